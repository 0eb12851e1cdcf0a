"""Medusa-1's heads (`specdec.medusa1`): each head its own output layer, initialised from the target's output-head rows
of the draft vocabulary, so that untrained they draft what the shared-output Medusa heads draft; trained with Medusa's
loss on the same data; greedy output is the target's own as a chain, a tree, batch rows and admitted rows; the
checkpoint round-trips and the spec language names it."""
import json, shutil
from pathlib import Path
import pytest, torch
from specdec import generate
from specdec.vocab import DraftVocab
from specdec.heads import MedusaHeads
from specdec.medusa1 import Medusa1Heads
from specdec.checkpoints import save_head, load_head
from specdec.train import new_head, train_head
from specdec.controllers import FixedK, AdaptiveK, DynamicK
from specdec.policies import RejectionSampling
from specdec.trees import TokenTree
from conftest import hf_greedy
from test_heads import own_records
from test_lossless_tiny import TEXTS
from test_slots import admitted_and_alone
from test_eagle3 import spec_language_builds

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "heads"


@pytest.fixture(scope="module")
def data(tiny):
    "The target's own answers to six prompts and a 200-id draft vocabulary of them."
    records = own_records(tiny, [tiny.encode(t) for t in TEXTS[:6]])
    vocab = DraftVocab.most_frequent([r["ids"] for r in records], 200, tiny.vocab_size, always=tiny.eos_token_ids)
    return records, vocab


@pytest.fixture(scope="module")
def trained(tiny, data):
    "Three Medusa-1 heads trained a few epochs (as test_heads trains Medusa's); their weights before, the target's."
    records, vocab = data
    head = new_head("medusa1", tiny, vocab, n=3, seed=0)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    target_before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    result = train_head(head, records, epochs=8, lr=1e-2, batch_size=3, seed=0, progress=False)
    return head, before, target_before, result


def _drafts(target, prompt, drafter) -> tuple[list, list]:
    "Each step's draft tokens and the output of a greedy generation."
    steps = []
    out = generate(target, prompt, drafter=drafter, controller=FixedK(3), max_new_tokens=24, eos_token_id=[],
                   on_step=lambda e: steps.append(e.draft_tokens))
    return steps, out.tokens[0].tolist()


def test_untrained_medusa1_heads_draft_what_the_shared_output_heads_draft(tiny, data):
    "Each head's output layer starts as the target's rows of the draft vocabulary: the same logits, the same drafts."
    vocab = data[1]
    shared, own = new_head("medusa", tiny, vocab, n=3, seed=0), new_head("medusa1", tiny, vocab, n=3, seed=0)
    assert type(own) is Medusa1Heads and own.head_type == "medusa1" and len(own.lm_heads) == 3
    rows = tiny.model.lm_head.weight[vocab.ids.long()]                               # [N, H]
    assert all(torch.equal(layer.weight, rows) and layer.bias is None for layer in own.lm_heads)
    features = torch.randn(2, 7, own.hidden_size, generator=torch.Generator().manual_seed(0))   # [B, T, H]
    with torch.inference_mode(): torch.testing.assert_close(own(features), shared(features), rtol=1e-5, atol=1e-5)
    prompt = tiny.encode(TEXTS[6])
    assert _drafts(tiny, prompt, own) == _drafts(tiny, prompt, shared)
    assert not any(name.startswith("lm_heads") for name in shared.state_dict())     # the shared head has none


def test_medusa1_trains_with_medusas_loss_on_the_same_data(tiny, data):
    "The same recipe: on the same first batch, untrained Medusa and Medusa-1 heads have the same loss and agreement."
    records, vocab = data
    first = {kind: train_head(new_head(kind, tiny, vocab, n=3, seed=0), records, batch_size=3, max_steps=1, seed=0,
                              progress=False) for kind in ("medusa", "medusa1")}
    assert first["medusa1"]["losses"] == pytest.approx(first["medusa"]["losses"], rel=1e-5)
    assert first["medusa1"]["agreement"] == first["medusa"]["agreement"] and len(first["medusa1"]["agreement"][0]) == 3


def test_training_moves_each_heads_own_output_layer_and_lowers_the_loss(tiny, trained):
    "Each head's output layer is trained (apart from the others'); the target, its output head included, is not."
    head, before, target_before, result = trained
    curve = result["losses"]
    assert sum(curve[-2:]) < 0.8 * sum(curve[:2]), curve
    now = head.state_dict()
    assert set(now) == {f"blocks.{i}.linear.{p}" for i in range(3) for p in ("weight", "bias")} | \
        {f"lm_heads.{i}.weight" for i in range(3)}
    assert all(not torch.equal(now[f"lm_heads.{i}.weight"], before[f"lm_heads.{i}.weight"]) for i in range(3))
    assert not torch.equal(head.lm_heads[0].weight, head.lm_heads[1].weight)        # each its own
    assert all(torch.equal(v, target_before[k]) for k, v in tiny.model.state_dict().items())


