"The benchmark harness: papermill smoke run, provenance and resume, statistics, certificates, CLI flags, errors."
import dataclasses, json, signal, subprocess, sys, time
from pathlib import Path
import numpy as np
import pytest, torch
import specdec.bench as bench
import specdec.provenance as provenance
from specdec.bench import BenchConfig, Method, run_benchmark, methods_from
from specdec.provenance import read_records, read_manifest, record_key, git_state, ResumeRefused
from specdec.summary import certificate, tokens_equal, bootstrap_geomean, speedup, HF, HF_PLD, AR
from specdec.policies import Greedy, Verdict
from specdec.report import validate_manifest

ROOT = Path(__file__).resolve().parents[1]
METHODS_NB = ROOT / "nbs/bench/methods.ipynb"
COMMIT_A = {"commit": "a" * 40, "dirty": False, "diff": None}
COMMIT_B = {"commit": "b" * 40, "dirty": False, "diff": None}
SYNTH = dict(model="synthetic", drafters="synthetic:0.9", ks="4", categories="qa", n_prompts=2, hf_pld=False,
             max_new_tokens=8, iterations=1, warmup=0, cost_model=False, bootstrap=100)


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-c", "from specdec.cli import main; raise SystemExit(main())", *args],
                          capture_output=True, text=True, cwd=kw.get("cwd", ROOT))


def test_papermill_smoke_run_through_the_cli(tmp_path):
    "`specdec bench` executes the notebook into a new run folder: schema-valid manifest, records, report.html."
    run = cli("bench", "--model", "tiny-llama", "--drafters", "pld", "--ks", "4", "--policies", "greedy,typical",
              "--categories", "qa,code", "--n-prompts", "1", "--max-new-tokens", "8", "--iterations", "2",
              "--no-cost-model", "--bootstrap", "100", "--out", str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    run_dir = Path(run.stdout.strip().splitlines()[-1])
    manifest = validate_manifest(run_dir / "MANIFEST.json")
    methods = [HF, HF_PLD, AR, "pld/k4", "pld/k4/typical"]
    assert manifest["status"] == "done" and manifest["methods"] == methods
    records = read_records(run_dir / "records.jsonl")
    assert len(records) == manifest["counts"]["records"] == manifest["this_invocation"]["measured"] == 2 * len(methods) * 2
    assert manifest["counts"]["iterations_complete"] == 2 and manifest["this_invocation"]["reused"] == 0
    for r in records:
        assert {"commit", "dirty", "diff", "time", "loadavg", "threads", "device"} <= set(r)
    cert = manifest["certificate"]
    assert cert["pld/k4"]["passed"] and cert["pld/k4"]["vs"][AR]["identical"] == cert["pld/k4"]["vs"][HF]["identical"] == 2
    assert cert["pld/k4/typical"]["lossless"] is False and "agreement" in cert["pld/k4/typical"]
    assert str(tmp_path) not in (run_dir / "MANIFEST.json").read_text()          # no machine paths
    html = (run_dir / "report.html").read_text()
    assert (run_dir / "report.ipynb").exists() and "../plotly.min.js" in html and "Plotly.newPlot" in html
    assert len(html) < 3_000_000 and (tmp_path / "plotly.min.js").stat().st_size > 1_000_000


def test_notebook_parameters_are_the_config_fields():
    "One parameter list: BenchConfig has exactly the notebook's parameters, with the same defaults."
    from specdec.cli import notebook_parameters
    params = notebook_parameters(METHODS_NB)
    fields = {f.name: f.default for f in dataclasses.fields(BenchConfig)}
    assert {n: p["default"] for n, p in params.items()} == fields


def test_a_parameter_added_to_the_notebook_is_a_cli_flag(tmp_path):
    import argparse, nbformat
    from specdec.cli import _bench_parser
    nb = nbformat.read(METHODS_NB, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source += '\nnew_knob = 7                      # a knob added to the notebook\n'
    nbformat.write(nb, tmp_path / "methods.ipynb")
    parser = argparse.ArgumentParser(); sub = parser.add_subparsers(dest="command")
    _bench_parser(sub, notebook=tmp_path / "methods.ipynb")
    bench_parser = sub.choices["bench"]
    assert "--new-knob" in bench_parser.format_help() and "a knob added to the notebook" in bench_parser.format_help()
    assert bench_parser.parse_args(["--new-knob", "9"]).new_knob == 9
    assert "--max-new-tokens" in bench_parser.format_help() and "--resume" in bench_parser.format_help()


def test_git_state_outside_a_repository_and_without_commits_is_unknown(tmp_path):
    "Unknown outside a repository; dirty with a changed or an untracked file (its contents hashed), never for results/."
    assert git_state(tmp_path) == {"commit": None, "dirty": None, "diff": None}
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    assert git_state(tmp_path) == {"commit": None, "dirty": None, "diff": None}
    git = lambda *a: subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *a], check=True,
                                    capture_output=True)
    (tmp_path / "code.py").write_text("x = 1\n"); (tmp_path / "results").mkdir(); (tmp_path / "results" / "r.jsonl").write_text("")
    git("add", "."); git("commit", "-q", "-m", "c")
    clean = git_state(tmp_path)
    assert len(clean["commit"]) == 40 and clean["dirty"] is False and clean["diff"] is None
    (tmp_path / "results" / "r.jsonl").write_text("{}\n")                          # a run writing its records: still clean
    (tmp_path / "results" / "new-run").mkdir(); (tmp_path / "results" / "new-run" / "records.jsonl").write_text("{}\n")
    assert git_state(tmp_path) == clean
    (tmp_path / ".gitignore").write_text("scratch/\n"); git("add", ".gitignore"); git("commit", "-q", "-m", "ignore")
    clean = git_state(tmp_path)
    (tmp_path / "scratch").mkdir(); (tmp_path / "scratch" / "notes.py").write_text("z = 1\n")   # git-ignored: clean
    assert git_state(tmp_path) == clean
    (tmp_path / "new_module.py").write_text("y = 1\n")                       # untracked code: dirty, in the diff hash
    untracked = git_state(tmp_path)
    assert untracked["commit"] == clean["commit"] and untracked["dirty"] is True and len(untracked["diff"]) == 12
    (tmp_path / "new_module.py").write_text("y = 2\n")                          # other contents, another hash
    assert git_state(tmp_path)["diff"] != untracked["diff"] and git_state(tmp_path)["dirty"]
    (tmp_path / "new_module.py").unlink()
    assert git_state(tmp_path) == clean
    (tmp_path / "code.py").write_text("x = 2\n")
    dirty = git_state(tmp_path)
    assert dirty["commit"] == clean["commit"] and dirty["dirty"] is True and len(dirty["diff"]) == 12
    from specdec.report import run_summary
    assert "code unknown" in run_summary({"run_id": "r", "status": "done", "params": {"model": "m", "iterations": 1, "max_new_tokens": 1, "temperature": 0},
                                          "counts": {}, "git": {"commit": None, "dirty": None}, "system": {"device": "cpu", "cpu": "x"},
                                          "prompt_set": {"name": "builtin"}, "options": {"ignore_eos": False},
                                          "this_invocation": {"measured": 0, "reused": 0}})


