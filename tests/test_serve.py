"""`specdec serve`: the OpenAI-compatible app in process (`TestClient`, raw ASGI calls for a disconnect) and one bounded
loopback run of `specdec serve` under uvicorn, stopped by SIGTERM while a stream is in flight."""
import asyncio, contextlib, io, json, logging, os, signal, socket, subprocess, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
import pytest, torch

pytest.importorskip("fastapi", reason="specdec serve needs the serve extra: pip install 'specdec[serve]'")
import httpx
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from specdec import serve, serve_engine, specs
from specdec.cli import main
from specdec.decode import Batch, generate

PROMPT = "abc abc abc abc"
NAME = "tiny-llama"


def served(target, drafter=None, controller="4"):
    d = specs.make_drafter(drafter, target)
    return serve_engine.ServedModel(target, d, specs.make_controller(controller) if d is not None else None)


def offline(target, drafter, ids, **kw):
    "What `generate` gives for the same method, with a fresh drafter and controller."
    d = specs.make_drafter(drafter, target)
    return generate(target, ids, drafter=d, controller=specs.make_controller("4") if d is not None else None, **kw)


@contextlib.contextmanager
def client_for(model, **kw):
    app = serve.make_app(lambda: model, NAME, **kw)
    with TestClient(app) as client:
        assert app.state.worker.wait_loaded(60)
        yield client


def ask(**fields) -> dict:
    return {"model": NAME, "prompt": PROMPT, "max_tokens": 24, "temperature": 0} | fields


def events(text:str) -> list[dict]:
    "A stream's SSE events as JSON, the closing `[DONE]` checked and dropped."
    data = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in text.split("\n\n") if e) and data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def metrics(client) -> dict:
    "The /metrics samples by name and labels (model_name dropped): {(name, ((label, value), ...)): value}."
    out = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            assert s.labels.pop("model_name") == NAME
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def stat(m:dict, name:str, **labels) -> float:
    return m.get(("specdec:" + name, tuple(sorted((k, str(v)) for k, v in labels.items()))), 0.0)


# --- what the server answers is what `generate` decodes

@pytest.mark.parametrize("drafter", [None, "pld", "model:tiny-llama-draft"])
def test_greedy_completion_is_generates_output(tiny, drafter):
    with client_for(served(tiny, drafter)) as client: r = client.post("/v1/completions", json=ask())
    ids = tiny.encode(PROMPT)
    out = offline(tiny, drafter, ids, max_new_tokens=24)
    body = r.json()
    assert r.status_code == 200 and body["object"] == "text_completion" and body["model"] == NAME
    assert body["choices"][0]["text"] == tiny.decode(out.tokens)
    n = out.tokens.shape[1]
    assert body["usage"] == {"prompt_tokens": ids.shape[1], "completion_tokens": n, "total_tokens": ids.shape[1] + n}
    assert body["specdec"] == serve.spec_stats(out.stats) and body["specdec"]["steps"] == len(out.accepted_lengths)
    eos = out.tokens[0, -1].item() in tiny.eos_token_ids
    assert body["choices"][0]["finish_reason"] == ("stop" if eos or n < 24 else "length")
    if drafter == "model:tiny-llama-draft": assert body["specdec"]["accepted_tokens"] > 0   # speculation did work


def test_sampling_follows_seed_and_top_p(tiny):
    "temperature, top_p and seed reach `generate`: the same seed repeats the text, another seed changes it."
    with client_for(served(tiny, "pld")) as client:
        texts = [client.post("/v1/completions", json=ask(temperature=0.9, top_p=0.8, seed=s)).json()["choices"][0]["text"]
                 for s in (7, 7, 8)]
    out = offline(tiny, "pld", tiny.encode(PROMPT), max_new_tokens=24, temperature=0.9, top_p=0.8, seed=7)
    assert texts[0] == texts[1] == tiny.decode(out.tokens) and texts[2] != texts[0]


