"""EAGLE and Medusa heads, trained a few steps inside the test on tiny models: greedy output equals the target's own,
and rejection sampling with a head keeps the target's distribution (the chi-square setup of test_distribution)."""
import pytest, torch
from specdec import generate
from specdec.models import tiny_llama
from types import SimpleNamespace
from specdec.vocab import DraftVocab
from specdec.heads import EagleHead, MedusaHeads, HALF_ROWS, _linear
from specdec.checkpoints import save_head, load_head, head_dtype
from specdec.drafters import Draft, Fallback, PromptLookup, _merge
from specdec.distill import record_features, feature_layers
from specdec.train import new_head, train_head, add_eagle_layers
from specdec.controllers import FixedK, AdaptiveK, DynamicK
from specdec.policies import RejectionSampling
from specdec.sampling import SamplingConfig, logits_to_probs
from conftest import hf_greedy
from test_lossless_tiny import TEXTS
from test_distribution import V, ResampleFromTarget, _chi2_pvalue, _tables


def own_records(target, prompts, max_new_tokens=40):
    "Training records from the target's own greedy answers to `prompts` ([1, S] id tensors)."
    records = []
    for prompt in prompts:
        out = hf_greedy(target, prompt, max_new_tokens)
        records.append({"ids": prompt[0].tolist() + out[0].tolist(), "answer_start": prompt.shape[1]})
    return records


@pytest.fixture(scope="module")
def heads(tiny):
    "Both heads trained for a few steps on the target's own answers, over a reduced draft vocabulary."
    records = own_records(tiny, [tiny.encode(t) for t in TEXTS[:6]])
    vocab = DraftVocab.most_frequent([r["ids"] for r in records], 200, tiny.vocab_size, always=tiny.eos_token_ids)
    out = {}
    for kind in ("eagle", "medusa", "eagle2"):                             # eagle2: a 2-layer EAGLE head
        head = new_head(kind.rstrip("2"), tiny, vocab, n=3, seed=0, num_layers=2 if kind == "eagle2" else 1)
        curve = train_head(head, records, epochs=8, lr=1e-2, batch_size=3, seed=0, progress=False)["losses"]
        assert sum(curve[-2:]) < sum(curve[:2]), (kind, curve)          # the last epoch's loss below the first's
        out[kind] = head
    return out


@pytest.mark.parametrize("kind", ["eagle", "medusa", "eagle2"])
def test_greedy_with_a_head_equals_the_targets_greedy(tiny, heads, kind):
    head = heads[kind]
    accepted = proposed = 0
    for text in TEXTS[:8]:
        prompt = tiny.encode(text)
        ref = hf_greedy(tiny, prompt, 40)
        for controller in (FixedK(1), FixedK(4), AdaptiveK(k_max=6), DynamicK(6, stop_below=0.3)):
            out = generate(tiny, prompt, drafter=head, controller=controller, max_new_tokens=40)
            assert torch.equal(out.tokens, ref), (kind, text, controller)
            assert head.missing_features == 0                     # it drafted from the target's own features every step
            accepted, proposed = accepted + out.stats.accepted, proposed + out.stats.proposed
        out = generate(tiny, prompt, drafter=head, policy=RejectionSampling(), max_new_tokens=40)
        assert torch.equal(out.tokens, ref), (kind, text)
    assert 0 < accepted < proposed, (kind, accepted, proposed)        # both the accept and the reject paths ran


@pytest.mark.parametrize("kind", ["eagle", "medusa"])
def test_a_half_precision_head_on_a_float32_target_stays_lossless(tiny, heads, kind, tmp_path):
    "Loaded with dtype auto, a head computes in float16 on a float32 target (weights, cache, draft rows): output still equals HF greedy."
    half = load_head(save_head(heads[kind], tmp_path / kind), tiny)
    assert half.dtype == torch.float16 and half.draft_weight().dtype == torch.float16
    assert half.use_engine("eager") == {"mode": "eager", "dtype": "float16", "draft_vocab": len(half.draft_vocab),
                                        "prompt_vocab": False}                    # what a benchmark records
    accepted = 0
    for text in TEXTS[:4]:
        prompt = tiny.encode(text)
        out = generate(tiny, prompt, drafter=half, controller=FixedK(3), max_new_tokens=40)
        assert torch.equal(out.tokens, hf_greedy(tiny, prompt, 40)), (kind, text)
        accepted += out.stats.accepted
    assert accepted > 0 and half.missing_features == 0
    if kind == "eagle":
        assert half.cache.keys.dtype == torch.float32                  # a float16 head attends in float32 on the CPU (`cache_dtype`)
        drafts = {}                                                    # and its fixed-shape forwards write that cache as the eager ones do
        for mode in ("eager", "fixed"):
            out = generate(tiny, prompt, drafter=half, controller=FixedK(3), max_new_tokens=20, compile=mode,
                           on_step=lambda e, mode=mode: drafts.setdefault(mode, []).append(e.draft_tokens))
            assert torch.equal(out.tokens, hf_greedy(tiny, prompt, 20)), mode
        same = sum(a == b for a, b in zip(drafts["fixed"], drafts["eager"]))   # float16 outputs: a near-tie may round apart
        assert len(drafts["fixed"]) == len(drafts["eager"]) and same >= 0.9 * len(drafts["eager"]), drafts


