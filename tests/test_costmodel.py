"The cost model: expected tokens, interpolated step costs, predicted speedup, best K, and measured costs."
import pytest, torch
from specdec.costmodel import (StepCosts, expected_tokens, predicted_speedup, best_k, conditional_acceptance,
                               measure_step_costs)
from specdec.stats import Stats


@pytest.mark.parametrize("acceptance, k, expected", [
    ([0.8], 0, 1.0),                          # no drafts: the target's token only
    ([1.0], 4, 5.0),                          # all accepted
    ([0.0], 4, 1.0),
    ([], 3, 1.0),                             # no rates: nothing accepted
    ([0.5], 2, 1.75),
    ([0.9, 0.5], 3, 1 + 0.9 + 0.45 + 0.225),  # the last rate is reused
    ([0.9, 0.5, 0.0, 1.0], 4, 1 + 0.9 + 0.45),  # nothing survives a zero
    (0.5, 2, 1.75),                           # a single rate as a number
])
def test_expected_tokens(acceptance, k, expected):
    assert expected_tokens(acceptance, k) == pytest.approx(expected)


@pytest.mark.parametrize("a", [0.1, 0.5, 0.9])
def test_expected_tokens_closed_form(a):
    for k in range(10): assert expected_tokens([a], k) == pytest.approx((1 - a ** (k + 1)) / (1 - a))


def test_interpolation():
    c = StepCosts({8: 0.021, 1: 0.010, 4: 0.013, 2: 0.011})   # any order
    assert list(c.verify) == [1, 2, 4, 8]
    for q, t in c.verify.items(): assert c.verify_cost(q) == t
    assert c.verify_cost(3) == pytest.approx(0.012)
    assert c.verify_cost(6) == pytest.approx(0.017)
    assert c.verify_cost(12) == pytest.approx(0.029)          # extrapolated from 4 and 8
    assert StepCosts({2: 0.02, 4: 0.03}).verify_cost(1) == pytest.approx(0.015)   # below the first point
    assert StepCosts({1: 0.01, 4: 0.02, 8: 0.019}).verify_cost(16) == pytest.approx(0.019)   # no downward extrapolation
    assert StepCosts({1: 0.01}).verify_cost(7) == 0.01
    with pytest.raises(ValueError, match="at least one verification cost"): StepCosts({})


def test_predicted_speedup():
    c = StepCosts({1: 0.010, 2: 0.011, 4: 0.013}, draft=0.001, overhead=0.002)
    assert predicted_speedup(c, [0.0], 0) == 1.0
    assert predicted_speedup(c, [0.8], 0) == 1.0
    # k=3: (1 + .8 + .64 + .512) tokens in 3*1 + 13 + 2 ms, against 1 token per 12 ms
    assert predicted_speedup(c, [0.8], 3) == pytest.approx(2.952 / 0.018 * 0.012)
    assert predicted_speedup(c, [0.0], 3) < 1


def test_best_k_edges():
    cheap = StepCosts({1: 0.020, 2: 0.0201, 16: 0.021}, draft=0.0)
    assert best_k(cheap, [0.0]) == 0                            # never accepted: do not draft
    assert best_k(cheap, []) == 0
    assert best_k(cheap, [0.02]) == 0 or predicted_speedup(cheap, [0.02], best_k(cheap, [0.02])) > 1
    assert best_k(cheap, [1.0]) == 16                           # always accepted, free drafts: draft the most
    assert best_k(cheap, [1.0], k_max=5) == 5
    assert best_k(cheap, [1.0], k_max=0) == 0
    assert best_k(cheap, [0.9]) > 0
    assert best_k(StepCosts({1: 0.01, 2: 0.02}), [0.9]) == 0   # verifying 2 tokens costs 2 plain steps
    assert best_k(StepCosts({1: 0.01}, draft=0.05), [0.9]) == 0   # drafts dearer than the target
    flat = StepCosts({1: 0.01})                                 # ties between k keep the smaller one
    assert best_k(flat, [0.9, 0.0]) == 1
    ks = [best_k(StepCosts({1: 0.02, 16: 0.035}, draft=0.002), [a]) for a in (0.3, 0.6, 0.8, 0.95)]
    assert ks == sorted(ks) and ks[0] < ks[-1]                  # more acceptance, longer drafts


def test_conditional_acceptance():
    s = Stats()
    for n in [4, 4, 2, 0]: s.record_step(4, n)
    assert conditional_acceptance(s) == pytest.approx([0.75, 1.0, 2 / 3, 1.0])
    s = Stats(); s.record_step(3, 0); s.record_step(3, 0)
    assert conditional_acceptance(s) == [0.0]                   # nothing passed position 0: no later rates
    assert conditional_acceptance(Stats()) == []