@pytest.mark.parametrize("drafter", ["pld", "model:tiny-llama-draft"])
def test_a_stream_sends_one_chunk_per_step_and_adds_up_to_the_text(tiny, drafter):
    with client_for(served(tiny, drafter)) as client:
        whole = client.post("/v1/completions", json=ask()).json()
        r = client.post("/v1/completions", json=ask(stream=True, stream_options={"include_usage": True}))
    out = offline(tiny, drafter, tiny.encode(PROMPT), max_new_tokens=24)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = events(r.text)
    *steps, last, usage = chunks
    assert [c["specdec"]["accepted"] for c in steps] == out.accepted_lengths          # one chunk per verification step
    assert [c["specdec"]["step"] for c in steps] == list(range(len(steps)))
    assert sum(c["specdec"]["tokens"] for c in steps) == out.tokens.shape[1]
    assert "".join(c["choices"][0]["text"] for c in [*steps, last]) == whole["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in steps] == [None] * len(steps)
    assert last["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert last["specdec"] == whole["specdec"]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    assert all(c["usage"] is None for c in [*steps, last]) and len({c["id"] for c in chunks}) == 1
    with client_for(served(tiny, drafter)) as client:                    # no include_usage: no usage chunk, no field
        plain = events(client.post("/v1/completions", json=ask(stream=True)).text)
    assert len(plain) == len(steps) + 1 and all("usage" not in c for c in plain)


def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk(tiny):
    "vLLM's `continuous_usage_stats` (GuideLLM asks for it): each step chunk counts the tokens sent up to it."
    options = {"include_usage": True, "continuous_usage_stats": True}
    with client_for(served(tiny, "pld")) as client:
        whole = client.post("/v1/completions", json=ask()).json()
        *steps, last, usage = events(client.post("/v1/completions", json=ask(stream=True, stream_options=options)).text)
        alone = events(client.post("/v1/completions", json=ask(stream=True, stream_options={
            "continuous_usage_stats": True})).text)                         # without include_usage: no usage at all
    sent = [sum(c["specdec"]["tokens"] for c in steps[:i + 1]) for i in range(len(steps))]
    assert [c["usage"]["completion_tokens"] for c in steps] == sent and len(sent) > 2
    assert {c["usage"]["prompt_tokens"] for c in [*steps, last]} == {whole["usage"]["prompt_tokens"]}
    assert last["usage"] == usage["usage"] == whole["usage"] and usage["choices"] == []
    assert all("usage" not in c for c in alone)



def test_the_openai_client_works_against_it(tiny):
    """The `openai` Python client (pinned in .ci/requirements.txt) through the app: completions and chat, streamed and
    not, give `generate`'s text and statistics; a refused request raises the client's own error with our message."""
    import openai
    chat = [{"role": "user", "content": "say abc abc"}]
    with client_for(served(tiny, "pld")) as http:                    # TestClient is an httpx.Client
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)
        whole = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=24, temperature=0)
        pieces = list(client.completions.create(model=NAME, prompt=PROMPT, max_tokens=24, temperature=0, stream=True,
                                                stream_options={"include_usage": True}))
        answer = client.chat.completions.create(model=NAME, messages=chat, max_tokens=12, temperature=0)
        deltas = list(client.chat.completions.create(model=NAME, messages=chat, max_tokens=12, temperature=0,
                                                     stream=True))
        with pytest.raises(openai.BadRequestError, match=r"temperature"):
            client.completions.create(model=NAME, prompt=PROMPT, max_tokens=4, temperature=5)
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            client.completions.create(model="another-model", prompt=PROMPT, max_tokens=4)
        assert [m.id for m in client.models.list().data] == [NAME]
    out = offline(tiny, "pld", tiny.encode(PROMPT), max_new_tokens=24)
    assert whole.choices[0].text == tiny.decode(out.tokens) and whole.usage.completion_tokens == out.tokens.shape[1]
    assert whole.model_extra["specdec"]["steps"] == len(out.accepted_lengths)
    assert "".join(c.choices[0].text for c in pieces if c.choices) == whole.choices[0].text
    assert pieces[-1].choices == [] and pieces[-1].usage == whole.usage
    assert "".join(c.choices[0].delta.content or "" for c in deltas if c.choices) == answer.choices[0].message.content
    assert answer.choices[0].message.content and deltas[0].choices[0].delta.role == "assistant"