def test_a_bfloat16_head_on_the_cpu_attends_over_a_float32_cache(tiny, heads, tmp_path):
    "The same for bfloat16 (a bfloat16 target's head on the CPU): a float32 cache, bfloat16 outputs, output equal to HF greedy."
    head = load_head(save_head(heads["eagle"], tmp_path / "eagle"), tiny, dtype="bfloat16")
    prompt = tiny.encode(TEXTS[1])
    out = generate(tiny, prompt, drafter=head, controller=FixedK(3), max_new_tokens=30)
    assert torch.equal(out.tokens, hf_greedy(tiny, prompt, 30)) and out.stats.accepted > 0
    assert head.dtype == torch.bfloat16 and head.cache.keys.dtype == torch.float32

def test_a_heads_cache_dtype():
    "Its own dtype, except float32 for a half-precision head on the CPU (the CPU's float16 and bfloat16 attention is slow)."
    from specdec.net import cache_dtype
    assert cache_dtype(torch.float16, "cpu") == torch.float32 == cache_dtype(torch.float32, "cpu") == cache_dtype(torch.bfloat16, "cpu")
    assert cache_dtype(torch.float16, "cuda") == torch.float16 == cache_dtype(torch.float16, torch.device("cuda", 0))
    assert cache_dtype(torch.bfloat16, "cuda") == torch.bfloat16


def test_a_float16_product_over_many_rows_runs_in_float32():
    "Few rows: the float16 layer itself; more than HALF_ROWS (a prompt's catch-up): float32 over the float16 weights, cast back."
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(24, 40).half()
    for rows in (1, HALF_ROWS, HALF_ROWS + 1, 300):
        x = torch.randn(2, rows, 24, generator=g).half()
        got = _linear(layer, x)
        assert got.dtype == torch.float16 and got.shape == (2, rows, 40)
        exact = torch.nn.functional.linear(x.float(), layer.weight.float(), layer.bias.float())
        torch.testing.assert_close(got.float(), exact, rtol=2e-3, atol=2e-3)
        if 2 * rows > HALF_ROWS: assert torch.equal(got, exact.half())       # rounded once, from float32
        else: assert torch.equal(got, layer(x))


def test_head_dtype():
    "auto: a half-precision GPU target's own dtype, else float16 (on the CPU, float16 drafts faster than bfloat16); names and torch dtypes pass through; anything else is refused."
    target = lambda dtype, device="cpu": SimpleNamespace(dtype=dtype, device=torch.device(device))
    assert head_dtype(target(torch.float32)) == torch.float16 == head_dtype(target(torch.bfloat16)) == head_dtype(target(torch.float32, "cuda"))
    assert head_dtype(target(torch.bfloat16, "cuda")) == torch.bfloat16 and head_dtype(target(torch.float16, "cuda")) == torch.float16
    assert head_dtype(target(torch.float32), "float32") == torch.float32 == head_dtype(target(torch.bfloat16), torch.float32)
    for bad in ("int8", "fp16", torch.int32, None):
        with pytest.raises(ValueError, match="head dtype must be auto, float32, float16 or bfloat16, got"): head_dtype(target(torch.float32), bad)


@pytest.mark.parametrize("kind", ["eagle", "medusa"])
def test_prompt_lookup_falling_back_to_a_head_is_lossless(tiny, heads, kind):
    """pld+head: greedy and rejection-sampled (at temperature 0) output equal the target's; both drafters draft; the head
    never misses features, and is asked to draft only on the steps prompt lookup did not cover (on the host, or on the
    device: one row reads whether the device drafted)."""
    head, asked = heads[kind], []
    propose = head.propose
    head.propose = lambda *args, **kw: (asked.append(1), propose(*args, **kw))[1]   # counts the head's proposals
    try:
        for on_device in (False, True):
            drafter, used = Fallback([PromptLookup(2, 1, on_device=on_device), head]), [0, 0]
            for text in TEXTS[:6]:
                prompt = tiny.encode(text)
                ref = hf_greedy(tiny, prompt, 40)
                asked.clear(); steps = []
                out = generate(tiny, prompt, drafter=drafter, controller=FixedK(3), max_new_tokens=40,
                               on_step=lambda e: steps.append(e.proposed))
                assert torch.equal(out.tokens, ref), (kind, on_device, text)
                assert head.missing_features == 0 and out.stats.accepted > 0
                drafting = sum(p > 0 for p in steps)                          # steps that drafted (K > 0)
                assert len(asked) == drafting - drafter.usage[0]["steps"], (kind, on_device, text)
                used = [u + x["steps"] for u, x in zip(used, drafter.usage)]
                out = generate(tiny, prompt, drafter=drafter, policy=RejectionSampling(), controller=FixedK(2),
                               max_new_tokens=40)
                assert torch.equal(out.tokens, ref), (kind, on_device, text)
            assert used[0] > 0 and used[1] > 0, (on_device, used)
    finally: del head.propose