def test_greedy_with_medusa1_heads_equals_the_targets_greedy(tiny, trained):
    head, accepted, proposed = trained[0], 0, 0
    for text in TEXTS[:4]:
        prompt = tiny.encode(text)
        ref = hf_greedy(tiny, prompt, 30)
        for controller in (FixedK(1), FixedK(3), AdaptiveK(k_max=6), DynamicK(6, stop_below=0.3)):
            out = generate(tiny, prompt, drafter=head, controller=controller, max_new_tokens=30)
            assert torch.equal(out.tokens, ref), (text, controller)
            assert head.missing_features == 0
            accepted, proposed = accepted + out.stats.accepted, proposed + out.stats.proposed
        out = generate(tiny, prompt, drafter=head, policy=RejectionSampling(), max_new_tokens=30)
        assert torch.equal(out.tokens, ref), text
    assert 0 < accepted < proposed, (accepted, proposed)                # both the accept and the reject paths ran


def test_medusa1_heads_as_a_tree_are_lossless(tiny, trained):
    tree = TokenTree(trained[0], width=3, nodes=8)
    assert tree.name.startswith("medusa1-tree:3:8")
    accepted = 0
    for text in TEXTS[:3]:
        prompt = tiny.encode(text)
        out = generate(tiny, prompt, drafter=tree, controller=FixedK(3), max_new_tokens=30)
        assert torch.equal(out.tokens, hf_greedy(tiny, prompt, 30)), text
        accepted += out.stats.accepted
    assert accepted > 0


@pytest.mark.parametrize("compile", ["eager", "fixed"])
def test_a_batch_with_medusa1_heads_drafts_each_row_as_alone(tiny, trained, compile):
    "Three ragged prompts in one batch, as a chain and as a tree: each row as that prompt alone, none missing features."
    head = trained[0]
    prompts = [tiny.encode(TEXTS[i] + " again" * i)[0] for i in range(3)]          # ids [S_b], ragged
    for drafter in (head, TokenTree(head, width=2, nodes=5)):
        run = lambda ps: generate(tiny, ps, drafter=drafter, controller=FixedK(3), max_new_tokens=24, eos_token_id=[],
                                  compile=compile)
        alone = [run(p) for p in prompts]
        out = run(prompts)
        assert all(torch.equal(a.tokens[0], t) for a, t in zip(alone, out.tokens)), drafter.name
        assert all(torch.equal(a.tokens, hf_greedy(tiny, p[None], 24, eos_token_id=[])) for a, p in zip(alone, prompts))
        assert [a.stats.accepted for a in alone] == [rs.accepted for rs in out.row_stats], drafter.name
        assert out.stats.accepted > 0 and head.missing_features == 0, drafter.name


def test_a_prompt_admitted_next_to_a_running_row_decodes_its_batch_1_output(tiny, trained):
    "Rows as slots (admit/release) with Medusa-1 heads: every output equals its prompt's batch-1 greedy output."
    outputs, alone = admitted_and_alone(tiny, trained[0])
    assert outputs == alone


def test_a_medusa1_checkpoint_round_trips_and_drafts_the_same(tiny, trained, tmp_path):
    head = trained[0]
    save_head(head, tmp_path / "m1")
    config = json.loads((tmp_path / "m1" / "config.json").read_text())
    assert config["head_type"] == "medusa1" and config["num_heads"] == 3
    loaded = load_head(tmp_path / "m1", tiny, dtype="float32")
    assert type(loaded) is Medusa1Heads and loaded.n == 3 and loaded.draft_vocab == head.draft_vocab
    assert list(loaded.state_dict()) == list(head.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), loaded.state_dict().values()))
    prompt = tiny.encode(TEXTS[1])
    steps, tokens = _drafts(tiny, prompt, loaded)
    assert (steps, tokens) == _drafts(tiny, prompt, head) and any(len(s) for s in steps)
    half = load_head(tmp_path / "m1", tiny)                                  # "auto": float16 on the CPU
    assert half.dtype == torch.float16 and half.lm_heads[0].weight.dtype == torch.float16
    out = generate(tiny, prompt, drafter=half, controller=FixedK(3), max_new_tokens=30)
    assert torch.equal(out.tokens, hf_greedy(tiny, prompt, 30)) and out.stats.accepted > 0
    with pytest.raises(ValueError, match="holds a medusa1 head, not a medusa head"):
        load_head(tmp_path / "m1", tiny, "medusa")
    old = load_head(FIXTURES / "medusa-tiny", tiny)                          # a shared-output checkpoint still loads
    assert type(old) is MedusaHeads and not hasattr(old, "lm_heads")


