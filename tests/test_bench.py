"The benchmark harness: papermill smoke run, manifest schema, resume after a kill, certificates, errors."
import json, os, signal, subprocess, sys, time
from pathlib import Path
import pytest, torch
from specdec.bench import BenchConfig, run_benchmark, read_records, record_key, certificate, methods_from, tokens_equal, HF, AR
from specdec.policies import Greedy, Verdict
from specdec.report import validate_manifest, MANIFEST_SCHEMA

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(model="tiny-llama", drafters=["pld", "layerskip:2"], ks=["1", "4"], categories=["qa", "code"], n_prompts=1,
            max_new_tokens=12, warmup=1, iterations=2)


def test_papermill_smoke_run_writes_a_complete_run(tmp_path):
    import papermill as pm
    params = dict(model="tiny-llama", drafters="pld,layerskip:2", ks="1,4", policies="greedy,typical", categories="qa,rag",
                  n_prompts=1, max_new_tokens=12, iterations=1, warmup=1, out=str(tmp_path), run_id="smoke")
    pm.execute_notebook(str(ROOT / "nbs/bench/methods.ipynb"), str(tmp_path / "executed.ipynb"), parameters=params,
                        kernel_name="python3", progress_bar=False)
    run = tmp_path / "smoke"
    manifest = validate_manifest(run / "MANIFEST.json")
    assert manifest["status"] == "complete" and manifest["params"]["model"] == "tiny-llama"
    records = read_records(run / "records.jsonl")
    assert len(records) == 2 * (2 + 2 * 2 * 2)            # prompts × (baselines + drafters × ks × policies)
    assert manifest["certificate"]["pld/k4"]["passed"] and manifest["certificate"][AR]["passed"]
    assert manifest["certificate"]["pld/k4/typical"]["lossless"] is False
    assert "agreement" in manifest["certificate"]["pld/k4/typical"]
    html = (run / "report.html").read_text()
    assert (run / "report.ipynb").exists() and "../plotly.min.js" in html
    assert len(html) < 2_000_000 and "Plotly.newPlot" in html          # figures, without an embedded plotly.js
    assert (tmp_path / "plotly.min.js").stat().st_size > 1_000_000   # one shared copy beside the runs
    with pytest.raises(Exception): validate_manifest({**manifest, "results": {"x": {"tok_s": {}}}})


def test_killed_run_resumes_without_duplicates(tmp_path):
    code = ("import sys; from specdec.bench import BenchConfig, run_benchmark; "
            f"run_benchmark(BenchConfig(**{TINY!r}, out={str(tmp_path)!r}, run_id='r', cost_model=False, perplexity=False), progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", code])
    records = tmp_path / "r" / "records.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not records.exists() or len(records.read_text().splitlines()) < 5): time.sleep(0.05)
    proc.send_signal(signal.SIGKILL); proc.wait()
    partial = read_records(records)
    assert 5 <= len(partial) < 2 * 2 * (2 + 4)                          # killed part-way
    cfg = BenchConfig(**TINY, out=str(tmp_path), run_id="r", cost_model=False, perplexity=False)
    run_benchmark(cfg, progress=False)
    full = read_records(records)
    keys = [record_key(r) for r in full]
    assert len(keys) == len(set(keys)) == 2 * 2 * (2 + 4)               # prompts × iterations × methods, once each
    assert full[:len(partial)] == partial                              # finished records were kept as they were
    assert json.loads((tmp_path / "r" / "MANIFEST.json").read_text())["status"] == "complete"


class AcceptEverything(Greedy):
    "Made lossy on purpose, but still labelled lossless: accepts every draft."
    def __call__(self, draft_tokens, draft_probs, target_logits, sampling=None, generator=None):
        B, K = draft_tokens.shape
        return Verdict(torch.full((B,), K), target_logits[:, K].argmax(-1))


def test_lossless_method_made_lossy_fails_its_certificate(tmp_path):
    cfg = BenchConfig(model="tiny-llama", drafters=["model:tiny-llama-draft"], ks=["4"], policies=[AcceptEverything()],
                      categories=["qa", "summarization", "code"], n_prompts=1, max_new_tokens=16, warmup=0,
                      out=str(tmp_path), run_id="broken", cost_model=False)
    manifest = json.loads((run_benchmark(cfg, progress=False) / "MANIFEST.json").read_text())
    cert = manifest["certificate"]["model:tiny-llama-draft/k4/accepteverything"]
    assert cert["lossless"] and not cert["passed"] and cert["identical"] < cert["prompts"] == 3
    assert manifest["certificate"][AR]["passed"]


def test_certificate_fails_on_truncated_output():
    methods = methods_from(["pld"], ["4"], ["greedy"])
    rec = lambda m, p, toks: {"prompt_id": p, "method": m, "iteration": 0, "tokens": toks}
    records = [rec(HF, "a", [1, 2, 3, 4]), rec(AR, "a", [1, 2, 3, 4]), rec("pld/k4", "a", [1, 2, 3])]
    cert = certificate(records, methods, 0.0)
    assert cert[AR]["passed"] and not cert["pld/k4"]["passed"] and cert["pld/k4"]["failed_prompts"] == ["a"]
    assert not tokens_equal([1, 2, 3], [1, 2, 3, 4]) and not tokens_equal([1, 2, 3, 4, 5], [1, 2, 3, 4])


def test_malformed_prompts_file_names_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "category": "qa", "turns": ["hi"]}\n{"question_id": 2, "category": "qa"\n')
    run = subprocess.run([sys.executable, "-c", "from specdec.cli import main; raise SystemExit(main())", "bench",
                          "--model", "tiny-llama", "--prompts", str(bad), "--out", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 2 and "line 2" in run.stderr and "bad.jsonl" in run.stderr


def test_bad_bench_parameters():
    with pytest.raises(ValueError, match="K >= 1"): BenchConfig(ks=["0"])
    with pytest.raises(ValueError, match="drafters is empty"): BenchConfig(drafters=[])
    with pytest.raises(ValueError, match="unknown policy 'nope'"): BenchConfig(policies=["nope"])


def test_dry_run_checks_pipeline_and_cost_model(tmp_path):
    "The synthetic target and drafters (set costs and acceptance) run the whole harness in seconds."
    cfg = BenchConfig(model="synthetic", drafters=["synthetic:0.9", "synthetic:0.3"], ks=["1", "4"], categories=["qa", "code"],
                      n_prompts=1, max_new_tokens=32, warmup=1, out=str(tmp_path), run_id="dry")
    manifest = validate_manifest(run_benchmark(cfg, progress=False) / "MANIFEST.json")
    assert all(c["passed"] for c in manifest["certificate"].values())
    good, poor = manifest["results"]["synthetic:0.9/k4"], manifest["results"]["synthetic:0.3/k4"]
    assert good["tau"] > 2.5 and poor["tau"] < 2.0 and good["speedup"][AR]["geomean"] > 1.5
    for name, r in manifest["results"].items():
        if r.get("predicted_speedup") is not None:
            assert abs(r["predicted_speedup"] / r["speedup"][AR]["of_mean_tok_s"] - 1) < 0.35, name