def test_resume_after_a_new_commit_is_refused_and_reuses_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "git_state", lambda *a, **k: dict(COMMIT_A))
    run_dir = run_benchmark(BenchConfig(**SYNTH, out=str(tmp_path), run_id="r"), progress=False)
    before = (run_dir / "records.jsonl").read_text()
    with pytest.raises(ValueError, match="already holds a run"):                      # a fresh run never writes into it
        run_benchmark(BenchConfig(**SYNTH, out=str(tmp_path), run_id="r"), progress=False)
    monkeypatch.setattr(bench, "git_state", lambda *a, **k: dict(COMMIT_B))
    with pytest.raises(ResumeRefused, match="measured at commit aaaaaaaaaa.*this code is commit bbbbbbbbbb.*leave out --resume"):
        run_benchmark(BenchConfig(**SYNTH, out=str(tmp_path), resume="r"), progress=False)
    assert (run_dir / "records.jsonl").read_text() == before
    assert json.loads((run_dir / "MANIFEST.json").read_text())["git"] == COMMIT_A
    monkeypatch.setattr(bench, "git_state", lambda *a, **k: dict(COMMIT_A))              # same code: a valid resume reuses all
    manifest = json.loads((run_benchmark(BenchConfig(**SYNTH, out=str(tmp_path), resume=str(run_dir)), progress=False)
                           / "MANIFEST.json").read_text())
    assert manifest["this_invocation"] == {**manifest["this_invocation"], "measured": 0, "reused": 2 * 3}
    assert (run_dir / "records.jsonl").read_text() == before and len(manifest["invocations"]) == 2


def test_a_run_records_the_cpus_instruction_sets_and_is_not_resumed_on_a_host_without_them(tmp_path, monkeypatch):
    # two hosts of one VM image: same machine id, model name, cores and RAM, different vector units (AVX-512, AVX2)
    monkeypatch.setattr(bench, "git_state", lambda *a, **k: dict(COMMIT_A))
    run_dir = run_benchmark(BenchConfig(**SYNTH, out=str(tmp_path), run_id="r"), progress=False)
    manifest = json.loads((run_dir / "MANIFEST.json").read_text())
    assert manifest["system"]["cpu_capability"] == manifest["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    flags = manifest["system"]["cpu_flags"]
    assert flags is None or set(flags) <= set(provenance.CPU_ISA_FLAGS)
    from specdec.report import run_summary
    assert f"({manifest['system']['cpu']}, {manifest['system']['cpu_capability']})" in run_summary(manifest)
    other = {"cpu_capability": "AVX512" if manifest["system"]["cpu_capability"] != "AVX512" else "AVX2",
             "cpu_flags": ["avx2", "fma", "avx512f", "avx512_bf16"] if flags != ["avx2", "fma", "avx512f", "avx512_bf16"] else ["avx2"]}
    monkeypatch.setattr(provenance, "cpu_isa", lambda: other)
    with pytest.raises(ResumeRefused, match=r"another machine \(cpu_capability '[A-Z0-9_]+' there, '[A-Z0-9_]+' here; cpu_flags "):
        run_benchmark(BenchConfig(**SYNTH, out=str(tmp_path), resume="r"), progress=False)


def test_fresh_invocations_make_new_run_ids():
    a = BenchConfig(**SYNTH).new_run_id(); time.sleep(1.1); b = BenchConfig(**SYNTH).new_run_id()
    assert a != b and a.endswith(BenchConfig(**SYNTH).config_hash())


def test_killed_run_resumes_explicitly_without_duplicates(tmp_path, monkeypatch):
    cfg = dict(model="tiny-llama", drafters="pld", ks="4", categories="qa,code", n_prompts=1, max_new_tokens=8,
               warmup=1, iterations=2, cost_model=False, perplexity=False, bootstrap=100)
    code = ("import specdec.bench as b; b.git_state = lambda *a, **k: {'commit': 'a' * 40, 'dirty': False, 'diff': None}; "
            f"b.run_benchmark(b.BenchConfig(**{cfg!r}, out={str(tmp_path)!r}, run_id='r'), progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", code])
    records = tmp_path / "r" / "records.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and (not records.exists() or len(records.read_text().splitlines()) < 5):
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL); proc.wait()
    partial = read_records(records)
    total = 2 * 2 * (3 + 1)                                                       # prompts × iterations × methods
    assert 5 <= len(partial) < total
    assert json.loads((tmp_path / "r" / "MANIFEST.json").read_text())["status"] == "running"
    monkeypatch.setattr(bench, "git_state", lambda *a, **k: dict(COMMIT_A))
    manifest = json.loads((run_benchmark(BenchConfig(**cfg, out=str(tmp_path), resume="r"), progress=False) / "MANIFEST.json").read_text())
    full = read_records(records)
    keys = [record_key(r) for r in full]
    assert len(keys) == len(set(keys)) == total
    assert full[:len(partial)] == partial                                      # finished records were kept as they were
    assert manifest["status"] == "done" and manifest["this_invocation"]["reused"] == len(partial)
    assert manifest["this_invocation"]["measured"] == total - len(partial)


