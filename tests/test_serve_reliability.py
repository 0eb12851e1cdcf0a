"""Issue 30's reliability checks (specdec.serve_reliability): the hostile requests (seeded, every class, each a 4xx from
the app in process), `run_reliability` against a loopback `specdec serve`, and a deliberately broken server it fails."""
import json, re, signal, threading, time
from collections import Counter
from pathlib import Path
import pytest

pytest.importorskip("fastapi", reason="the reliability checks run against specdec serve: pip install 'specdec[serve]'")
import httpx, uvicorn
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from specdec import serve, serve_engine, specs
from specdec.serve_bench import Server, free_port, wait_healthy
from specdec.serve_reliability import (HOSTILE_KINDS, hostile_requests, run_reliability, send_all, summarise_hostile)

NAME = "tiny-llama"


def served(target):
    return serve_engine.ServedModel(target, specs.make_drafter("pld", target), specs.make_controller("4"))


def test_hostile_requests_are_seeded_cover_every_class_and_count_n():
    k = len(HOSTILE_KINDS)
    assert [len(hostile_requests(n, NAME)) for n in (0, 1, k - 1, k, 3 * k + 5)] == [0, 1, k - 1, k, 3 * k + 5]
    first = hostile_requests(3 * k, NAME, seed=4)
    assert hostile_requests(3 * k, NAME, seed=4) == first != hostile_requests(3 * k, NAME, seed=5)
    assert Counter(r.kind for r in first) == {kind: 3 for kind in HOSTILE_KINDS}
    assert [r.kind for r in hostile_requests(5, NAME)] == list(HOSTILE_KINDS[:5])
    assert hostile_requests(2 * k, NAME, seed=4) == first[:2 * k]             # request i does not depend on n
    many = hostile_requests(20 * k, NAME, seed=0, max_body_bytes=5000, max_context=300)
    huge = [r for r in many if r.kind == "huge_body"]
    assert all(5000 < len(r.body) <= 5000 + 4096 for r in huge) and {r.chunked for r in huge} == {True, False}
    assert all(len(r.body) <= 5000 for r in many if r.kind == "oversize_prompt")   # over the context, not the limit
    assert {r.path for r in many if r.kind not in ("wrong_path", "wrong_method")} == {
        "/v1/completions", "/v1/chat/completions"}
    assert all(r.method != "POST" or r.path not in ("/v1/completions", "/v1/chat/completions")
               for r in many if r.kind == "wrong_method")
    for bad, message in [(dict(n=-1), "n=-1"), (dict(n=1, max_body_bytes=10), "max_body_bytes=10"),
                         (dict(n=1, max_context=1), "max_context=1")]:
        with pytest.raises(ValueError, match=re.escape(message)): hostile_requests(model=NAME, **bad)


def test_a_thousand_hostile_requests_get_a_4xx_from_the_app_and_it_goes_on(tiny):
    "Every one of 1,000 gets a 4xx (none reaches the engine); a well-formed request is served after them."
    requests = hostile_requests(1000, NAME, seed=0)
    app = serve.make_app(lambda: served(tiny), NAME)
    with TestClient(app, raise_server_exceptions=False) as client:
        assert app.state.worker.wait_loaded(60)
        start = time.monotonic()
        answers = send_all("", requests, threads=4, client=client, timeout=None, progress=False)
        took = time.monotonic() - start
        after = client.post("/v1/completions", json={"model": NAME, "prompt": "abc abc", "max_tokens": 8})
        start = time.monotonic()                   # spread over 0.5 s: the last of 18 leaves 17/18 of it after start
        spread = send_all("", requests[:18], threads=4, client=client, timeout=None, progress=False, spread_s=0.5)
        spread_took = time.monotonic() - start
        decoded = app.state.metrics.generation_tokens._value.get()
    summary = summarise_hostile(requests, answers)
    assert summary["not_4xx"] == [] and summary["by_status_class"] == {"4xx": 1000}, summary["not_4xx"][:5]
    assert set(summary["by_kind"]) == set(HOSTILE_KINDS)
    assert {a["status"] for a in answers} >= {400, 404, 405, 413}
    assert spread == answers[:18] and spread_took >= 0.5 * 17 / 18
    assert after.status_code == 200 and decoded == after.json()["usage"]["completion_tokens"]    # it alone decoded
    print(f"1,000 hostile requests in process: {took:.1f} s")