def test_measure_synthetic_costs(virtual_clock):
    """Target forwards through the target's own `.net`; the drafter timed through propose, like any drafter (on a virtual
    clock: the synthetic sleeps are the only time that passes)."""
    from specdec.synthetic import SyntheticTarget, SyntheticDrafter
    verify = {1: 0.002, 2: 0.003, 4: 0.005}
    target = SyntheticTarget(verify_cost=verify)
    costs = measure_step_costs(target, context=16, q_values=(1, 2, 4), repeats=3)
    for q, t in verify.items(): assert costs.verify[q] == pytest.approx(t)
    assert costs.draft == 0.0 and costs.source["context"] == 16
    drafted = measure_step_costs(target, SyntheticDrafter(0.5, draft_cost=0.002), context=16, verify=costs.verify, repeats=3)
    assert drafted.draft == pytest.approx(0.002) and drafted.verify == costs.verify   # the set sleep per token
    assert drafted.source["drafter"] == "synthetic:0.5" and drafted.source["draft_k"] == 4


def test_measure_tiny_costs(tiny):
    from specdec.drafters import LayerSkip, PromptLookup
    costs = measure_step_costs(tiny, LayerSkip(tiny, 2), context=32, q_values=(4, 1, 2), repeats=2)
    assert list(costs.verify) == [1, 2, 4] and all(t > 0 for t in costs.verify.values())
    assert costs.draft > 0
    pld = measure_step_costs(tiny, PromptLookup(), context=0, q_values=(1,), repeats=1).draft
    assert 0 < pld < costs.verify[1]                 # a host-side search: cheap, but measured, not assumed 0
    with pytest.raises(ValueError, match="repeats must be >= 1"): measure_step_costs(tiny, repeats=0)
    with pytest.raises(ValueError, match="draft_k must be >= 1"): measure_step_costs(tiny, PromptLookup(), draft_k=0)


def test_draft_model_timed_in_steady_state(tiny):
    "One timed propose of k tokens after the warm-up costs k draft forwards of one token each: no re-prefill."
    from specdec.drafters import DraftModel
    drafter, fed = DraftModel(tiny), []
    hook = drafter.draft.model.model.embed_tokens.register_forward_hook(lambda m, args, out: fed.append(args[0].shape[1]))
    try: measure_step_costs(tiny, drafter, context=20, q_values=(1,), repeats=3, draft_k=4)
    finally: hook.remove()
    draft_fed = fed[-(1 + 3) * 4:]                   # the drafter's forwards: warm-up and 3 timed steps of 4 each
    assert draft_fed[0] == 20 and draft_fed[1:] == [1] * 15


@pytest.mark.parametrize("compile", ["eager", "fixed"])
def test_a_batchs_draft_costs_are_timed_row_by_row(tiny, compile):
    """At batch 2 every kind of drafter is timed as `generate` drives it (each row's length, a count per row): prompt
    lookup, a draft model, an EAGLE head that reads the target's features, and prompt lookup falling back to it."""
    from specdec.drafters import PromptLookup, DraftModel, Fallback
    from specdec.train import new_head
    head = new_head("eagle", tiny, seed=0)
    for drafter in (PromptLookup(), DraftModel("tiny-llama-draft"), head, Fallback([PromptLookup(3, 2), head])):
        costs = measure_step_costs(tiny, drafter, context=16, q_values=(1, 2), repeats=2, batch=2, compile=compile)
        assert costs.draft > 0 and set(costs.verify) == {1, 2}, drafter.name
        assert head.missing_features == 0                                     # the head drafted from the target's features


def test_a_runs_step_costs_keep_each_cost_at_its_lowest_pass(monkeypatch):
    """`bench.measure_costs` (a run's costs at B=1, which `cost:` controllers choose K from) times the target, then each
    drafter, then all of it again, and keeps each cost at the lower of its passes: a burst of the host's other work,
    scripted here in pass 1 on the target's q=2 and in pass 2 on drafter a's draft, is gone; `source` counts the passes;
    a single pass keeps the burst; a bad `passes` is refused."""
    import specdec.bench as bench
    calls, burst = [], {(0, "q2"), (1, "a")}
    def step_costs(target, drafter=None, context=0, verify=None, q_values=(), compile="auto"):
        calls.append("verify" if verify is None else drafter)
        n = calls.count("verify") - 1                                         # the pass: the target comes first
        if verify is None: return StepCosts({q: 0.5 if (n, f"q{q}") in burst else 0.01 * q for q in q_values})
        return StepCosts(verify, 0.5 if (n, drafter) in burst else 0.002, source={"drafter": drafter})
    monkeypatch.setattr(bench, "measure_step_costs", step_costs)
    costs = bench.measure_costs(None, {"a": "a", "b": "b", "ar": None}, 64, k_max=2, progress=False)
    assert calls == ["verify", "a", "b"] * 2 and set(costs) == {"a", "b"}
    assert costs["a"].verify == costs["b"].verify == {1: 0.01, 2: 0.02, 3: 0.03}
    assert costs["a"].draft == costs["b"].draft == 0.002
    assert costs["a"].source == {"drafter": "a", "passes": 2}
    calls.clear()
    one = bench.measure_costs(None, {"a": "a"}, 64, k_max=2, progress=False, passes=1)
    assert one["a"].verify[2] == 0.5 and one["a"].source["passes"] == 1      # one pass keeps the burst
    with pytest.raises(ValueError, match="passes must be an integer >= 1, got 0"):
        bench.measure_costs(None, {"a": "a"}, 64, passes=0)
