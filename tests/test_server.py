"""`medusa serve` against a live uvicorn server on loopback, driven with the official `openai` client and raw
HTTP: response shapes, streaming, concurrency, the bounded queue, disconnects, API keys, malformed requests."""
from __future__ import annotations

import copy
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from medusa.chat_format import encode_prompt
from medusa.inference.stops import StopCutter
from medusa.interfaces.textstream import RunStats, stream_text
from serving import serve, tiny_medusa

MSG = [{"role": "user", "content": "Tell me a story."}]


@pytest.fixture(scope="module")
def model():
    return tiny_medusa()


@pytest.fixture(scope="module")
def server(model):
    with serve(model, defaults={"max_new_tokens": 6}) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


class _SlowVerifier:
    def __init__(self, verifier, delay: float):
        self.verifier, self.delay = verifier, delay

    def __getattr__(self, name):
        return getattr(self.verifier, name)

    def verify(self, *args, **kwargs):
        time.sleep(self.delay)
        return self.verifier.verify(*args, **kwargs)


class Slowed:
    """The model with a pause before every verification forward and no end-of-sequence token, so that a
    request reliably runs long enough to be queued behind or disconnected from."""

    def __init__(self, model, delay: float = 0.02):
        self.model = model
        self.engine = copy.copy(model.engine)
        self.engine.verifier = _SlowVerifier(model.engine.verifier, delay)

    def __getattr__(self, name):
        return getattr(self.model, name)

    def requests(self, ids, **options):
        return self.model.requests(ids, **{**options, "eos_token_id": []})


def reference(model, messages, max_tokens: int) -> str:
    """The library's own greedy answer, without the server."""
    ids = encode_prompt(model.tokenizer, messages)
    return "".join(stream_text(model.stream(ids, max_new_tokens=max_tokens), model.tokenizer, RunStats()))


