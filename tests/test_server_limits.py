"""What one request may cost the server, against a real uvicorn on loopback: body size, prompt
length, chat-template budgets, a full queue, strict JSON, request types, stop strings, and a
client that goes away. Most use a tiny model written by the test (fast); the disconnect test
uses the real SmolLM2 (a generation long enough to tell "stopped" from "ran to the end")."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import gguf
import httpx
import numpy as np
import openai
import pytest
from tiny_gguf import D_MODEL, write_tiny_llama

from realm_nb.chat_template import TemplateBudget, render_template
from realm_nb.errors import ChatTemplateBudgetError, ChatTemplateError
from realm_nb.kernel import RealmKernel
from realm_nb.server import BackgroundServer, ServerLimits, create_app, json_text

TINY = "tiny"
SMALL_BODY = 64 * 1024


# ------------------------------------------------------------------------------ fixtures


TEMPLATES = {
    # a loop in a loop over a list made once: no call, no output, 10**10 steps
    "nested_loop": "{% set r = range(100000) %}{% for a in r %}{% for b in r %}{% endfor %}"
                   "{% endfor %}",
    "huge_string": "{{ 'x' * 100000000 }}",
    "doubling": "{% set ns = namespace(s='ab') %}{% for i in range(64) %}"
                "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "huge_output": "{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}",
    "recursive_macro": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "include": "{% include 'other.jinja' %}",
}


@pytest.fixture(scope="module")
def tiny_kernel(tmp_path_factory: pytest.TempPathFactory) -> RealmKernel:
    """A kernel of its own: the tiny model, plus one tiny model per hostile chat template
    (registered only: rendering needs the tokenizer, not the weights)."""
    d = tmp_path_factory.mktemp("limits")
    kernel = RealmKernel(n_slots=2, max_context=256)
    write_tiny_llama(d / "tiny.gguf")
    kernel.store.register(d / "tiny.gguf", name=TINY)
    for i, (name, template) in enumerate(TEMPLATES.items()):
        write_tiny_llama(d / f"{name}.gguf", seed=100 + i, chat_template=template)
        kernel.store.register(d / f"{name}.gguf", name=name)
    return kernel


@pytest.fixture(scope="module")
def tiny(tiny_kernel: RealmKernel) -> Iterator[BackgroundServer]:
    limits = ServerLimits(max_body_bytes=SMALL_BODY)
    with BackgroundServer(create_app(tiny_kernel, default_model=TINY, limits=limits)) as srv:
        yield srv


def post(srv: BackgroundServer, path: str, body: Any, **kw: Any) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, timeout=120, **kw)


def raw_request(url: str, head: bytes, body: bytes) -> tuple[bytes, int]:
    """Send a request's head and (part of) a body on a raw socket; read the answer. Returns the
    answer and how many body bytes the server let through before it answered."""
    host, port = url.removeprefix("http://").split(":")
    sent = 0
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head)
        s.settimeout(0.2)
        answer = b""
        for i in range(0, len(body), 4096):
            with contextlib.suppress(TimeoutError):
                answer = s.recv(65536)
            if answer:
                break
            try:
                s.sendall(body[i:i + 4096])
            except OSError:  # the server closed: it answered and will not read on
                break
            sent += len(body[i:i + 4096])
        s.settimeout(30)
        while chunk := s.recv(65536):  # the server closes the connection after its answer
            answer += chunk
    return answer, sent


def strict_json(text: str) -> Any:
    """json.loads that refuses NaN and Infinity, as every JSON parser but Python's does."""
    def refuse(name: str) -> None:
        raise AssertionError(f"not JSON: {name} in {text[:200]}")

    return json.loads(text, parse_constant=refuse)


# ------------------------------------------------------------------------------ body size


