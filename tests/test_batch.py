"""Batched decoding: prompts of different lengths decoded together, each row at its own length. Every row's greedy
output equals its own batch-1 output (and Hugging Face's), whatever drafter and compile mode; rows that finish stop
emitting; sampled rows follow the target's distribution (chi-square, with a negative control) and do not depend on the
rows beside them."""
import pytest, torch
from specdec import generate
from specdec.drafters import PromptLookup, DraftModel, LayerSkip, Fallback, Drafter, no_draft, padded_draft
from specdec.controllers import FixedK
from specdec.policies import RejectionSampling
from specdec.sampling import SamplingConfig, logits_to_probs
from conftest import hf_greedy
from test_lossless_tiny import TEXTS
from test_distribution import V, ResampleFromTarget, _tables, _chi2_pvalue, pair


def _prompts(tiny, n):
    "n prompts of different lengths (ids [S_i])."
    return [tiny.encode(TEXTS[i % len(TEXTS)] + " again" * i)[0] for i in range(n)]


@pytest.mark.parametrize("B", [2, 4, 8])
def test_each_row_is_its_own_batch_1_output(tiny, B):
    prompts = _prompts(tiny, B)
    assert len({p.numel() for p in prompts}) > 1                                  # ragged
    alone = [generate(tiny, p, max_new_tokens=24, eos_token_id=[]).tokens[0] for p in prompts]
    for p, a in zip(prompts[:2], alone[:2]): assert torch.equal(a, hf_greedy(tiny, p[None], 24, eos_token_id=[])[0])
    drafters = [None, PromptLookup(), PromptLookup(on_device=True), DraftModel("tiny-llama-draft"), LayerSkip(tiny, 2),
                Fallback([PromptLookup(3, 2), LayerSkip(tiny, 2)])]
    for drafter in drafters:
        out = generate(tiny, prompts, drafter=drafter, controller=FixedK(3) if drafter else None, max_new_tokens=24,
                       eos_token_id=[])
        name = drafter.name if drafter else "ar"
        assert len(out.tokens) == B and all(torch.equal(a, t) for a, t in zip(alone, out.tokens)), name
        assert out.stats.new_tokens == sum(t.numel() for t in out.tokens) == 24 * B
        assert [rs.new_tokens for rs in out.row_stats] == [24] * B and out.stats.generations == B
        if drafter is not None and not isinstance(drafter, PromptLookup): assert out.stats.accepted > 0, name


@pytest.mark.parametrize("drafter", [None, "pld", "pld-device", "layerskip"])
def test_a_batch_at_fixed_shapes_keeps_each_rows_tokens(tiny, drafter):
    """The fixed-shape engine (the CUDA graphs' path) steps rows at different lengths, each at its own positions; a draft
    model's engine drafts each row's tokens, its ragged catch-up run by the net's own forward on the engine's cache."""
    prompts = _prompts(tiny, 4)
    make = {None: lambda: None, "pld": lambda: PromptLookup(), "pld-device": lambda: PromptLookup(on_device=True),
            "layerskip": lambda: LayerSkip(tiny, 2)}[drafter]
    eager = generate(tiny, prompts, drafter=make(), controller=FixedK(3) if drafter else None, max_new_tokens=20,
                     eos_token_id=[], compile="eager")
    fixed = generate(tiny, prompts, drafter=make(), controller=FixedK(3) if drafter else None, max_new_tokens=20,
                     eos_token_id=[], compile="fixed")
    assert all(torch.equal(a, b) for a, b in zip(eager.tokens, fixed.tokens))
    assert fixed.engine["mode"] == "fixed"


def test_rows_that_finish_stop_emitting(tiny):
    "A row that reaches an EOS stops there (its output ends at the EOS) while the others go on."
    prompts = _prompts(tiny, 3)
    free = [generate(tiny, p, max_new_tokens=30, eos_token_id=[]).tokens[0] for p in prompts]
    eos = int(free[1][5])                                                         # row 1's sixth token ends it
    out = generate(tiny, prompts, drafter=PromptLookup(), controller=FixedK(3), max_new_tokens=30, eos_token_id=eos)
    for a, t in zip(free, out.tokens):
        cut = (a == eos).nonzero()
        expect = a if cut.numel() == 0 else a[:int(cut[0]) + 1]
        assert torch.equal(t, expect)
    assert out.tokens[1].numel() == int((free[1] == eos).nonzero()[0]) + 1 <= 6
    assert out.row_stats[1].wall_time <= out.stats.wall_time


def test_a_batch_names_what_it_cannot_do(tiny):
    from specdec.trees import TokenTree
    from specdec.train import new_head
    prompts = _prompts(tiny, 2)
    # a token tree drafted for one prompt at a time (every shipped tree batches: tests/test_batch_trees.py)
    class OneAtATime(TokenTree): batches_trees = False
    with pytest.raises(NotImplementedError, match="drafted and verified for one prompt at a time; got 2"):
        generate(tiny, prompts, drafter=Fallback([PromptLookup(), OneAtATime(new_head("eagle", tiny, seed=0), 2, 4)]))
    with pytest.raises(NotImplementedError, match="on_step follows one prompt"):
        generate(tiny, prompts, on_step=lambda e: None)
    with pytest.raises(ValueError, match="empty prompt: prompt 1"): generate(tiny, [prompts[0], []])


