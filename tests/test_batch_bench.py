"""The batch benchmark: a papermill smoke run through `specdec bench-batch` (manifest, records, report, the per-row
certificate, `specdec summary`), a drafter that cannot run at a batch size, a resumed run, and the pure pieces on
synthetic inputs: the pool and its groups, the schedule, paired speedups with their CIs, the certificate's
divergences, the cost model's break-even batch."""
import dataclasses, json, subprocess, sys
from pathlib import Path
from types import SimpleNamespace
import pytest, torch
import specdec.batch_bench as bb
from specdec.batch_bench import BatchConfig, prompt_pool, batch_groups, run_batch_benchmark, batch_key
from specdec.batch_summary import (paired_speedup, pool_throughput, row_certificate, explain_divergences, predict_batch, monotone,
                                   break_even_batch, batch_step_costs, row_acceptance, load_batch_summary,
                                   batch_text_summary)
from specdec.bench import schedule
from specdec.costmodel import expected_tokens
from specdec.provenance import read_records
from specdec.trees import TokenTree
from specdec.stats import Stats
from specdec.summary import HF, AR

ROOT = Path(__file__).resolve().parents[1]
COMMIT = {"commit": "c" * 40, "dirty": False, "diff": None}
TINY = dict(model="tiny-llama", batch_sizes="1,2", n_prompts=2, categories="qa,math_reasoning", prompts="builtin",
            max_new_tokens=6, iterations=1, warmup=0, bootstrap=100)


def cli(*args):
    return subprocess.run([sys.executable, "-c", "from specdec.cli import main; raise SystemExit(main())", *args],
                          capture_output=True, text=True, cwd=ROOT)