class AcceptEverything(Greedy):
    "Made lossy on purpose, but still labelled lossless: accepts every draft."
    def __call__(self, draft_tokens, draft_probs, target_logits, sampling=None, generator=None):
        B, K = draft_tokens.shape
        return Verdict(torch.full((B,), K), target_logits[:, K].argmax(-1))


def test_lossless_method_made_lossy_fails_its_certificate(tmp_path):
    cfg = BenchConfig(model="tiny-llama", drafters="model:tiny-llama-draft", ks="4", policies=[AcceptEverything()],
                      categories="qa,summarization", n_prompts=1, max_new_tokens=16, warmup=0, iterations=1, hf_pld=False,
                      out=str(tmp_path), run_id="broken", cost_model=False, bootstrap=100)
    manifest = json.loads((run_benchmark(cfg, progress=False) / "MANIFEST.json").read_text())
    cert = manifest["certificate"]["model:tiny-llama-draft/k4/accepteverything"]
    assert cert["lossless"] and not cert["passed"] and cert["vs"][AR]["identical"] < cert["vs"][AR]["prompts"] == 2
    assert manifest["certificate"][AR]["passed"]


def test_float32_certificate_pass_and_equal_work(tmp_path):
    "A bf16 speed run gets its certificate from float32 records; with ignore_eos every method does max_new_tokens."
    cfg = BenchConfig(model="tiny-llama", dtype="bfloat16", drafters="pld", ks="4", categories="qa,code", n_prompts=1,
                      max_new_tokens=8, iterations=1, warmup=0, ignore_eos="true", certify_prompts=1, hf_pld=False,
                      cost_model=False, bootstrap=100, out=str(tmp_path), run_id="c")
    run_dir = run_benchmark(cfg, progress=False)
    manifest, records = json.loads((run_dir / "MANIFEST.json").read_text()), read_records(run_dir / "records.jsonl")
    certify = [r for r in records if r["purpose"] == "certify"]
    assert sorted(r["method"] for r in certify) == sorted([HF, AR, "pld/k4"]) and {r["dtype"] for r in certify} == {"float32"}
    assert {r["dtype"] for r in records if r["purpose"] == "speed"} == {"bfloat16"}
    cert = manifest["certificate"]["pld/k4"]
    assert cert["dtype"] == "float32" and cert["passed"] and cert["vs"][HF]["prompts"] == 1
    assert cert["speed_run_vs_hf"]["dtype"] == "bfloat16" and cert["speed_run_vs_hf"]["prompts"] == 2
    assert all(r["new_tokens"] == 8 for r in records)


def test_joined_drafter_records_who_drafted_and_stays_lossless(tmp_path):
    "pld:3:2+model:...: each record counts the steps each member drafted; the report tabulates them; the certificate passes."
    from specdec.report import fallback_table, load_run
    spec = "pld:3:2+model:tiny-llama-draft"
    cfg = BenchConfig(model="tiny-llama", drafters=spec, ks="3", categories="qa,summarization", n_prompts=1, max_new_tokens=24,
                      warmup=0, iterations=1, hf_pld=False, cost_model=False, bootstrap=100, out=str(tmp_path), run_id="joined")
    run_dir = run_benchmark(cfg, progress=False)
    manifest, records = load_run(run_dir)
    assert manifest["certificate"][f"{spec}/k3"]["passed"]
    joined = records[records.method == f"{spec}/k3"].to_dict("records")
    members = ["pld:3:2", "model:tiny-llama-draft"]                                      # each drafter named by its spec
    assert joined and all([u["drafter"] for u in r["drafter_usage"]] == members for r in joined)
    steps = [[u["steps"] for u in r["drafter_usage"]] for r in joined]
    assert all(sum(s) <= r["target_forwards"] for s, r in zip(steps, joined)) and sum(s[1] for s in steps) > 0
    table = fallback_table(records)
    qa = next(r for r in joined if r["category"] == "qa")
    assert table.loc[(f"{spec}/k3", "qa"), ("steps", members[1])] == qa["drafter_usage"][1]["steps"]
    assert fallback_table(records[records.method == AR]) == "no joined drafter (A+B) in this run"


