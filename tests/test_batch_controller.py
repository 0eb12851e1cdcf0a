"""The cost-aware K controller over a batch: it keeps each row's acceptance apart, and chooses K for the step from the
rows it decodes. A fixed batch ends with its slowest row, so one row whose drafts fail turns drafting off for all; a
server's refilled rows are weighed by their tokens a second, so the good rows keep drafting. Alone, a row is chosen
for exactly as before."""
import pytest, torch
from specdec import generate
from specdec.controllers import CostAwareK
from specdec.costmodel import StepCosts, best_k
from specdec.decode import Batch
from specdec.drafters import PromptLookup
from test_batch import _prompts

# a step over q tokens costs 1 + 0.1 (q - 1): a wider verification is cheap, not free
COSTS = StepCosts({q: 1.0 + 0.1 * (q - 1) for q in range(1, 10)})


def controller_with(rows:dict[int, float], steps:int=30, k:int=4) -> CostAwareK:
    "A CostAwareK(8) that has seen `steps` steps of K drafts in each row, accepting a share `rows[row]` of them."
    c = CostAwareK(8, costs=COSTS)
    c.reset()
    for _ in range(steps):
        for row, share in rows.items(): c.update(k, round(share * k), row)
    return c


def test_each_row_keeps_its_own_acceptance():
    c = controller_with({0: 1.0, 1: 0.0})
    good, bad = c.acceptance_estimates(0), c.acceptance_estimates(1)
    assert min(good[:4]) > 0.9 and bad[0] < 0.1
    pooled = c.acceptance_estimates()
    assert bad[0] < pooled[0] < good[0]                                           # pooled: between the two
    c.update(4, 0, 1)                                                             # row 1's step leaves row 0's counts
    assert c.acceptance_estimates(0) == good
    c.reset_row(1)                                                                # a new request in row 1: the prior
    assert c.acceptance_estimates(1)[0] == pytest.approx(c.prior)


def test_a_fixed_batch_stops_drafting_for_a_row_whose_drafts_fail():
    "The batch ends when row 1 does: drafting costs every step more and row 1 gains nothing from it."
    c = controller_with({0: 1.0, 1: 0.0})
    c.plan({0: 40, 1: 40})
    assert c.next_k() == 0
    c.plan({0: 40})                                                               # row 1 done: row 0 alone drafts
    assert c.next_k() == best_k(COSTS, c.acceptance_estimates(0), 8) > 0
    c.plan({0: 40, 1: 2})                                                         # row 1 nearly done: row 0 decides
    assert c.next_k() > 0


def test_refilled_rows_are_weighed_by_their_tokens_a_second():
    c = controller_with({0: 1.0, 1: 0.0})
    c.plan({0: 40, 1: 40}, refilled=True)
    assert c.next_k() > 0                                                         # row 0's gains outweigh row 1's cost
    c = controller_with({0: 0.0, 1: 0.0})                                         # negative control: no row gains
    c.plan({0: 40, 1: 40}, refilled=True)
    assert c.next_k() == 0


def test_when_every_row_accepts_a_fixed_batch_drafts_as_one_row_would():
    c = controller_with({0: 1.0, 1: 1.0, 2: 1.0})
    c.plan({0: 40, 1: 40, 2: 40})
    assert c.next_k() == best_k(COSTS, c.acceptance_estimates(0), 8) > 0


def test_alone_the_choice_is_the_single_row_cost_model():
    c = controller_with({0: 0.5})
    for remaining in (40, 3):
        c.plan({0: remaining})
        assert c.choose_k() == best_k(COSTS, c.acceptance_estimates(), 8)


class _Planned(CostAwareK):
    "CostAwareK that records each plan it is told."
    def reset(self):
        super().reset()
        self.plans = []
    def plan(self, remaining, refilled=False, width=None):
        self.plans.append((dict(remaining), refilled, width))
        super().plan(remaining, refilled, width)


def test_a_batch_tells_the_controller_its_rows_and_their_budgets(tiny):
    prompts = _prompts(tiny, 3)
    budgets = [6, 12, 9]
    c = _Planned(4, costs=COSTS)
    batch = Batch(tiny, 3, max(p.numel() for p in prompts) + 12, PromptLookup(), None, c, eos_token_id=[])
    padded = torch.nn.utils.rnn.pad_sequence(prompts, batch_first=True)         # [3, S] right-padded
    batch.start(padded, [p.numel() for p in prompts], budgets, 0)
    added = [0, 0, 0]
    while not all(batch.done):
        before = [budgets[b] - added[b] for b in range(3) if not batch.done[b]]
        step = batch.step()
        remaining, refilled, width = c.plans[-1]
        assert sorted(remaining.values()) == sorted(before) and refilled is False
        assert width == max(remaining) + 1                                      # the rows up to the last not done
        added = [a + s for a, s in zip(added, step)]
    assert added == budgets
    assert {tuple(sorted(r)) for r, *_ in c.plans} >= {(0, 1, 2), (1,)}           # rows leave as they finish
    served = Batch(tiny, 2, 64, PromptLookup(), None, _Planned(4, costs=COSTS), refilled=True)
    served.start(None, [], 1)
    served.admit(prompts[0], 4)
    served.step()
    assert served.controller.plans[-1] == ({0: 4}, True, 1)                 # one row held: a one-row step


def test_fixed_batch_output_is_unchanged_by_the_choice(tiny):
    "Whatever K the batch-aware choice makes, each row is its own batch-1 output (lossless)."
    prompts = _prompts(tiny, 4)
    alone = [generate(tiny, p, max_new_tokens=20, eos_token_id=[]).tokens[0] for p in prompts]
    out = generate(tiny, prompts, drafter=PromptLookup(), controller=CostAwareK(4, costs=COSTS), max_new_tokens=20,
                   eos_token_id=[])
    assert all(torch.equal(a, t) for a, t in zip(alone, out.tokens))


def test_a_step_is_costed_at_the_rows_its_forward_decodes(monkeypatch):
    """Measured at each width a step may have (a batch skipping its free last rows), a step over one row of an 8-row
    batch is costed at width 1, one over 3 rows at width 4: where verifying 8 rows wide does not pay and 1 row does, a
    lone request drafts and the full batch does not."""
    import specdec.controllers as controllers
    # width 1: a wide verification nearly free; width 4 and 8: each drafted token as dear as a step
    table = {1: COSTS, 2: COSTS, 4: StepCosts({q: float(q) for q in range(1, 10)}),
             8: StepCosts({q: float(q) for q in range(1, 10)})}
    calls = []
    def measured(target, drafter, batch=1, **kw):
        calls.append(batch); return table[batch]
    monkeypatch.setattr(controllers, "measure_step_costs", measured)
    c = CostAwareK(8)
    c.start("target", "drafter", "eager", 8, widths=(1, 2, 4, 8))
    c.start("target", "drafter", "eager", 8, widths=(1, 2, 4, 8))               # the same pair and widths: kept
    assert calls == [1, 2, 4, 8] and c.costs_at(3) is table[4] and c.costs_at(1) is table[1]
    for _ in range(30): c.update(4, 4, 0)                                        # row 0 accepts every draft
    c.plan({0: 40}, refilled=True, width=1)
    assert c.next_k() > 0
    c.plan({0: 40}, refilled=True, width=8)                                      # the same row, a batch-8 forward
    assert c.next_k() == 0
    c.start("target", "drafter", "eager", 8)                                    # the batch's width alone: measured
    assert calls == [1, 2, 4, 8, 8] and c.costs_at(1) is table[8]
