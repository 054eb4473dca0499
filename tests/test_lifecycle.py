"""Lifecycles around a generation: unloading a model then exiting is clean (issue 10, item 7),
and a stream is read by one thread at a time (a second reader is an error, not a hang)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
import tiny_gguf as tg

from realm_nb.errors import StreamBusyError
from realm_nb.kernel import GenerationStream, RealmKernel
from realm_nb.types import SamplingParams

MODEL = "lifecycle-tiny"


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealmKernel]:
    path = tg.write_tiny_llama(tmp_path_factory.mktemp("lifecycle") / "tiny.gguf").path
    k = RealmKernel.shared()
    k.load_model(str(path), name=MODEL)
    yield k
    if any(m.name == MODEL for m in k.store.entries()):
        k.unload_model(MODEL)


def stream(kernel: RealmKernel, max_tokens: int = 48) -> GenerationStream:
    return kernel.generate(tenant="lifecycle", model=MODEL, prompt=[1, 2, 3],
                           params=SamplingParams(max_tokens=max_tokens, temperature=0))


def in_thread(fn: object, timeout: float = 30.0) -> list[object]:
    """Run fn in a daemon thread; its result or exception, or [] if it did not end in time."""
    out: list[object] = []

    def work() -> None:
        try:
            out.append(fn())  # type: ignore[operator]
        except BaseException as exc:  # handed to the test
            out.append(exc)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(timeout)
    return out


# --- unload, then exit ------------------------------------------------------------------------


def test_unload_waits_for_the_step_thread_and_frees_the_engine(kernel: RealmKernel,
                                                               tmp_path: Path) -> None:
    path = tg.write_tiny_llama(tmp_path / "other.gguf", seed=3).path
    kernel.load_model(str(path), name="lifecycle-unload")
    g = kernel.generate(tenant="lifecycle", model="lifecycle-unload", prompt=[1, 2, 3],
                        params=SamplingParams(max_tokens=4, temperature=0)).result()
    assert len(g.token_ids) == 4
    engine = weakref.ref(kernel.store.get("lifecycle-unload").engine)
    kernel.unload_model("lifecycle-unload")
    # the step thread ended inside unload_model, dropping the device arrays there: a daemon
    # thread dropping them while the interpreter exits aborts the process
    assert not [t for t in threading.enumerate() if t.name == "realm-step-lifecycle-unload"]
    assert engine() is None


@pytest.mark.slow
def test_generate_unload_exit_does_not_abort(smollm2_path: Path) -> None:
    code = textwrap.dedent("""
        import realm_nb
        r = realm_nb.Realm(mode="local")
        g = r.generate(prompt="The capital of France is", model="smollm2-135m", max_tokens=4,
                       temperature=0)
        assert len(g.token_ids) == 4
        r.unload_model("smollm2-135m")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, check=False)
    assert "terminate called" not in proc.stderr
    assert proc.returncode == 0, proc.stderr[-2000:]  # was 134 (SIGABRT) at exit


@pytest.mark.slow
def test_exit_in_the_middle_of_a_generation_is_clean(smollm2_path: Path) -> None:
    # the step thread was cut off inside XLA (rc 134), or the open stream's close at teardown
    # waited for ever for a generation whose thread could no longer run
    code = textwrap.dedent("""
        import realm_nb
        r = realm_nb.Realm(mode="local")
        s = r.generate(prompt="Once upon a time", model="smollm2-135m", max_tokens=300,
                       temperature=0, stream=True)
        it = iter(s)
        print(next(it), next(it), flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
    assert "terminate called" not in proc.stderr
    assert proc.returncode == 0, proc.stderr[-2000:]


# --- one reader per stream --------------------------------------------------------------------


def test_a_second_thread_reading_a_stream_gets_an_error(kernel: RealmKernel) -> None:
    s = stream(kernel)
    it = iter(s)
    first = next(it)  # this thread now reads the stream (its iterator stays open)
    out = in_thread(lambda: next(iter(s)), timeout=10)
    assert out, "the second reader hung"
    assert isinstance(out[0], StreamBusyError), out
    assert "read a stream from one thread" in out[0].message
    rest = "".join(it)  # the first reader still gets every piece
    assert first + rest == s.result().text


def test_a_stream_read_again_after_its_end_ends_at_once(kernel: RealmKernel) -> None:
    s = stream(kernel, max_tokens=8)
    text = "".join(s)
    assert text == s.result().text
    out = in_thread(lambda: list(s), timeout=10)  # another thread, after the first is done
    assert out == [[]], out
    assert list(s) == []


def test_a_second_thread_reading_a_server_stream_gets_an_error() -> None:
    import json

    import httpx

    from realm_nb.client import HttpBackend, HttpStream
    from realm_nb.types import Generation

    generation = Generation(text="abc", token_ids=[1, 2, 3], prompt="x", prompt_ids=[9],
                            finish_reason="length", model="m")
    events = [{"request_id": "req-1", "model": "m"}, {"text": "a"}, {"text": "b"},
              {"text": "c"}, {"generation": generation.to_dict()}]
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    backend = HttpBackend("http://realm.test")
    backend.client = httpx.Client(base_url="http://realm.test",
                                  transport=httpx.MockTransport(answer))
    s = HttpStream(backend, {"model": "m", "prompt": "x"})
    it = iter(s)
    first = next(it)
    out = in_thread(lambda: next(iter(s)), timeout=10)
    assert out and isinstance(out[0], StreamBusyError), out
    assert first + "".join(it) == "abc" == s.result().text