def test_speedup_excludes_unequal_work():
    rec = lambda m, p, n, wall: {"prompt_id": p, "method": m, "iteration": 0, "new_tokens": n, "wall_time": wall}
    base = [rec(AR, "a", 10, 1.0), rec(AR, "b", 10, 1.0)]
    mine = [rec("x", "a", 10, 0.5), rec("x", "b", 4, 0.1)]                        # b stopped early: not the same work
    s = speedup(mine, base, n_boot=50)
    assert s["geomean"] == pytest.approx(2.0) and s["prompts"] == 1 and s["excluded_unequal_length"] == ["b"]


def test_decode_speedup_leaves_the_prefill_out():
    "Both methods spend 1 s in the prefill: end to end 3.0/2.0 = 1.5x, the decode alone 2.0/1.0 = 2x; HF's untimed prefill gives none."
    rec = lambda m, p, wall, prefill: {"prompt_id": p, "method": m, "iteration": 0, "new_tokens": 20, "wall_time": wall, "prefill_time": prefill}
    base, mine = [rec(AR, "a", 3.0, 1.0)], [rec("x", "a", 2.0, 1.0)]
    assert speedup(mine, base, n_boot=50)["geomean"] == pytest.approx(1.5)
    assert speedup(mine, base, n_boot=50, key="decode_tok_s")["geomean"] == pytest.approx(2.0)
    hf = speedup([rec(HF, "a", 2.0, 0.0)], base, n_boot=50, key="decode_tok_s")
    assert hf["geomean"] is None and hf["prompts"] == 0


def test_bootstrap_ci_contains_the_point_and_narrows_with_more_prompts():
    rng = np.random.default_rng(0)
    few, many = bootstrap_geomean(rng.lognormal(0.3, 0.4, 6)), bootstrap_geomean(rng.lognormal(0.3, 0.4, 200))
    for s in (few, many): assert s["ci95"][0] < s["geomean"] < s["ci95"][1]
    assert many["ci95"][1] - many["ci95"][0] < 0.5 * (few["ci95"][1] - few["ci95"][0])
    assert 1.2 < many["geomean"] < 1.5 and bootstrap_geomean([2.0])["ci95"] is None
    assert bootstrap_geomean([1.1, 1.3, 1.2], seed=3) == bootstrap_geomean([1.1, 1.3, 1.2], seed=3)      # fixed seed


def test_interleaved_schedule_rotates_methods():
    order = bench.schedule(["p", "q"], ["a", "b", "c"], 3)
    assert [i for i, _, _ in order] == [0] * 6 + [1] * 6 + [2] * 6              # iteration i finishes before i + 1
    firsts = [m for k, (_, _, m) in enumerate(order) if k % 3 == 0]
    assert set(firsts) == {"a", "b", "c"}                                         # no method always goes first


def test_certificate_fails_on_truncated_output():
    methods = {m.name: m.describe(0.0) for m in methods_from(["pld"], ["4"], ["greedy"], (HF, AR))}
    rec = lambda m, p, toks: {"prompt_id": p, "method": m, "iteration": 0, "tokens": toks}
    records = [rec(HF, "a", [1, 2, 3, 4]), rec(AR, "a", [1, 2, 3, 4]), rec("pld/k4", "a", [1, 2, 3])]
    cert = certificate(records, methods, 0.0)
    assert cert[AR]["passed"] and not cert["pld/k4"]["passed"] and cert["pld/k4"]["failed_prompts"] == ["a"]
    assert not tokens_equal([1, 2, 3], [1, 2, 3, 4]) and not tokens_equal([1, 2, 3, 4, 5], [1, 2, 3, 4])