def _batched_pairs(target, draft, prompts, sampling, policy, runs):
    "Each row's first two tokens over `runs` seeded batched generations (a draft model, FixedK(2)): `[runs]` a row."
    cells = [[] for _ in prompts]
    for seed in range(runs):
        out = generate(target, prompts, drafter=DraftModel(draft), policy=policy, controller=FixedK(2), max_new_tokens=3,
                       temperature=sampling.temperature, top_p=sampling.top_p, seed=seed, eos_token_id=[])
        for b, t in enumerate(out.tokens): cells[b].append(t[0] * V + t[1])
    return [torch.stack(c) for c in cells]


def test_every_row_of_a_sampled_batch_follows_the_targets_distribution(pair):
    """4 rows (prompts of 3 different lengths) sampled together, 2,000 seeds: each row's first two tokens follow that
    row's own two-token law (chi-square); resampling from the target after a rejection (wrong) fails the same test."""
    target, draft = pair
    sampling = SamplingConfig(0.8)
    prompts = [torch.tensor(p) for p in ([1, 5, 7], [2, 9], [3, 3, 8, 11], [1, 5, 7])]
    laws = []
    for p in prompts:
        tables = _tables(target, draft, p[None])
        laws.append(logits_to_probs(tables[0], sampling)[:, None] * logits_to_probs(tables[1], sampling))   # [V, V]
    cells = _batched_pairs(target, draft, prompts, sampling, RejectionSampling(), 2000)
    assert all(_chi2_pvalue(c, law) > 1e-3 for c, law in zip(cells, laws))
    assert not torch.equal(cells[0], cells[3])                                     # same prompt, its own draws
    wrong = _batched_pairs(target, draft, prompts, sampling, ResampleFromTarget(), 2000)
    assert min(_chi2_pvalue(c, law) for c, law in zip(wrong, laws)) < 1e-6


def test_a_sampled_row_does_not_depend_on_its_neighbours(tiny):
    "Row 0 (its own seed) samples the same tokens beside one prompt or beside three others, with a draft model."
    prompts = _prompts(tiny, 4)
    kw = dict(drafter=DraftModel("tiny-llama-draft"), controller=FixedK(3), max_new_tokens=20, temperature=0.9,
              eos_token_id=[], seed=7)
    two = generate(tiny, prompts[:2], **kw)
    four = generate(tiny, [prompts[0], prompts[3], prompts[2], prompts[1]], **kw)
    assert torch.equal(two.tokens[0], four.tokens[0])
    assert not torch.equal(two.tokens[1], four.tokens[1])                        # the neighbours themselves differ


class _FirstRowDrafts(Drafter):
    "Drafts k copies of row 0's last token for row 0; every other row drafts nothing (padded: `n_valid` 0)."
    def propose(self, tokens, k, sampling=SamplingConfig(), generator=None, lengths=None):
        last = tokens[0, lengths[0] - 1]
        return padded_draft([last.repeat(k)] + [tokens.new_empty(0)] * (tokens.shape[0] - 1), tokens.device)


class _Recorded(FixedK):
    "FixedK that records each `update(proposed, accepted, row)`."
    def reset(self):
        super().reset()
        self.updates = []
    def update(self, proposed, accepted, row=0):
        self.updates.append((proposed, accepted, row))
        super().update(proposed, accepted, row)


def test_a_row_that_drafts_nothing_counts_as_rejected_for_the_controller(tiny):
    """A batch step verifies K+1 tokens in every row when any row drafted: a row that drafted nothing paid for the block
    and gained nothing, so the controller sees it as a rejection at the first position (what a cost-aware K weighs);
    alone, a row that drafts nothing decodes one token and the controller sees no step."""
    prompts = _prompts(tiny, 2)
    controller = _Recorded(3)
    out = generate(tiny, prompts, drafter=_FirstRowDrafts(), controller=controller, max_new_tokens=12, eos_token_id=[])
    steps = [len(a) for a in out.accepted_lengths]                                # [B] each row's steps
    assert len(controller.updates) == sum(steps) and steps[1] >= 4
    assert all(p == 3 for p, _, _ in controller.updates)                          # every row: the step's K
    assert [u for u in controller.updates if u[2] == 1] == [(3, 0, 1)] * steps[1] # row 1: rejected at 0, each step
    assert sum(a for p, a, r in controller.updates) == sum(out.accepted_lengths[0])  # only row 0's drafts were kept
    alone = _Recorded(3)
    generate(tiny, prompts[1], drafter=_NoDrafts(), controller=alone, max_new_tokens=12, eos_token_id=[])
    assert alone.updates == []


class _NoDrafts(Drafter):
    def propose(self, tokens, k, sampling=SamplingConfig(), generator=None, lengths=None): return no_draft(tokens)