def wait_idle(engine, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.pending:
        assert time.monotonic() < deadline, "the engine did not become idle"
        time.sleep(0.01)


def wait_pending(engine, n: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.pending < n:
        assert time.monotonic() < deadline, f"the engine never had {n} requests"
        time.sleep(0.005)


# ---------------------------------------------------------------- the pure parts
@pytest.mark.parametrize("pieces, stop, want, stopped", [
    (["ab", "cX", "Yde"], ("XY",), "abc", True),
    (["abX", "Zc"], ("XY",), "abXZc", False),           # a held-back partial match that was not one
    (["XY"], ("XY",), "", True),
    (["a", "b"], ("zz", "b"), "a", True),
    (["hello"], (), "hello", False),
])
def test_stop_cutter(pieces, stop, want, stopped):
    cutter = StopCutter(stop)
    assert "".join(cutter.push(p) for p in pieces) + cutter.flush() == want
    assert cutter.stopped == stopped


# ---------------------------------------------------------------- the official client
def test_chat_completion_shape_usage_and_medusa_figures(client, model):
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=40)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == "tiny"
    assert isinstance(r.created, int) and abs(r.created - time.time()) < 600
    (choice,) = r.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.message.content == reference(model, MSG, 40)
    assert choice.finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens == encode_prompt(model.tokenizer, MSG).shape[1]
    assert 0 < u.completion_tokens <= 40 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    m = r.model_extra["medusa"]
    assert m["steps"] >= 1 and m["tokens_per_s"] > 0
    assert m["tokens_per_step"] == pytest.approx(u.completion_tokens / m["steps"], abs=1e-3)


def test_streaming_equals_non_streaming(client):
    whole = client.chat.completions.create(messages=MSG, model="tiny", max_tokens=30)
    chunks = list(client.chat.completions.create(messages=MSG, model="tiny", max_tokens=30, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    closing, usage_only = chunks[-2], chunks[-1]
    assert closing.choices[0].finish_reason == whole.choices[0].finish_reason
    assert closing.model_extra["medusa"]["steps"] == whole.model_extra["medusa"]["steps"]
    assert usage_only.choices == [] and usage_only.usage.completion_tokens == whole.usage.completion_tokens


def test_raw_event_stream_format(server):
    body = {"messages": MSG, "max_tokens": 8, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert [p["choices"][0]["finish_reason"] for p in payloads].count(None) == len(payloads) - 1
    assert "usage" in payloads[-1] and "medusa" in payloads[-1]   # even without stream_options


def test_completions_stop_strings_and_streaming(client):
    first = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=60)
    text = first.choices[0].text
    assert first.object == "text_completion" and first.id.startswith("cmpl-") and first.usage.completion_tokens > 0
    if len(text) < 12:
        pytest.skip("the tiny model ended too early to pick a stop string")
    stop = text[8:10]
    cut = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=60, stop=[stop, "\x01"])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=60, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_sampling_with_a_seed_repeats(client):
    ask = lambda seed: client.chat.completions.create(model="tiny", messages=MSG, max_tokens=30, temperature=1.0,
                                                      top_p=0.9, seed=seed).choices[0].message.content
    assert ask(7) == ask(7)
    assert len({ask(7), ask(8), ask(9)}) > 1


def test_models_health_and_model_names(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    for name in ("default", None):   # "default" (what `medusa distill --api-base` sends) and none at all
        body = {"messages": MSG, "max_tokens": 2, **({"model": name} if name else {})}
        assert httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
    default_length = client.chat.completions.create(model="tiny", messages=MSG)      # the server's default
    assert default_length.usage.completion_tokens <= 6
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=2)
    assert e.value.body["code"] == "model_not_found"


def test_concurrent_clients_each_get_their_own_answer(client, server):
    prompts = [f"Question number {i}: {'why ' * i}?" for i in range(8)]
    ask = lambda p, stream=False: client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": p}], max_tokens=48, stream=stream)
    alone = [ask(p).choices[0].message.content for p in prompts]

    def concurrently(i):
        if i % 2:
            return "".join(c.choices[0].delta.content or "" for c in ask(prompts[i], stream=True) if c.choices)
        return ask(prompts[i]).choices[0].message.content

    seen, done = [], threading.Event()

    def watch():
        while not done.is_set():
            seen.append(server.engine.running)
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(concurrently, range(len(prompts))))
    done.set()
    watcher.join()
    assert together == alone
    assert len(set(alone)) > 1   # the prompts really give different answers
    assert max(seen) > 1         # decoded together, in one batch


# ---------------------------------------------------------------- the queue and disconnects
@pytest.fixture(scope="module")
def slow_server(model):
    with serve(Slowed(model), queue_size=1, max_batch=1) as s:
        yield s


def _stream_request(url: str, max_tokens: int = 150):
    body = {"messages": MSG, "max_tokens": max_tokens, "stream": True}
    return httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60)


def test_full_queue_answers_429_at_once(slow_server):
    s = slow_server
    with _stream_request(s.url) as running, _stream_request(s.url) as waiting:
        assert running.status_code == waiting.status_code == 200
        wait_pending(s.engine, 2)
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": MSG, "max_tokens": 4}, timeout=60)
        assert s.engine.pending == 2               # answered while both others were still in the engine
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "queue_full"
    wait_idle(s.engine)
    assert httpx.post(s.url + "/v1/chat/completions", json={"messages": MSG, "max_tokens": 4}, timeout=60).is_success


def test_disconnect_mid_stream_stops_generation(slow_server):
    s = slow_server
    wait_idle(s.engine)
    with _stream_request(s.url, max_tokens=200) as r:
        pieces = 0
        for line in r.iter_lines():
            pieces += line.startswith("data: ")
            if pieces >= 4:
                break                                   # leaving the block closes the connection
    wait_idle(s.engine)
    report = s.engine.reports[-1]
    assert report.cancelled and report.finish_reason == "cancelled" and report.new_tokens < 200
    after = httpx.post(s.url + "/v1/chat/completions", json={"messages": MSG, "max_tokens": 5}, timeout=60).json()
    assert after["usage"]["completion_tokens"] == 5 and not s.engine.reports[-1].cancelled


