"""The batch cost model for token trees (issue 29): the surface times each tree's own step at every batch size (the
target's forward over the tree's nodes a row, root included, and the whole tree's draft), and `predict_batch` predicts
a tree from its batch-1 τ: `τ · T(B, 1) / (draft_tree(B) + p T_tree(B) + (1 - p) T(B, 1))`, the slowest row of each
group setting its time where the run measured each row at batch 1. Surfaces from before trees were timed still predict
their chains and leave their trees out."""
import math
from pathlib import Path
import pytest
from specdec.batch_bench import measure_batch_costs
from specdec.batch_summary import predict_batch, break_even_batch, cost_table
from specdec.costmodel import measure_tree_step
from specdec.specs import make_drafter

HEADS = Path(__file__).resolve().parent / "fixtures" / "heads"
SIZES = (1, 2, 4, 8, 16, 32)
T = lambda B, q: 0.010 * (1 + max(0, B * q - 16) / 16)          # flat up to 16 tokens in all, linear past them
WIDTH, DRAFT = 11, 0.002                                         # a tree of 10 nodes and the root; its whole draft
METHODS = {"c/k4": {"drafter": "c", "controller": {"kind": "fixed", "k_max": 4}},
           "t/k4": {"drafter": "t", "controller": {"kind": "fixed", "k_max": 4}},
           "t/cost:8": {"drafter": "t", "controller": {"kind": "cost", "k_max": 8}}}


def surface(with_trees:bool=True, draft=lambda B: DRAFT) -> dict:
    "Costs at every size: a chain drafter `c`, a token tree `t` whose step was timed (`with_trees`) or not (old runs)."
    def at(B):
        s = {"verify": {str(q): T(B, q) for q in range(1, 10)}, "draft": {"c": 1e-4, "t": 1e-4}, "errors": {}}
        if with_trees: s["tree"] = {"t": {"width": WIDTH, "k": 4, "verify": T(B, WIDTH), "draft": draft(B)}}
        return s
    return {"k_max": 8, "trees": ["t"], "by_batch": {str(B): at(B) for B in SIZES}}


def acceptance(tau:float=2.6, share:float=1.0, rows=None) -> dict:
    tree = {"tau": tau, "draft_share": share, "conditional": [0.8, 0.7], "methods": ["t/k4"]}
    return {"c": {"conditional": [0.7, 0.6], "draft_share": 0.9}, "t": {**tree, **({"rows": rows} if rows else {})}}


def test_a_trees_prediction_is_its_tau_over_its_own_step():
    """At every B the tree's speedup is τ·T(B,1) / (T_tree(B) + draft_tree(B)) (a head drafts every step), computed
    here from the costs; the method whose τ it is gets it at every B, rows alike."""
    pred = predict_batch(surface(), acceptance(), METHODS)
    tree = pred["drafters"]["t"]
    for B in SIZES:
        expected = 2.6 * T(B, 1) / (T(B, WIDTH) + DRAFT)
        assert tree["by_batch"][str(B)]["speedup_drafting"] == pytest.approx(expected)
        assert pred["methods"]["t/k4"][str(B)] == pytest.approx(expected)
        assert tree["by_batch"][str(B)]["width"] == WIDTH and tree["by_batch"][str(B)]["model"] == "rows alike"
    assert "t/cost:8" not in pred["methods"]                      # τ was measured on t/k4: only it is predicted
    assert "c/k4" in pred["methods"] and set(pred["drafters"]) == {"c", "t"}


def test_a_tree_that_drafts_on_some_steps_verifies_one_token_on_the_others():
    "With a draft share f < 1 the tree's forward is paid where some row drafted: p = 1 - (1 - f)^B, else T(B, 1)."
    pred = predict_batch(surface(), acceptance(tau=1.8, share=0.4), METHODS)["drafters"]["t"]["by_batch"]
    for B in (1, 4):
        p = 1 - 0.6 ** B
        expected = 1.8 * T(B, 1) / (DRAFT + p * T(B, WIDTH) + (1 - p) * T(B, 1))
        assert pred[str(B)]["speedup_drafting"] == pytest.approx(expected)


