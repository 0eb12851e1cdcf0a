"""specdec.serve_bench: the /metrics deltas (specdec's, vLLM's and SGLang's names) on recorded fixtures, GuideLLM's
report read on ones it wrote, the health poll's deadline, `specdec bench-serve --endpoint` against a server that fails
every second request and exports vLLM's counters, and one short run against real `specdec serve` subprocesses
(speculative and baseline) that writes a run folder. Functional only: no timing here is a result. Fixtures:
tests/fixtures/serve_bench (make_metrics.py writes the vLLM and SGLang texts; the specdec texts and response were
scraped around one request to `specdec serve smollm2-135m --drafter pld`; the GuideLLM reports are GuideLLM 0.8.1's
own, their request lists cut to one each, gzipped: guidellm_errored.json.gz from a streamed run against `specdec serve
smollm2-135m` that refused every request (400: stream_options.continuous_usage_stats, before the server took vLLM's
field), guidellm_stream_concurrent2.json.gz from a streamed run against the same server taking that field)."""
import gzip, http.server, json, re, subprocess, sys, threading
from pathlib import Path
import pytest
from specdec.serve_bench import (ServeBenchConfig, read_guidellm, run_serve_bench, save_tokenizer, spec_delta,
                                 parse_metrics, engine_of, wait_healthy, free_port, profile_record, serve_table,
                                 acceptance_table, fig_serve, queue_delta, histogram_quantile)
from specdec.serve_reference import IN_PROCESS, target_rows, targets_table, reference_summary
from specdec.cli import main

FIX = Path(__file__).parent / "fixtures" / "serve_bench"
text = lambda name: (gzip.decompress((FIX / name).read_bytes()).decode() if name.endswith(".gz") else
                     (FIX / name).read_text())   # the GuideLLM reports are gzipped (the tree travels to a GPU)


def test_vllm_counters_give_tau_and_per_position_acceptance():
    d = spec_delta(text("vllm_metrics_before.txt"), text("vllm_metrics_after.txt"))
    assert d["engine"] == "vllm" and not d["sampled"]
    assert (d["drafts"], d["draft_tokens"], d["accepted_tokens"], d["generation_tokens"]) == (40, 120, 70, 110)
    assert d["accepted_per_position"] == [30, 24, 16]
    assert d["acceptance_per_position"] == pytest.approx([0.75, 0.6, 0.4])
    assert d["acceptance_rate"] == pytest.approx(70 / 120)
    assert d["mean_acceptance_length"] == d["tau"] == pytest.approx(2.75)   # vLLM counts no steps: 1 + accepted/drafts
    assert d["verification_steps"] is None
    same = spec_delta(text("vllm_metrics_after.txt"), text("vllm_metrics_after.txt"))     # no load in between
    assert (same["drafts"], same["tau"], same["acceptance_per_position"]) == (0, None, [])


def test_specdec_counters_equal_the_response_own_statistics():
    "One request between the scrapes: the deltas are its `specdec` statistics (τ = tokens per verification step)."
    stats = json.loads(text("specdec_response.json"))["specdec"]
    d = spec_delta(text("specdec_metrics_before.txt"), text("specdec_metrics_after.txt"))
    assert d["engine"] == "specdec"
    assert (d["verification_steps"], d["drafts"], d["draft_tokens"], d["accepted_tokens"]) == (
        stats["steps"], stats["drafts"], stats["draft_tokens"], stats["accepted_tokens"])
    assert d["accepted_per_position"] == stats["accepted_per_position"]   # absent before the request: counted from 0
    assert d["tau"] == pytest.approx(stats["tau"]) and d["tau"] != pytest.approx(d["mean_acceptance_length"])


def test_sglang_gauges_are_sampled_and_other_servers_have_none():
    d = spec_delta("", text("sglang_metrics.txt"))
    assert d == {"engine": "sglang", "sampled": True, "mean_acceptance_length": 2.9, "tau": 2.9,
                 "acceptance_rate": 0.27}
    assert spec_delta("", "") == {"engine": None}
    samples = parse_metrics(text("vllm_metrics_after.txt"))             # prometheus_client's parser: labels kept
    key = (("engine", "0"), ("model_name", "meta-llama/Llama-3.1-8B-Instruct"), ("position", "2"))
    assert samples["vllm:spec_decode_num_accepted_tokens_per_pos_total"][key] == 19
    assert engine_of(samples) == "vllm" and engine_of(parse_metrics(text("specdec_metrics_after.txt"))) == "specdec"