def test_papermill_smoke_run_through_the_cli(tmp_path):
    """`specdec bench-batch` runs nbs/bench/batch.ipynb into a new run folder: a batch manifest, one record per
    batch-generation with each row's tokens and stats, every row identical to its own batch-1 output, the report with
    its figures, and `specdec summary` printing it per batch size."""
    run = cli("bench-batch", "--model", "tiny-llama", "--drafters", "pld,layerskip:2", "--ks", "4",
              "--batch-sizes", "1,2", "--n-prompts", "2", "--categories", "qa,math_reasoning", "--prompts", "builtin",
              "--max-new-tokens", "6", "--iterations", "1", "--warmup", "0", "--bootstrap", "100", "--no-cost-model",
              "--out", str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    run_dir = Path(run.stdout.strip().splitlines()[-1])
    manifest = json.loads((run_dir / "MANIFEST.json").read_text())
    methods = [HF, AR, "pld/k4", "layerskip:2/k4"]
    assert (manifest["kind"], manifest["status"], manifest["batch_sizes"]) == ("batch", "done", [1, 2])
    assert manifest["methods"] == methods
    assert {"git", "system", "machine", "versions", "params", "models", "prompt_set"} <= set(manifest)
    pool = manifest["prompt_set"]["pool"]
    assert manifest["groups"] == {"1": [[pool[0]], [pool[1]]], "2": [pool]}
    assert manifest["params"]["max_new_tokens"] == 6
    records = read_records(run_dir / "records.jsonl")
    assert len(records) == manifest["counts"]["records"] == manifest["this_invocation"]["measured"] == len(methods) * 3
    for r in records:
        assert {"commit", "dirty", "diff", "time", "loadavg", "threads", "device"} <= set(r)
        assert len(r["tokens"]) == len(r["row_stats"]) == len(r["prompt_ids"]) == r["batch_size"]
        assert r["new_tokens"] == sum(map(len, r["tokens"])) == sum(s["new_tokens"] for s in r["row_stats"])
        assert max(s["wall_time"] for s in r["row_stats"]) <= r["wall_time"] + 1e-9   # a row finishes within its batch
    # the per-row certificate, checked here from the records: every row equals its reference
    alone = lambda m: {r["prompt_ids"][0]: r["tokens"][0] for r in records if r["method"] == m and r["batch_size"] == 1}
    for r in records:
        ref = alone(HF) if r["method"] == HF and r["batch_size"] > 1 else alone(AR)
        assert [ref[p] for p in r["prompt_ids"]] == r["tokens"], (r["method"], r["batch_size"])
    assert all((c["identical"], c["rows"], c["passed"]) == (2, 2, True)
               for name in methods for c in manifest["certificate"][name].values())
    assert set(manifest["certificate"][AR]) == {"1", "2"}
    assert manifest["certificate"][HF]["2"]["reference"] == "hf-generate B=1"
    cell = manifest["results"]["pld/k4"]["by_batch"]["1"]
    assert cell["speedup"][AR]["pairs"] == 2 and cell["tok_s"]["groups"] == 2 and cell["row_latency_s"]["rows"] == 2
    assert manifest["cost_surface"] is None and manifest["cost_model"] is None                   # --no-cost-model
    nb = json.loads((run_dir / "report.ipynb").read_text())
    assert not [o for c in nb["cells"] for o in c.get("outputs", []) if o["output_type"] == "error"]
    html = (run_dir / "report.html").read_text()
    assert "Throughput against batch size" in html and "Speedup over specdec-ar at the same B" in html
    assert "../plotly.min.js" in html and str(tmp_path) not in (run_dir / "MANIFEST.json").read_text()
    summary = cli("summary", str(run_dir))
    assert summary.returncode == 0, summary.stderr[-2000:]
    lines = summary.stdout.splitlines()
    assert manifest["run_id"] in lines[0] and "95% CI across groups and iterations, this run" in summary.stdout
    certificate = lines[next(i for i, l in enumerate(lines) if l.startswith("Per-row certificate")) + 2:]
    for name in methods: assert next(l for l in certificate if l.startswith(name + " ")).split()[-2:] == ["2/2", "2/2"]
    mixed = cli("summary", str(run_dir), str(ROOT / "results" / "example-synthetic"))
    assert mixed.returncode == 2 and "mix batch runs" in mixed.stderr


def test_a_drafter_that_cannot_run_at_a_batch_size_is_recorded_and_the_run_resumes(tmp_path, monkeypatch):
    """A token tree filling in for prompt lookup (`pld+eagle-tree`), made here to draft for one prompt at a time (every
    shipped tree batches): at B=2 its generation raises NotImplementedError. The run records that, measures the rest (prompt lookup's predicted speedups
    beside its measured ones), and an interrupted run resumes without measuring twice; its partial summary plans no
    records where a method cannot run."""
    monkeypatch.setattr(bb, "git_state", lambda *a, **k: dict(COMMIT))
    monkeypatch.setattr(TokenTree, "batches_trees", False)
    tree = f"pld:3:2+eagle-tree:2:4:{ROOT}/tests/fixtures/heads/eagle-tiny"
    cfg = BatchConfig(**{**TINY, "warmup": 1}, drafters=f"pld,{tree}", ks="4", hf=False, out=str(tmp_path), run_id="r")
    run_dir = run_batch_benchmark(cfg, progress=False)
    manifest = json.loads((run_dir / "MANIFEST.json").read_text())
    assert {m: list(by) for m, by in manifest["unavailable"].items()} == {f"{tree}/k4": ["2"]}
    assert "NotImplementedError" in manifest["unavailable"][f"{tree}/k4"]["2"]
    assert "for one prompt at a time" in manifest["unavailable"][f"{tree}/k4"]["2"]
    surface = manifest["cost_surface"]
    assert surface["trees"] == [tree]                         # (its timed draft of rows: prompt lookup's, no error)
    assert {len(s["verify"]) for s in surface["by_batch"].values()} == {9}                          # q = 1..K_max+1
    records = read_records(run_dir / "records.jsonl")
    measured = sorted((r["method"], r["batch_size"]) for r in records)
    assert measured == sorted([(AR, 1), (AR, 1), (AR, 2), ("pld/k4", 1), ("pld/k4", 1), ("pld/k4", 2),
                               (f"{tree}/k4", 1), (f"{tree}/k4", 1)])
    assert set(manifest["certificate"][f"{tree}/k4"]) == {"1"} and manifest["certificate"][f"{tree}/k4"]["1"]["passed"]
    assert all(c["predicted_speedup"] > 0 for c in manifest["results"]["pld/k4"]["by_batch"].values())
    assert list(manifest["cost_model"]["drafters"]) == ["pld", tree]             # a token tree: from its own step
    assert list(manifest["cost_model"]["drafters"][tree]["by_batch"]) == ["1"]   # timed where it drafts: B=1 only
    assert surface["by_batch"]["2"]["tree"][tree] is None and surface["by_batch"]["1"]["tree"][tree]["width"] == 5
    assert manifest["results"][f"{tree}/k4"]["by_batch"]["1"]["predicted_speedup"] > 0
    assert f"Not measured:\n  {tree}/k4: cannot run at B=2 (NotImplementedError" in batch_text_summary(run_dir)
    (run_dir / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:3]))   # cut off after three
    (run_dir / "MANIFEST.json").write_text(json.dumps({**manifest, "status": "running"}))
    partial = load_batch_summary(run_dir)
    assert partial["partial"] == {"status": "running", "measured": 3, "planned": 8}
    assert batch_text_summary(run_dir).startswith("PARTIAL RUN (running): 3 of 8 batch records")
    resumed = json.loads((run_batch_benchmark(BatchConfig(**{**dataclasses.asdict(cfg), "resume": "r", "run_id": ""}),
                                              progress=False) / "MANIFEST.json").read_text())
    full = read_records(run_dir / "records.jsonl")
    assert full[:3] == records[:3] and sorted(map(batch_key, full)) == sorted(map(batch_key, records))
    assert (resumed["this_invocation"]["reused"], resumed["this_invocation"]["measured"]) == (3, 5)
    assert resumed["unavailable"] == manifest["unavailable"]