@pytest.mark.parametrize("kind", ["eagle", "medusa", "eagle2"])
def test_a_batch_with_a_head_drafts_each_row_as_alone(tiny, heads, kind):
    """Three prompts of different lengths in one batch, eager and over the fixed-shape engine, alone and behind prompt
    lookup: each row's tokens, and what its drafts got accepted, equal that prompt run by itself; the head drafts every
    row from that row's own features (none missing)."""
    head = heads[kind]
    prompts = [tiny.encode(TEXTS[i] + " again" * i)[0] for i in range(3)]         # ids [S_b], ragged
    for make in (lambda: head, lambda: Fallback([PromptLookup(3, 2), head])):
        for compile in ("eager", "fixed"):
            run = lambda ps: generate(tiny, ps, drafter=make(), controller=FixedK(3), max_new_tokens=24,
                                      eos_token_id=[], compile=compile)
            alone = [run(p) for p in prompts]
            out = run(prompts)
            assert all(torch.equal(a.tokens[0], t) for a, t in zip(alone, out.tokens)), (kind, compile)
            assert [a.stats.accepted for a in alone] == [rs.accepted for rs in out.row_stats], (kind, compile)
            assert out.stats.accepted > 0 and head.missing_features == 0, (kind, compile)


def test_fallback_merges_drafts_per_row_on_the_device():
    "Rows where the first drafter found nothing (n_valid 0) take the second's draft and distribution; the others keep the first's, one-hot."
    first = Draft(torch.tensor([[4, 5, 0], [0, 0, 0]]), n_valid=torch.tensor([2, 0]))         # prompt lookup: row 1 found nothing
    probs = torch.softmax(torch.randn(2, 2, 8, generator=torch.Generator().manual_seed(0)), -1)
    second = Draft(torch.tensor([[1, 2], [3, 6]]), probs)                                       # a head: K=2, every row
    merged = _merge(first, second)
    assert merged.tokens.tolist() == [[4, 5, 0], [3, 6, 0]] and merged.n_valid.tolist() == [2, 2]
    torch.testing.assert_close(merged.probs[0, :2], torch.nn.functional.one_hot(torch.tensor([4, 5]), 8).float())
    torch.testing.assert_close(merged.probs[1, :2], probs[1])


