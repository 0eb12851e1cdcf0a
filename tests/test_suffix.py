"""SuffixDecoding: the suffix index counts what a suffix tree counts (checked against a brute-force scan), forgets dropped
sequences exactly and stays within its memory bound; the drafter drafts as the paper says (factor × match length,
probability cut, best score), learns from earlier responses, and is lossless: greedy output equals Hugging Face's,
chains and trees, alone and joined, and rejection sampling keeps the target's distribution (with negative controls)."""
import random
import pytest, torch
from specdec import generate
from specdec.suffix import SuffixIndex, SuffixDecoding, acceptance_tables
from specdec.drafters import Fallback, PromptLookup
from specdec.controllers import FixedK, AdaptiveK
from specdec.policies import Greedy, RejectionSampling
from specdec.sampling import SamplingConfig, logits_to_probs
from conftest import hf_greedy
from test_lossless_tiny import TEXTS
from test_distribution import V, pair, ResampleFromTarget, _tables, _chi2_pvalue, _generated_pairs


def scan_count(seqs, pattern) -> int:
    "How often `pattern` occurs in `seqs`, by brute force."
    n = len(pattern)
    return sum(s[i:i + n] == pattern for s in seqs for i in range(len(s) - n + 1))

def scan_children(seqs, pattern) -> dict:
    "What follows `pattern` in `seqs` and how often, by brute force."
    n, out = len(pattern), {}
    for s in seqs:
        for i in range(len(s) - n):
            if s[i:i + n] == pattern: out[s[i + n]] = out.get(s[i + n], 0) + 1
    return out

def random_sequences(rng, n, vocab=5, longest=30):
    return [[rng.randrange(vocab) for _ in range(rng.randrange(1, longest))] for _ in range(n)]

def agrees(index, seqs, rng, patterns=1500):
    "Counts and children of random patterns equal a brute-force scan of `seqs`."
    for _ in range(patterns):
        pattern = [rng.randrange(5) for _ in range(rng.randrange(1, 6))]
        assert index.count(pattern) == scan_count(seqs, pattern), pattern
        assert index.children(pattern) == scan_children(seqs, pattern), pattern


# --- the suffix index ---

def test_counts_and_children_are_the_suffix_trees():
    rng = random.Random(0)
    seqs = random_sequences(rng, 25)
    index = SuffixIndex()
    for s in seqs: index.add(s)
    agrees(index, seqs, rng)
    assert index.count([seqs[0][-1], seqs[1][0]]) == scan_count(seqs, [seqs[0][-1], seqs[1][0]])   # never across two
    assert index.children([]) == {t: sum(s.count(t) for s in seqs) for t in range(5) if any(t in s for s in seqs)}
    assert (len(index), index.sequences) == (sum(map(len, seqs)), 25)


def test_a_sequence_grown_token_by_token_equals_one_added_whole():
    rng = random.Random(1)
    seqs = random_sequences(rng, 6, longest=200)
    grown, whole = SuffixIndex(), SuffixIndex()
    for s in seqs:
        whole.add(s)
        for i in range(0, len(s), 3): grown.extend(s[i:i + 3])         # the buffer grows and moves under it
        grown.close()
    assert grown.tail(4) == [] and len(grown) == len(whole)
    agrees(grown, seqs, rng, 300)
    growing = SuffixIndex(); growing.extend(seqs[0])
    assert growing.tail(5) == seqs[0][-5:]


def test_dropping_the_oldest_forgets_it_exactly():
    "After dropping, every count, continuation and draft equals an index built from the sequences kept."
    rng = random.Random(2)
    seqs = random_sequences(rng, 40)
    index = SuffixIndex()
    for s in seqs[:20]: index.add(s)
    for i, s in enumerate(seqs[20:]):                                   # add one, drop one: the buffer wraps around
        index.add(s); index.drop_oldest()
    kept, fresh = seqs[20:], SuffixIndex()
    for s in kept: fresh.add(s)
    agrees(index, kept, rng)
    for _ in range(300):
        context = [rng.randrange(5) for _ in range(rng.randrange(1, 8))]
        for tree in (None, 3):
            assert index.speculate(context, 6, 2.0, 0.1, tree) == fresh.speculate(context, 6, 2.0, 0.1, tree), context
    while index.sequences: index.drop_oldest()
    assert len(index) == 0 and index.count([0]) == 0 and index.children([]) == {}
    with pytest.raises(ValueError, match="nothing to drop"): index.drop_oldest()
    with pytest.raises(ValueError, match="token ids must be >= 0"): index.extend([3, -1])


