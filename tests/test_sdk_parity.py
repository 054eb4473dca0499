"""The same SDK calls in local and server mode give the same outputs, types and errors."""

from __future__ import annotations

import socket
from typing import Any, assert_type

import pytest

from realm_nb import Generation, ModelInfo, Realm
from realm_nb.errors import (
    ContextLengthError,
    InvalidRequestError,
    ModelNotFoundError,
    ServerConnectionError,
)
from realm_nb.sdk import Stream
from realm_nb.server import BackgroundServer, create_app

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(kernel):
    with BackgroundServer(create_app(kernel)) as srv:
        yield srv


@pytest.fixture(scope="module")
def local() -> Realm:
    return Realm(mode="local")


@pytest.fixture(scope="module")
def remote(server) -> Realm:
    return Realm(mode="server", endpoint=server.url)


def same(a: Generation, b: Generation) -> None:
    """Equal in everything but wall-clock timings (and the seed drawn when none was given)."""
    assert isinstance(a, Generation) and isinstance(b, Generation)
    da, db = a.to_dict(), b.to_dict()
    for d in (da, db):
        d.pop("timings")
        d["params"].pop("seed")
    assert da == db
    assert set(a.timings) == set(b.timings)


def test_generate_same_in_both_modes(local: Realm, remote: Realm) -> None:
    kw: dict[str, Any] = {"max_tokens": 10, "temperature": 0}
    same(local.generate("The capital of France is", **kw),
         remote.generate("The capital of France is", **kw))


def test_seeded_sampling_same_in_both_modes(local: Realm, remote: Realm) -> None:
    kw: dict[str, Any] = {"max_tokens": 10, "temperature": 0.9, "seed": 99, "top_k": 30,
                          "stop": ["\n\n"]}
    a = local.generate("A short poem about rain:", **kw)
    b = remote.generate("A short poem about rain:", **kw)
    same(a, b)
    assert a.params == b.params and b.params is not None and b.params.seed == 99


def test_token_id_prompt_and_logprobs(local: Realm, remote: Realm) -> None:
    ids = local.generate("Hello", max_tokens=1, temperature=0).prompt_ids
    a = local.generate(ids, max_tokens=5, temperature=0, echo=True, logprobs=3)
    b = remote.generate(ids, max_tokens=5, temperature=0, echo=True, logprobs=3)
    same(a, b)
    assert b.logprobs is not None and len(b.logprobs[-1].top) == 3


def test_stream_same_in_both_modes(local: Realm, remote: Realm) -> None:
    kw: dict[str, Any] = {"max_tokens": 12, "temperature": 0}
    sa = local.generate("Once upon a time", stream=True, **kw)
    sb = remote.generate("Once upon a time", stream=True, **kw)
    pa, pb = list(sa), list(sb)
    assert "".join(pa) == "".join(pb) and len(pb) > 1
    same(sa.generation, sb.generation)
    same(sa.result(), sb.result())


def test_chat_same_in_both_modes(local: Realm, remote: Realm) -> None:
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "Name a colour."}]
    same(local.chat(messages, max_tokens=8, temperature=0),
         remote.chat(messages, max_tokens=8, temperature=0))
    sa = local.chat(messages, max_tokens=8, temperature=0, stream=True)
    sb = remote.chat(messages, max_tokens=8, temperature=0, stream=True)
    assert "".join(sa) == "".join(sb)


def test_models_same_types(local: Realm, remote: Realm) -> None:
    a, b = local.models(), remote.models()
    assert all(isinstance(m, ModelInfo) for m in a + b)
    assert {m.name for m in a} == {m.name for m in b}
    la = next(m for m in a if m.name == "smollm2-135m")
    lb = next(m for m in b if m.name == "smollm2-135m")
    assert la == lb
    assert remote.load_model("smollm2-135m") == local.load_model("smollm2-135m")


@pytest.mark.parametrize(("call", "error"), [
    (lambda r: r.generate("hi", model="no-such-model"), ModelNotFoundError),
    (lambda r: r.generate("hello " * 3000, max_tokens=4), ContextLengthError),
    (lambda r: r.generate("", max_tokens=4), InvalidRequestError),
    (lambda r: r.generate([10**9], max_tokens=4), InvalidRequestError),
    (lambda r: r.generate("hi", max_tokens=-1), InvalidRequestError),
    (lambda r: r.generate("hi", logprobs=50), InvalidRequestError),
    (lambda r: r.chat([{"role": "user"}]), InvalidRequestError),
    (lambda r: r.unload_model("no-such-model"), ModelNotFoundError),
    (lambda r: r.generate("hi", stop=5), InvalidRequestError),  # was TypeError / HTTP 500
    (lambda r: r.generate("hi", max_tokens=2**40), InvalidRequestError),
    (lambda r: r.generate("a\ud800b", max_tokens=2), InvalidRequestError),  # lone surrogate
    (lambda r: r.chat([{"role": "user", "content": "\udfff"}]), InvalidRequestError),
])
def test_same_errors_in_both_modes(local: Realm, remote: Realm, call, error) -> None:
    with pytest.raises(error) as ea:
        call(local)
    with pytest.raises(error) as eb:
        call(remote)
    assert type(ea.value) is type(eb.value)