def test_malformed_prompts_file_names_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "category": "qa", "turns": ["hi"]}\n{"question_id": 2, "category": "qa"\n')
    run = cli("bench", "--model", "tiny-llama", "--prompts", str(bad), "--out", str(tmp_path))
    assert run.returncode == 2 and "line 2" in run.stderr and "bad.jsonl" in run.stderr
    assert not any(tmp_path.glob("*/MANIFEST.json"))


def test_bad_bench_parameters():
    with pytest.raises(ValueError, match="K >= 1"): BenchConfig(ks="0")
    with pytest.raises(ValueError, match="drafters is empty"): BenchConfig(drafters="")
    with pytest.raises(ValueError, match="unknown policy 'nope'"): BenchConfig(policies="nope")
    with pytest.raises(ValueError, match="iterations must be an integer >= 1"): BenchConfig(iterations=0)
    with pytest.raises(ValueError, match="unknown preset 'nope'"): BenchConfig(preset="nope")
    with pytest.raises(ValueError, match="ignore_eos must be auto, true or false"): BenchConfig(ignore_eos="maybe")
    with pytest.raises(ValueError, match="'pld@0' pins a bad controller after '@'.*K >= 1"): BenchConfig(drafters="pld@0")
    with pytest.raises(ValueError, match="'pld@x' pins a bad controller.*unknown controller 'x'"): BenchConfig(drafters="pld@x")
    with pytest.raises(ValueError, match="'@4' has no drafter before '@'"): BenchConfig(drafters="@4")
    with pytest.raises(ValueError, match="methods pld/k4 would run twice"): BenchConfig(drafters="pld", ks="4,fixed:4")
    with pytest.raises(ValueError, match="methods pld/k4 would run twice"): BenchConfig(drafters="pld,pld@4", ks="4")


def test_a_drafter_pinned_to_a_k_runs_with_that_k_only(tmp_path):
    "`SPEC@K` (a tree at its depth, say) runs with K alone, beside drafters crossed with every K of `ks`, in one run."
    assert BenchConfig(drafters="eagle:/a@b/head").drafter_specs == ["eagle:/a@b/head"]            # an '@' in a path is no pin
    cfg = BenchConfig(model="synthetic", drafters="synthetic:0.9@1,synthetic:0.5", ks="4,cost:6", categories="qa", n_prompts=1,
                      hf_pld=False, max_new_tokens=24, iterations=1, warmup=0, cost_model=False, bootstrap=100,
                      out=str(tmp_path), run_id="pinned")
    assert cfg.drafter_specs == ["synthetic:0.9", "synthetic:0.5"]
    assert [(m.k, m.controller.k_max, m.controller.needs_costs) for m in cfg.methods()[2:]] == [
        ("fixed:1", 1, False), ("fixed:4", 4, False), ("cost:6", 6, True)]
    manifest = validate_manifest(run_benchmark(cfg, progress=False) / "MANIFEST.json")
    assert manifest["methods"] == [HF, AR, "synthetic:0.9/k1", "synthetic:0.5/k4", "synthetic:0.5/cost:6"]
    assert set(manifest["models"]["drafters"]) == {"synthetic:0.9", "synthetic:0.5"}
    pinned = [r for r in read_records(Path(tmp_path) / "pinned" / "records.jsonl") if r["method"] == "synthetic:0.9/k1"]
    assert pinned and all(r["new_tokens"] <= 2 * r["target_forwards"] for r in pinned)              # K=1: at most 2 tokens a step
    assert manifest["results"]["synthetic:0.9/k1"]["tau"] <= 2.0


def test_dry_run_checks_pipeline_and_cost_model(tmp_path):
    "The synthetic target and drafters (set costs and acceptance) run the whole harness in seconds."
    cfg = BenchConfig(model="synthetic", drafters="synthetic:0.9,synthetic:0.3", ks="1,4", categories="qa,code", n_prompts=1,
                      hf_pld=False, max_new_tokens=32, iterations=3, warmup=1, bootstrap=200, out=str(tmp_path), run_id="dry")
    manifest = validate_manifest(run_benchmark(cfg, progress=False) / "MANIFEST.json")
    assert all(c["passed"] for c in manifest["certificate"].values())
    good, poor = manifest["results"]["synthetic:0.9/k4"], manifest["results"]["synthetic:0.3/k4"]
    assert good["tau"] > 2.5 and poor["tau"] < 2.0 and good["speedup"][AR]["geomean"] > 1.5
    for name, r in manifest["results"].items():
        if r.get("predicted_speedup") is not None:
            assert abs(r["predicted_speedup"] / r["speedup"][AR]["geomean"] - 1) < 0.35, name


def test_hf_static_sizes_its_cache_once_per_run():
    """hf-static gets one cache size for all of a run's prompts (its longest prompt plus the new tokens), so HF compiles
    its decode step once; its greedy tokens are HF generate's."""
    from transformers.cache_utils import Cache
    from specdec.bench import hf_generate, static_cache_len, HF_STATIC
    from specdec.models import tiny_llama
    target = tiny_llama()
    prompts = [torch.randint(3, 100, (1, n), generator=torch.Generator().manual_seed(n)) for n in (5, 11)]
    size = static_cache_len(prompts, 8)
    assert size == 11 + 8
    sizes = []
    def keep_cache_size(module, args, kwargs):
        sizes.extend(v.get_max_length() for v in kwargs.values() if isinstance(v, Cache))
    hook = target.model.register_forward_pre_hook(keep_cache_size, with_kwargs=True)
    try:
        for p in prompts:
            plain, _ = hf_generate(target, p, 8)
            sizes.clear()
            static, stats = hf_generate(target, p, 8, mode=HF_STATIC, max_cache_len=size)
            assert static == plain and stats.new_tokens == 8
            assert sizes and set(sizes) == {size}                   # every forward ran on the run's one cache size
    finally: hook.remove()


def test_an_interrupted_run_still_summarizes_what_it_measured(tmp_path):
    "A run cut off part-way (its MANIFEST still `running`) gives the summaries of the records it wrote, counted as partial."
    from specdec.summary import summarize_partial
    run_dir = run_benchmark(BenchConfig(**{**SYNTH, "iterations": 2}, out=str(tmp_path)), progress=False)
    records = (run_dir / "records.jsonl").read_text().splitlines()
    speed = [l for l in records if json.loads(l)["purpose"] == "speed"]
    (run_dir / "records.jsonl").write_text("\n".join(speed[:len(speed) // 2]) + "\n")      # the first iteration only
    manifest = json.loads((run_dir / "MANIFEST.json").read_text())
    manifest = {k: v for k, v in manifest.items() if k not in ("results", "per_category", "counts", "certificate")}
    (run_dir / "MANIFEST.json").write_text(json.dumps({**manifest, "status": "running"}))
    summary = summarize_partial(run_dir)
    assert summary["partial"] == {"status": "running", "measured": len(speed) // 2, "planned": len(speed)}
    assert summary["counts"]["iterations_complete"] == 1 and set(summary["results"]) == set(manifest["methods"])
    assert summary["results"]["synthetic:0.9/k4"]["speedup"][AR]["n"] == 2
    (run_dir / "MANIFEST.json").write_text(json.dumps({**manifest, "methods": manifest["methods"][:-1]}))
    with pytest.raises(ValueError, match="its manifest lists"): summarize_partial(run_dir)
    (run_dir / "MANIFEST.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "method_info"}))
    with pytest.raises(ValueError, match="no method_info in its manifest"): summarize_partial(run_dir)


def test_summary_prints_a_run_as_text_and_says_when_it_is_partial(tmp_path):
    """`specdec summary RUN`: a line per method with the manifest's speedups, a row per category (one prompt there: no CI),
    and an unfinished run summarized from its records, saying so; a folder that is no run is a clear error."""
    run_dir = run_benchmark(BenchConfig(**{**SYNTH, "categories": "qa,code", "n_prompts": 1, "iterations": 2}, out=str(tmp_path)),
                            progress=False)
    manifest = json.loads((run_dir / "MANIFEST.json").read_text())
    run = cli("summary", run_dir.name, "--results", str(tmp_path))
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert "PARTIAL" not in run.stdout and manifest["run_id"] in lines[0]
    for name in manifest["methods"]:
        sp = manifest["results"][name]["speedup"][AR]
        line = next(l for l in lines if l.startswith(name + " "))
        assert f"{sp['geomean']:.2f} [{sp['ci95'][0]:.2f}-{sp['ci95'][1]:.2f}]" in line
        r = manifest["results"][name]                     # verify / draft ms per verification step (the prefill apart)
        if r["time_split"] is None: continue                                              # HF generate: no split
        steps = r["target_forwards"]
        assert f"{1e3 * r['time_split']['verify'] / steps:.1f} / {1e3 * r['time_split']['draft'] / steps:.1f}" in line
    per_category = lines[lines.index("× specdec-AR per category (geometric mean over its prompts):") + 1:]
    assert per_category[0].split() == [m for m in manifest["methods"] if m != AR]
    for category in ("code", "qa"):
        row = next(l for l in per_category if l.startswith(category + " ")).split()
        expected = manifest["per_category"][category]["synthetic:0.9/k4"]["speedup"][AR]
        assert expected["ci95"] is None and row[-1] == f"{expected['geomean']:.2f}"     # one prompt: the point alone
    speed = [l for l in (run_dir / "records.jsonl").read_text().splitlines() if json.loads(l)["purpose"] == "speed"]
    (run_dir / "records.jsonl").write_text("\n".join(speed[:len(speed) // 4]) + "\n")          # cut off early
    (run_dir / "MANIFEST.json").write_text(json.dumps({**manifest, "status": "running"}))
    partial = cli("summary", str(run_dir))
    assert partial.returncode == 0, partial.stderr[-2000:]
    assert partial.stdout.startswith(f"PARTIAL RUN (running): {len(speed) // 4} of {len(speed)} timed records")
    missing = cli("summary", "no-such-run", "--results", str(tmp_path))
    assert missing.returncode == 2 and "no run 'no-such-run' to summarize" in missing.stderr


def test_python_m_specdec_cli_runs_the_command():
    "`python -m specdec.cli` (the package on PYTHONPATH, no `specdec` script: a lent GPU machine) runs the command."
    run = subprocess.run([sys.executable, "-m", "specdec.cli", "bench", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0 and run.stdout.startswith("usage: specdec bench"), run.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-m", "specdec.cli", "generate", "--model", "tiny-llama", "--k", "0", "--prompt", "x"],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "K >= 1" in bad.stderr


def test_the_target_is_fused_before_any_hf_generation(tmp_path, monkeypatch):
    """specdec's net (q/k/v and gate/up fused into new tensors) exists before HF's first generation, so hf-static's
    compiled graphs never record weight addresses that fusing replaces later."""
    seen = []
    real = bench.hf_generate
    def spy(target, *args, **kw):
        seen.append("net" in vars(target))
        return real(target, *args, **kw)
    monkeypatch.setattr(bench, "hf_generate", spy)
    run_benchmark(BenchConfig(model="tiny-llama", drafters="pld", ks="4", categories="qa", n_prompts=1, max_new_tokens=4,
                              iterations=1, warmup=1, cost_model=False, bootstrap=100, out=str(tmp_path)), progress=False)
    assert seen and all(seen)


RESULTS = ROOT / "results"
DEFAULT_RUNS = ["20261205-121529-smollm2-135m-ba831493", "20261205-174250-smollm2-135m-ba831493"]   # one preset


@pytest.mark.parametrize("run", ["20261127-020753-smollm2-135m-f9bb01b6", "20261204-171554-smollm2-135m-d244f7a2",
                                 "20261205-080946-smollm2-135m-c42e3a2c"])
def test_committed_runs_still_summarize(run):
    "Runs written by older code (a K sweep, dynamic:6:0.1, pinned trees) print as they did, their CIs labelled."
    out = cli("summary", run)
    assert out.returncode == 0, out.stderr[-2000:]
    manifest = read_manifest(RESULTS / run)
    assert run in out.stdout and "95% CI across prompts, this run" in out.stdout
    for name in manifest["methods"]:
        sp = manifest["results"][name]["speedup"][AR]
        line = next(l for l in out.stdout.splitlines() if l.startswith(name + " "))
        point = f"{sp['geomean']:.2f}"
        assert (f"{point} [{sp['ci95'][0]:.2f}-{sp['ci95'][1]:.2f}]" if sp["ci95"] else point) in line


def test_summary_of_several_runs_shows_the_spread_between_them():
    "Two committed runs of the default preset: each figure is the median of the runs' own figures with their min-max."
    manifests = [read_manifest(RESULTS / r) for r in DEFAULT_RUNS]
    out = cli("summary", *DEFAULT_RUNS)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("2 runs of the same parameters (config ba831493)")
    assert all(r in out.stdout for r in DEFAULT_RUNS)
    for name in manifests[0]["methods"]:
        points = [m["results"][name]["speedup"][AR]["geomean"] for m in manifests]
        taus = [m["results"][name]["tau"] for m in manifests]
        line = next(l for l in lines if l.startswith(name + " "))
        assert f"{np.median(points):.2f} ({min(points):.2f}-{max(points):.2f})" in line, line
        if None not in taus: assert f"{np.median(taus):.2f} ({min(taus):.2f}-{max(taus):.2f})" in line
    per_category = lines[next(i for i, l in enumerate(lines) if l.startswith("× specdec-AR per category")) + 1:]
    qa = next(l for l in per_category if l.startswith("qa "))
    points = [m["per_category"]["qa"]["pld/k4"]["speedup"][AR]["geomean"] for m in manifests]
    assert f"{np.median(points):.2f} ({min(points):.2f}-{max(points):.2f})" in qa
    one = cli("summary", DEFAULT_RUNS[0])                                            # one run prints as before
    assert one.returncode == 0 and one.stdout.startswith(f"Run `{DEFAULT_RUNS[0]}`") and "min-max" not in one.stdout


def test_summary_refuses_runs_that_measured_different_things(tmp_path):
    other = cli("summary", DEFAULT_RUNS[0], "20261127-020753-smollm2-135m-f9bb01b6")       # the k_sweep preset
    assert other.returncode == 2 and "measured different methods" in other.stderr
    manifest = read_manifest(RESULTS / DEFAULT_RUNS[1])   # same methods, other lengths
    (tmp_path / "longer").mkdir()
    manifest["params"]["max_new_tokens"] = 128
    (tmp_path / "longer" / "MANIFEST.json").write_text(json.dumps({**manifest, "run_id": "longer"}))
    longer = cli("summary", DEFAULT_RUNS[0], str(tmp_path / "longer"))
    assert longer.returncode == 2 and "max_new_tokens 48 in 20261205-121529" in longer.stderr
    assert "128 in longer" in longer.stderr



def test_a_parameter_added_later_is_read_as_what_older_runs_measured(tmp_path):
    "`history` came with the suffix drafters: a run without it measured 'sequence'; a run with 'none' differs."
    manifest = read_manifest(RESULTS / DEFAULT_RUNS[1])
    assert "history" not in manifest["params"]
    for name, history in (("newer", "sequence"), ("other", "none")):
        (tmp_path / name).mkdir()
        params = {**manifest["params"], "history": history}
        (tmp_path / name / "MANIFEST.json").write_text(json.dumps({**manifest, "run_id": name, "params": params}))
    newer = cli("summary", DEFAULT_RUNS[0], str(tmp_path / "newer"))
    assert newer.returncode == 0, newer.stderr[-2000:]
    assert f"history absent in {DEFAULT_RUNS[0]}: read as 'sequence'" in newer.stdout
    other = cli("summary", DEFAULT_RUNS[0], str(tmp_path / "other"))
    assert other.returncode == 2 and "history 'sequence' in 20261205-121529" in other.stderr

def test_certificate_fails_a_lossless_method_that_drafted_without_target_features():
    "Equal tokens are not enough: a head that found no target features (drafting from zeros) fails, naming the prompts."
    from specdec.summary import certificate_failures
    methods = {HF: {"lossless": True}, AR: {"lossless": True}, "eagle/k4": {"lossless": True}}
    rec = lambda m, p, missing=None: {"prompt_id": p, "method": m, "iteration": 0, "tokens": [1, 2, 3],
                                      "purpose": "speed", **({} if missing is None else {"missing_features": missing})}
    base = [rec(b, p) for b in (HF, AR) for p in ("a", "b")]
    old = certificate(base + [rec("eagle/k4", "a"), rec("eagle/k4", "b")], methods, 0.0)      # older records: no field
    fine = certificate(base + [rec("eagle/k4", "a", 0), rec("eagle/k4", "b", 0)], methods, 0.0)
    bad = certificate(base + [rec("eagle/k4", "a", 0), rec("eagle/k4", "b", 5)], methods, 0.0)
    assert old["eagle/k4"]["passed"] and fine["eagle/k4"]["passed"] and fine["eagle/k4"]["missing_features"] == {}
    assert not bad["eagle/k4"]["passed"] and bad["eagle/k4"]["missing_features"] == {"b": 5} and bad[AR]["passed"]
    failures = certificate_failures({"certificate": bad})
    assert failures == ["eagle/k4: drafted without the target's features on b (5 steps)"]
    assert certificate_failures({"certificate": fine}) == []


def test_hf_and_specdec_stop_on_the_same_ids():
    """Both get the target's stop ids explicitly (`stop_ids`), never None (what HF makes of None has changed between
    its versions): a target whose stop ids are its HF config's EOS stops both there; one that stops on nothing (its HF
    config still naming an EOS) runs both to max_new_tokens."""
    from specdec.bench import hf_generate, run_method, stop_ids
    from specdec.models import tiny_llama
    target = tiny_llama()
    prompt = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(0))
    free, _ = hf_generate(target, prompt, 16, ignore_eos=True)
    stop = next(t for i, t in enumerate(free) if i >= 3 and t not in free[:i])         # first made at a step i >= 3
    cfg, opts = BenchConfig(max_new_tokens=16), {"ignore_eos": False}
    target.model.generation_config.eos_token_id = stop
    assert stop_ids(target, False) == [stop] and stop_ids(target, True) == []
    hf, _ = hf_generate(target, prompt, 16)
    assert hf == run_method(Method(AR), target, prompt, cfg, opts)[0] == free[:free.index(stop) + 1]   # both stop there

    class StopsOnNothing(type(target)):
        eos_token_ids = []                                # the target's own stop ids: none (its HF config keeps one)
    target.__class__ = StopsOnNothing
    hf, _ = hf_generate(target, prompt, 16)
    assert stop_ids(target, False) == [] and hf == run_method(Method(AR), target, prompt, cfg, opts)[0] == free


def test_k_sweep_figure_reads_the_controller_however_written():
    "`fixed:2,fixed:4`, `2,4` and `cost:4,cost:8` sweeps each make a line (fixed ones as older manifests wrote them)."
    from specdec.report import fig_k_sweep
    result = lambda drafter, k, tok_s: {"drafter": drafter, "k": k, "policy": "greedy", "tok_s": {"median": tok_s},
                                        "tau": 1.5}
    results = {"a/k2": result("a", "fixed:2", 10), "a/k4": result("a", "fixed:4", 12), "b/k2": result("b", "2", 9),
               "b/k4": result("b", "4", 11), "c/cost:4": result("c", "cost:4", 8),
               "c/cost:8": result("c", "cost:8", 13), "d/k4": result("d", "fixed:4", 7)}
    fig = fig_k_sweep({"results": results})
    lines = {t.name: (list(t.x), list(t.y)) for t in fig.data if t.showlegend is not False}
    assert lines == {"a": ([2, 4], [10, 12]), "b": ([2, 4], [9, 11]), "c cost": ([4, 8], [8, 13]), "d": ([4], [7])}
    assert fig_k_sweep({"results": {"d/k4": result("d", "fixed:4", 7)}}) is None           # no drafter at several K


def _suffix_counters(run_dir, method="suffix/k4"):
    "The suffix drafter's counters of each (prompt, iteration) of `method`'s speed records."
    records = read_records(run_dir / "records.jsonl")
    return {(r["prompt_id"], r["iteration"]): next(iter(r["drafter_counters"].values())) for r in records
            if r["method"] == method and r["purpose"] == "speed"}


def test_a_suffix_sequence_sees_the_same_history_in_every_iteration(tmp_path, monkeypatch):
    """history=sequence: before each generation the suffix cache is set to the method's outputs for the prompts before
    it in the run's order, whatever ran before (the warm-up, the other iterations), so every iteration drafts alike;
    history=none sets it empty. Negative control: without `remember`, later iterations draft from their own answers."""
    from specdec.suffix import SuffixDecoding
    seen, remember = [], SuffixDecoding.remember
    monkeypatch.setattr(SuffixDecoding, "remember", lambda self, responses: (seen.append([list(r) for r in responses]),
                                                                             remember(self, responses))[1])
    base = dict(model="tiny-llama", drafters="suffix", ks="4", prompts="repeated", categories="extract_order,add_type_hints",
                n_prompts=2, max_new_tokens=16, iterations=2, warmup=1, hf_pld=False, cost_model=False, bootstrap=100,
                out=str(tmp_path))
    run_dir = run_benchmark(BenchConfig(**base, run_id="sequence"), progress=False)
    manifest = json.loads((run_dir / "MANIFEST.json").read_text())
    order = ["repeated-01", "repeated-02", "repeated-04", "repeated-05"]
    assert manifest["history"] == {"mode": "sequence", "order": order} and manifest["certificate"]["suffix/k4"]["passed"]
    outputs = {r["prompt_id"]: r["tokens"] for r in read_records(run_dir / "records.jsonl")
               if r["method"] == "suffix/k4" and r["iteration"] == 0}
    histories = [[outputs[q] for q in order[:j]] for j in range(len(order))]
    assert seen == histories[:1] + histories + histories                    # the warm-up, then two iterations
    counters = _suffix_counters(run_dir)
    assert all(counters[(p, 0)] == counters[(p, 1)] for p in order) and counters[(order[-1], 0)]["drafts"] > 0
    seen.clear()
    cold = _suffix_counters(run_benchmark(BenchConfig(**base, history="none", run_id="none"), progress=False))
    assert seen == [[]] * 9 and cold[(order[0], 0)] == counters[(order[0], 0)]
    monkeypatch.setattr(SuffixDecoding, "remember", lambda self, responses: None)
    leaky = _suffix_counters(run_benchmark(BenchConfig(**base, run_id="leaky"), progress=False))
    assert any(leaky[(p, 0)] != leaky[(p, 1)] for p in order)
    with pytest.raises(ValueError, match="history must be one of sequence, none"): BenchConfig(history="all")


def test_suffix_presets_name_the_workloads_and_methods():
    dev = bench.config_from_parameters({"preset": "suffix"})
    assert dev.prompts.endswith("spec_bench_dev.jsonl") and dev.history == "sequence" and dev.max_new_tokens == 128
    repeated = bench.config_from_parameters({"preset": "suffix_repeated"})
    assert repeated.prompts == "repeated" and repeated.n_prompts == 0 and repeated.history == "sequence"
    for cfg in (dev, repeated):
        names = [m.name for m in cfg.methods()]
        assert {"suffix", "suffix-tree", "pld", "eagle", "pld:3:2+eagle"} <= {n.split("/")[0] for n in names}
        assert any(n.startswith("suffix") and "+eagle" in n for n in names)
    from specdec.prompts import load_prompts
    assert len(load_prompts(repeated.prompts, n_prompts=repeated.n_prompts or None)) == 18