def test_the_cache_is_bounded_in_tokens_and_memory_oldest_out_first():
    drafter = SuffixDecoding(max_cached_tokens=500)
    rng = random.Random(3)
    responses = [[rng.randrange(1000) for _ in range(rng.randrange(10, 60))] for _ in range(400)]
    peak = 0
    for r in responses:
        drafter.add_response(r)
        assert len(drafter.cache) <= 500
        peak = max(peak, drafter.cache.nbytes)
    kept = drafter.cache.sequences
    assert sum(map(len, responses[-kept:])) == len(drafter.cache) > 500 - 60      # the newest ones, whole
    assert drafter.cache.count(responses[-1]) == 1 and drafter.cache.count(responses[0]) == 0
    assert peak < 48 * 500                                     # bytes: two int64 arrays over at most 2x the bound
    drafter.add_response(list(range(600)))                      # one longer than the bound is not kept
    assert len(drafter.cache) == 0
    off = SuffixDecoding(max_cached_tokens=0); off.add_response([1, 2, 3])
    assert len(off.cache) == 0


# --- drafting ---

def test_draft_length_follows_the_match_and_the_probability():
    index = SuffixIndex()
    for r in ([7, 1, 2, 3, 4, 5], [8, 1, 2, 3, 4, 5], [9, 1, 2, 3, 6]): index.add(r)
    d = index.speculate([0, 1, 2], 8, max_spec_factor=1, min_token_prob=0.1)      # 2 tokens matched: 2 drafts
    assert (d.tokens, d.probs, d.match_len) == ([3, 4], [1.0, 2 / 3], 2)
    assert index.speculate([0, 1, 2], 8, 4, 0.1).tokens == [3, 4, 5]              # up to 8: what follows ends there
    assert index.speculate([0, 1, 2], 2, 4, 0.1).tokens == [3, 4]                 # K caps it
    assert index.speculate([0, 1, 2], 8, 4, 0.7).tokens == [3]                    # 4 is only 2/3 likely
    assert index.speculate([0, 1, 2], 8, 0.4, 0.1).tokens == []                   # 0.4 × 2 < 1 draft
    d = index.speculate([8, 1, 2, 3], 8, 1, 0.1)              # the longest match, seen once, outscores the shorter ones
    assert (d.tokens, d.probs, d.match_len, d.score) == ([4, 5], [1.0, 1.0], 4, 2.0)
    assert index.speculate([6, 6], 8, 4, 0.1).tokens == [] and index.speculate([6, 6], 8, 4, 0.1).match_len == 1


def test_ties_go_to_the_latest_continuation():
    index = SuffixIndex()
    index.add([1, 2, 9, 1, 3, 9])                             # 1 is followed by 2, then by 3: 3 is the latest
    assert index.speculate([5, 1], 4, 4, 0.1).tokens == [3, 9]
    index.add([1, 2])                                         # now 2 twice
    assert index.speculate([5, 1], 4, 4, 0.1).tokens[0] == 2