def test_oversized_body_is_413_before_the_body_is_sent(tiny: BackgroundServer) -> None:
    claimed = 100 * 1024 * 1024
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {claimed}\r\n\r\n").encode()
    answer, sent = raw_request(tiny.url, head, b"x" * (4 * SMALL_BODY))
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < SMALL_BODY  # answered from the header: the body was not waited for
    assert b"request_too_large" in answer and str(SMALL_BODY).encode() in answer


def test_oversized_chunked_body_is_413(tiny: BackgroundServer) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(64):  # 4 MiB in all, 64 x the limit
            yield b" " * 65536

    r = httpx.post(tiny.url + "/v1/completions", content=chunks(), timeout=60,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "RequestTooLargeError"
    assert post(tiny, "/v1/completions", {"prompt": "hi", "max_tokens": 1}).status_code == 200


# ------------------------------------------------------------------------------ prompt length


def test_a_prompt_too_long_in_characters_is_refused_before_tokenizing(
        tiny: BackgroundServer, tiny_kernel: RealmKernel,
        monkeypatch: pytest.MonkeyPatch) -> None:
    codec = tiny_kernel.store.get(TINY).codec
    most = tiny_kernel.store.max_context * codec.max_token_chars() + 1
    calls: list[int] = []
    real_encode = codec.encode

    def encode(text: str, *args: Any, **kwargs: Any) -> list[int]:
        calls.append(len(text))
        return real_encode(text, *args, **kwargs)

    monkeypatch.setattr(codec, "encode", encode)
    r = post(tiny, "/v1/completions", {"prompt": "a" * (most + 1), "max_tokens": 1})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    assert f"at most {most} characters" in err["message"] and "shorten" in err["message"]
    assert calls == []  # refused on its length in characters: never tokenized
    ok = post(tiny, "/v1/completions", {"prompt": "hello", "max_tokens": 1})
    assert ok.status_code == 200 and calls == [5]


# ------------------------------------------------------------------------------ chat templates


@pytest.mark.parametrize(("model", "code", "says"), [
    ("nested_loop", "chat_template_budget_exceeded", "steps"),
    ("huge_string", "chat_template_budget_exceeded", "characters"),
    ("doubling", "chat_template_budget_exceeded", "characters"),
    ("huge_output", "chat_template_budget_exceeded", "output"),
    ("recursive_macro", "chat_template_error", "recurses"),
    ("include", "chat_template_error", "stand alone"),
])
def test_a_hostile_chat_template_is_a_400_that_says_so(tiny: BackgroundServer, model: str,
                                                       code: str, says: str) -> None:
    client = openai.OpenAI(base_url=tiny.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, max_tokens=1,
                                       messages=[{"role": "user", "content": "hi"}])
    err = e.value.body
    assert isinstance(err, dict) and err["code"] == code, err
    assert says in err["message"]
    assert httpx.get(tiny.url + "/health", timeout=10).status_code == 200


def test_a_template_stops_at_its_step_budget() -> None:
    """The budget is counted in steps (loop iterations, calls, lookups), not only in time: a
    loop that produces nothing and calls nothing still stops where the count says."""
    budget = TemplateBudget(time_s=600, max_steps=5000)
    with pytest.raises(ChatTemplateBudgetError, match="more than 5000 steps"):
        render_template(TEMPLATES["nested_loop"], [{"role": "user", "content": "x"}], True,
                        budget=budget)
    ran = []

    def check() -> None:  # the caller's check runs while the template renders
        ran.append(1)
        if len(ran) == 3:
            raise ChatTemplateError("stop here")

    with pytest.raises(ChatTemplateError, match="stop here"):
        render_template(TEMPLATES["nested_loop"], [{"role": "user", "content": "x"}], True,
                        budget=TemplateBudget(time_s=600, max_steps=10**12), check=check)


@pytest.fixture(scope="module")
def patient(tiny_kernel: RealmKernel) -> Iterator[BackgroundServer]:
    """A server whose templates may render for a minute: cancellation must stop them."""
    limits = ServerLimits(template=TemplateBudget(time_s=60, max_steps=10**12))
    with BackgroundServer(create_app(tiny_kernel, default_model=TINY, limits=limits)) as srv:
        yield srv


def preparing(srv: BackgroundServer) -> int:
    """How many of the default tenant's requests /v1/cancel finds (and cancels)."""
    return int(httpx.post(srv.url + "/v1/cancel", timeout=10).json()["cancelled"])


def test_cancel_stops_a_rendering_template(patient: BackgroundServer) -> None:
    answers: list[httpx.Response] = []
    body = {"model": "nested_loop", "messages": [{"role": "user", "content": "hi"}]}
    t = threading.Thread(target=lambda: answers.append(
        httpx.post(patient.url + "/v1/chat/completions", json=body, timeout=60)))
    t.start()
    deadline = time.monotonic() + 20
    cancelled = 0
    while cancelled == 0 and time.monotonic() < deadline and t.is_alive():
        time.sleep(0.05)
        cancelled = preparing(patient)
    t.join(20)
    assert cancelled == 1 and not t.is_alive()  # found while rendering; ended long before 60 s
    assert answers[0].status_code == 499 and answers[0].json()["error"]["code"] == "cancelled"


def test_a_client_gone_stops_its_rendering_template(patient: BackgroundServer) -> None:
    app: Any = patient.server.config.app
    preparing = app.state.preparing  # tenant → requests rendering or tokenizing now
    body = json.dumps({"model": "nested_loop", "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    host, port = patient.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head + body)
        deadline = time.monotonic() + 20
        while not preparing:
            assert time.monotonic() < deadline, "the render never began"
            time.sleep(0.02)
    deadline = time.monotonic() + 20  # the render's own budget is 60 s
    while preparing and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not preparing


# ------------------------------------------------------------------------------ a full queue


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    """One slot, no queue, and the slot held: every request finds the queue full."""
    path = tmp_path_factory.mktemp("full") / "tiny.gguf"
    write_tiny_llama(path)
    kernel = RealmKernel(n_slots=1, max_context=256, max_queue=0)
    entry = kernel.store.register(path, name=TINY)
    kernel.store.ensure_resident(entry)
    sched = kernel.scheduler(entry)
    held = sched.open("hog")
    with BackgroundServer(create_app(kernel, default_model=TINY)) as srv:
        yield srv
    sched.close(held)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions",
                                  "/v1/realm/generate"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_full_queue_is_503_with_retry_after_before_any_stream(full: BackgroundServer,
                                                                path: str, stream: bool) -> None:
    body: dict[str, Any] = {"max_tokens": 2, "stream": stream}
    if path == "/v1/completions":
        body["prompt"] = "hello"
    elif path == "/v1/realm/generate":
        body = {"prompt": "hello", "stream": stream, "params": {"max_tokens": 2}}
    else:
        body["messages"] = [{"role": "user", "content": "hi"}]
    r = post(full, path, body)
    assert r.status_code == 503, r.text
    assert not r.headers["content-type"].startswith("text/event-stream")
    assert int(r.headers["Retry-After"]) >= 1
    assert r.json()["error"]["code"] == "queue_full"


def test_the_openai_client_sees_the_full_queue(full: BackgroundServer) -> None:
    client = openai.OpenAI(base_url=full.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.InternalServerError) as e:
        list(client.completions.create(model=TINY, prompt="hello", max_tokens=2, stream=True))
    assert e.value.status_code == 503 and e.value.response.headers["retry-after"]


# ------------------------------------------------------------------------------ strict JSON


@pytest.fixture(scope="module")
def overflowing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    """A model whose logits overflow to infinities, so that its logprobs are NaN."""
    path = tmp_path_factory.mktemp("nan") / "overflow.gguf"
    write_tiny_llama(path, replace={"output_norm.weight": (
        np.full((D_MODEL,), 3e38, np.float32), gguf.GGMLQuantizationType.F32)})
    kernel = RealmKernel(n_slots=2, max_context=256)
    kernel.store.register(path, name="overflow")
    with BackgroundServer(create_app(kernel, default_model="overflow")) as srv:
        yield srv


def test_nan_logprobs_are_valid_json(overflowing: BackgroundServer) -> None:
    body = {"prompt": "hello", "max_tokens": 2, "temperature": 0, "logprobs": 2, "echo": True}
    r = post(overflowing, "/v1/completions", body)
    assert r.status_code == 200, r.text  # was a 500: NaN cannot be written as JSON
    lp = strict_json(r.text)["choices"][0]["logprobs"]
    assert lp["token_logprobs"][1:] == [None, None]  # NaN → null
    with httpx.stream("POST", overflowing.url + "/v1/completions", json={**body, "stream": True},
                      timeout=60) as s:
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    for e in events[:-1]:
        strict_json(e)  # was a bare NaN in the stream
    chat = post(overflowing, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "logprobs": True,
        "top_logprobs": 2})
    assert chat.status_code == 200
    assert strict_json(chat.text)["choices"][0]["logprobs"]["content"][0]["logprob"] is None


def test_minus_infinity_is_openais_floor() -> None:
    text = json_text({"logprob": float("-inf"), "top": [float("nan"), 1.5, float("inf")]})
    assert strict_json(text) == {"logprob": -9999.0, "top": [None, 1.5, None]}


# ------------------------------------------------------------------------------ request types


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {"prompt": "x", "stop": {"a": 1}}, "stop"),
    ("/v1/completions", {"prompt": "x", "echo": "yes"}, "echo"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stop": {"a": 1}},
     "stop"),
    ("/v1/realm/generate", {"prompt": "x", "params": {"stop": {"a": 1}}}, "stop"),
    ("/v1/realm/generate", {"prompt": "x", "params": {"stop": ["x" * 257]}}, "stop"),
    ("/v1/realm/generate", {"prompt": "x", "params": {"stop": ["s"] * 17}}, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": ["x" * 2000] * 16}, "stop"),
    ("/v1/realm/generate", {"prompt": "x", "echo": "yes"}, "echo"),
])
def test_wrong_types_and_oversized_stops_are_400(tiny: BackgroundServer, path: str,
                                                 body: dict[str, Any], param: str) -> None:
    r = post(tiny, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and len(err["message"]) < 400  # says it; echoes little


def test_stop_limits_are_in_the_message(tiny: BackgroundServer) -> None:
    r = post(tiny, "/v1/completions", {"prompt": "x", "stop": ["y" * 300]})
    assert "at most 256 characters" in r.json()["error"]["message"]


# ------------------------------------------------------------------------------ client gone


@pytest.mark.slow
def test_a_non_streaming_request_stops_when_its_client_goes(kernel: RealmKernel) -> None:
    """Before: the wait for the result looked at the connection only when no piece had come for
    half a second, so a generation that kept producing ran to its end for nobody."""
    with BackgroundServer(create_app(kernel)) as srv:
        before = _metric(srv.url, "realm_cancelled_total")
        body = json.dumps({"prompt": "Once upon a time", "max_tokens": 1500,
                           "temperature": 0}).encode()
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                f"application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        host, port = srv.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(head + body)
            deadline = time.monotonic() + 60
            while not httpx.get(srv.url + "/v1/requests").json()["data"]:
                assert time.monotonic() < deadline, "the generation never started"
                time.sleep(0.05)
            time.sleep(1.0)  # generating: pieces keep coming
        deadline = time.monotonic() + 15  # 1500 tokens take far longer than this
        while time.monotonic() < deadline:
            if not httpx.get(srv.url + "/v1/requests").json()["data"]:
                break
            time.sleep(0.1)
        assert httpx.get(srv.url + "/v1/requests").json()["data"] == []
        assert _metric(srv.url, "realm_cancelled_total") == before + 1


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")