def test_the_notebook_parameters_are_the_config_fields():
    "One parameter list: BatchConfig has exactly batch.ipynb's parameters, with the same defaults."
    from specdec.parameters import notebook_parameters
    params = notebook_parameters(ROOT / "nbs/bench/batch.ipynb")
    assert {n: p["default"] for n, p in params.items()} == {f.name: f.default for f in dataclasses.fields(BatchConfig)}


def test_bad_batch_parameters_name_the_problem():
    for kw, message in [({"batch_sizes": "2,4", "n_prompts": 4}, "must include 1"),
                        ({"batch_sizes": "1,3", "n_prompts": 4}, "not a multiple of batch size 3"),
                        ({"batch_sizes": "1,x"}, "comma-separated integers"), ({"batch_sizes": "0,1"}, ">= 1"),
                        ({"n_prompts": 0}, "n_prompts must be an integer >= 1"),
                        ({"drafters": ""}, "drafters is empty"),
                        ({"ks": "4,fixed:4"}, "would run twice"), ({"ignore_eos": "maybe"}, "ignore_eos must be")]:
        with pytest.raises(ValueError, match=message): BatchConfig(**kw)
    with pytest.raises(ValueError, match="more than the 4 prompts of 'builtin' in categories qa"):
        prompt_pool("builtin", "qa", 5)


def test_the_pool_mixes_categories_and_every_batch_size_decodes_it_all():
    pool = prompt_pool("builtin", None, 8)
    assert [p.id for p in pool[:3]] == ["multi_turn-1", "translation-1", "summarization-1"]   # each category in turn
    assert len({p.category for p in pool}) == 7 and pool[7].id == "multi_turn-2"
    groups = batch_groups(pool, [1, 2, 4, 8])
    for B in (1, 2, 4, 8):
        mine = [g for g in groups if g.batch_size == B]
        assert len(mine) == 8 // B and all(len(g.prompts) == B for g in mine)
        assert [p.id for g in mine for p in g.prompts] == [p.id for p in pool]
    with pytest.raises(ValueError, match="does not split into groups of 3"): batch_groups(pool, [1, 3])


def test_every_method_runs_at_every_batch_size_before_the_next_iteration():
    groups = batch_groups(prompt_pool("builtin", None, 4), [1, 2, 4])
    order = schedule(groups, ["a", "b", "c"], 2)
    per_iteration = len(groups) * 3
    for i in range(2):
        chunk = order[i * per_iteration:(i + 1) * per_iteration]
        assert {x[0] for x in chunk} == {i}
        assert {(g.id, m) for _, g, m in chunk} == {(g.id, m) for g in groups for m in "abc"}
    firsts = [order[j * 3][2] for j in range(len(groups))]                         # the method that opens each group
    assert set(firsts) == {"a", "b", "c"}                                          # rotated


def record(method, B, group, it, lengths, wall, prompts=None):
    "A synthetic batch record: rows of `lengths` tokens, the batch `wall` seconds."
    rows = [Stats(new_tokens=n, wall_time=wall, generations=1, target_forwards=n) for n in lengths]
    return {"method": method, "batch_size": B, "group": group, "iteration": it, "purpose": "speed",
            "prompt_ids": prompts or [f"p{group}-{j}" for j in range(len(lengths))],
            "tokens": [[2] * n for n in lengths],
            **sum(rows, Stats()).to_record(), "wall_time": wall, "row_stats": [r.to_record() for r in rows]}


