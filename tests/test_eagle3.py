"""The EAGLE-3 head in the reference layout (`specdec.eagle3`): trained with the training-time test (7 steps), it drafts
in the one loop as a chain, as a tree and for batch rows, losslessly; its checkpoint round-trips; drafting computes
what training unrolled."""
import pytest, torch
from specdec import generate
from specdec.models import tiny_llama
from specdec.vocab import DraftVocab
from specdec.eagle3 import Eagle3Head, reference_layers, export_head
from specdec.heads import EagleHead, eagle3_layers
from specdec.checkpoints import save_head, load_head
from specdec.distill import record_features
from specdec.train import new_head, train_head, add_eagle_layers
from specdec.controllers import FixedK
from specdec.trees import TokenTree
from conftest import hf_greedy
from test_heads import own_records
from test_lossless_tiny import TEXTS
from test_slots import admitted_and_alone


@pytest.fixture(scope="module")
def trained(tiny):
    "An eagle3 head trained a few epochs on tiny-llama's own answers (7 training-time-test steps, the default)."
    records = own_records(tiny, [tiny.encode(t) for t in TEXTS[:6]])
    vocab = DraftVocab.most_frequent([r["ids"] for r in records], 200, tiny.vocab_size, always=tiny.eos_token_ids)
    head = new_head("eagle3", tiny, vocab, seed=0)
    result = train_head(head, records, epochs=8, lr=1e-2, batch_size=3, seed=0, progress=False)
    return head, records, result


def test_training_unrolls_seven_steps_and_lowers_the_loss(trained):
    head, _, result = trained
    assert isinstance(head, Eagle3Head) and result["ttt_steps"] == 7 and len(result["agreement"][0]) == 7
    curve = result["losses"]
    assert sum(curve[-2:]) < 0.8 * sum(curve[:2]), curve


def test_the_reference_layers_are_the_engines_default_inputs():
    "vLLM/SGLang read the inputs of layers (2, L//2, L-3): the outputs of (1, L//2-1, L-4), one before EagleHead's."
    assert reference_layers(30) == (1, 14, 26) and eagle3_layers(30) == (2, 15, 27)
    assert reference_layers(32) == tuple(i - 1 for i in (2, 16, 29))


def test_a_new_eagle3_head_has_the_reference_names(tiny):
    head = new_head("eagle3", tiny, seed=0)
    names = set(head.state_dict())
    H, L = tiny.config.hidden_size, len(head.target_layers)
    assert {"fc.weight", "norm.weight", "lm_head.weight", "midlayer.input_layernorm.weight",
            "midlayer.hidden_norm.weight", "midlayer.self_attn.q_proj.weight", "midlayer.self_attn.o_proj.weight",
            "midlayer.post_attention_layernorm.weight", "midlayer.mlp.gate_proj.weight",
            "midlayer.mlp.down_proj.weight"} <= names
    assert not any(n.startswith(("fuse", "q_proj", "more_layers")) for n in names)
    assert head.fc.weight.shape == (H, L * H) and head.fc.bias is None
    assert head.midlayer.self_attn.q_proj.weight.shape[1] == 2 * H
    with pytest.raises(ValueError, match="one decoder layer"): new_head("eagle3", tiny, num_layers=2)
    with pytest.raises(ValueError, match="only an EAGLE head takes more layers"): add_eagle_layers(head, 2)


@pytest.mark.parametrize("k", [1, 4])
def test_greedy_with_the_eagle3_head_equals_the_targets_greedy(tiny, trained, k):
    head, accepted = trained[0], 0
    for text in TEXTS[6:9]:
        prompt = tiny.encode(text)
        out = generate(tiny, prompt, drafter=head, controller=FixedK(k), max_new_tokens=30)
        assert torch.equal(out.tokens, hf_greedy(tiny, prompt, 30)), (text, k)
        assert head.missing_features == 0
        accepted += out.stats.accepted
    assert accepted > 0


def test_the_eagle3_head_as_a_tree_is_lossless(tiny, trained):
    tree = TokenTree(trained[0], width=3, nodes=12)
    for text in TEXTS[:2]:                                                # prompts it trained on: drafts accepted
        prompt = tiny.encode(text)
        out = generate(tiny, prompt, drafter=tree, controller=FixedK(4), max_new_tokens=30)
        assert torch.equal(out.tokens, hf_greedy(tiny, prompt, 30)), text
        assert out.stats.accepted > 0


@pytest.mark.parametrize("compile", ["eager", "fixed"])
def test_a_batch_with_the_eagle3_head_drafts_each_row_as_alone(tiny, trained, compile):
    "Three ragged prompts in one batch, eager and at fixed shapes: each row as that prompt alone, none missing features."
    head = trained[0]
    prompts = [tiny.encode(TEXTS[i] + " again" * i)[0] for i in range(3)]
    run = lambda ps: generate(tiny, ps, drafter=head, controller=FixedK(3), max_new_tokens=24, eos_token_id=[],
                              compile=compile)
    alone = [run(p) for p in prompts]
    out = run(prompts)
    assert all(torch.equal(a.tokens[0], t) for a, t in zip(alone, out.tokens))
    assert [a.stats.accepted for a in alone] == [rs.accepted for rs in out.row_stats]
    assert out.stats.accepted > 0 and head.missing_features == 0