def test_run_reliability_against_a_loopback_server(tmp_path):
    """`specdec serve tiny-llama --max-waiting 2`: 100 hostile requests all 4xx, alive after; of 10 clients some
    complete and the rest get 429, nothing else; the disconnect shows in the gauge and is undone; SIGTERM then ends
    it."""
    with Server(NAME, "pld", log=tmp_path / "server.log", extra=("--max-waiting", "2")) as server:
        endpoint = server.start(180)
        result = run_reliability(endpoint, NAME, n_hostile=100, clients=10, repeats=2, stream_tokens=32,
                                 client_tokens=16, timeout=120, progress=False, sigterm_streams=4,
                                 sigterm_tokens=64, terminate=lambda: server.process.send_signal(signal.SIGTERM))
        code = server.process.wait(120)
    json.dumps(result)                                                       # JSON-able as it is
    hostile, clients, gone, targets = result["hostile"], result["clients"], result["disconnect"], result["targets"]
    assert hostile["n"] == 100 and sum(hostile["by_status_class"].values()) == 100
    assert sum(sum(c.values()) for c in hostile["by_kind"].values()) == 100 and len(hostile["by_kind"]) == 18
    assert hostile["by_status_class"] == {"4xx": 100} and hostile["not_4xx"] == [] and hostile["health_after"] == 200
    assert [s["outcome"] for s in hostile["unloaded_streams"] + hostile["loaded_streams"]] == ["complete"] * (
        2 + len(hostile["loaded_streams"]))
    assert all(s["completion_tokens"] == 32 and s["tpot_s"] > 0 for s in hostile["unloaded_streams"])
    assert hostile["tpot_ratio"] == hostile["loaded_tpot_s"] / hostile["unloaded_tpot_s"] and hostile["spread_s"] > 0
    assert clients["complete"] + clients["refused_429"] + clients["refused_503"] + len(clients["other"]) == 10
    assert clients["other"] == [] and clients["complete"] >= 1 and clients["refused_429"] >= 1
    assert gone["running_before"] == 0 and gone["running_during"] == 1 and gone["elapsed_s"] is not None
    assert result["health_at_end"] == 200
    for name in ("hostile_all_4xx", "alive_after_hostile", "clients_complete_or_refused", "alive_at_end"):
        assert targets[name]["passed"] and targets[name]["threshold"], name
    term = result["sigterm"]                       # 1 decoding, 2 waiting, 1 refused: all served before the exit
    assert term["in_flight_at_signal"] and term["hung_or_cut"] == [] and sum(term["outcomes"].values()) == 4
    assert term["outcomes"].get("complete", 0) >= 1 and targets["sigterm_no_hung_request"]["passed"]
    assert result["passed"] == all(t["passed"] for t in targets.values())
    assert code == -signal.SIGTERM                                           # ended by the signal, nothing hung


class ServerErrorOnNonFinite:
    "A deliberately broken server: a body holding NaN or Infinity gets a 500 before the app sees it."
    def __init__(self, app): self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http": return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b"")); more = message.get("more_body", False)
        body = b"".join(chunks)
        if b"NaN" in body or b"Infinity" in body:
            return await JSONResponse({"error": {"message": "deliberately broken"}}, 500)(scope, receive, send)
        pending = [{"type": "http.request", "body": body, "more_body": False}]
        async def replay(): return pending.pop() if pending else await receive()
        await self.app(scope, replay, send)