def test_a_tree_whose_verify_cost_rises_with_B_stops_paying_at_a_bracketed_batch():
    """Past the ridge a tree's 11 tokens a row cost far more than one: the speedup falls from above 1 to below it, and
    the break-even batch sits between the last size above 1 and the first at or below it (interpolated in log B)."""
    tree = predict_batch(surface(), acceptance(), METHODS)["drafters"]["t"]
    speedups = [tree["by_batch"][str(B)]["speedup_drafting"] for B in SIZES]
    assert speedups[0] > 1 > speedups[-1]
    first = next(i for i, s in enumerate(speedups) if s <= 1)
    be = tree["break_even"]
    assert be["between"] == [SIZES[first - 1], SIZES[first]] == break_even_batch(list(SIZES), speedups)["between"]
    assert SIZES[first - 1] < be["batch"] < SIZES[first]
    s0, s1 = speedups[first - 1], speedups[first]                         # 1 crossed linearly in log B
    at = math.log(SIZES[first - 1]) + math.log(2) * (s0 - 1) / (s0 - s1)
    assert be["batch"] == pytest.approx(math.exp(at))


def test_a_tree_group_ends_with_its_slowest_row():
    """Two rows a group: one keeps τ = 4, the other drafts nothing (τ = 1, f = 0). Rows alike (their mean τ) predict
    a gain at B=2; the group's own rows predict a loss: the batch takes as many tree steps as the idle row has tokens.
    Two good rows (the negative control) gain as one row alone."""
    good, idle = ({"tau": 4.0, "draft_share": 1.0, "new_tokens": 64, "conditional": [0.9]},
                  {"tau": 1.0, "draft_share": 0.0, "new_tokens": 64, "conditional": []})
    acc = acceptance(tau=2.5, share=0.5, rows={"a": good, "b": idle})
    alike = predict_batch(surface(), acc, METHODS)["drafters"]["t"]["by_batch"]["2"]
    rows = predict_batch(surface(), acc, METHODS, {"2": [["a", "b"]]})["drafters"]["t"]["by_batch"]["2"]
    assert alike["speedup_drafting"] > 1 and alike["model"] == "rows alike"
    p = 1 - (1 - 1.0) * (1 - 0.0)                                         # the good row drafts every step
    step = DRAFT + p * T(2, WIDTH) + (1 - p) * T(2, 1)
    expected = 64 * T(2, 1) / (max(64 / 4.0, 64 / 1.0) * step)
    assert rows["speedup_drafting"] == pytest.approx(expected) and expected < 1
    assert rows["model"] == "slowest row of each group"
    both = acceptance(rows={"a": good, "c": dict(good)})
    two = predict_batch(surface(), both, METHODS, {"2": [["a", "c"]]})["drafters"]["t"]["by_batch"]["2"]
    assert two["speedup_drafting"] == pytest.approx(4.0 * T(2, 1) / (T(2, WIDTH) + DRAFT))


def test_an_old_surface_predicts_its_chains_and_leaves_its_trees_out():
    """A surface measured before trees were timed (no `tree` entries): the chain's predictions are those the new
    surface gives, and the tree has none, as before; the cost table shows the tree's width where it is predicted."""
    old, new = (predict_batch(surface(t), acceptance(), METHODS) for t in (False, True))
    assert list(old["drafters"]) == ["c"] and set(old["methods"]) == {"c/k4"}
    assert old["drafters"]["c"] == new["drafters"]["c"] and old["methods"]["c/k4"] == new["methods"]["c/k4"]
    table = cost_table({"cost_model": new, "batch_sizes": list(SIZES)})
    assert table.loc["t", "B=1"].startswith(f"q={WIDTH}, ") and table.loc["c", "B=1"].startswith("K=")
    assert "falls through 1" in table.loc["t", "break-even B"]
    none_timed = surface(draft=lambda B: DRAFT)
    for s in none_timed["by_batch"].values(): s["tree"]["t"] = None          # a tree that drafts no batch size here
    assert list(predict_batch(none_timed, acceptance(), METHODS)["drafters"]) == ["c"]