def test_a_prompt_admitted_next_to_a_running_row_decodes_its_batch_1_output(tiny, trained):
    "Rows as slots (admit/release) with the eagle3 head: every output equals its prompt's batch-1 greedy output."
    outputs, alone = admitted_and_alone(tiny, trained[0])
    assert outputs == alone


def test_drafting_computes_what_training_unrolled(tiny, trained):
    "Step j of the training-time test at position t equals drafting's j-th fed-back step (teacher-forced tokens)."
    head = trained[0]
    prompt = tiny.encode(TEXTS[0])
    S = prompt.shape[1]
    layers = sorted(set(head.target_layers))
    recorded = record_features(tiny, [{"ids": prompt[0].tolist(), "answer_start": 1}], layers)[0]
    features = recorded["hidden"][None, :, [layers.index(i) for i in head.target_layers]].flatten(2).float()
    with torch.inference_mode():
        unrolled = head.unroll(prompt[:, 1:], features, steps=3)
        t = S // 2
        head._reset(1, S + 4)
        out = head(prompt[:, 1:t + 2], head.fused(features[:, :t + 1]), 0, head.cache)[:, -1:]
        torch.testing.assert_close(out[0, 0], unrolled[0][0, t], rtol=1e-4, atol=1e-4)
        for j in (1, 2):
            out = head(prompt[:, t + j + 1:t + j + 2], out, t + j, head.cache)
            torch.testing.assert_close(out[0, 0], unrolled[j][0, t + j], rtol=1e-4, atol=1e-4)


def test_an_eagle3_checkpoint_round_trips_and_an_old_one_still_loads(tiny, trained, tmp_path):
    head = trained[0]
    save_head(head, tmp_path / "e3")
    loaded = load_head(tmp_path / "e3", tiny, dtype="float32")
    assert type(loaded) is Eagle3Head and loaded.target_layers == head.target_layers
    for (n, a), (m, b) in zip(head.state_dict().items(), loaded.state_dict().items()):
        assert n == m and torch.equal(a, b)
    with pytest.raises(ValueError, match="holds a eagle3 head, not a eagle head"):
        load_head(tmp_path / "e3", tiny, "eagle")
    old = new_head("eagle", tiny, seed=0)
    save_head(old, tmp_path / "old")
    assert type(load_head(tmp_path / "old", tiny, dtype="float32")) is EagleHead


def test_the_exported_trained_head_drafts_as_ours(tiny, trained, tmp_path):
    "Export parity on trained weights (tiny-llama; no trained eagle3 head ships yet), its chain of drafts not constant."
    from test_eagle3_export import parity, TOL
    head = trained[0]
    folder = export_head(head, tmp_path / "vllm", "vllm")
    diff, drafts, ref_drafts, _ = parity(tiny, head, folder, tiny.encode(TEXTS[1]), k=5)
    assert diff <= TOL, diff
    assert drafts == ref_drafts and len(set(drafts)) > 1, (drafts, ref_drafts)


def test_a_float16_eagle3_head_stays_lossless_and_a_prompt_vocabulary_is_refused(tiny, trained, tmp_path):
    head, records, _ = trained
    save_head(head, tmp_path / "e3")
    half = load_head(tmp_path / "e3", tiny)                                # "auto": float16 on the CPU
    assert half.dtype == torch.float16
    prompt = tiny.encode(TEXTS[1])
    out = generate(tiny, prompt, drafter=half, controller=FixedK(4), max_new_tokens=30)
    assert torch.equal(out.tokens, hf_greedy(tiny, prompt, 30)) and out.stats.accepted > 0
    half.prompt_vocab = True                    # its lm_head has the draft vocabulary's rows only
    with pytest.raises(ValueError, match="own lm_head over its draft vocabulary: no prompt_vocab"):
        generate(tiny, prompt, drafter=half, controller=FixedK(4), max_new_tokens=5)


def spec_language_builds(tiny, head, tmp_path):
    """`KIND:PATH` and `KIND-tree:2:6:PATH` build the saved `head` (its own class; their specs round-trip; greedy output
    the target's own); no head of its kind ships."""
    from specdec import specs
    kind, cls, path = head.head_type, type(head), tmp_path / head.head_type
    save_head(head, path)
    chain, tree = (specs.make_drafter(s, tiny) for s in (f"{kind}:{path}", f"{kind}-tree:2:6:{path}"))
    assert type(chain) is cls and type(tree) is TokenTree and type(tree.head) is cls
    assert specs.spec_of(chain) == f"{kind}:{path}" and specs.spec_of(tree) == f"{kind}-tree:2:6:{path}"
    prompt = tiny.encode("abc abc abc")
    plain = generate(tiny, prompt, max_new_tokens=16, eos_token_id=[]).tokens
    assert all(torch.equal(generate(tiny, prompt, drafter=d, max_new_tokens=16, eos_token_id=[]).tokens, plain)
               for d in (chain, tree))
    with pytest.raises(ValueError, match=f"no {kind} head ships for target"): specs.make_drafter(kind, tiny)
    return path


def test_the_spec_language_names_an_eagle3_head(tiny, trained, tmp_path):
    "`eagle3:PATH` and `eagle3-tree:W:N:PATH` build the saved head (greedy output the target's own); no head ships."
    spec_language_builds(tiny, trained[0], tmp_path)