def test_bad_medusa1_input_names_the_problem(tiny, trained, tmp_path):
    head = trained[0]
    # a shared-output checkpoint relabelled medusa1 lacks the output layers; a count of heads that does not fit
    relabelled = Path(shutil.copytree(FIXTURES / "medusa-tiny", tmp_path / "relabelled"))
    config = json.loads((relabelled / "config.json").read_text())
    (relabelled / "config.json").write_text(json.dumps(config | {"head_type": "medusa1"}))
    with pytest.raises(ValueError, match="(?s)weights do not fit a medusa1 head: .*Missing key.*lm_heads.0.weight"):
        load_head(relabelled, tiny)
    save_head(head, tmp_path / "m1")
    config = json.loads((tmp_path / "m1" / "config.json").read_text())
    (tmp_path / "m1" / "config.json").write_text(json.dumps(config | {"num_heads": 2}))
    with pytest.raises(ValueError, match="weights do not fit a medusa1 head"): load_head(tmp_path / "m1", tiny)
    with pytest.raises(ValueError, match="MedusaHeads needs n >= 1 heads, got 0"): Medusa1Heads(tiny, 0)
    with pytest.raises(ValueError, match="unknown head type 'medusa2': use eagle, medusa, .*medusa1"):
        new_head("medusa2", tiny)
    prompt = tiny.encode(TEXTS[1])
    head.prompt_vocab = True                           # its output layers hold the draft vocabulary's rows only
    try:
        with pytest.raises(ValueError, match="output layers over its draft vocabulary only: no prompt_vocab"):
            generate(tiny, prompt, drafter=head, controller=FixedK(3), max_new_tokens=5)
    finally: head.prompt_vocab, head.run_vocab = False, None
    with pytest.raises(ValueError, match="no prompt_vocab"):
        train_head(new_head("medusa1", tiny, head.draft_vocab, seed=0), own_records(tiny, [prompt], 8), max_steps=1,
                   prompt_vocab=True, progress=False)
    reduced = head.draft_vocab
    head.draft_vocab = DraftVocab.full(tiny.vocab_size)        # a vocabulary its output layers were not built for
    try:
        with pytest.raises(ValueError, match=f"output layer 0 has {len(reduced)} rows but the draft vocabulary 512"):
            generate(tiny, prompt, drafter=head, controller=FixedK(3), max_new_tokens=5)
    finally: head.draft_vocab = reduced
    assert torch.equal(generate(tiny, prompt, drafter=head, max_new_tokens=8).tokens, hf_greedy(tiny, prompt, 8))


def test_the_spec_language_names_medusa1_heads(tiny, trained, tmp_path):
    """`medusa1:PATH` and `medusa1-tree:W:N:PATH` build the saved heads (greedy output the target's own); none ships; a
    `medusa` spec does not load them; a bad tree width is named."""
    from specdec import specs
    path = spec_language_builds(tiny, trained[0], tmp_path)
    with pytest.raises(ValueError, match="holds a medusa1 head, not a medusa head"):
        specs.make_drafter(f"medusa:{path}", tiny)
    with pytest.raises(ValueError, match=r"medusa1-tree needs an integer tree width, e\.g\. medusa1-tree:4:10"):
        specs.validate("drafter", "medusa1-tree:x")


def test_the_training_notebook_trains_medusa1_heads(tiny, tmp_path):
    "nbs/bench/train_head.ipynb with head_type medusa1 on the tiny model: a checkpoint the registry loads."
    import papermill as pm
    from specdec.specs import make_drafter
    root = Path(__file__).resolve().parents[1]
    params = {"target": "tiny-llama", "head_type": "medusa1", "medusa_heads": 2, "n_batches": 1, "batch_size": 2,
              "max_prompt_tokens": 6, "max_new_tokens": 8, "styles": "open", "epochs": 1, "draft_vocab_size": 64,
              "out_dir": str(tmp_path / "run"), "tau_prompts": 2, "tau_ks": "1,2", "tau_new_tokens": 6,
              "draft_cost_iterations": 1}
    pm.execute_notebook(str(root / "nbs/bench/train_head.ipynb"), str(tmp_path / "executed.ipynb"), parameters=params,
                        kernel_name="python3", cwd=str(tmp_path), progress_bar=False)
    metrics = json.loads((tmp_path / "run" / "medusa1" / "report.json").read_text())["metrics"]
    assert metrics["steps"] >= 1 and len(metrics["agreement"][0]) == 2
    assert set(metrics["tau_heldout"]["by_k"]) == {"1", "2"}
    assert {row["draft vocabulary"].split()[0] for row in metrics["draft_cost_effect"]} == {"reduced"}
    head = make_drafter(f"medusa1:{tmp_path / 'run' / 'medusa1'}", tiny)
    assert type(head) is Medusa1Heads and head.n == 2 and len(head.lm_heads[0].weight) == len(head.draft_vocab) <= 64