def test_chat_applies_the_template_and_streams_deltas(tiny):
    "tiny-llama's byte tokenizer has no chat template: one user message is what `encode(chat=True)` writes."
    chat = {"model": NAME, "messages": [{"role": "user", "content": "say abc abc"}], "max_tokens": 12, "temperature": 0}
    with client_for(served(tiny, "pld")) as client:
        body = client.post("/v1/chat/completions", json=chat).json()
        chunks = events(client.post("/v1/chat/completions", json=chat | {"stream": True}).text)
        parts = {"role": "user", "content": [{"type": "text", "text": "say abc"}, {"type": "text", "text": " abc"}]}
        same = client.post("/v1/chat/completions", json=chat | {"messages": [parts]}).json()
        two = client.post("/v1/chat/completions", json=chat | {"messages": [
            {"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}]}).json()
    out = offline(tiny, "pld", tiny.encode("say abc abc", chat=True), max_new_tokens=12)
    assert body["object"] == "chat.completion" and body["choices"][0]["message"] == {
        "role": "assistant", "content": tiny.decode(out.tokens)}
    assert same["choices"] == body["choices"]                                 # text parts are joined
    assert chunks[0]["object"] == "chat.completion.chunk" and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == body["choices"][0]["message"]["content"]
    lines = "System: be brief\nUser: hi\nAssistant:"                         # developer is the system role
    assert two["usage"]["prompt_tokens"] == len(tiny.tokenizer.encode(lines))


def test_chat_template_of_a_real_tokenizer(smol):
    "SmolLM2's chat template: the server's prompt is `encode(chat=True)`'s, its greedy reply `generate`'s."
    messages = [{"role": "user", "content": "Repeat: the quick brown fox."}]
    app = serve.make_app(lambda: served(smol, "pld"), "smollm2-135m")
    with TestClient(app) as client:
        assert app.state.worker.wait_loaded(60)
        body = client.post("/v1/chat/completions", json={"model": "smollm2-135m", "messages": messages,
                                                         "max_tokens": 8, "temperature": 0}).json()
    ids = smol.encode(messages[0]["content"], chat=True)
    out = offline(smol, "pld", ids, max_new_tokens=8)
    assert body["usage"]["prompt_tokens"] == ids.shape[1]
    assert body["choices"][0]["message"]["content"] == smol.decode(out.tokens) and out.tokens.shape[1] > 1


@pytest.mark.parametrize("max_batch", [1, 2])
def test_stop_strings_end_the_text(tiny, max_batch):
    "The text ends before the earliest stop string, streamed or not; a stop string that never appears changes nothing."
    with client_for(served(tiny, "pld"), max_batch=max_batch) as client:
        text = client.post("/v1/completions", json=ask(max_tokens=40)).json()["choices"][0]["text"]
        i = next(i for i in range(4, len(text) - 2) if "\ufffd" not in text[i:i + 2])
        first, later = text[i:i + 2], text[i + 4:i + 6]
        stops = [later, first, "never in a random model's output"]
        stopped = client.post("/v1/completions", json=ask(max_tokens=40, stop=stops)).json()
        streamed = events(client.post("/v1/completions", json=ask(max_tokens=40, stop=stops, stream=True)).text)
        one = client.post("/v1/completions", json=ask(max_tokens=40, stop="never in a random model's output")).json()
    expected = text[:min(text.find(s) for s in (first, later) if s in text)]
    assert stopped["choices"][0] | {"text": None} == {"index": 0, "text": None, "logprobs": None, "finish_reason": "stop"}
    assert stopped["choices"][0]["text"] == expected and len(expected) < len(text)
    assert "".join(c["choices"][0]["text"] for c in streamed) == expected
    assert streamed[-1]["choices"][0]["finish_reason"] == "stop"
    assert one["choices"][0]["text"] == text


@pytest.mark.parametrize("max_batch", [1, 2])
def test_ignore_eos_decodes_all_max_tokens(tiny, max_batch, monkeypatch):
    "With its 11th greedy token made the EOS: ignore_eos decodes all 60 tokens, the next request stops at the EOS."
    eos = offline(tiny, None, tiny.encode(PROMPT), max_new_tokens=60).tokens[0, 10].item()
    monkeypatch.setattr(type(tiny), "eos_token_ids", property(lambda self: [eos]))
    with client_for(served(tiny, "pld"), max_batch=max_batch) as client:
        body = client.post("/v1/completions", json=ask(max_tokens=60, ignore_eos=True)).json()
        after = client.post("/v1/completions", json=ask(max_tokens=60)).json()        # EOS ends the text again
    assert body["usage"]["completion_tokens"] == 60 and body["choices"][0]["finish_reason"] == "length"
    out = offline(tiny, "pld", tiny.encode(PROMPT), max_new_tokens=60)
    assert out.tokens.shape[1] <= 11 and after["choices"][0]["finish_reason"] == "stop"
    assert after["choices"][0]["text"] == tiny.decode(out.tokens)


# --- metrics

def test_metrics_count_what_the_responses_report(tiny):
    with client_for(served(tiny, "model:tiny-llama-draft")) as client:
        before = metrics(client)
        bodies = [client.post("/v1/completions", json=ask(prompt=p)).json() for p in (PROMPT, "the cat the cat")]
        after = metrics(client)
    assert stat(before, "spec_decode_num_drafts_total") == 0 and stat(before, "e2e_request_latency_seconds_count") == 0
    total = lambda key: sum(b["specdec"][key] for b in bodies)
    assert stat(after, "spec_decode_num_drafts_total") == total("drafts") > 0
    assert stat(after, "spec_decode_num_draft_tokens_total") == total("draft_tokens")
    assert stat(after, "spec_decode_num_accepted_tokens_total") == total("accepted_tokens") > 0
    assert stat(after, "num_verification_steps_total") == total("steps")
    per_pos = [sum(x) for x in zip(*[b["specdec"]["accepted_per_position"] + [0] * 8 for b in bodies])]
    assert [stat(after, "spec_decode_num_accepted_tokens_per_pos_total", position=i) for i in range(8)] == per_pos[:8]
    assert stat(after, "generation_tokens_total") == sum(b["usage"]["completion_tokens"] for b in bodies)
    assert stat(after, "prompt_tokens_total") == sum(b["usage"]["prompt_tokens"] for b in bodies)
    reasons = [b["choices"][0]["finish_reason"] for b in bodies]
    assert sum(stat(after, "request_success_total", finished_reason=r) for r in set(reasons)) == 2
    for h in ("request_queue_time_seconds", "time_to_first_token_seconds", "e2e_request_latency_seconds",
              "time_per_output_token_seconds"):
        assert stat(after, h + "_count") == 2 and stat(after, h + "_sum") > 0, h
    assert stat(after, "num_requests_running") == stat(after, "num_requests_waiting") == 0


def test_each_app_counts_in_its_own_registry(tiny):
    with client_for(served(tiny, "pld")) as a, client_for(served(tiny, "pld")) as b:
        a.post("/v1/completions", json=ask())
        assert stat(metrics(a), "e2e_request_latency_seconds_count") == 1
        assert stat(metrics(b), "e2e_request_latency_seconds_count") == 0


# --- bad input: a clear 4xx, never a 500

BAD = [  # endpoint, body, status, message part, param
    ("completions", ask(model="gpt-4"), 404, "the model `gpt-4` does not exist: this server serves `tiny-llama`",
     "model"),
    ("completions", ask(temperature=2.5), 400, "temperature: Input should be less than or equal to 2", "temperature"),
    ("completions", ask(temperature=-0.1), 400, "temperature: Input should be greater than or equal to 0",
     "temperature"),
    ("completions", ask(top_p=0), 400, "top_p: Input should be greater than 0", "top_p"),
    ("completions", ask(top_p=1.5), 400, "top_p: Input should be less than or equal to 1", "top_p"),
    ("completions", ask(max_tokens=0), 400, "max_tokens: Input should be greater than or equal to 1", "max_tokens"),
    ("completions", ask(max_tokens=4090), 400, "maximum context length is 4096 tokens; the request asks for 4106 "
     "(16 in the prompt and 4090 in the completion)", "max_tokens"),
    ("completions", ask(max_tokens=10**30), 400, "maximum context length is 4096 tokens", "max_tokens"),
    ("completions", ask(prompt=""), 400, "prompt is empty", "prompt"),
    ("completions", ask(prompt="   "), 400, "prompt is empty", "prompt"),
    ("completions", ask(prompt=[]), 400, "prompt is empty", "prompt"),
    ("completions", ask(prompt=["a", "b"]), 400, "prompt holds 2 prompts: send one per request", "prompt"),
    ("completions", ask(prompt=[1, 99999]), 400, "prompt token id 99999 is outside the vocabulary [0, 512)", "prompt"),
    ("completions", ask(prompt=7), 400, "prompt: Input should be a valid string", "prompt"),
    ("completions", ask(max_tokens="16"), 400, "max_tokens: Input should be a valid integer", "max_tokens"),
    ("completions", ask(temperature=True), 400, "temperature: Input should be a valid number", "temperature"),
    ("completions", ask(seed=2**70), 400, "seed: Input should be less than or equal to", "seed"),
    ("completions", ask(stop=["", "x"]), 400, "stop strings must not be empty", "stop"),
    ("completions", ask(n=2), 400, "n=2: only one completion per request is served", "n"),
    ("completions", ask(frequency_penalty=0.5), 400, "frequency_penalty is not supported", "frequency_penalty"),
    ("completions", ask(best_of=3), 400, "best_of: unknown field", "best_of"),
    ("completions", ask(stream_options={"include_usage": 1}), 400, "stream_options.include_usage: Input should be a "
     "valid boolean", "stream_options.include_usage"),
    ("completions", {"prompt": PROMPT}, 400, "model: Field required", "model"),
    ("completions", '{"model": "tiny-llama", "prompt": "a",', 400, "malformed JSON: EOF while parsing", None),
    ("completions", '{"model": "tiny-llama", "temperature": NaN, "prompt": "a"}', 400,
     "temperature: Input should be a finite number", "temperature"),
    ("completions", '{"model": "tiny-llama", "temperature": 1e999, "prompt": "a"}', 400,
     "temperature: Input should be a finite number", "temperature"),
    ("completions", "", 400, "empty request body: send a JSON object", None),
    ("completions", "[1, 2]", 400, "Input should be an object", None),
    ("chat/completions", {"model": NAME, "messages": []}, 400, "messages is empty: give at least one message",
     "messages"),
    ("chat/completions", {"model": NAME, "messages": [{"role": "robot", "content": "hi"}]}, 400,
     "messages.0.role: Input should be 'system', 'developer', 'user' or 'assistant'", "messages.0.role"),
    ("chat/completions", {"model": NAME, "prompt": "hi"}, 400, "messages: Field required", "messages"),
    ("chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 5000},
     400, "maximum context length is 4096 tokens", "max_tokens"),
]


def test_bad_requests_get_a_clear_4xx_and_the_server_goes_on(tiny):
    with client_for(served(tiny, "pld")) as client:
        for endpoint, body, status, message, param in BAD:
            kw = {"content": body} if isinstance(body, str) else {"json": body}
            r = client.post("/v1/" + endpoint, **kw)
            error = r.json()["error"]
            assert (r.status_code, set(error)) == (status, {"message", "type", "param", "code"}), (body, r.text)
            assert message in error["message"] and error["param"] == param, (body, error)
            assert error["type"] == "invalid_request_error"
        assert client.post("/v1/completions", json=ask()).status_code == 200
        assert client.get("/v1/nowhere").json()["error"]["message"] == "Not Found"
        assert client.get("/v1/completions").status_code == 405
        assert stat(metrics(client), "e2e_request_latency_seconds_count") == 1     # the refused never reached the engine


def test_a_model_without_tokenizer_takes_token_ids():
    "A target without a tokenizer: text prompts and chat get 400 saying so; token ids decode as `generate` does."
    from specdec.models import tiny_llama
    bare = tiny_llama(vocab_size=100)                    # too small for the byte tokenizer: no tokenizer
    with client_for(served(bare, "pld")) as client:
        text = client.post("/v1/completions", json=ask(prompt="abc"))
        chat = client.post("/v1/chat/completions", json={"model": NAME, "messages": [{"role": "user", "content": "a"}]})
        ids = client.post("/v1/completions", json=ask(prompt=[5, 6, 7, 5, 6, 7], max_tokens=8))
    for r in (text, chat):
        assert r.status_code == 400 and "this model has no tokenizer: send the prompt as token ids" in r.text
    out = offline(bare, "pld", torch.tensor([5, 6, 7, 5, 6, 7]), max_new_tokens=8)
    assert ids.status_code == 200 and ids.json()["choices"][0]["text"] == bare.decode(out.tokens)


def test_an_unexpected_error_in_the_app_is_a_500_with_a_request_id(tiny, monkeypatch, caplog):
    def broken(*args): raise KeyError("a deliberate bug")
    monkeypatch.setattr(serve, "_job", broken)
    app = serve.make_app(lambda: served(tiny, "pld"), NAME)
    with caplog.at_level(logging.ERROR, logger="specdec.serve"), TestClient(app, raise_server_exceptions=False) as c:
        assert app.state.worker.wait_loaded(60)
        r = c.post("/v1/completions", json=ask())
        assert c.get("/health").status_code == 200
    error = r.json()["error"]
    assert r.status_code == 500 and error["request_id"] in error["message"] and error["type"] == "server_error"
    assert any(rec.getMessage() == f"request {error['request_id']} failed" for rec in caplog.records)


def test_a_body_over_the_limit_gets_413(tiny):
    with client_for(served(tiny, "pld"), max_body_bytes=1000) as client:
        small = client.post("/v1/completions", json=ask(prompt="x" * 100))
        declared = client.post("/v1/completions", json=ask(prompt="x" * 2000))
        chunked = client.post("/v1/completions", content=iter([b"{" + b" " * 600, b" " * 600 + b"}"]))
    assert small.status_code == 200
    for r in (declared, chunked):                     # a declared length, and a chunked body counted as it comes
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert "request body over 1000 bytes" in r.json()["error"]["message"]


# --- failures, loading, queueing, disconnects

def test_an_internal_error_fails_only_its_request(tiny, monkeypatch, caplog):
    """A request whose decoding raises gets 500 with its id (logged); one that fails mid-stream gets an error event; the
    next request is served."""
    real, calls = Batch.step, []
    def failing(batch):
        calls.append(1)
        if len(calls) == 1: raise RuntimeError("a deliberate failure")          # the first request's first step
        if len(calls) == 4: raise RuntimeError("a deliberate failure mid-stream")   # the stream's third step
        return real(batch)
    monkeypatch.setattr(Batch, "step", failing)
    with caplog.at_level(logging.ERROR, logger="specdec.serve"), client_for(served(tiny, "pld")) as client:
        first = client.post("/v1/completions", json=ask())
        stream = client.post("/v1/completions", json=ask(stream=True, ignore_eos=True))
        after = client.post("/v1/completions", json=ask())
    error = first.json()["error"]
    assert first.status_code == 500 and error["type"] == "server_error" and error["code"] == "internal_error"
    assert error["request_id"].startswith("cmpl-") and error["request_id"] in error["message"]
    assert "RuntimeError" in error["message"]
    logged = {r.getMessage(): r.exc_info[1] for r in caplog.records if r.exc_info}
    assert str(logged[f"request {error['request_id']} failed"]) == "a deliberate failure"
    *steps, failed = events(stream.text)
    assert stream.status_code == 200 and [c["specdec"]["step"] for c in steps] == [0, 1]
    assert failed["error"]["code"] == "internal_error" and failed["error"]["request_id"] in failed["error"]["message"]
    out = offline(tiny, "pld", tiny.encode(PROMPT), max_new_tokens=24)
    assert after.status_code == 200 and after.json()["choices"][0]["text"] == tiny.decode(out.tokens)


def test_health_is_503_until_the_model_is_loaded(tiny):
    loaded = threading.Event()
    def loader():
        assert loaded.wait(60)
        return served(tiny, "pld")
    app = serve.make_app(loader, NAME)
    with TestClient(app) as client:
        health, early = client.get("/health"), client.post("/v1/completions", json=ask())
        models = client.get("/v1/models").json()
        loaded.set()
        assert app.state.worker.wait_loaded(60)
        ready, later = client.get("/health"), client.post("/v1/completions", json=ask())
        card = client.get("/v1/models").json()["data"][0]
    assert (health.status_code, health.json()) == (503, {"status": "loading"})
    assert early.status_code == 503 and "the model is not ready" in early.json()["error"]["message"]
    assert [m["id"] for m in models["data"]] == [NAME] and "max_model_len" not in models["data"][0]
    assert (ready.status_code, ready.json()) == (200, {"status": "ok"}) and later.status_code == 200
    assert card["max_model_len"] == 4096 and card["specdec"] == {"drafter": "pld:3", "controller": "fixed:4"}


def test_a_model_that_fails_to_load_says_why(tiny):
    def loader(): raise ValueError("unknown model 'nope'")
    app = serve.make_app(loader, NAME)
    with TestClient(app) as client:
        assert app.state.worker.wait_loaded(60)
        health, r = client.get("/health"), client.post("/v1/completions", json=ask())
    assert (health.status_code, health.json()) == (503, {"status": "failed: ValueError: unknown model 'nope'"})
    assert r.status_code == 503


def test_concurrent_requests_queue_and_both_complete(tiny, monkeypatch):
    "The second request waits (the waiting gauge shows it) until the engine has finished the first."
    real, started, release = Batch.step, threading.Event(), threading.Event()
    def held(batch):
        started.set()
        assert release.wait(60)
        return real(batch)
    monkeypatch.setattr(Batch, "step", held)
    prompts = [PROMPT, "the cat the cat"]
    with client_for(served(tiny, "pld")) as client, ThreadPoolExecutor(2) as pool:
        first = pool.submit(client.post, "/v1/completions", json=ask(prompt=prompts[0]))
        assert started.wait(60)
        second = pool.submit(client.post, "/v1/completions", json=ask(prompt=prompts[1]))
        deadline, gauges = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            m = metrics(client)
            gauges = stat(m, "num_requests_running"), stat(m, "num_requests_waiting")
            if gauges == (1, 1): break
            time.sleep(0.05)
        release.set()
        responses = [first.result(60), second.result(60)]
        after = metrics(client)
    assert gauges == (1, 1)                                       # one decoding, one queued
    for r, p in zip(responses, prompts):
        out = offline(tiny, "pld", tiny.encode(p), max_new_tokens=24)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == tiny.decode(out.tokens)
    assert stat(after, "request_queue_time_seconds_count") == 2
    assert stat(after, "num_requests_running") == stat(after, "num_requests_waiting") == 0


def test_a_prompt_being_encoded_holds_up_neither_the_event_loop_nor_the_engine(tiny):
    """Prompts are encoded on the encoder threads: while one prompt's encoding is held, /health answers and a request
    of token ids completes; released, the held request completes with `generate`'s text."""
    model = served(tiny, "pld")
    entered, release, encoder = threading.Event(), threading.Event(), model.prompt_tokenizer
    class Held:
        def encode(self, text, *args, **kw):
            entered.set()
            assert release.wait(60)
            return encoder.encode(text, *args, **kw)
    model.prompt_tokenizer = Held()
    other = tiny.encode("the cat the cat")[0].tolist()
    with client_for(model) as client, ThreadPoolExecutor(1) as pool:
        held = pool.submit(client.post, "/v1/completions", json=ask())
        assert entered.wait(60)
        health, ids = client.get("/health"), client.post("/v1/completions", json=ask(prompt=other))
        done_first = not held.done()
        release.set()
        held = held.result(60)
    assert health.status_code == 200 and ids.status_code == 200 and done_first
    for r, prompt in ((ids, torch.tensor([other])), (held, tiny.encode(PROMPT))):
        assert r.json()["choices"][0]["text"] == tiny.decode(offline(tiny, "pld", prompt, max_new_tokens=24).tokens)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's own niceness is Linux's")
def test_prompt_encoders_run_below_the_other_threads():
    def niceness(): return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    here = niceness()
    for nice in (0, 5):
        with serve.PromptEncoders(nice) as pool: theirs = pool.submit(niceness).result(60)
        assert theirs == min(19, here + nice) and niceness() == here
    for bad in (-1, 20):
        with pytest.raises(ValueError, match=f"encode_nice {bad}: give 0 to 19"): serve.PromptEncoders(bad)


def test_a_full_queue_answers_429(tiny, monkeypatch):
    real, started, release = Batch.step, threading.Event(), threading.Event()
    def held(batch):
        started.set(); assert release.wait(60)
        return real(batch)
    monkeypatch.setattr(Batch, "step", held)
    with client_for(served(tiny, "pld"), max_waiting=1) as client, ThreadPoolExecutor(2) as pool:
        running = pool.submit(client.post, "/v1/completions", json=ask())
        assert started.wait(60)
        waiting = pool.submit(client.post, "/v1/completions", json=ask())
        deadline = time.monotonic() + 60
        while stat(metrics(client), "num_requests_waiting") < 1 and time.monotonic() < deadline: time.sleep(0.05)
        refused = client.post("/v1/completions", json=ask())
        release.set()
        codes = [running.result(60).status_code, waiting.result(60).status_code]
    assert refused.status_code == 429 and "1 requests are already waiting" in refused.json()["error"]["message"]
    assert codes == [200, 200]


def asgi_stream_then_disconnect(app, body:dict) -> list[dict]:
    "Call the ASGI app directly with a streaming request whose client leaves once the first chunk arrived."
    async def call():
        raw, sent, gone = json.dumps(body).encode(), [], asyncio.Event()
        pending = [{"type": "http.request", "body": raw, "more_body": False}]
        async def receive():
            if pending: return pending.pop()
            await gone.wait()
            return {"type": "http.disconnect"}
        async def send(message):
            sent.append(message)
            if message["type"] == "http.response.body" and message.get("body"): gone.set()
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
                 "query_string": b"", "root_path": "", "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
                 "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]}
        await app(scope, receive, send)
        return sent
    return call


def test_a_client_that_disconnects_cancels_its_request(tiny):
    "The stream ends, the engine stops the request at a step boundary (counted as an abort) and serves the next."
    with client_for(served(tiny, "pld")) as client:
        sent = client.portal.call(asgi_stream_then_disconnect(client.app, ask(max_tokens=400, ignore_eos=True,
                                                                              stream=True)))
        deadline = time.monotonic() + 60
        while stat(metrics(client), "request_success_total", finished_reason="abort") < 1:
            assert time.monotonic() < deadline, "the engine never stopped the abandoned request"
            time.sleep(0.05)
        m = metrics(client)
        after = client.post("/v1/completions", json=ask())
    chunks = [x for x in sent if x["type"] == "http.response.body" and x.get("body")]
    assert 1 <= len(chunks) < 400 and b"[DONE]" not in b"".join(c["body"] for c in chunks)
    assert stat(m, "generation_tokens_total") < 400                       # stopped well before its 400 tokens
    assert stat(m, "num_requests_running") == 0 and stat(m, "e2e_request_latency_seconds_count") == 0
    assert after.status_code == 200


def test_engine_worker_stops_a_cancelled_request_at_the_next_step(tiny, monkeypatch):
    "A handle cancelled as its first step's chunk is handed over gets no further chunk, then its `Failed`."
    class CancelledAtFirstStep(serve_engine.Handle):
        def put(self, item):
            super().put(item)
            if isinstance(item, serve_engine.StepChunk): self.cancel()
    monkeypatch.setattr(serve_engine, "Handle", CancelledAtFirstStep)
    metrics = serve_engine.ServeMetrics(NAME)
    worker = serve_engine.EngineWorker(lambda: served(tiny, "pld"), metrics)
    worker.start()
    assert worker.wait_loaded(60)
    async def run():
        handle = worker.submit(serve_engine.Job("cmpl-test", tiny.encode(PROMPT)[0].tolist(), 300, ignore_eos=True))
        items = [await handle.get()]
        while not isinstance(items[-1], serve_engine.Failed): items.append(await handle.get())
        return items
    first, failed = asyncio.run(run())
    worker.close()
    assert isinstance(first, serve_engine.StepChunk) and first.step == 0
    assert failed.status == 503 and failed.message == "request cancelled: the client went away"
    assert metrics.generation_tokens._value.get() == len(first.tokens) and not worker.thread.is_alive()


# --- continuous batching (--max-batch 2)

def gated_admission(monkeypatch, n:int):
    "Hold the engine's first admission until `n` requests wait (set the returned event once they do)."
    real, gate = serve_engine.EngineWorker._admit, threading.Event()
    def admit(self):
        assert gate.wait(60)
        return real(self)
    monkeypatch.setattr(serve_engine.EngineWorker, "_admit", admit)
    return gate


def post_together(client, gate, bodies:list[dict]) -> list:
    "Post `bodies` concurrently, queued in their order; open the gate once all of them wait; the responses in order."
    with ThreadPoolExecutor(len(bodies)) as pool:
        futures, deadline = [], time.monotonic() + 60
        for i, body in enumerate(bodies):
            futures.append(pool.submit(client.post, "/v1/completions", json=body))
            while stat(metrics(client), "num_requests_waiting") < i + 1:
                assert time.monotonic() < deadline, "the requests never all waited"
                time.sleep(0.02)
        gate.set()
        return [f.result(120) for f in futures]


@pytest.mark.parametrize("drafter", [None, "pld"])
def test_a_batch_of_two_rows_serves_four_requests_as_generate_alone(tiny, drafter, monkeypatch):
    "Four concurrent requests, two rows: each text is what `generate` gives for its prompt alone; counters add up."
    gate = gated_admission(monkeypatch, 4)
    prompts = [(PROMPT, 24), ("the cat the cat", 9), ("one two three one two", 30), ("zz yy zz yy zz", 17)]
    model = served(tiny, drafter)
    app = serve.make_app(lambda: model, NAME, max_batch=2)
    with TestClient(app) as client:
        assert app.state.worker.wait_loaded(60)
        responses = post_together(client, gate, [ask(prompt=p, max_tokens=n) for p, n in prompts])
        after = metrics(client)
    assert app.state.worker.max_running == 2
    bodies = [r.json() for r in responses]
    for body, (p, n) in zip(bodies, prompts):
        out = offline(tiny, drafter, tiny.encode(p), max_new_tokens=n)
        assert body["choices"][0]["text"] == tiny.decode(out.tokens), p
        assert body["usage"]["completion_tokens"] == out.tokens.shape[1]
    total = lambda key: sum(b["specdec"][key] for b in bodies)
    assert stat(after, "num_verification_steps_total") == total("steps")
    assert stat(after, "spec_decode_num_drafts_total") == total("drafts")
    assert stat(after, "spec_decode_num_draft_tokens_total") == total("draft_tokens")
    assert stat(after, "spec_decode_num_accepted_tokens_total") == total("accepted_tokens")
    if drafter == "pld": assert total("draft_tokens") > 0
    assert stat(after, "generation_tokens_total") == sum(b["usage"]["completion_tokens"] for b in bodies)
    assert stat(after, "num_requests_running") == stat(after, "num_requests_waiting") == 0


def test_a_batch_streams_one_chunk_per_step_of_its_row(tiny, monkeypatch):
    gate = gated_admission(monkeypatch, 2)
    app = serve.make_app(lambda: served(tiny, "pld"), NAME, max_batch=2)
    with TestClient(app) as client:
        assert app.state.worker.wait_loaded(60)
        streamed, whole = post_together(client, gate, [ask(stream=True), ask(prompt="the cat the cat")])
    *steps, last = events(streamed.text)
    out = offline(tiny, "pld", tiny.encode(PROMPT), max_new_tokens=24)
    assert [c["specdec"]["step"] for c in steps] == list(range(len(steps))) == list(range(last["specdec"]["steps"]))
    assert sum(c["specdec"]["tokens"] for c in steps) == out.tokens.shape[1]
    assert "".join(c["choices"][0]["text"] for c in [*steps, last]) == tiny.decode(out.tokens)
    assert whole.status_code == 200


def test_a_cancelled_row_is_freed_for_a_waiting_request(tiny):
    "Two rows held by endless requests: cancelling one lets a third request in while the other still decodes."
    metrics_ = serve_engine.ServeMetrics(NAME)
    worker = serve_engine.EngineWorker(lambda: served(tiny, "pld"), metrics_, max_batch=2)
    worker.start()
    assert worker.wait_loaded(60)
    ids = tiny.encode(PROMPT)[0].tolist()
    async def until_end(handle):
        items = [await asyncio.wait_for(handle.get(), 60)]
        while isinstance(items[-1], serve_engine.StepChunk): items.append(await asyncio.wait_for(handle.get(), 60))
        return items
    async def run():
        a, b = (worker.submit(serve_engine.Job(r, ids, 4000, ignore_eos=True)) for r in ("a", "b"))
        await a.get(); await b.get()                                      # both rows decode
        c = worker.submit(serve_engine.Job("c", ids, 8, ignore_eos=True))
        a.cancel()
        third = await until_end(c)                                        # served while b still holds its row
        b_running = worker.slots and not b.cancelled.is_set()
        b.cancel()
        return (await until_end(a))[-1], (await until_end(b))[-1], third, b_running
    first, second, third, b_running = asyncio.run(run())
    worker.close()
    out = offline(tiny, "pld", torch.tensor([ids]), max_new_tokens=8, eos_token_id=[])
    assert isinstance(third[-1], serve_engine.Done) and third[-1].completion_tokens == 8 and b_running
    assert sum((c.tokens for c in third[:-1]), []) == out.tokens[0].tolist()
    assert first.status == second.status == 503 and "the client went away" in first.message
    assert stat_value(metrics_.request_success, "abort") == 2 and not worker.thread.is_alive()


def stat_value(counter, label) -> float:
    return counter.labels(NAME, label)._value.get()


def test_a_request_with_other_sampling_waits_for_an_empty_batch(tiny, monkeypatch):
    "Greedy, then sampled, then greedy: the sampled one runs alone once the batch empties; all succeed."
    gate = gated_admission(monkeypatch, 3)
    app = serve.make_app(lambda: served(tiny, "pld"), NAME, max_batch=2)
    sampled = dict(temperature=0.9, top_p=0.8, seed=7)
    with TestClient(app) as client:
        assert app.state.worker.wait_loaded(60)
        responses = post_together(client, gate, [ask(), ask(prompt="the cat the cat", **sampled),
                                                 ask(prompt="zz yy zz yy zz")])
        again = client.post("/v1/completions", json=ask(prompt="the cat the cat", **sampled))
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert app.state.worker.max_running == 1                    # nobody shared the batch with the sampled request
    for r, p in zip(responses[::2], (PROMPT, "zz yy zz yy zz")):
        out = offline(tiny, "pld", tiny.encode(p), max_new_tokens=24)
        assert r.json()["choices"][0]["text"] == tiny.decode(out.tokens)
    assert responses[1].json()["choices"][0]["text"] == again.json()["choices"][0]["text"]


def test_an_error_in_a_batch_step_fails_its_rows_and_the_server_goes_on(tiny, monkeypatch, caplog):
    gate = gated_admission(monkeypatch, 2)
    real, calls = serve_engine.Batch.step, []
    def failing(self):
        calls.append(1)
        if len(calls) == 3: raise RuntimeError("a deliberate failure")
        return real(self)
    monkeypatch.setattr(serve_engine.Batch, "step", failing)
    app = serve.make_app(lambda: served(tiny, "pld"), NAME, max_batch=2)
    with caplog.at_level(logging.ERROR, logger="specdec.serve"), TestClient(app) as client:
        assert app.state.worker.wait_loaded(60)
        failed = post_together(client, gate, [ask(ignore_eos=True), ask(prompt="the cat the cat", ignore_eos=True)])
        after = client.post("/v1/completions", json=ask())
    errors = [r.json()["error"] for r in failed]
    assert [r.status_code for r in failed] == [500, 500] and len({e["request_id"] for e in errors}) == 2
    assert all(e["request_id"] in e["message"] and "RuntimeError" in e["message"] for e in errors)
    out = offline(tiny, "pld", tiny.encode(PROMPT), max_new_tokens=24)
    assert after.status_code == 200 and after.json()["choices"][0]["text"] == tiny.decode(out.tokens)


# --- the command line and a real server

def test_serve_command_line_refuses_what_it_cannot_do():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit): main(["serve", "--help"])
    for flag in ("--drafter", "--controller", "--max-batch", "--host", "--port", "--served-model-name",
                 "--max-body-bytes", "--shutdown-timeout", "--max-model-len", "--encode-nice"):
        assert flag in out.getvalue()
    with contextlib.redirect_stderr(err):
        assert main(["serve", NAME, "--max-batch", "0"]) == 2
        assert main(["serve", NAME, "--drafter", "pdl"]) == 2
        assert main(["serve", NAME, "--encode-nice", "20"]) == 2
    assert "--max-batch 0: give at least 1" in err.getvalue()
    assert "encode_nice 20: give 0 to 19" in err.getvalue()
    assert "pdl" in err.getvalue().splitlines()[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_loopback_server_streams_and_sigterm_lets_the_stream_finish(tmp_path):
    """`specdec serve` under uvicorn: /health turns 200; a stream in flight at SIGTERM still ends with [DONE], then the
    app shuts down and uvicorn ends the process by the signal it caught (its way: exit status -SIGTERM)."""
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "specdec.cli", "serve", NAME, "--drafter", "pld", "--port", str(port),
                             "--log-level", "info", "--shutdown-timeout", "600"],   # on a loaded machine too
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200: break
            except httpx.TransportError: pass
            time.sleep(0.2)
        lines = []
        with httpx.stream("POST", base + "/v1/completions", json=ask(max_tokens=200, ignore_eos=True, stream=True),
                          timeout=60) as r:
            for line in r.iter_lines():
                if line and not lines: proc.send_signal(signal.SIGTERM)      # the stream is in flight
                if line: lines.append(line)
        assert proc.wait(60) == -signal.SIGTERM
    finally:
        if proc.poll() is None: proc.kill(); proc.wait()
        log.close()
    chunks = [json.loads(l.removeprefix("data: ")) for l in lines[:-1]]
    assert lines[-1] == "data: [DONE]" and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(c["specdec"]["tokens"] for c in chunks[:-1]) == 200
    log = (tmp_path / "server.log").read_text()
    assert "Waiting for application shutdown" in log and "Application shutdown complete" in log, log