def test_guidellm_report_is_read_with_every_failed_request_counted():
    (ok,) = read_guidellm(json.loads(text("guidellm_stream_concurrent2.json.gz")))
    assert (ok["strategy"], ok["streams"], ok["requests"], ok["failed"]) == (
        "concurrent", 2, {"successful": 3, "errored": 0, "incomplete": 0}, 0)
    assert ok["latency"]["ttft_ms"]["count"] == 3 and ok["latency"]["itl_ms"]["count"] == 21
    assert all(ok["latency"][k]["p50"] > 0 for k in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_s"))
    assert ok["measured"] == ok["requests"] and ok["requests_per_s"] == pytest.approx(3 / ok["duration_s"])
    assert ok["output_tokens"] == 24
    (bad,) = read_guidellm(json.loads(text("guidellm_errored.json.gz")))
    assert (bad["requests"]["successful"], bad["failed"]) == (0, 2)
    assert "400 Bad Request" in bad["errors"][0] and bad["latency"]["ttft_ms"]["p50"] is None
    with pytest.raises(ValueError, match="schema version 2"): read_guidellm({"metadata": {"version": 1}})


def test_the_vllm_fixture_makes_a_record_and_its_tables():
    report = json.loads(text("guidellm_stream_concurrent2.json.gz"))
    rec = profile_record("speculative", "concurrent", 2, report, text("vllm_metrics_before.txt"),
                         text("vllm_metrics_after.txt"))
    assert (rec["label"], rec["spec"]["engine"], rec["spec"]["tau"]) == ("concurrent@2", "vllm", pytest.approx(2.75))
    table, acc = serve_table([rec]), acceptance_table([rec])
    assert list(acc.loc[0, ["pos 0", "pos 1", "pos 2"]]) == pytest.approx([0.75, 0.6, 0.4])
    assert table.loc[0, "failed"] == 0 and table.loc[0, "tau"] == pytest.approx(2.75)
    assert len(fig_serve([rec]).data) == 4


class _Fake(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible server that answers 500 to every second completion request, /health as `health` says, and
    /metrics with the recorded vLLM text: the one before a load until a request came, then the one after."""
    health, count, fail_every = (200, b'{"status": "ok"}'), 0, 2
    def log_message(self, *a): pass
    def _send(self, status, body):
        self.send_response(status); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def do_GET(self):
        if self.path == "/health": self._send(*type(self).health)
        elif self.path == "/v1/models": self._send(200, b'{"object": "list", "data": [{"id": "fake"}]}')
        elif self.path == "/metrics":
            self._send(200, text("vllm_metrics_after.txt" if type(self).count else "vllm_metrics_before.txt").encode())
        else: self._send(404, b'{}')
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).count += 1
        if type(self).count % type(self).fail_every == 0:
            return self._send(500, b'{"error": {"message": "internal error"}}')
        self._send(200, json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "fake",
                                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "a b c"},
                                                 "finish_reason": "length"}],
                                    "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}).encode())


@pytest.fixture
def fake_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Fake)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown(); _Fake.health, _Fake.count, _Fake.fail_every = (200, b'{"status": "ok"}'), 0, 2


def test_health_poll_names_the_endpoint_and_its_last_answer(fake_server):
    _Fake.health = (503, b'{"status": "loading"}')
    with pytest.raises(TimeoutError, match=rf"{fake_server}/health did not answer 200 within 1 s; last answer: "
                                           r'HTTP 503: \{"status": "loading"\}'):
        wait_healthy(fake_server, timeout=1, poll=0.2)
    nobody = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TimeoutError, match=rf"{nobody}/health did not answer 200 within 0.5 s; last answer: Connect"):
        wait_healthy(nobody, timeout=0.5, poll=0.2)
    _Fake.health = (200, b'{"status": "ok"}')
    assert wait_healthy(fake_server, timeout=5) < 5
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"]); dead.wait()
    with pytest.raises(RuntimeError, match="exited with code 3 before it was healthy"):
        wait_healthy(nobody, timeout=30, process=dead)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return save_tokenizer("smollm2-135m", tmp_path_factory.mktemp("tok"))


def test_bench_serve_against_a_vllm_like_endpoint_counts_failures_and_reads_its_counters(fake_server, tokenizer,
                                                                                        tmp_path, capsys):
    """`specdec bench-serve --endpoint`: the notebook runs GuideLLM against a server that fails every second request and
    exports vLLM's counters; the manifest, the records and the executed report say so (the same ones as specdec's)."""
    assert main(["bench-serve", "--endpoint", fake_server, "--served-model", "fake", "--tokenizer", tokenizer,
                 "--concurrencies", "", "--requests", "4", "--max-tokens", "3", "--warmup", "0", "--no-stream",
                 "--out", str(tmp_path), "--run-id", "vllm", "--no-html"]) == 0
    run_dir = tmp_path / "vllm"
    manifest = json.loads((run_dir / "MANIFEST.json").read_text())
    (rec,) = [json.loads(l) for l in (run_dir / "records.jsonl").read_text().splitlines()]
    assert _Fake.count == 4                                              # no retry: one POST per request
    assert (rec["requests"]["successful"], rec["requests"]["errored"], rec["failed"]) == (2, 2, 2)
    assert "500" in rec["errors"][0] and manifest["failed_requests"] == 2
    assert list(manifest["servers"]) == ["speculative"] and manifest["servers"]["speculative"]["engine"] == "vllm"
    assert rec["spec"]["tau"] == pytest.approx(2.75)
    assert rec["spec"]["acceptance_per_position"] == pytest.approx([0.75, 0.6, 0.4])
    report = (run_dir / "report.ipynb").read_text()
    assert "pos 2" in report and "500 Internal Server Error" in report    # the acceptance table, the failures
    assert main(["summary", str(run_dir)]) == 0
    assert "speculative synchronous: 2 failed, first: HTTPStatusError" in capsys.readouterr().out


def test_a_profile_whose_every_request_failed_ends_the_run_with_the_error(fake_server, tokenizer, tmp_path, capsys):
    "Through `specdec bench-serve`: exit 1, the error naming the server, the profile and the first error; no --resume."
    _Fake.fail_every = 1
    assert main(["bench-serve", "--endpoint", fake_server, "--served-model", "fake", "--tokenizer", tokenizer,
                 "--concurrencies", "", "--requests", "1", "--max-tokens", "3", "--warmup", "0", "--no-stream",
                 "--out", str(tmp_path), "--run-id", "dead", "--no-html"]) == 1
    err = capsys.readouterr().err
    assert re.search(rf"every request of synchronous against the speculative server \({fake_server}\) failed \(1\); "
                     r"first error: .*500", err)
    assert "start a fresh run" in err and "--resume" not in err.split("the benchmark failed")[1]
    manifest = json.loads((tmp_path / "dead" / "MANIFEST.json").read_text())
    assert (manifest["status"], manifest["failed_requests"]) == ("failed", 1)      # recorded before the error


def test_a_short_run_against_specdec_serve_writes_its_run_folder(tokenizer, tmp_path, capsys):
    """Speculative (pld) and baseline (--drafter none) servers started here with --max-batch 2, two streamed requests
    each, synchronous and at concurrency 2, a few tokens; before them, the in-process reference of both (batch 1 and
    batched at 2) and the targets' rows in `specdec summary`."""
    cfg = ServeBenchConfig(model="smollm2-135m", drafter="pld", max_batch=2, synchronous=True, concurrencies="2",
                           requests=2, max_tokens=6, warmup=1, n_prompts=4, stream=True, out=str(tmp_path),
                           run_id="run", tokenizer=tokenizer, reference_iterations=1)
    run_dir = run_serve_bench(cfg)
    manifest = json.loads((run_dir / "MANIFEST.json").read_text())
    everything = [json.loads(l) for l in (run_dir / "records.jsonl").read_text().splitlines()]
    reference, records = everything[:4], everything[4:]                 # the reference is measured first
    assert (manifest["kind"], manifest["status"], manifest["failed_requests"]) == ("serve", "complete", 0)
    assert manifest["git"]["commit"] and manifest["versions"]["guidellm"] == "0.8.1"
    # stopped by SIGTERM: uvicorn shuts down gracefully, then re-raises the signal (exit code -15)
    assert {r: (s["engine"], s["exit_code"]) for r, s in manifest["servers"].items()} == {
        "speculative": ("specdec", -15), "baseline": ("specdec", -15)}
    assert "Application shutdown complete" in (run_dir / "server-baseline.log").read_text()
    assert [(r["server"], r["label"]) for r in records] == [
        ("speculative", "synchronous"), ("speculative", "concurrent@2"), ("baseline", "synchronous"),
        ("baseline", "concurrent@2")]
    # on a loaded machine GuideLLM's scheduler has made one request of the two asked: every one made must succeed
    assert all(1 <= r["requests"]["successful"] <= 2 and r["failed"] == 0 for r in records)
    spec, base = records[0]["spec"], records[2]["spec"]
    for r in records:                                                   # the warm-up is not in the deltas
        # the server counts every request made; GuideLLM's measured window can leave one out of its token count
        assert r["spec"]["generation_tokens"] >= r["output_tokens"] > 0 and (run_dir / r["guidellm"]).is_file()
        assert r["queue"]["metric"] == "specdec:request_queue_time_seconds"
        assert r["requests"]["successful"] <= r["queue"]["count"] <= 2   # the server's count: every request made
    assert spec["drafts"] > 0 and spec["verification_steps"] <= spec["generation_tokens"]
    assert base["drafts"] == 0 and base["tau"] == 1.0                    # speculation off: one token a step
    # GuideLLM's own options
    assert all(r["streamed"] and r["latency"]["ttft_ms"]["count"] == r["requests"]["successful"] for r in records)
    assert 0 < records[0]["latency"]["ttft_ms"]["p50"] <= 1000 * records[0]["latency"]["e2e_s"]["p50"]
    assert records[0]["latency"]["e2e_s"]["count"] == records[0]["requests"]["successful"]
    # the in-process reference: the same two requests (the data's first two rows, chat template applied), decoded
    # alone and as one batch of 2
    assert [(r["server"], r["role"], r["mode"], r["batch_size"], r["drafter"]) for r in reference] == [
        ("in-process", "speculative", "batch-1", 1, "pld:3"), ("in-process", "baseline", "batch-1", 1, "none"),
        ("in-process", "speculative", "batched", 2, "pld:3"), ("in-process", "baseline", "batched", 2, "none")]
    spec1, base1, spec2, base2 = reference
    assert len(spec1["decoded"]) == 2 and [b["rows"] for b in spec2["batches"]] == [2]
    assert [d["tokens"] for d in spec1["decoded"]] == [d["tokens"] for d in base1["decoded"]] == spec2["batches"][0][
        "tokens"]                                                        # greedy: every way decodes the same tokens
    if records[0]["requests"]["successful"] == 2:                       # ... as the server did (6 each, or to EOS)
        assert spec1["output_tokens"] == records[0]["output_tokens"]
    for d in spec1["decoded"] + base1["decoded"]:
        assert 0 < d["ttft_s"] <= d["e2e_s"] and d["tpot_ms"] > 0 and d["steps"] <= d["tokens"] <= 6
    assert sum(d["steps"] for d in base1["decoded"]) == base1["output_tokens"]   # no drafter: one token a step
    assert all(r["output_tokens_per_s"] > 0 for r in reference)
    ref = manifest["reference"]
    assert (ref["measured"], ref["modes"], ref["requests"], ref["iterations"], ref["unavailable"]) == (
        True, {"batch-1": 1, "batched": 2}, 2, 1, {})
    assert ref["roles"] == {"speculative": {"drafter": "pld:3", "controller": "fixed:4"},
                            "baseline": {"drafter": "none", "controller": "none"}}
    assert main(["summary", str(run_dir)]) == 0                          # specdec summary RUN: the tables as text
    out = capsys.readouterr().out
    assert "servers: speculative http://127.0.0.1:" in out and "baseline" in out and "no failed request" in out
    assert "in-process reference: measured; ratio = served / in-process" in out
    for row in ("TPOT at concurrency 1 / in-process generate at batch 1", "throughput at concurrency 2 / in-process "
                "batched loop at B=2"):
        assert out.count(row) == 2                                        # speculative and baseline
    from specdec.serve_reference import target_rows
    rows = target_rows(everything, 2)
    assert [(r["server"], r["served profile"], r["note"]) for r in rows] == [
        ("speculative", "synchronous", ""), ("speculative", "concurrent@2", ""), ("baseline", "synchronous", ""),
        ("baseline", "concurrent@2", "")]
    assert all(r["ratio"] > 0 and r["queue p50 (ms)"] is not None for r in rows)


def test_bench_serve_refuses_resume(capsys):
    assert main(["bench-serve", "--resume", "somerun"]) == 2
    assert "a serve benchmark cannot be resumed" in capsys.readouterr().err


def test_the_config_has_the_notebook_parameters():
    "One parameter list: ServeBenchConfig has exactly nbs/bench/serve.ipynb's parameters, with the same defaults."
    import dataclasses
    from specdec.parameters import notebook_parameters
    params = notebook_parameters(Path(__file__).resolve().parents[1] / "nbs/bench/serve.ipynb")
    fields = {f.name: f.default for f in dataclasses.fields(ServeBenchConfig)}
    assert {n: p["default"] for n, p in params.items()} == fields
    assert ServeBenchConfig(rates="0.5,2", concurrencies="1").profiles() == [
        ("synchronous", None), ("concurrent", 1), ("poisson", 0.5), ("poisson", 2.0)]
    with pytest.raises(ValueError, match="concurrencies must be integers"): ServeBenchConfig(concurrencies="1,x")
    with pytest.raises(ValueError, match="no load profile"): ServeBenchConfig(synchronous=False, concurrencies="")


def test_each_profile_scenario_is_valid_for_guidellm():
    "The scenario of every load profile (with a time limit too) validates against GuideLLM 0.8.1's own schema."
    from guidellm.schemas.benchmark import BenchmarkScenario
    from specdec.serve_bench import guidellm_scenario
    for profile, load, want in [("synchronous", None, {}), ("concurrent", 4, {"streams": [4]}),
                                ("poisson", 0.5, {"rate": [0.5]})]:
        s = guidellm_scenario("http://127.0.0.1:1", "m", profile, load, Path("d.jsonl"), "tok", Path("o.json"),
                              requests=8, max_seconds=30, max_tokens=16, chat=True, stream=True, temperature=0.0,
                              seed=0)
        spec = BenchmarkScenario.create(scenario=None, **s).spec
        assert spec.profile.kind == profile and all(getattr(spec.profile, k) == v for k, v in want.items())
        assert [(c.kind, getattr(c, "count", None) or c.seconds) for c in spec.constraints] == [
            ("max_requests", 8), ("max_duration", 30)]
        assert spec.backend.extras.body == {"temperature": 0.0} and spec.backend.max_tokens == 16
    with pytest.raises(ValueError, match="unknown load profile 'sweep'"):
        guidellm_scenario("http://x", "m", "sweep", None, Path("d"), "t", Path("o"), 1, 0, 1, True, True, 0.0, 0)


def test_queue_time_is_read_from_the_histogram_deltas():
    "One request between the specdec scrapes: queue count 1, its seconds, p50/p90 inside the first bucket (0-10 ms)."
    q = queue_delta(text("specdec_metrics_before.txt"), text("specdec_metrics_after.txt"))
    assert (q["metric"], q["count"]) == ("specdec:request_queue_time_seconds", 1)
    assert q["mean_s"] == pytest.approx(16.3051638140023 - 16.301282027001434)
    assert (q["p50_s"], q["p90_s"]) == (pytest.approx(0.005), pytest.approx(0.009))
    assert queue_delta(text("vllm_metrics_before.txt"), text("vllm_metrics_after.txt")) is None  # no such histogram
    same = queue_delta(text("specdec_metrics_after.txt"), text("specdec_metrics_after.txt"))
    assert (same["count"], same["mean_s"], same["p50_s"]) == (0, None, None)
    # Prometheus's rule: linear inside the bucket, the first from 0; in the +Inf bucket, the highest finite bound
    buckets = [(0.1, 2.0), (1.0, 6.0), (float("inf"), 10.0)]
    assert histogram_quantile(0.1, buckets) == pytest.approx(0.05)
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1 + 0.9 * 3 / 4)
    assert histogram_quantile(0.9, buckets) == 1.0 and histogram_quantile(0.5, []) is None