@pytest.mark.parametrize("eagle_kind", ["eagle", "eagle2"])
def test_drafting_computes_what_training_unrolled(tiny, heads, eagle_kind):
    """EAGLE's training-time test at step j and position t equals drafting's j-th fed-back step after the committed pairs
    0..t-j (teacher-forced with the true tokens), with one layer or two; Medusa's first draft is head 0 at the last known position."""
    prompt = tiny.encode(TEXTS[0])                                        # [1, S]
    S = prompt.shape[1]
    eagle, medusa = heads[eagle_kind], heads["medusa"]
    recorded = record_features(tiny, [{"ids": prompt[0].tolist(), "answer_start": 1}], feature_layers(tiny.num_layers))[0]
    layers = list(feature_layers(tiny.num_layers))
    features = recorded["hidden"][None, :, [layers.index(i) for i in eagle.target_layers]].flatten(2).float()   # [1, S-1, F]
    with torch.inference_mode():                                          # as generate: the head's cache is an inference tensor
        unrolled = eagle.unroll(prompt[:, 1:], features, steps=3)        # [3] x [1, S-1, H]
        for t in (3, S // 2, S - 5):
            eagle._reset(1, S + 4)
            out = eagle(prompt[:, 1:t + 2], eagle.fused(features[:, :t + 1]), 0, eagle.cache)[:, -1:]   # committed pairs 0..t
            torch.testing.assert_close(out[0, 0], unrolled[0][0, t], rtol=1e-4, atol=1e-4)
            for j in (1, 2):                                               # its own output fed back, the true next token
                out = eagle(prompt[:, t + j + 1:t + j + 2], out, t + j, eagle.cache)
                torch.testing.assert_close(out[0, 0], unrolled[j][0, t + j], rtol=1e-4, atol=1e-4)
        eagle_first = eagle.logits(unrolled[0][0, S - 2]).argmax()       # drafts token S from the pair at S-2
        medusa_first = medusa(recorded["hidden"][None, :, -1].float())[0, 0, S - 2].argmax()   # head 0 at S-2
    drafts = {}
    for name, head in (("eagle", eagle), ("medusa", medusa)):
        generate(tiny, prompt, drafter=head, controller=FixedK(2), max_new_tokens=3,
                 on_step=lambda e, name=name: drafts.setdefault(name, e.draft_tokens))
    assert drafts["eagle"][0] == eagle.draft_vocab.ids[eagle_first].item()
    assert drafts["medusa"][0] == medusa.draft_vocab.ids[medusa_first].item()


def test_heads_draft_only_from_the_draft_vocabulary(tiny, heads):
    "Draft tokens are full ids inside the draft vocabulary; their distributions are zero outside it."
    prompt = tiny.encode(TEXTS[0])
    for head in heads.values():
        drafts = []
        generate(tiny, prompt, drafter=head, controller=FixedK(3), max_new_tokens=20, temperature=0.9, seed=1,
                 on_step=lambda e: drafts.extend(e.draft_tokens))
        allowed = set(head.draft_vocab.ids.tolist())
        assert drafts and set(drafts) <= allowed
    medusa = heads["medusa"]
    prefill = tiny.net(prompt[:, :4], tiny.net.new_cache(1, 8), logits="none", keep=medusa.target_layers)
    medusa.start(tiny, prompt[:, :5], 64, prefill.features)             # the features of the first 4 positions
    draft = medusa.propose(prompt[:, :5], 3, SamplingConfig(0.9), torch.Generator().manual_seed(0))
    outside = torch.ones(tiny.vocab_size, dtype=torch.bool); outside[medusa.draft_vocab.ids] = False
    assert draft.k == 3 and draft.probs[..., outside].abs().sum() == 0
    torch.testing.assert_close(draft.probs.sum(-1), torch.ones(1, 3))


@pytest.fixture(scope="module")
def small_vocab_target():
    "test_distribution's V=16 target."
    return tiny_llama(vocab_size=V, hidden_size=32, num_layers=2, intermediate_size=64, seed=3, init_std=0.3)


def _head_pairs(target, head, prompt, sampling, policy, runs):
    "The first two tokens of `runs` seeded 3-token generations drafted by `head` with FixedK(2)."
    cells, k2_steps = [], 0
    for seed in range(runs):
        out = generate(target, prompt, drafter=head, policy=policy, controller=FixedK(2), max_new_tokens=3,
                       temperature=sampling.temperature, top_p=sampling.top_p, seed=seed, eos_token_id=[])
        cells.append(out.tokens[0, 0] * V + out.tokens[0, 1])
        k2_steps += out.stats.proposed_by_position[1] if len(out.stats.proposed_by_position) > 1 else 0
    return torch.stack(cells), k2_steps


@pytest.fixture
def one_thread():
    "Thousands of tiny forwards run faster on one thread."
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("kind", ["eagle", "medusa"])
def test_rejection_sampling_with_a_head_keeps_the_target_distribution(small_vocab_target, kind, one_thread):
    target = small_vocab_target
    g = torch.Generator().manual_seed(0)
    records = [{"ids": torch.randint(0, V, (24,), generator=g).tolist(), "answer_start": 1} for _ in range(8)]
    head = new_head(kind, target, DraftVocab(list(range(0, V, 2)) + [1, 3], V), n=2, seed=0)   # 10 of the 16 ids
    train_head(head, records, epochs=1, lr=1e-3, batch_size=4, seed=0, progress=False)
    sampling, prompt, runs = SamplingConfig(0.7, top_p=0.9), torch.tensor([[1, 5, 7]]), 2000
    t1, t2, *_ = _tables(target, target, prompt)
    joint = logits_to_probs(t1, sampling)[:, None] * logits_to_probs(t2, sampling)      # [V, V] the target's law
    cells, k2_steps = _head_pairs(target, head, prompt, sampling, RejectionSampling(), runs)
    assert k2_steps == runs and head.missing_features == 0
    assert _chi2_pvalue(cells, joint) > 1e-3
    if kind == "eagle":                                                   # the same test rejects a wrong rule (once: time)
        wrong, _ = _head_pairs(target, head, prompt, sampling, ResampleFromTarget(), 4000)
        assert _chi2_pvalue(wrong, joint) < 1e-4                          # far below the 1e-3 the right rule must pass


def test_rejection_sampling_with_prompt_lookup_falling_back_to_a_head_keeps_the_target_distribution(small_vocab_target, one_thread):
    "Steps drafted by prompt lookup (one-hot) and by the head mix within a generation; the pair law stays the target's."
    target = small_vocab_target
    g = torch.Generator().manual_seed(0)
    records = [{"ids": torch.randint(0, V, (24,), generator=g).tolist(), "answer_start": 1} for _ in range(8)]
    head = new_head("eagle", target, DraftVocab(list(range(0, V, 2)) + [1, 3], V), seed=0)
    train_head(head, records, epochs=1, lr=1e-3, batch_size=4, seed=0, progress=False)
    drafter, used = Fallback([PromptLookup(1, 1), head]), [0, 0]
    sampling, prompt, runs, cells = SamplingConfig(0.7, top_p=0.9), torch.tensor([[1, 5, 7]]), 2000, []
    for seed in range(runs):
        out = generate(target, prompt, drafter=drafter, policy=RejectionSampling(), controller=FixedK(2), max_new_tokens=3,
                       temperature=sampling.temperature, top_p=sampling.top_p, seed=seed, eos_token_id=[])
        cells.append(out.tokens[0, 0] * V + out.tokens[0, 1])
        used = [u + x["steps"] for u, x in zip(used, drafter.usage)]
    t1, t2, *_ = _tables(target, target, prompt)
    joint = logits_to_probs(t1, sampling)[:, None] * logits_to_probs(t2, sampling)      # [V, V] the target's law
    assert used[0] > 0 and used[1] >= runs and head.missing_features == 0, used
    assert _chi2_pvalue(torch.stack(cells), joint) > 1e-3


@pytest.mark.parametrize("kind", ["eagle", "medusa"])
def test_the_shipped_heads_are_lossless_on_the_default_model(smol, kind):
    "`eagle` / `medusa` with no path load the heads shipped for SmolLM2-135M: float32 greedy output equals HF's, drafts are accepted."
    from specdec.specs import make_drafter, spec_of
    from specdec.prompts import builtin_prompts
    head = make_drafter(kind, smol)
    assert spec_of(head) == kind and head.missing_features == 0
    accepted = 0
    for prompt in builtin_prompts()[:3]:
        ids = prompt.encode(smol)
        out = generate(smol, ids, drafter=head, controller=FixedK(3), max_new_tokens=32)
        assert torch.equal(out.tokens, hf_greedy(smol, ids, 32)), (kind, prompt.id)
        accepted += out.stats.accepted
    assert accepted > 0


def test_a_grown_eagle_head_drafts_as_before_and_keeps_its_layers(tiny, heads, tmp_path):
    """`add_eagle_layers` adds layers that start as the identity: the grown head drafts exactly what the 1-layer head did;
    a 2-layer checkpoint loads back with its 2 layers and drafts what it drafted before saving."""
    one = heads["eagle"]
    grown = add_eagle_layers(load_head(save_head(one, tmp_path / "one"), tiny, "eagle", dtype="float32"), 2)
    assert grown.num_layers == 2 and one.num_layers == 1
    drafts = {}
    for name, head in (("one", one), ("grown", grown), ("two", heads["eagle2"])):
        for text in TEXTS[:3]:
            generate(tiny, tiny.encode(text), drafter=head, controller=FixedK(3), max_new_tokens=12,
                     on_step=lambda e, name=name: drafts.setdefault(name, []).append(e.draft_tokens))
    assert drafts["grown"] == drafts["one"]
    assert drafts["two"] != drafts["one"]                                 # the trained second layer changes the drafts
    loaded = load_head(save_head(heads["eagle2"], tmp_path / "eagle2"), tiny, "eagle", dtype="float32")
    assert loaded.num_layers == 2
    for text in TEXTS[:3]:
        generate(tiny, tiny.encode(text), drafter=loaded, controller=FixedK(3), max_new_tokens=12,
                 on_step=lambda e: drafts.setdefault("loaded", []).append(e.draft_tokens))
    assert drafts["loaded"] == drafts["two"]
    assert loaded.cache.keys.shape[0] == 2                                # one cache layer per head layer
    with pytest.raises(ValueError, match="cannot grow to 1"): add_eagle_layers(grown, 1)
    with pytest.raises(ValueError, match="num_layers must be a positive integer, got 0"): EagleHead(tiny, num_layers=0)
    with pytest.raises(ValueError, match="only an EAGLE head"): add_eagle_layers(heads["medusa"], 2)


def test_copy_agreement_splits_the_heads_agreement_where_lookup_is_right(tiny, heads):
    """Every drafted answer position lands in exactly one group; a lookup that always drafts the target's greedy token puts
    them all in `copyable`, one that never drafts puts them all in `other`, with the same hits."""
    from specdec.train import copy_agreement
    from specdec.drafters import Draft, no_draft
    records = own_records(tiny, [tiny.encode(t) for t in TEXTS[:2]], max_new_tokens=16)
    layers = feature_layers(tiny.num_layers)
    recorded = record_features(tiny, records, layers)
    positions = sum(len(r["ids"]) - 2 - max(r["answer_start"] - 2, 0) for r in records)
    split = copy_agreement(heads["eagle"], records, recorded, layers)
    assert split["copyable"][1] + split["other"][1] == positions
    assert 0 <= split["copyable"][0] <= split["copyable"][1] and 0 <= split["other"][0] <= split["other"][1]

    greedy = {}                                                          # prefix length -> the target's greedy next token
    for r, rec in zip(records, recorded):
        for i, token in enumerate(rec["top_ids"][:, 0].tolist()): greedy[(tuple(r["ids"][:r["answer_start"] + i]))] = token
    class Oracle(PromptLookup):
        def propose(self, tokens, k, sampling=None, generator=None):
            return Draft(torch.tensor([[greedy[tuple(tokens[0].tolist())]]]))
    class Never(PromptLookup):
        def propose(self, tokens, k, sampling=None, generator=None): return no_draft(tokens)
    always, never = (copy_agreement(heads["eagle"], records, recorded, layers, lookup) for lookup in (Oracle(), Never()))
    assert always["other"][1] == 0 and never["copyable"][1] == 0 and always["copyable"][1] == never["other"][1] == positions
    assert always["copyable"][0] == never["other"][0] == split["copyable"][0] + split["other"][0] > 0
    with pytest.raises(ValueError, match="measures an EAGLE head"): copy_agreement(heads["medusa"], records, recorded, layers)


def test_a_vocabulary_with_more_ids_keeps_its_draft_ids():
    vocab = DraftVocab([5, 2, 9], 20)
    assert vocab.with_ids(torch.tensor([[9, 2, 5]])) is vocab                  # nothing new: the same vocabulary
    grown = vocab.with_ids(torch.tensor([[7, 2, 3, 7]]))
    assert grown.ids.tolist() == [5, 2, 9, 3, 7] and grown.vocab_size == 20   # old draft ids unchanged, new ones appended sorted
    assert grown.to_draft[torch.tensor([5, 2, 9, 3, 7])].tolist() == [0, 1, 2, 3, 4] and grown.to_draft[0] == -1


@pytest.mark.parametrize("kind", ["eagle", "medusa"])
def test_a_head_with_a_prompt_vocabulary_drafts_prompt_tokens_and_stays_lossless(tiny, kind, tmp_path):
    "Trained and drafting with `prompt_vocab`: drafts come from the draft vocabulary or the prompt, some from the prompt alone; output stays the target's."
    records = own_records(tiny, [tiny.encode(t) for t in TEXTS[:6]])
    base = DraftVocab.most_frequent([r["ids"][r["answer_start"]:] for r in records], 24, tiny.vocab_size, always=tiny.eos_token_ids)
    head = new_head(kind, tiny, base, n=3, seed=0)
    metrics = train_head(head, records, epochs=4, lr=1e-2, batch_size=3, seed=0, progress=False, prompt_vocab=True)
    assert head.prompt_vocab and head.run_vocab is None and metrics["prompt_vocab"]
    head = load_head(save_head(head, tmp_path / kind), tiny, kind, dtype="float32")
    assert head.prompt_vocab and head.draft_vocab == base                     # the checkpoint drafts as it was trained
    assert head.use_engine("eager")["prompt_vocab"] and head.use_engine("eager")["draft_vocab"] == len(base)   # and the run records it
    beyond, accepted = 0, 0
    for text in TEXTS[:8]:
        prompt, drafts = tiny.encode(text), []
        ref = hf_greedy(tiny, prompt, 30)
        out = generate(tiny, prompt, drafter=head, controller=FixedK(3), max_new_tokens=30, on_step=lambda e: drafts.extend(e.draft_tokens))
        assert torch.equal(out.tokens, ref), (kind, text)
        accepted += out.stats.accepted
        generate(tiny, prompt, drafter=head, controller=FixedK(3), max_new_tokens=30, temperature=1.0, seed=3,
                 on_step=lambda e: drafts.extend(e.draft_tokens))
        allowed = set(base.ids.tolist()) | set(prompt[0].tolist())
        assert set(drafts) <= allowed, (kind, text)
        beyond += len(set(drafts) - set(base.ids.tolist()))
    assert beyond > 0 and accepted > 0, (beyond, accepted)
    head.prompt_vocab = False                                                 # off: back to the draft vocabulary alone
    drafts = []
    generate(tiny, tiny.encode(TEXTS[0]), drafter=head, controller=FixedK(3), max_new_tokens=30, temperature=1.0, seed=3,
             on_step=lambda e: drafts.extend(e.draft_tokens))
    assert drafts and set(drafts) <= set(base.ids.tolist())


@pytest.mark.parametrize("kind", ["eagle", "medusa"])
def test_a_batch_with_a_prompt_vocabulary_drafts_each_row_from_its_own_prompt(tiny, kind):
    """`prompt_vocab` in a batch: the run's vocabulary holds every row's prompt, yet each row drafts from the draft
    vocabulary and its own prompt only, as alone: its tokens and accepted drafts equal that prompt's run by itself
    (greedy, eager and at fixed shapes), and its sampled drafts stay in its vocabulary. Negative control: without the
    per-row mask (`in_row_vocab` a no-op) rows draft their neighbours' prompt tokens."""
    base = DraftVocab(torch.arange(16), tiny.vocab_size)
    head = new_head(kind, tiny, base, n=3, seed=0)
    head.prompt_vocab = True
    prompts = [tiny.encode(TEXTS[i] + " again" * i)[0] for i in range(3)]         # ids [S_b], ragged
    own = [set(range(16)) | set(p.tolist()) for p in prompts]
    drafts, original = [], head.propose
    def propose(tokens, k, *args, **kwargs):
        draft = original(tokens, k, *args, **kwargs)
        drafts.append([row[:k] for row in draft.tokens.tolist()])                   # [rows, k] this step
        return draft
    def run(ps, compile="eager", **sampling):
        drafts.clear()
        return generate(tiny, ps, drafter=head, controller=FixedK(3), max_new_tokens=20, eos_token_id=[],
                        compile=compile, **sampling)
    def strays():                                      # drafts outside their row's own vocabulary
        return [t for step in drafts for b, row in enumerate(step) for t in row if t not in own[b]]
    head.propose = propose
    try:
        for compile in ("eager", "fixed"):
            alone = [run(p, compile) for p in prompts]
            out = run(prompts, compile)
            assert all(torch.equal(a.tokens[0], t) for a, t in zip(alone, out.tokens)), (kind, compile)
            assert [a.stats.accepted for a in alone] == [rs.accepted for rs in out.row_stats], (kind, compile)
            assert len(head.run_vocab) > max(map(len, own)) and not strays(), (kind, compile)
            assert any(t >= 16 for step in drafts for row in step for t in row)    # prompt tokens are drafted
        run(prompts, temperature=1.0, seed=3)
        assert drafts and not strays(), kind
        head.in_row_vocab = lambda logits, row_dim=0: logits                          # the negative control
        run(prompts)
        assert strays(), kind
    finally: del head.propose; head.__dict__.pop("in_row_vocab", None)


def test_a_row_bias_keeps_each_row_to_the_draft_vocabulary_and_its_own_ids():
    base = DraftVocab([5, 2, 9], 20)
    run = base.with_ids(torch.tensor([7, 3, 11]))                                   # ids 5, 2, 9, 3, 7, 11
    bias = run.row_bias(base, [torch.tensor([7, 2]), torch.tensor([[3, 11, 11]])])
    assert (bias == 0).tolist() == [[True, True, True, False, True, False], [True, True, True, True, False, True]]
    assert bias.shape == (2, 6) and torch.isinf(bias[bias != 0]).all() and (bias[bias != 0] < 0).all()


def test_a_vocabulary_copies_its_ids_to_a_device_once():
    vocab = DraftVocab([5, 2, 9], 20)
    on_cpu = vocab.ids_on("cpu")
    assert on_cpu.tolist() == [5, 2, 9] and vocab.ids_on(torch.device("cpu")) is on_cpu   # the same tensor, not a new copy


@pytest.mark.parametrize("kind", ["eagle", "medusa", "eagle2"])
def test_a_head_drafts_the_same_over_the_fixed_shape_engine(tiny, heads, kind):
    """The target at fixed shapes (the CPU stand-in for CUDA graphs: chunked prefill, one step function per width) hands
    a head the same features as the eager forward: the same drafts, so the same acceptances, and the same output."""
    head = heads[kind]
    long = " ".join(TEXTS[:6])                                        # > 2 prefill chunks of 64 tokens
    for text in (TEXTS[0], long):
        prompt = tiny.encode(text)
        drafts = {}
        for mode in ("eager", "fixed"):
            out = generate(tiny, prompt, drafter=head, controller=FixedK(4), max_new_tokens=30, eos_token_id=[], compile=mode,
                           on_step=lambda e, mode=mode: drafts.setdefault(mode, []).append(e.draft_tokens))
            assert out.engine["mode"] == out.engine["drafter"]["mode"] == mode and head.missing_features == 0
            assert (head.steps is None) == (mode == "eager")            # the head's own forwards at fixed shapes too
            drafts[mode + " out"] = (out.tokens, out.stats.accepted, out.stats.proposed)
        assert drafts["fixed"] == drafts["eager"], kind
        assert torch.equal(drafts["fixed out"][0], drafts["eager out"][0]) and drafts["fixed out"][1:] == drafts["eager out"][1:]
    assert tiny.encode(long).shape[1] > 128


@pytest.mark.parametrize("kind,dtype", [("eagle", torch.float32), ("eagle2", torch.float32), ("eagle", torch.float16)])
def test_the_fixed_shape_head_forward_equals_the_sliced_one(tiny, heads, kind, dtype, tmp_path):
    """`forward_at` (K/V written at device positions, attention over the whole cache) computes what `forward` does; a
    float16 head writes and reads a float32 cache (`cache_dtype` on the CPU) either way."""
    from specdec.net import KVCache
    head = heads[kind] if dtype == torch.float32 else load_head(save_head(heads[kind], tmp_path / kind), tiny, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    ids, hidden = torch.randint(0, tiny.vocab_size, (1, 9), generator=g), torch.randn(1, 9, head.hidden_size, generator=g).to(dtype)
    caches = [KVCache(head.num_layers, 1, head.num_kv_heads, 32, head.head_dim, torch.float32, "cpu") for _ in range(2)]
    with torch.inference_mode():
        sliced = [head(ids[:, :6], hidden[:, :6], 0, caches[0]), head(ids[:, 6:], hidden[:, 6:], 6, caches[0])]
        at = [head.forward_at(ids[:, :6], hidden[:, :6], torch.arange(6), caches[1]),
              head.forward_at(ids[:, 6:], hidden[:, 6:], torch.arange(6, 9), caches[1])]
    tol = 1e-4 if dtype == torch.float32 else 1e-2                    # float32: summed in another order; float16: rounded outputs
    for a, b in zip(sliced, at): assert a.dtype == dtype; torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    torch.testing.assert_close(caches[0].keys[:, :, :, :9], caches[1].keys[:, :, :, :9])


def test_head_steps_modes_and_what_drops_their_graphs():
    from specdec.engine import HeadSteps, HEAD_MODES
    with pytest.raises(ValueError, match="HeadSteps mode must be fixed or graphs, got 'eager'"): HeadSteps("eager")
    assert HEAD_MODES["compile"] == "fixed" and HEAD_MODES["compile+graphs"] == "graphs" and "eager" not in HEAD_MODES
    steps, a, b = HeadSteps("fixed"), torch.zeros(4), torch.zeros(4)
    assert steps("draft", 1, lambda x: x + 1, a).tolist() == [1.0] * 4 and steps.setup_total == 0
    steps.graphs[("draft", 1)] = "captured"
    steps.reset(a); steps.graphs[("draft", 1)] = "captured"
    steps.reset(a); assert steps.graphs                                 # the same tensors: the graphs stay
    steps.reset(b); assert not steps.graphs                             # a new cache or new draft rows: captured again


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_head_drafts_the_same_over_cuda_graphs():
    "On CUDA (float32) the captured target's static feature buffers reach the head intact: same drafts as eager."
    gpu = tiny_llama(seed=0, device="cuda", dtype=torch.float32)
    records = own_records(gpu, [gpu.encode(t) for t in TEXTS[:4]])
    for kind, layers in (("eagle", 1), ("medusa", 1), ("eagle", 2), ("medusa1", 1)):
        head = new_head(kind, gpu, None, n=3, seed=0, num_layers=layers)
        train_head(head, records, epochs=4, lr=1e-2, batch_size=2, seed=0, progress=False)
        for drafter in (head, Fallback([PromptLookup(3, 2), head])):
            prompt = gpu.encode(" ".join(TEXTS[:4]))
            eager = generate(gpu, prompt, drafter=drafter, max_new_tokens=30, eos_token_id=[], compile="eager")
            graphs = generate(gpu, prompt, drafter=drafter, max_new_tokens=30, eos_token_id=[], compile="graphs")
            assert graphs.engine["mode"] == "graphs" and head.missing_features == 0
            assert head.steps.mode == "graphs" and head.steps.graphs, (kind, layers)     # the head's forwards replayed too
            assert any(key.startswith("draft:") for key in graphs.engine["setup_seconds"])
            assert torch.equal(graphs.tokens, eager.tokens)
            assert graphs.stats.accepted == eager.stats.accepted, (kind, layers, drafter.name)


def _first_draft(target, prompt, drafter, controller, **kw):
    "The draft of a generation's first step (temperature 1, seed 0: the same draws whatever stops the draft)."
    seen, propose = [], drafter.propose
    def recording(*args, **kwargs):
        draft = propose(*args, **kwargs)
        if not seen: seen.append(draft)
        return draft
    drafter.propose = recording
    try: generate(target, prompt, drafter=drafter, controller=controller, temperature=1.0, seed=0, max_new_tokens=12, **kw)
    finally: del drafter.propose
    return seen[0]


@pytest.mark.parametrize("kind", ["eagle", "medusa", "model"])
def test_dynamic_k_stops_where_the_chain_probability_falls_below(tiny, tiny_draft, heads, kind):
    "DynamicK: the drafter stops after the first token whose chain probability (the draft's own) is below stop_below."
    from specdec.drafters import DraftModel
    drafter = DraftModel(tiny_draft) if kind == "model" else heads[kind]
    k = 3 if kind == "medusa" else 6
    prompt = tiny.encode(TEXTS[1])
    full = _first_draft(tiny, prompt, drafter, FixedK(k))
    assert full.k == k
    chain = full.probs[0].gather(-1, full.tokens[0, :, None])[:, 0].cumprod(0).tolist()    # [k] the chain's probability
    tried = 0
    for j in range(k - 1):                                                                 # the chain falls below at draft j
        above = chain[j - 1] if j else 1.0
        below = (above * chain[j]) ** 0.5                                                 # between the two chain values
        if not chain[j] < below <= above: continue                                        # equal values: no threshold between
        short = _first_draft(tiny, prompt, drafter, DynamicK(k, stop_below=below))
        assert short.k == j + 1, (kind, j, chain)                                         # it drafts that token, then stops
        assert torch.equal(short.tokens, full.tokens[:, :j + 1])                          # the same draws, cut
        tried += 1
    assert tried >= k // 2, chain
    assert drafter.stop_below == below                                                    # set by generate from the controller
    generate(tiny, prompt, drafter=drafter, controller=FixedK(k), max_new_tokens=4)
    assert drafter.stop_below is None                                                     # and cleared by any other controller