def test_trees_are_best_first_parents_first_and_within_depth():
    index = SuffixIndex()
    for r in ([1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [1, 2, 3, 6], [1, 2, 7, 8]): index.add(r)
    d = index.speculate([1, 2], 8, 4, 0.1, tree_depth=3)
    assert (d.tokens, d.parents) == ([3, 4, 5, 7, 6, 8], [-1, 0, 1, -1, 0, 3])      # equal probabilities: first pushed
    assert d.probs == pytest.approx([3 / 4, 1 / 2, 1 / 2, 1 / 4, 1 / 4, 1 / 4])
    assert all(p < i for i, p in enumerate(d.parents))
    children = {}
    for i, p in enumerate(d.parents): children.setdefault(p, []).append(d.tokens[i])
    assert all(len(set(c)) == len(c) for c in children.values())           # siblings never repeat a token
    shallow = index.speculate([1, 2], 8, 4, 0.1, tree_depth=1)
    assert (shallow.tokens, shallow.parents) == ([3, 7], [-1, -1])
    assert index.speculate([1, 2], 3, 4, 0.1, tree_depth=3).tokens == [3, 4, 5]     # the node budget
    assert index.speculate([1, 2], 8, 4, 0.3, tree_depth=3).tokens == [3, 4, 5]     # 1/4 < 0.3


# --- the drafter ---

def drafters():
    return [SuffixDecoding(), SuffixDecoding(1.0, 0.05, max_cached_tokens=0), SuffixDecoding(1.5, 0.1, tree_nodes=6),
            SuffixDecoding(1.0, 0.2, tree_nodes=3)]


@pytest.mark.parametrize("k", [1, 4, 8])
def test_greedy_equals_hf_chains_and_trees_with_a_warm_cache(tiny, k):
    "One drafter per setting for every text, so the cache holds the earlier outputs; three texts twice."
    made = drafters()
    for text in TEXTS[:8] + TEXTS[:3]:
        prompt = tiny.encode(text)
        ref = hf_greedy(tiny, prompt, 40)
        for drafter in made:
            out = generate(tiny, prompt, drafter=drafter, controller=FixedK(k), max_new_tokens=40)
            assert torch.equal(out.tokens, ref), (text, drafter.name, k)
    assert all(d.cache.sequences == 11 for d in made if d.max_cached_tokens)


def test_joined_with_prompt_lookup_either_way_and_other_controllers(tiny):
    for text in TEXTS[:8]:
        prompt = tiny.encode(text)
        ref = hf_greedy(tiny, prompt, 40)
        for drafter in (Fallback([SuffixDecoding(min_score=1.5), PromptLookup(3, 2)]),
                        Fallback([PromptLookup(3, 2), SuffixDecoding(tree_nodes=4)]),
                        Fallback([SuffixDecoding(2.0, 0.1, tree_nodes=5), PromptLookup()])):
            for controller in (FixedK(4), AdaptiveK(k_max=8)):
                out = generate(tiny, prompt, drafter=drafter, controller=controller, max_new_tokens=40)
                assert torch.equal(out.tokens, ref), (text, drafter.name)
            out = generate(tiny, prompt, drafter=drafter, policy=RejectionSampling(), max_new_tokens=40)
            assert torch.equal(out.tokens, ref), (text, drafter.name)


def test_it_learns_from_earlier_responses_and_counts_by_match_length(tiny):
    prompt = tiny.encode("Q: What is the capital of France?\nA:")
    suffix = SuffixDecoding(max_cached_tokens=0)                       # negative control: the request's text only
    cold = generate(tiny, prompt, drafter=suffix, controller=FixedK(6), max_new_tokens=48, eos_token_id=[])
    warm_drafter = SuffixDecoding()
    first = generate(tiny, prompt, drafter=warm_drafter, controller=FixedK(6), max_new_tokens=48, eos_token_id=[])
    assert warm_drafter.cache.sequences == 1 and warm_drafter.cache.count(first.tokens[0].tolist()) == 1   # `finish`
    again = generate(tiny, prompt, drafter=warm_drafter, controller=FixedK(6), max_new_tokens=48, eos_token_id=[])
    assert torch.equal(again.tokens, cold.tokens) and torch.equal(first.tokens, cold.tokens)
    assert again.stats.tau > 2 * cold.stats.tau and again.stats.tau > 3
    c = warm_drafter.counters
    assert c["by_source"]["cache"][2] > 0
    # the counters agree with the loop's statistics: drafts, proposed, accepted
    rows = list(c["by_match_length"].values())
    assert sum(r[0] for r in rows) == c["drafts"] and c["drafts"] + c["no_draft"] <= again.stats.target_forwards
    assert (sum(r[1] for r in rows), sum(r[2] for r in rows)) == (again.stats.proposed, again.stats.accepted)
    by_prob = c["by_probability"]
    assert sum(n for n, _ in by_prob.values()) == again.stats.proposed and sum(a for _, a in by_prob.values()) == again.stats.accepted
    tables = acceptance_tables([c, c])
    assert sum(r["accepted"] for r in tables["by_source"]) == 2 * again.stats.accepted
    warm_drafter.remember([])                                           # the benchmark sets what it has seen
    assert len(warm_drafter.cache) == 0
    forgot = generate(tiny, prompt, drafter=warm_drafter, controller=FixedK(6), max_new_tokens=48, eos_token_id=[])
    assert forgot.stats.tau == cold.stats.tau


def test_min_score_abstains_where_the_match_is_weak(tiny):
    prompt = tiny.encode(TEXTS[0])
    never = SuffixDecoding(min_score=100)
    out = generate(tiny, prompt, drafter=never, controller=FixedK(4), max_new_tokens=24)
    assert out.stats.proposed == 0 and never.counters["drafts"] == 0
    assert never.counters["no_draft"] == out.stats.target_forwards - 1          # the last step has room for no draft
    joined = Fallback([SuffixDecoding(min_score=100), PromptLookup()])
    out = generate(tiny, prompt, drafter=joined, controller=FixedK(4), max_new_tokens=24)
    assert joined.usage[0]["steps"] == 0 and joined.usage[1]["steps"] > 0      # prompt lookup drafts every step it can


def test_bad_arguments_are_refused():
    for kw, message in ((dict(max_spec_factor=0), "max_spec_factor > 0"), (dict(min_token_prob=1.5), "min_token_prob"),
                        (dict(min_score=-1), "min_score >= 0"), (dict(max_depth=0), "max_depth >= 1"),
                        (dict(max_cached_tokens=-1), "max_cached_tokens >= 0"), (dict(tree_nodes=-2), "tree_nodes >= 0")):
        with pytest.raises(ValueError, match=message): SuffixDecoding(**kw)


def test_a_batch_drafts_each_row_from_its_own_text_and_the_shared_cache(tiny):
    "Rows at their own lengths: each row's output is its batch-1 output; the rows' outputs join the cache at the end."
    prompts = [tiny.encode(TEXTS[i] + " again" * i)[0] for i in range(4)]
    alone = [generate(tiny, p, max_new_tokens=24, eos_token_id=[]).tokens[0] for p in prompts]
    drafter = SuffixDecoding()
    for _ in range(2):                                                 # the second time, from the first batch's outputs
        out = generate(tiny, prompts, drafter=drafter, controller=FixedK(4), max_new_tokens=24, eos_token_id=[])
        assert all(torch.equal(a, t) for a, t in zip(alone, out.tokens))
    assert drafter.cache.sequences == 8 and drafter.counters["by_source"]["cache"][2] > 0
    trees = generate(tiny, prompts, drafter=SuffixDecoding(tree_nodes=4), controller=FixedK(4), max_new_tokens=24,
                     eos_token_id=[])                               # each row its own tree, padded (test_batch_trees)
    assert all(torch.equal(a, t) for a, t in zip(alone, trees.tokens))


# --- rejection sampling keeps the target's distribution ---

class KeepRejected(RejectionSampling):
    "Wrong on purpose: after a tree child is rejected, its token stays in the distribution the next try draws from."
    def without(self, probs, token): return probs


@pytest.mark.parametrize("tree", [False, True], ids=["chain", "tree"])
def test_rejection_sampling_with_suffix_drafts_keeps_the_target_distribution(pair, tree):
    """2,000 seeded runs at T=0.8 whose suffix drafts come from the prompt's repeats and from the earlier runs' outputs
    (the cache): the first two tokens follow the target's law; the same test rejects a wrong residual."""
    target, _ = pair
    sampling, prompt, runs = SamplingConfig(0.8), torch.tensor([[1, 5, 7, 1, 5, 9, 1, 5]]), 2000
    t1, t2 = _tables(target, target, prompt)[:2]
    joint = logits_to_probs(t1, sampling)[:, None] * logits_to_probs(t2, sampling)        # [V, V]
    make = lambda: SuffixDecoding(2.0, 0.05, max_cached_tokens=20_000, tree_nodes=4 if tree else 0)
    cells, two_deep = _generated_pairs(target, make(), prompt, sampling, RejectionSampling(), runs)
    assert two_deep > runs / 2                                                 # most first steps drafted two deep
    assert _chi2_pvalue(cells, joint) > 1e-3
    wrong = KeepRejected() if tree else ResampleFromTarget()
    bad, _ = _generated_pairs(target, make(), prompt, sampling, wrong, runs)
    assert _chi2_pvalue(bad, joint) < 1e-6