def test_cancel_keeps_partial_text_in_both_modes(local: Realm, remote: Realm) -> None:
    for realm in (local, remote):
        s = realm.generate("Once upon a time", stream=True, max_tokens=1500, temperature=0)
        it = iter(s)
        first = next(it)
        s.cancel()
        g = s.result()
        assert g.finish_reason == "cancelled"
        assert g.text.startswith(first) and len(g.token_ids) < 1500


def test_realm_cancel_and_stats(server, remote: Realm) -> None:
    s = remote.generate("Once upon a time", stream=True, max_tokens=1500, temperature=0)
    pieces = iter(s)  # kept: a dropped iterator cancels
    next(pieces)
    other = Realm(mode="server", endpoint=server.url)  # same tenant, does not hold the stream
    assert other.cancel() == 1
    assert s.result().finish_reason == "cancelled"
    stats = remote.stats()
    assert {"tenants", "store", "running"} <= set(stats)
    # a server without keys has no isolation to keep: it lists every tenant (the kernel's own
    # tests use one too); a plain key sees only itself (tests/test_server.py)
    assert "default" in [t["id"] for t in stats["tenants"]]


def test_realm_cancel_returns_the_count_of_its_own_streams(local: Realm, remote: Realm) -> None:
    """The Realm that holds the stream counts it too (server mode said 0: its streams were
    cancelled one by one before the runtime's count)."""
    for realm in (local, remote):
        s = realm.generate("Once upon a time", stream=True, max_tokens=1500, temperature=0)
        pieces = iter(s)
        next(pieces)
        assert realm.cancel() == 1, realm.mode
        assert s.result().finish_reason == "cancelled"
        assert realm.cancel() == 0, realm.mode


def test_default_model_is_settable_and_model_is_its_alias(server) -> None:
    for realm in (Realm(mode="local", default_model="smollm2"),
                  Realm(mode="server", endpoint=server.url, default_model="smollm2")):
        assert realm.default_model == realm.model == "smollm2"
        realm.default_model = "smollm2-135m"
        assert realm.model == "smollm2-135m"
        realm.model = "smollm2"
        assert realm.default_model == "smollm2"
        assert realm.generate("Hi", max_tokens=1, temperature=0).model == "smollm2-135m"
        assert "default_model='smollm2'" in repr(realm)


def test_use_model_takes_a_name_alias_or_id_and_refuses_unknown_ones(local: Realm,
                                                                     remote: Realm) -> None:
    for realm in (local, remote):
        before = realm.default_model
        try:
            info = realm.use_model("smollm2")
            assert isinstance(info, ModelInfo) and info.name == "smollm2-135m"
            assert realm.default_model == "smollm2"
            realm.use_model(info.id)
            assert realm.default_model == info.id
            with pytest.raises(ModelNotFoundError, match=r"unknown model 'nope'.*smollm2-135m"):
                realm.use_model("nope")
            assert realm.default_model == info.id, "a refused name leaves the default as it was"
        finally:
            realm.default_model = before


def test_generate_and_chat_return_the_type_that_stream_asks_for(local: Realm) -> None:
    """`@overload`s: mypy (on tests/ too) checks the assert_type lines; isinstance the values."""
    g = local.generate("Hi", max_tokens=1, temperature=0)
    assert_type(g, Generation)
    s = local.generate("Hi", stream=True, max_tokens=1, temperature=0)
    assert_type(s, Stream)
    assert_type(local.generate("Hi", None, True, max_tokens=1), Stream)
    c = local.chat([{"role": "user", "content": "Hi"}], stream=False, max_tokens=1)
    assert_type(c, Generation)
    cs = local.chat([{"role": "user", "content": "Hi"}], stream=True, max_tokens=1)
    assert_type(cs, Stream)
    assert isinstance(g, Generation) and isinstance(c, Generation)
    assert isinstance(s.result(), Generation) and isinstance(cs.result(), Generation)


def test_auto_mode_follows_endpoint(server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REALM_ENDPOINT", raising=False)
    assert Realm().mode == "local"
    assert Realm(endpoint=server.url).mode == "server"
    monkeypatch.setenv("REALM_ENDPOINT", server.url)
    r = Realm()
    assert r.mode == "server"
    assert r.generate("Hi", max_tokens=2, temperature=0).usage["completion_tokens"] == 2


def test_unreachable_server_names_the_url() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    r = Realm(mode="server", endpoint=url)
    with pytest.raises(ServerConnectionError, match=url):
        r.models()
    with pytest.raises(ServerConnectionError, match=url):
        r.generate("hi")