def test_disconnect_while_waiting_non_streaming(slow_server):
    s = slow_server
    wait_idle(s.engine)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(s.url + "/v1/chat/completions", json={"messages": MSG, "max_tokens": 200}, timeout=0.5)
    wait_idle(s.engine)
    report = s.engine.reports[-1]
    assert report.cancelled and report.new_tokens < 200


def test_a_model_without_chat_template_takes_one_message_only():
    bare = tiny_medusa()
    bare.tokenizer.chat_template = None
    with serve(bare) as s:
        url = s.url + "/v1/chat/completions"
        assert httpx.post(url, json={"messages": MSG, "max_tokens": 3}, timeout=60).status_code == 200
        two = MSG + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}]
        r = httpx.post(url, json={"messages": two, "max_tokens": 3}, timeout=60)
        assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]


# ---------------------------------------------------------------- the API key
def test_api_key_is_checked_on_every_route_but_health_and_the_page(model):
    with serve(model, api_key="s3cret") as s:
        for method, path in [("GET", "/v1/models"), ("GET", "/v1/models/tiny"), ("POST", "/v1/chat/completions"),
                             ("POST", "/v1/completions")]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                r = httpx.request(method, s.url + path, headers=headers, json={"messages": MSG, "prompt": "x"})
                assert r.status_code == 401, (path, headers)
                assert r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(s.url + "/health").status_code == 200
        assert httpx.get(s.url + "/").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model="tiny", messages=MSG, max_tokens=3).usage.completion_tokens > 0


# ---------------------------------------------------------------- malformed requests
CHAT, TEXT = "/v1/chat/completions", "/v1/completions"
OK_CHAT = {"model": "tiny", "messages": MSG, "max_tokens": 4}