def test_run_reliability_fails_a_server_that_answers_500(tiny):
    """The negative control: the same app behind the broken middleware fails `hostile_all_4xx`; stopped without grace,
    its cut stream fails `sigterm_no_hung_request`; the run fails."""
    requests = hostile_requests(4 * len(HOSTILE_KINDS), NAME, seed=0)
    broken = {i for i, r in enumerate(requests) if b"NaN" in r.body or b"Infinity" in r.body}
    assert broken and all(requests[i].kind == "non_finite" for i in broken)
    port = free_port()
    app = serve.make_app(lambda: served(tiny), NAME)
    server = uvicorn.Server(uvicorn.Config(ServerErrorOnNonFinite(app), host="127.0.0.1", port=port,
                                           log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        wait_healthy(endpoint, 120)
        def force_exit():                          # no graceful shutdown: the streams in flight are cut
            server.force_exit = server.should_exit = True
        result = run_reliability(endpoint, NAME, n_hostile=len(requests), clients=3, repeats=1, stream_tokens=8,
                                 client_tokens=4, timeout=120, progress=False, terminate=force_exit,
                                 sigterm_streams=2, sigterm_tokens=2000)
    finally:
        server.should_exit = True
        thread.join(60)
        app.state.worker.close()                   # a forced exit skips the app's shutdown: stop its engine here
    hostile = result["hostile"]
    assert {x["index"] for x in hostile["not_4xx"]} == broken
    assert all(x["status"] == 500 and "deliberately broken" in x["answer"] and x["kind"] == "non_finite"
               for x in hostile["not_4xx"])
    assert hostile["by_status_class"] == {"4xx": len(requests) - len(broken), "5xx": len(broken)}
    assert hostile["by_kind"]["non_finite"].get("5xx") == len(broken)
    assert not result["targets"]["hostile_all_4xx"]["passed"] and not result["passed"]
    assert result["targets"]["alive_after_hostile"]["passed"]                 # the other checks still ran and passed
    assert result["clients"]["other"] == [] and result["clients"]["complete"] >= 1
    cut = result["sigterm"]["hung_or_cut"]                      # the forced exit: a stream cut short, and reported
    assert "truncated" in {c["outcome"] for c in cut}, result["sigterm"]
    assert not result["targets"]["sigterm_no_hung_request"]["passed"]


def test_a_serve_benchmark_run_checks_reliability_on_a_server_of_its_own(tmp_path, capsys):
    """`bench-serve --reliability`'s step: a fresh `specdec serve` as the run starts its servers, the checks, SIGTERM
    last (its exit recorded), `reliability.json` and the targets in the run's MANIFEST and report table."""
    from specdec.serve_bench import ServeBenchConfig
    from specdec.serve_reliability import reliability_for_run, reliability_table
    from specdec.provenance import write_json, read_manifest
    cfg = ServeBenchConfig(model=NAME, drafter="pld", max_batch=2, n_hostile=36, clients=6, max_tokens=8)
    write_json(tmp_path / "MANIFEST.json", {"kind": "serve", "run_id": "r", "status": "complete"})
    result = reliability_for_run(cfg, tmp_path, progress=False)
    assert result["hostile"]["n"] == 36 and result["hostile"]["by_status_class"] == {"4xx": 36}
    assert result["server"]["exit"] == "by SIGTERM" and result["server"]["command"][2:5] == ["serve", NAME, "--drafter"]
    assert json.loads((tmp_path / "reliability.json").read_text())["targets"] == result["targets"]
    manifest = read_manifest(tmp_path)
    assert manifest["reliability"]["passed"] == result["passed"] and manifest["status"] == "complete"
    table = reliability_table(manifest)
    assert set(table["target"]) == set(result["targets"]) >= {"hostile_all_4xx", "sigterm_no_hung_request"}
    assert table.set_index("target").loc["hostile_all_4xx", "met"]
    assert (tmp_path / "server-reliability.log").exists()


def test_a_stream_closed_before_any_answer_is_told_from_one_left_hanging():
    """At shutdown uvicorn closes a connection whose request it has not begun: the stream ends `closed_unanswered`
    (never taken, so an explicit end at SIGTERM, as a refused connection is); a server that never answers ends
    `no_response` at the timeout (hanging: not explicit), and a stream cut after its answer began stays `truncated`."""
    import socket, threading, httpx
    from specdec.serve_reliability import stream_request, EXPLICIT
    def serve_once(reply:bytes|None):                     # one connection: read the request, answer `reply` or nothing
        listener = socket.create_server(("127.0.0.1", 0))
        def run():
            conn, _ = listener.accept()
            conn.recv(65536)
            if reply is None: threading.Event().wait(3)   # hang past the client's timeout
            else: conn.sendall(reply)
            conn.close(); listener.close()
        threading.Thread(target=run, daemon=True).start()
        return f"http://127.0.0.1:{listener.getsockname()[1]}"
    started = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
               b"1a\r\ndata: {\"choices\": [{}]}\n\n\r\n")
    outcomes = {}
    for name, reply in (("closed", b""), ("hanging", None), ("cut", started)):
        with httpx.Client() as client:
            outcomes[name] = stream_request(client, serve_once(reply), "m", "hi", 4, timeout=1)["outcome"]
    assert outcomes == {"closed": "closed_unanswered", "hanging": "no_response", "cut": "truncated"}
    assert "closed_unanswered" in EXPLICIT and not {"no_response", "truncated"} & set(EXPLICIT)
