"""The HTTP server against a real uvicorn on a free loopback port, driven by the `openai` client.

Both servers run in this process on the shared kernel, so SmolLM2 loads once; greedy results are
compared with local mode's.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from realm_nb.server import BackgroundServer, KeyConfig, create_app, load_keys

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"
KEYS = {
    "sk-alice": KeyConfig(tenant="alice"),
    "sk-bob": KeyConfig(tenant="bob"),
    "sk-tiny": KeyConfig(tenant="tiny", rate=0.5, burst=2),
}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Path:
    d = tmp_path_factory.mktemp("models")
    (d / "mini.gguf").symlink_to(smollm2_path)
    return d


@pytest.fixture(scope="module")
def server(kernel, models_dir: Path):
    with BackgroundServer(create_app(kernel, models_dirs=[models_dir])) as srv:
        yield srv


@pytest.fixture(scope="module")
def keyed(kernel):
    with BackgroundServer(create_app(kernel, api_keys=KEYS)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def local():
    from realm_nb import Realm

    return Realm(mode="local")


def sse_events(response: httpx.Response) -> list[str]:
    return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


# ------------------------------------------------------------------------------ OpenAI client


def test_openai_models_list(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    m = models[MODEL]
    extra = m.model_extra or {}
    assert extra["loaded"] is True
    assert extra["arch"] == "llama" and extra["quant"] and extra["size"] > 10**7
    assert client.models.retrieve(MODEL).id == MODEL


def test_openai_completion_greedy_equals_local(client: openai.OpenAI, local) -> None:
    want = local.generate("The capital of France is", max_tokens=12, temperature=0)
    got = client.completions.create(model=MODEL, prompt="The capital of France is",
                                    max_tokens=12, temperature=0)
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == want.finish_reason
    assert got.usage is not None
    assert got.usage.prompt_tokens == want.usage["prompt_tokens"]
    assert got.usage.completion_tokens == want.usage["completion_tokens"] == 12


def test_openai_completion_stream_equals_local(client: openai.OpenAI, local) -> None:
    want = local.generate("Once upon a time", max_tokens=16, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time",
                                            max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == want.text
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and
              c.choices[0].finish_reason]
    assert finish == [want.finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16


def test_openai_chat_equals_local(client: openai.OpenAI, local) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    want = local.chat(messages, max_tokens=12, temperature=0)
    got = client.chat.completions.create(model=MODEL, messages=messages,  # type: ignore[arg-type]
                                         max_tokens=12, temperature=0)
    assert got.choices[0].message.content == want.text
    assert got.choices[0].message.role == "assistant"
    assert got.usage is not None and got.usage.prompt_tokens == want.usage["prompt_tokens"]
    chunks = list(client.chat.completions.create(  # type: ignore[call-overload]
        model=MODEL, messages=messages, max_tokens=12, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == \
        want.usage["total_tokens"]


def test_sampling_fields_seed_and_stop(client: openai.OpenAI, local) -> None:
    kw = {"temperature": 0.9, "seed": 1234, "top_k": 20, "min_p": 0.02,
          "repeat_penalty": 1.1, "repeat_window": 32, "top_p": 0.9}
    want = local.generate("My favourite food is", max_tokens=12, **kw)
    got = client.completions.create(model=MODEL, prompt="My favourite food is", max_tokens=12,
                                    temperature=0.9, seed=1234, top_p=0.9,
                                    extra_body={k: kw[k] for k in ("top_k", "min_p",
                                                                   "repeat_penalty",
                                                                   "repeat_window")})
    assert got.choices[0].text == want.text
    stopped = client.completions.create(model=MODEL, prompt="The capital of France is",
                                        max_tokens=12, temperature=0, stop=["."])
    assert stopped.choices[0].text == " Paris" or "." not in stopped.choices[0].text
    assert stopped.choices[0].finish_reason == "stop"


def test_echo_with_logprobs_shape(client: openai.OpenAI) -> None:
    prompt = "The capital of France is"
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0,
                                    echo=True, logprobs=2)
    choice = got.choices[0]
    assert choice.text.startswith(prompt)
    lp = choice.logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    assert lp.text_offset is not None
    n = got.usage.prompt_tokens + got.usage.completion_tokens  # type: ignore[union-attr]
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(len(t) == 2 for t in lp.top_logprobs[1:])
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset[0] == 0 and lp.text_offset[-1] == len(choice.text) - len(lp.tokens[-1])


# ------------------------------------------------------------------------------ concurrency


def test_eight_concurrent_streams_complete(server, local) -> None:
    prompts = [f"Count from {i} to {i + 5}:" for i in range(8)]
    want = [local.generate(p, max_tokens=16, temperature=0).text for p in prompts]
    got: list[str | None] = [None] * 8

    def run(i: int) -> None:
        body = {"model": MODEL, "prompt": prompts[i], "max_tokens": 16, "temperature": 0,
                "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body,
                          timeout=120) as r:
            events = sse_events(r)
        assert events[-1] == "[DONE]"
        got[i] = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == want


def test_client_disconnect_cancels_and_frees_slot(server) -> None:
    before = metric(server.url, "realm_cancelled_total")
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1500,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen >= 3:
                break
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if (metric(server.url, "realm_running_requests") == 0 and
                metric(server.url, "realm_cancelled_total") > before):
            break
        time.sleep(0.1)
    assert metric(server.url, "realm_running_requests") == 0
    assert metric(server.url, "realm_cancelled_total") == before + 1


# ------------------------------------------------------------------------------ bad requests


BAD = [
    ("/v1/completions", "{not json", 400),
    ("/v1/completions", '[1, 2]', 400),
    ("/v1/completions", '{"model": "no-such-model", "prompt": "x"}', 404),
    ("/v1/completions", '{"prompt": "x", "max_tokens": -1}', 400),
    ("/v1/completions", '{"prompt": "x", "max_tokens": "ten"}', 400),
    ("/v1/completions", '{"prompt": "x", "temperature": "hot"}', 400),
    ("/v1/completions", '{"prompt": 42}', 400),
    ("/v1/completions", '{"prompt": "x", "n": 2}', 400),
    ("/v1/completions", '{"prompt": "x", "top_p": 3}', 400),
    ("/v1/completions", '{"prompt": "x", "stop": [1]}', 400),
    ("/v1/completions", '{"prompt": [999999999]}', 400),
    ("/v1/completions", '{"prompt": ""}', 400),
    ("/v1/completions", '{"max_tokens": 3}', 400),
    ("/v1/completions", '{"prompt": "x", "logprobs": 99}', 400),
    ("/v1/chat/completions", '{"messages": "hi"}', 400),
    ("/v1/chat/completions", '{"messages": [{"role": "user"}], "max_tokens": 1.5}', 400),
    ("/v1/chat/completions", '{"messages": [{"content": "hi"}]}', 400),
    ("/v1/models/load", '{"model": "/etc/passwd"}', 404),
    ("/v1/models/load", '{"model": "../../etc/hosts"}', 404),
    ("/v1/models/unload", '{"model": "no-such-model"}', 404),
    ("/v1/requests/req-0/cancel", "", 404),
    ("/v1/no-such-endpoint", "{}", 404),
]


@pytest.mark.parametrize(("path", "body", "status"), BAD)
def test_bad_request_gets_4xx_with_openai_error(server, path: str, body: str,
                                                status: int) -> None:
    r = httpx.post(server.url + path, content=body, timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["code"]
    assert "param" in err


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/realm/generate", '{"prompt": "hi", "params": {"stop": 5}}'),  # was a 500
    ("/v1/completions", '{"prompt": "a\\ud800b", "max_tokens": 2}'),  # was a 500
    ("/v1/completions", '{"prompt": "hi", "max_tokens": 8589934592}'),  # was a 200 + error event
])
def test_odd_values_are_400_not_500(server, path: str, body: str) -> None:
    r = httpx.post(server.url + path, content=body, timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "InvalidRequestError"


def test_internal_error_is_500_and_the_connection_stays_usable(kernel) -> None:
    app = create_app(kernel)

    @app.get("/v1/boom")
    async def boom() -> None:
        raise RuntimeError("kaboom")

    with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        r = http.get("/v1/boom")
        assert r.status_code == 500
        assert r.json()["error"]["code"] == "internal_error" and "kaboom" in r.text
        assert http.get("/health").status_code == 200  # was: connection reset by peer


def test_prompt_longer_than_context_is_400(server, kernel) -> None:
    prompt = "hello " * (kernel.store.max_context + 10)
    r = httpx.post(server.url + "/v1/completions", json={"prompt": prompt}, timeout=30)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"


def test_load_model_from_models_dir_and_catalogue(server) -> None:
    r = httpx.post(server.url + "/v1/models/load", json={"model": "mini.gguf"}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["loaded"] is True
    r = httpx.post(server.url + "/v1/models/load", json={"model": MODEL}, timeout=120)
    assert r.status_code == 200 and r.json()["id"] == MODEL


# ------------------------------------------------------------------------------ service endpoints


def test_health_metrics_and_openapi(server) -> None:
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and MODEL in health["models"]
    text = httpx.get(server.url + "/metrics").text
    for family in ("realm_requests_total", "realm_tokens_total", "realm_request_latency_seconds",
                   "realm_time_to_first_token_seconds", "realm_queue_depth", "realm_tenants",
                   "realm_resident_bytes", "realm_running_requests", "realm_cancelled_total"):
        assert f"# TYPE {family.removesuffix('_total')}" in text, family
    assert metric(server.url, "realm_resident_bytes") > 10**7
    schema = httpx.get(server.url + "/openapi.json").json()
    for path in ("/v1/models", "/v1/models/load", "/v1/completions", "/v1/chat/completions",
                 "/health", "/metrics"):
        assert path in schema["paths"]


# ------------------------------------------------------------------------------ keys and tenants


def test_missing_or_wrong_key_is_401(keyed) -> None:
    assert httpx.get(keyed.url + "/v1/models").status_code == 401
    bad = openai.OpenAI(base_url=keyed.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=keyed.url + "/v1", api_key="sk-alice", max_retries=0)
    assert MODEL in {m.id for m in good.models.list()}
    assert httpx.get(keyed.url + "/health").status_code == 200


def test_rate_limit_is_429_with_retry_after(keyed) -> None:
    headers = {"Authorization": "Bearer sk-tiny"}
    statuses = []
    for _ in range(10):
        r = httpx.get(keyed.url + "/v1/models", headers=headers)
        statuses.append(r.status_code)
        if r.status_code == 429:
            break
    assert statuses[0] == 200 and statuses[-1] == 429
    assert int(r.headers["Retry-After"]) >= 1
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    # another key is not limited by tiny's bucket
    assert httpx.get(keyed.url + "/v1/models",
                     headers={"Authorization": "Bearer sk-bob"}).status_code == 200


def test_tenants_see_and_cancel_only_their_own_requests(keyed) -> None:
    alice = {"Authorization": "Bearer sk-alice"}
    bob = {"Authorization": "Bearer sk-bob"}
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1500, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", keyed.url + "/v1/completions", json=body, headers=alice,
                      timeout=60) as r:
        rid = r.headers["X-Realm-Request-Id"]
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        mine = httpx.get(keyed.url + "/v1/requests", headers=alice).json()["data"]
        assert [x["id"] for x in mine] == [rid] and mine[0]["tenant"] == "alice"
        assert httpx.get(keyed.url + "/v1/requests", headers=bob).json()["data"] == []
        assert httpx.post(keyed.url + f"/v1/requests/{rid}/cancel",
                          headers=bob).status_code == 404
        assert httpx.post(keyed.url + "/v1/cancel", headers=bob).json() == {"cancelled": 0}
        stats = httpx.get(keyed.url + "/v1/stats", headers=bob).json()
        assert [t["id"] for t in stats["tenants"]] in ([], ["bob"])
        assert httpx.post(keyed.url + f"/v1/requests/{rid}/cancel",
                          headers=alice).status_code == 200
        events = [line[6:] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["choices"][0]["finish_reason"] == "stop"  # OpenAI has no "cancelled"


def test_load_keys_toml(tmp_path: Path) -> None:
    f = tmp_path / "keys.toml"
    f.write_text('[keys."sk-a"]\ntenant = "alice"\nrate = 5.0\nburst = 10\n'
                 '[keys."sk-b"]\ntenant = "bob"\n')
    keys = load_keys(f)
    assert keys["sk-a"] == KeyConfig(tenant="alice", rate=5.0, burst=10)
    assert keys["sk-b"].rate is None
    from realm_nb.errors import InvalidRequestError

    f.write_text('[keys."sk-a"]\nrate = -1\n')
    with pytest.raises(InvalidRequestError, match="rate"):
        load_keys(f)


# ------------------------------------------------------------------------------ tenants by header


@pytest.fixture(scope="module")
def runtime_keyed(kernel):
    """A server like the one a Jupyter server owns: one key that names tenants, one plain key."""
    keys = {"sk-runtime": KeyConfig(tenant="jupyter", name_tenants=True),
            "sk-alice": KeyConfig(tenant="alice")}
    with BackgroundServer(create_app(kernel, api_keys=keys)) as srv:
        yield srv


def test_a_runtime_key_names_each_notebook_as_a_tenant(runtime_keyed, local) -> None:
    from realm_nb import Realm

    nbs = [Realm(mode="server", endpoint=runtime_keyed.url, api_key="sk-runtime",
                 tenant=f"/work/nb{i}.ipynb") for i in range(2)]
    want = local.generate("Hello", max_tokens=3, temperature=0).token_ids
    for nb in nbs:
        g = nb.generate("Hello", max_tokens=3, temperature=0)
        assert g.tenant == nb.tenant and g.token_ids == want
    seen = {t["id"] for t in nbs[0].stats()["tenants"]}
    assert {"/work/nb0.ipynb", "/work/nb1.ipynb"} <= seen  # a runtime key sees every notebook


def test_a_plain_key_may_not_act_as_another_tenant(runtime_keyed,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from realm_nb import Realm
    from realm_nb.errors import PermissionDeniedError

    # In a notebook (`%realm connect URL --api-key KEY`), a plain key still acts as itself:
    # the notebook's name is not sent for it.
    monkeypatch.setenv("JPY_SESSION_NAME", "/work/nb9.ipynb")
    assert Realm(mode="server", endpoint=runtime_keyed.url, api_key="sk-alice").generate(
        "Hello", max_tokens=1).tenant == "alice"

    mallory = Realm(mode="server", endpoint=runtime_keyed.url, api_key="sk-alice",
                    tenant="/work/nb0.ipynb")
    with pytest.raises(PermissionDeniedError, match=re.escape("may not act as '/work/nb0.ipynb'")):
        mallory.generate("Hello", max_tokens=1)
    alice = Realm(mode="server", endpoint=runtime_keyed.url, api_key="sk-alice")
    assert alice.generate("Hello", max_tokens=1).tenant == "alice"
    assert {t["id"] for t in alice.stats()["tenants"]} <= {"alice"}  # sees only herself


@pytest.mark.parametrize("bad", ["", "x" * 129, "tab\there"])
def test_a_malformed_tenant_header_is_a_400(runtime_keyed, bad: str) -> None:
    r = httpx.get(runtime_keyed.url + "/v1/models",
                  headers={"Authorization": "Bearer sk-runtime", "X-Realm-Tenant": bad})
    assert r.status_code == 400 and r.json()["error"]["param"] == "X-Realm-Tenant"


def test_load_progress_streams_before_the_first_piece(tmp_path: Path) -> None:
    """A model that is not resident yet: the realm stream reports its layers loading and the
    compile, then the text (what a notebook cell shows during a cold start)."""
    from tiny_gguf import write_tiny_llama

    from realm_nb.kernel import RealmKernel
    from realm_nb.types import SamplingParams

    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path)
    fresh = RealmKernel(n_slots=2, max_context=256)
    fresh.store.register(path, name="tiny")  # registered, not resident
    body = {"model": "tiny", "prompt": [1, 2, 3], "stream": True,
            "params": SamplingParams(max_tokens=2).to_dict()}
    with BackgroundServer(create_app(fresh)) as srv, \
            httpx.stream("POST", srv.url + "/v1/realm/generate", json=body, timeout=120) as r:
        events = [json.loads(e) for e in sse_events(r) if e != "[DONE]"]
    kinds = [next(iter(e)) for e in events]
    first_text = kinds.index("generation") if "text" not in kinds else kinds.index("text")
    progress = [e["progress"] for e in events[:first_text] if "progress" in e]
    loading = [p for p in progress if p["stage"] == "loading"]
    assert loading[0]["done"] == 0 and loading[-1]["done"] == loading[-1]["total"] > 0
    assert [p["done"] for p in loading] == sorted(p["done"] for p in loading)
    assert progress[-1]["stage"] == "compiling"
    assert "progress" not in kinds[first_text:]