def _malformed() -> list[tuple[str, str, dict, bytes | None]]:
    """(method, path, headers, body) that must each get a 4xx."""
    j = lambda d: json.dumps(d).encode()
    chat = lambda **kw: ("POST", CHAT, {"content-type": "application/json"}, j({**OK_CHAT, **kw}))
    cases = [("POST", CHAT, {"content-type": "application/json"}, b) for b in (
        b"", b"{", b"{bad json}", b"[]", b'"text"', b"42", b"null", j({"model": "tiny"}), b"\xff\xfe\x00")]
    cases += [chat(messages=v) for v in ([], {}, "hi", None, [{}], [{"role": "user"}], [{"content": "x"}],
                                         [{"role": "robot", "content": "x"}], [{"role": "user", "content": 5}],
                                         [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
                                         ["just a string"])]
    cases += [chat(max_tokens=v) for v in (0, -1, "10", 1.5, True, 10 ** 9, 257)]
    cases += [chat(max_completion_tokens=10 ** 6), chat(temperature=-1), chat(temperature=5), chat(temperature="hot"),
              chat(top_p=0), chat(top_p=1.5), chat(n=2), chat(n="1"), chat(stop=5), chat(stop=["a"] * 5),
              chat(stop=[""]), chat(stream="yes"), chat(model="gpt-4"), chat(model=5), chat(seed="x"),
              chat(tools=[{"type": "function"}]), chat(logprobs=True), chat(stream_options={"include_usage": "y"}),
              chat(messages=[{"role": "user", "content": "x" * 400}])]   # longer than the context
    cases += [("POST", CHAT, {"content-type": ct}, body) for ct, body in [
        ("text/plain", b"hello"), ("application/x-www-form-urlencoded", b"a=1&b=2"),
        ("multipart/form-data; boundary=x", b"--x\r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n--x--"),
        ("application/json", b"{" + b" " * (2 << 20) + b"}")]]
    text = lambda **kw: ("POST", TEXT, {"content-type": "application/json"}, j({"model": "tiny", "max_tokens": 4, **kw}))
    cases += [text(), text(prompt=""), text(prompt=[]), text(prompt=[[1, 2]]), text(prompt=[10 ** 6]),
              text(prompt=["a", "b"]), text(prompt=5), text(prompt="x", echo=True), text(prompt="x", best_of=3)]
    cases += [("GET", CHAT, {}, None), ("DELETE", "/v1/models", {}, None), ("GET", "/v1/nothing", {}, None),
              ("GET", "/v1/models/gpt-4", {}, None)]
    cases += [("POST", path, {"content-type": "application/json"}, body) for _, path, body, _ in _field_errors()]
    return cases


def _field_errors() -> list[tuple[str, str, bytes, str]]:
    """(name, path, body, the field a 400 must name): values that reached the engine or the tokenizer and
    came back as 500s, or as a 200 and then an error event when streaming."""
    j = lambda d: json.dumps(d).encode()           # json.dumps writes a lone surrogate as its \u escape
    deep = lambda key, n: f'{{"model": "tiny", "{key}": '.encode() + b"[" * n + b"]" * n + b"}"
    return [
        ("seed above 64 bits", CHAT, j({**OK_CHAT, "seed": 2 ** 64}), "seed"),
        ("seed below 64 bits", CHAT, j({**OK_CHAT, "seed": -2 ** 63 - 1}), "seed"),
        ("seed above 64 bits streaming", CHAT, j({**OK_CHAT, "seed": 2 ** 64, "stream": True}), "seed"),
        ("surrogate prompt", TEXT, j({"model": "tiny", "prompt": "\ud800", "max_tokens": 4}), "prompt"),
        ("surrogate in a prompt list", TEXT, j({"model": "tiny", "prompt": ["a\udfff"], "max_tokens": 4}),
         "prompt.0"),
        ("surrogate message", CHAT, j({**OK_CHAT, "messages": [{"role": "user", "content": "\ud800"}]}),
         "messages.0.content"),
        ("surrogate model name", CHAT, j({**OK_CHAT, "model": "\ud800"}), "model"),
        ("messages 1000 deep", CHAT, deep("messages", 1000), "messages"),
        ("prompt 5000 deep", TEXT, deep("prompt", 5000), "prompt"),
        ("ignored field 1000 deep", TEXT, b'{"prompt": "x", "metadata": ' + b'{"a": ' * 1000 + b"1" + b"}" * 1001,
         "metadata"),
    ]


@pytest.mark.parametrize("path, body, param", [case[1:] for case in _field_errors()],
                         ids=[case[0] for case in _field_errors()])
def test_values_the_engine_cannot_take_get_a_400_naming_the_field(server, path, body, param):
    r = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400, r.text[:300]
    err = r.json()["error"]
    assert err["param"] == param and err["message"].startswith(f"{param}: "), err
    assert "chat template" not in err["message"]


def _check_error(r: httpx.Response, what) -> None:
    assert 400 <= r.status_code < 500, (what, r.status_code, r.text[:300])
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"], what
    assert {"type", "param", "code"} <= set(err), what


def test_malformed_requests_get_openai_style_4xx_and_the_server_stays_healthy(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for method, path, headers, body in _malformed():
            _check_error(http.request(method, path, headers=headers, content=body), (method, path, body and body[:80]))
        rng = random.Random(0)
        for i in range(40):                      # random bytes, bounded
            body = rng.randbytes(rng.randrange(1, 300))
            _check_error(http.post(rng.choice([CHAT, TEXT]), content=body,
                                   headers={"content-type": "application/json"}), body[:40])
        values = [None, -1, 0, 1, 2.5, "", "x", "\ud800", [], {}, [1], {"a": 1}, True, 10 ** 12, 2 ** 64]
        for i in range(40):                      # one field of a good request set to a random value
            body = dict(OK_CHAT, **{rng.choice(["model", "messages", "max_tokens", "temperature", "top_p", "stop",
                                                "seed", "n", "stream", "stream_options"]): rng.choice(values)})
            r = http.post(CHAT, content=json.dumps(body), headers={"content-type": "application/json"})
            assert r.status_code == 200 or 400 <= r.status_code < 500, (body, r.status_code, r.text[:300])
            if r.status_code != 200:
                _check_error(r, body)
        assert http.get("/health").json()["status"] == "ok"
        assert http.post(CHAT, json=OK_CHAT).json()["usage"]["completion_tokens"] > 0


def test_soak_mixed_clients_leave_no_trace(model):
    """60 requests from 12 clients into a batch of 4: streaming and not, clients that hang up mid-answer,
    malformed bodies, prompts prefilled in chunks of 8 tokens while others decode. Zero 5xx, every finished
    answer its solo answer (no cross-talk between rows), and the engine back to empty and healthy."""
    from medusa.interfaces.soak import soak_request

    prompts = [f"Soak {i}: {'tell ' * (i % 5)}more" for i in range(12)]
    alone = {p: reference(model, [{"role": "user", "content": p}], 24) for p in prompts}

    def one(i: int):
        p = prompts[i % len(prompts)]
        kind, code, text = soak_request(s.url, i, p, 24)   # malformed, hangs up, streaming or not, by i
        return kind, code, (p, text)

    with serve(model, max_batch=4, queue_size=64, prefill_chunk=8) as s:
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(one, range(60)))
        wait_idle(s.engine)
        assert s.engine.running == 0 and httpx.get(s.url + "/health").json()["running"] == 0
        assert not any(t.name == "medusa-engine" and not t.is_alive() for t in threading.enumerate())
    assert all(code < 500 for _, code, _ in results)
    assert {kind for kind, _, _ in results} == {"malformed", "cancelled", "stream", "whole"}
    assert all(code == 400 for kind, code, _ in results if kind == "malformed")
    answered = [got for kind, _, got in results if kind in ("stream", "whole")]
    assert all(code == 200 for kind, code, _ in results if kind in ("stream", "whole"))
    assert len(answered) > 30 and all(text == alone[p] for p, text in answered)


# ---------------------------------------------------------------- `medusa serve` on the real default model
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_medusa_serve_command_on_the_default_model():
    import os
    import signal
    import subprocess
    import sys

    from medusa import MedusaModel
    from medusa.interfaces.chat import generate_once

    port = _free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "medusa", "serve", "--port", str(port), "--api-key", "k",
                             "--log-level", "warning"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 300
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "medusa serve did not come up"
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=300)
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        (served,) = [m.id for m in client.models.list().data]
        answer = client.chat.completions.create(model=served, messages=msgs, max_tokens=24)
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=served, messages=msgs, max_tokens=24, stream=True) if c.choices)
        m = MedusaModel.from_pretrained()
        want, stats = generate_once(m, encode_prompt(m.tokenizer, msgs), {"max_new_tokens": 24})
        assert answer.choices[0].message.content == want == streamed and "Paris" in want
        assert answer.usage.completion_tokens == stats.new_tokens
        assert answer.model_extra["medusa"]["steps"] == stats.steps
        assert httpx.get(url + "/").text.count(served) >= 1
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_the_soak_command_reports_what_the_soak_left(model):
    """`medusa bench-serve --soak`'s run, reduced: every kind of request, no 5xx (every malformed body a 400),
    no cross-talk, the server idle and healthy at the end, memory read at both ends."""
    from medusa.interfaces.soak import MALFORMED, run_soak

    prompts = [f"Soak {i}: {'tell ' * i}more" for i in range(5)]
    report = run_soak(model, prompts, requests=36, clients=6, max_tokens=12, max_batch=3, log=lambda s: None)
    assert report["server_errors"] == 0 and report["cross_talk"] == 0 and report["healthy_at_end"]
    assert set(report["kinds"]) == {"malformed", "cancelled", "stream", "whole"} and report["answered"] >= 15
    assert report["status"]["400"] == report["kinds"]["malformed"] == 5 == len(MALFORMED)
    assert report["rss_mib_start"] > 0 and report["rss_mib_end"] > 0