def test_paired_speedup_covers_groups_and_iterations_and_leaves_unequal_work_out():
    base = [record(AR, 2, g, i, [8, 8], 1.0) for g in range(4) for i in range(3)]
    mine = [record("x", 2, g, i, [8, 8], 1.0 / (1.5 + 0.1 * g)) for g in range(4) for i in range(3)]
    s = paired_speedup(mine, base, 500, seed=0)
    assert s["n"] == s["pairs"] == 12 and s["ci95"][0] < s["geomean"] < s["ci95"][1]
    assert 1.5 < s["ci95"][0] and s["ci95"][1] < 1.8                              # ratios 1.5..1.8, the mean inside
    assert abs(s["geomean"] - (1.5 * 1.6 * 1.7 * 1.8) ** 0.25) < 1e-9
    mine[0] = record("x", 2, 0, 0, [8, 7], 0.5)                                    # another length: no ratio over it
    s = paired_speedup(mine, base, 500)
    assert s["pairs"] == 11 and s["excluded_unequal_length"] == ["g0/i0"]
    assert paired_speedup(mine, [], 500)["geomean"] is None                       # nothing to pair with
    assert pool_throughput(base, 4) == 16.0 and pool_throughput(base[:-1], 4) == 16.0     # incomplete iteration: out
    assert pool_throughput(base[:3], 4) is None


class Logits(torch.nn.Module):
    "A stand-in target model whose next-token logits are set: `model(ids).logits[0, -1]`."
    def __init__(self, logits): super().__init__(); self.logits = torch.tensor(logits)
    def forward(self, ids): return SimpleNamespace(logits=self.logits.expand(1, ids.shape[1], -1))


@pytest.mark.parametrize("logits, near_tie", [([0.0, 0.0, 3.0, 0.0, 2.99995], True),    # the two tokens, 5e-5 apart
                                              ([0.0, 0.0, 3.0, 0.0, 2.5], False),       # the two tokens, far apart
                                              ([3.0, 0.0, 2.99995, 0.0, 0.0], False)])  # close, but not these two
def test_a_row_that_differs_is_counted_and_explained(logits, near_tie):
    refs = [record(AR, 1, g, 0, [4], 1.0, [f"p{g}"]) for g in range(2)]
    flip = record("d/k4", 2, 0, 0, [4, 4], 1.0, ["p0", "p1"])
    flip["tokens"][1] = [2, 4, 2, 2]                                               # row p1 differs at position 1
    cert = row_certificate(refs + [flip], {"d/k4": {"lossless": True}})
    c = cert["d/k4"]["2"]
    assert (c["identical"], c["rows"], c["passed"]) == (1, 2, False)
    assert c["differ"] == [{"prompt_id": "p1", "iteration": 0, "position": 1, "token": 4, "reference_token": 2}]
    target = SimpleNamespace(model=Logits(logits), dtype=torch.float32, device=torch.device("cpu"))
    explain_divergences(cert, refs + [flip], target, {"p0": torch.tensor([[1, 2]]), "p1": torch.tensor([[1, 2, 3]])})
    d = c["differ"][0]
    assert [t for t, _ in d["top2"]] == sorted(range(5), key=lambda i: -logits[i])[:2]
    assert abs(d["margin"] - (d["top2"][0][1] - d["top2"][1][1])) < 1e-9 and d["near_tie"] is near_tie
    short = record("d/k4", 1, 0, 1, [3], 1.0, ["p0"])                              # a truncated row differs too
    assert row_certificate(refs + [short], {})["d/k4"]["1"]["differ"][0]["position"] == 3