def _served(role, label, tok_s, itl=None, tpot=None, streamed=True, queue=None):
    "A served record with only what the targets read (GuideLLM's p50s, its throughput, the /metrics queue time)."
    return {"server": role, "label": label, "streamed": streamed, "output_tokens_per_s": tok_s, "queue": queue,
            "latency": {"itl_ms": {"p50": itl}, "tpot_ms": {"p50": tpot}, "ttft_ms": {"p50": 25.0}}}


def _batch1(role, i, decoded):
    "In-process batch-1 record of (tokens, TPOT ms, ms per token, e2e s) requests."
    rows = [{"tokens": n, "tpot_ms": t, "ms_per_token": m, "ttft_s": 0.01 * (i + 1), "e2e_s": e}
            for n, t, m, e in decoded]
    tokens, wall = sum(d[0] for d in decoded), sum(d[3] for d in decoded)
    return {"server": IN_PROCESS, "role": role, "mode": "batch-1", "batch_size": 1, "iteration": i, "decoded": rows,
            "output_tokens": tokens, "wall_s": wall, "output_tokens_per_s": tokens / wall}


def test_the_targets_divide_served_by_in_process_and_say_what_is_missing():
    """TPOT: token-weighted medians (a long request counts more), served ITL when streamed, GuideLLM's TPOT against ms
    per token when not; throughput at concurrency max_batch; a missing profile or reference is a note, not a number."""
    records = [_batch1("speculative", 0, [(11, 10.0, 12.0, 0.2), (3, 40.0, 50.0, 0.1)]),     # weights 10 and 2
               _batch1("speculative", 1, [(11, 12.0, 13.0, 0.2), (3, 44.0, 50.0, 0.1)]),
               {"server": IN_PROCESS, "role": "speculative", "mode": "batched", "batch_size": 4, "iteration": 0,
                "batches": [{"rows": 4}], "output_tokens": 120, "wall_s": 1.0, "output_tokens_per_s": 120.0},
               _served("speculative", "synchronous", 50.0, itl=11.5,
                       queue={"count": 2, "mean_s": 0.003, "p50_s": 0.002}),
               _served("speculative", "concurrent@4", 100.0, itl=20.0),
               _served("baseline", "concurrent@1", 40.0, tpot=30.0, streamed=False)]
    spec_tpot, spec_tput, base_tpot, base_tput = target_rows(records, max_batch=4)
    assert spec_tpot["in-process"] == 12.0             # 10 (x10), 40 (x2), 12 (x10), 44 (x2); unweighted: 26
    assert (spec_tpot["served profile"], spec_tpot["served"], spec_tpot["ratio"], spec_tpot["met"]) == (
        "synchronous", 11.5, pytest.approx(11.5 / 12.0), True)
    assert (spec_tpot["queue p50 (ms)"], spec_tpot["queue mean (ms)"], spec_tpot["TTFT p50 (ms)"]) == (2.0, 3.0, 25.0)
    assert spec_tpot["in-process over iterations"] == "10-12 ms" and spec_tpot["note"] == ""
    assert "<= 1.10" == spec_tpot["goal"] and ">= 0.90" == spec_tput["goal"]
    assert (spec_tput["served profile"], spec_tput["ratio"], spec_tput["met"]) == ("concurrent@4", 100 / 120, False)
    assert spec_tput["note"] == "no queue-time histogram in the server's /metrics"
    # the baseline: not streamed (GuideLLM's TPOT, first token included), no in-process record, no concurrent@4
    assert "first token included" in base_tpot["metric"] and base_tpot["served"] == 30.0
    assert (base_tpot["in-process"], base_tpot["ratio"], base_tpot["met"]) == (None, None, None)
    assert "no in-process batch-1 reference for baseline" in base_tpot["note"]
    assert (base_tput["served profile"], base_tput["served"], base_tput["ratio"]) == (None, None, None)
    assert base_tput["note"].startswith("no concurrent@4 profile against the baseline server; no in-process batched")
    # max_batch 1: the throughput row reads the batch-1 decodes and takes the synchronous profile
    one = target_rows(records, max_batch=1)[1]
    assert (one["served profile"], one["in-process"]) == ("synchronous", pytest.approx(28 / 0.6))
    summary = {(s["role"], s["mode"]): s for s in reference_summary(records)}
    assert summary[("speculative", "batch-1")]["ms_per_token"] == 13.0 and summary[("speculative", "batched")][
        "requests"] == 4
    assert list(targets_table(records, 4)["met"]) == [True, False, None, None]


def test_the_reference_is_on_when_the_run_starts_its_servers():
    assert ServeBenchConfig().measures_reference and not ServeBenchConfig(reference=False).measures_reference
    assert not ServeBenchConfig(endpoint="http://x:1").measures_reference            # another engine's model: asked
    assert ServeBenchConfig(endpoint="http://x:1", reference=True).measures_reference
    with pytest.raises(ValueError, match="reference_iterations must be >= 1"): ServeBenchConfig(reference_iterations=0)


def test_more_requests_than_prompts_is_refused_before_any_server(tmp_path):
    "GuideLLM sends each prompt once: a profile asking for more requests would wait forever, so the run says so first."
    cfg = ServeBenchConfig(categories="qa", n_prompts=1, requests=5, out=str(tmp_path), run_id="short")
    with pytest.raises(ValueError, match=r"requests=5 is more than the 1 prompts selected: GuideLLM sends each"):
        run_serve_bench(cfg)
    assert not (tmp_path / "short" / "MANIFEST.json").exists()