@pytest.mark.parametrize("compile", ["eager", "fixed"])
def test_the_surface_times_a_trees_step_at_each_batch_size(tiny, compile):
    """On the tiny model, an EAGLE tree 2 wide of 4 nodes beside prompt lookup: at each B the surface holds the tree's
    width (its nodes and the root), a positive forward over that many tokens a row, and a positive draft for the whole
    tree; the chain's entries are as before, and a chain drafter has no tree step."""
    tree = make_drafter(f"eagle-tree:2:4:{HEADS}/eagle-tiny", tiny)
    drafters = {"pld": make_drafter("pld", tiny), "tree": tree}
    surface = measure_batch_costs(tiny, drafters, 16, [1, 2], k_max=2, compile=compile, progress=False,
                                  tree_k={"tree": 3})
    for B in (1, 2):
        s = surface[B]
        assert set(s["verify"]) == {1, 2, 3} and s["draft"]["pld"] > 0 and s["draft"]["tree"] > 0
        assert set(s["tree"]) == {"tree"} and s["errors"] == {}
        step = s["tree"]["tree"]
        assert step["width"] == tree.max_drafts(3) + 1 == 5 and step["k"] == 3
        assert step["verify"] > 0 and step["draft"] > 0
    with pytest.raises(ValueError, match="drafts chains"): measure_tree_step(tiny, drafters["pld"])


def test_a_tree_drafted_one_prompt_at_a_time_has_no_step_past_batch_1(tiny, monkeypatch):
    "A tree that drafts for one prompt at a time is timed at B=1 only; at B=2 its entry is None, with why."
    from specdec.trees import TokenTree
    monkeypatch.setattr(TokenTree, "batches_trees", False)
    tree = make_drafter(f"eagle-tree:2:4:{HEADS}/eagle-tiny", tiny)
    surface = measure_batch_costs(tiny, {"tree": tree}, 8, [1, 2], k_max=1, progress=False)
    assert surface[1]["tree"]["tree"]["verify"] > 0 and surface[2]["tree"]["tree"] is None
    assert "for one prompt at a time" in surface[2]["errors"]["tree"]


def test_the_surface_keeps_each_cost_at_its_lowest_pass(tiny, monkeypatch):
    """A burst of the host's other work slows whatever is timed during it: the surface passes over every batch size
    twice (batch sizes in turn, then again) and keeps each cost at the lower of its passes. Timings scripted here: the
    first pass meets a burst at B=1 (q=2 and the tree's forward), the second at B=2 (q=1 and the draft)."""
    import specdec.batch_bench as bb
    from types import SimpleNamespace
    calls, burst = [], {(0, 1, "q2"), (0, 1, "tree"), (1, 2, "q1"), (1, 2, "draft")}
    def seconds(B, what):
        n = calls.count(("verify", B)) - 1                               # the pass: B's target forwards timed before
        return 0.5 if (n, B, what) in burst else 0.01 * B
    def step_costs(target, drafter=None, verify=None, q_values=(), batch=1, **at):
        if verify is None:
            calls.append(("verify", batch))
            return SimpleNamespace(verify={q: seconds(batch, f"q{q}") for q in q_values})
        calls.append(("draft", batch))
        return SimpleNamespace(draft=seconds(batch, "draft"))
    def tree_step(target, drafter, k, at):
        calls.append(("tree", at["batch"]))
        return {"width": 5, "k": k, "verify": seconds(at["batch"], "tree"), "draft": 0.002}
    monkeypatch.setattr(bb, "measure_step_costs", step_costs)
    monkeypatch.setattr(bb, "_tree_step_at", tree_step)
    tree = make_drafter(f"eagle-tree:2:4:{HEADS}/eagle-tiny", tiny)
    surface = measure_batch_costs(tiny, {"tree": tree}, 8, [1, 2], k_max=1, progress=False)
    assert [B for _, B in calls] == [1, 1, 1, 2, 2, 2] * 2                  # batch sizes in turn, then again
    assert surface[1]["verify"] == {1: 0.01, 2: 0.01} and surface[2]["verify"] == {1: 0.02, 2: 0.02}
    assert surface[2]["draft"]["tree"] == 0.02 and surface[1]["tree"]["tree"]["verify"] == 0.01
    calls.clear()
    one = measure_batch_costs(tiny, {"tree": tree}, 8, [1, 2], k_max=1, progress=False, passes=1)
    assert one[1]["verify"][2] == 0.5 and one[1]["tree"]["tree"]["verify"] == 0.5   # a single pass keeps the burst
    with pytest.raises(ValueError, match="passes must be an integer >= 1, got 0"):
        measure_batch_costs(tiny, {"tree": tree}, 8, [1], passes=0)