def test_the_break_even_batch_from_a_synthetic_cost_surface():
    """A forward costs the same up to 16 tokens in all and grows linearly past them: K(B) shrinks as B grows, and no K
    pays once a plain step is past the ridge; the measured-at-B=1 acceptance and draft share set E[L]."""
    T = lambda B, q: 0.010 * (1 + max(0, B * q - 16) / 16)
    surface = {"k_max": 8, "by_batch": {str(B): {"verify": {str(q): T(B, q) for q in range(1, 10)},
                                                 "draft": {"d": 1e-4}} for B in (1, 2, 4, 8, 16, 32)}}
    methods = {"d/k4": {"drafter": "d", "controller": {"kind": "fixed", "k_max": 4}},
               "d/cost:8": {"drafter": "d", "controller": {"kind": "cost", "k_max": 8}}}
    pred = predict_batch(surface, {"d": {"conditional": [0.7, 0.6], "draft_share": 0.9}}, methods)
    by = pred["drafters"]["d"]["by_batch"]
    assert [by[str(B)]["k_best"] for B in (1, 2, 4, 8, 16, 32)] == [7, 7, 3, 1, 0, 0]
    drafting = [by[str(B)]["speedup_drafting"] for B in (1, 2, 4, 8, 16, 32)]
    assert min(drafting[:4]) > 1 > max(drafting[4:])                              # the best K >= 1 stops paying
    be = pred["drafters"]["d"]["break_even"]
    assert be["between"] == [8, 16] and 8 < be["batch"] < 16 and pred["drafters"]["d"]["k0_from"] == 16
    rates = row_acceptance([0.7, 0.6], 0.9)
    assert abs(expected_tokens(rates, 3) - (1 + 0.9 * (0.7 + 0.7 * 0.6 + 0.7 * 0.6 * 0.6))) < 1e-12
    c = batch_step_costs(surface["by_batch"]["4"]["verify"], 1e-4, 0.9, 4)
    p = 1 - 0.1 ** 4                                                               # some row of 4 drafted
    assert abs(c.verify_cost(5) - (p * T(4, 5) + (1 - p) * T(4, 1))) < 1e-15 and c.verify_cost(1) == T(4, 1)
    k4 = expected_tokens(rates, 4) * T(1, 1) / (4 * 1e-4 + 0.9 * T(1, 5) + 0.1 * T(1, 1))   # at its own K, B=1
    assert pred["methods"]["d/k4"]["1"] == pytest.approx(k4)
    assert pred["methods"]["d/cost:8"]["32"] == 1.0                               # cost-aware: K=0, no gain, no loss
    assert break_even_batch([1, 4], [1.5, 0.5])["batch"] == pytest.approx(2.0)    # halfway in log B
    assert break_even_batch([1, 2, 4], [1.2, 1.1, 1.05])["batch"] is None
    assert break_even_batch([1, 2], [0.9, 0.8])["note"] == "does not pay even at B=1"


def test_a_fixed_batch_is_predicted_from_its_slowest_row():
    """Two rows a group: one accepts most drafts, one drafts nothing. Rows alike (the mean of the two) predict a gain at
    B=2; the group's own rows predict none, since the batch ends when the row that gains nothing does. Two good rows
    (the negative control) are predicted to gain as one row alone would, and costs that dip with q are made monotone."""
    verify = {str(q): 0.010 * (1 + 0.05 * (q - 1)) for q in range(1, 6)}
    verify["4"] = 0.001                                                            # a noisy, impossible dip
    surface = {"k_max": 4, "by_batch": {"1": {"verify": verify, "draft": {"d": 0.0}},
                                        "2": {"verify": verify, "draft": {"d": 0.0}}}}
    good, idle = ({"conditional": [0.9] * 4, "draft_share": 1.0, "new_tokens": 64},
                  {"conditional": [], "draft_share": 0.0, "new_tokens": 64})
    methods = {"d/cost:4": {"drafter": "d", "controller": {"kind": "cost", "k_max": 4}}}
    mixed = {"d": {"conditional": [0.9] * 4, "draft_share": 0.5, "rows": {"a": good, "b": idle}}}
    groups = {"1": [["a"], ["b"]], "2": [["a", "b"]]}
    alike = predict_batch(surface, mixed, methods)["drafters"]["d"]["by_batch"]["2"]
    by_rows = predict_batch(surface, mixed, methods, groups)["drafters"]["d"]["by_batch"]
    assert alike["speedup_drafting"] > 1.1 and alike["model"] == "rows alike"
    assert by_rows["2"]["speedup_drafting"] < 1 and by_rows["2"]["k_best"] == 0
    assert by_rows["2"]["model"] == "slowest row of each group"
    both = {"d": {"conditional": [0.9] * 4, "draft_share": 1.0, "rows": {"a": good, "c": dict(good)}}}
    two = predict_batch(surface, both, methods, {"1": [["a"], ["c"]], "2": [["a", "c"]]})["drafters"]["d"]["by_batch"]
    assert two["2"]["speedup_drafting"] == pytest.approx(two["1"]["speedup_drafting"])
    assert two["1"]["speedup_drafting"] > 1.5
    assert monotone(verify)[4] == monotone(verify)[3] == verify["3"]               # the dip raised to its left
