"""`HttpBackend`: the SDK's server mode, over httpx, with the same types as local mode.

It speaks realm-nb's own endpoint (`POST /v1/realm/generate`), whose SSE stream carries the
text pieces and ends with the whole `Generation` (token ids, usage, timings, logprobs), so that
`Realm(mode="server")` returns exactly what `Realm(mode="local")` does. Error bodies become the
same `RealmError` classes again (`errors.error_from_payload`); a server that cannot be reached
raises `ServerConnectionError` naming the URL. The tenant is the server's business: it is the one
the API key maps to.
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from .errors import (
    InvalidRequestError,
    RealmError,
    RequestNotFoundError,
    ServerConnectionError,
    error_from_payload,
)
from .types import Generation, ModelInfo, OneReader, SamplingParams


def _model_info(d: dict[str, Any]) -> ModelInfo:
    """One row of GET /v1/models (OpenAI's model object plus our fields) → ModelInfo."""
    return ModelInfo(id=d.get("content_id") or d["id"], name=d["id"], path=d.get("path"),
                     arch=d.get("arch"), quant=d.get("quant"), size_bytes=d.get("size"),
                     loaded=bool(d.get("loaded")), weights=d.get("weights"),
                     aliases=tuple(d.get("aliases") or ()),
                     resident_bytes=int(d.get("resident_bytes") or 0), source=d.get("source"),
                     on_disk=d.get("on_disk"))


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        payload = response.json()
    except ValueError:
        payload = {"error": {"message": f"server answered HTTP {response.status_code}: "
                                        f"{response.text[:200]}"}}
    raise error_from_payload(payload, response.status_code)


class HttpBackend:
    """A realm-nb server as an SDK backend (see `sdk.Backend`)."""

    def __init__(self, endpoint: str, api_key: str | None = None, timeout: float = 600.0,
                 tenant: str | None = None) -> None:
        base = endpoint.rstrip("/")
        if base.endswith("/v1"):
            base = base[:-3]
        self.endpoint = base
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        if tenant is not None:  # a key that speaks for many tenants (a notebook's runtime)
            headers["X-Realm-Tenant"] = tenant
        self.client = httpx.Client(base_url=base, headers=headers,
                                   timeout=httpx.Timeout(timeout, connect=10.0))

    def __repr__(self) -> str:
        return f"HttpBackend({self.endpoint!r})"

    def unreachable(self, e: Exception) -> ServerConnectionError:
        return ServerConnectionError(
            f"cannot reach the realm-nb server at {self.endpoint}: {type(e).__name__}: {e}. "
            "Is `realm-nb serve` running there?", param="endpoint")

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise self.unreachable(e) from None
        _raise_for(response)
        return response.json()

    # ------------------------------------------------------------------ sdk.Backend

    def models(self) -> list[ModelInfo]:
        return [_model_info(d) for d in self.request("GET", "/v1/models")["data"]]

    def load_model(self, source: str, name: str | None, weights: str | None) -> ModelInfo:
        body = {"model": source, "name": name, "weights": weights}
        return _model_info(self.request("POST", "/v1/models/load", json=body))

    def unload_model(self, name: str) -> ModelInfo:
        return _model_info(self.request("POST", "/v1/models/unload", json={"model": name}))

    def generate(self, *, tenant: str, model: str, prompt: str | list[int],
                 params: SamplingParams, echo: bool, logprobs: int | None,
                 weights: str | None) -> HttpStream:
        return HttpStream(self, {"model": model, "prompt": prompt, "params": params.to_dict(),
                                 "echo": echo, "logprobs": logprobs, "weights": weights})

    def chat(self, *, tenant: str, model: str, messages: list[dict[str, Any]],
             params: SamplingParams, logprobs: int | None, weights: str | None) -> HttpStream:
        return HttpStream(self, {"model": model, "messages": messages,
                                 "params": params.to_dict(), "logprobs": logprobs,
                                 "weights": weights})

    def cancel(self, tenant: str) -> int:
        return int(self.request("POST", "/v1/cancel")["cancelled"])

    def stats(self) -> dict[str, Any]:
        return dict(self.request("GET", "/v1/stats"))

    def close(self) -> None:
        self.client.close()


_END = object()  # the reader thread's last item
_POLL_S = 0.05


class HttpStream:
    """A generation running on the server: iterate text pieces; `.generation` once done.

    Behaves like the kernel's `GenerationStream`: `cancel()` stops it (the partial generation
    still arrives, finish_reason "cancelled"), `close()` cancels and waits, `result()` waits;
    cold-start progress events go to `on_progress` while it is iterated.
    """

    on_progress: Callable[[dict[str, Any]], None] | None = None

    def __init__(self, backend: HttpBackend, body: dict[str, Any]) -> None:
        self.backend = backend
        self.model: str = body["model"]
        self.request_id: str | None = None
        self.generation: Generation | None = None
        self.error: RealmError | None = None
        self._events: queue.Queue[str | dict[str, Any] | object] = queue.Queue()
        self._done = False
        self._one_reader = OneReader()  # the thread iterating, one at a time
        client = backend.client
        try:
            request = client.build_request("POST", "/v1/realm/generate",
                                           json={**body, "stream": True})
        except UnicodeEncodeError as e:  # a lone surrogate in the prompt or messages
            what = "prompt" if "prompt" in body else "messages"
            raise InvalidRequestError(
                f"{what}: not valid Unicode text, {e.object[e.start:e.end]!r} is a lone "
                "surrogate; send UTF-8 text", param=what) from None
        try:
            self._response = client.send(request, stream=True)
        except httpx.TransportError as e:
            raise backend.unreachable(e) from None
        if self._response.status_code >= 400:
            self._response.read()
            self._response.close()
            _raise_for(self._response)
        self._lines = self._response.iter_lines()
        self._read_event()  # the first event names the request
        # The rest is read by a thread of its own: a Ctrl-C in the consumer then lands in a queue
        # wait, never inside a socket read (which would break the stream before the server's
        # final event, the partial generation, could arrive).
        self._reader = threading.Thread(target=self._read_all, name="realm-http-stream",
                                        daemon=True)
        self._reader.start()

    @property
    def tenant(self) -> str | None:
        return self.generation.tenant if self.generation else None

    @property
    def done(self) -> bool:
        return self._done

    @property
    def text(self) -> str:
        return self.generation.text if self.generation else ""

    # ------------------------------------------------------------------ reader thread

    def _read_event(self) -> bool:
        """Read one SSE event into the queue or the result; False at the end of the stream."""
        try:
            for line in self._lines:
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return False
                event = json.loads(data)
                if "text" in event:
                    self._events.put(str(event["text"]))
                elif "progress" in event:
                    self._events.put(dict(event["progress"]))
                elif "generation" in event:
                    self.generation = Generation.from_dict(event["generation"])
                elif "error" in event:
                    self.error = error_from_payload(event, 500)
                elif "request_id" in event:
                    self.request_id = event["request_id"]
                    self.model = event.get("model", self.model)
                return True
        except httpx.TransportError as e:
            self.error = self.backend.unreachable(e) if self.request_id is None else \
                ServerConnectionError(
                    f"the realm-nb server at {self.backend.endpoint} dropped request "
                    f"{self.request_id} mid-way ({type(e).__name__}); it may have stopped or "
                    "crashed. A runtime owned by Jupyter restarts on the next request; "
                    "run the cell again", param="endpoint")
        return False

    def _read_all(self) -> None:
        try:
            while self._read_event():
                pass
        except Exception as e:  # handed to the consumer, never lost in this thread
            self.error = ServerConnectionError(
                f"reading request {self.request_id} from {self.backend.endpoint} failed: "
                f"{type(e).__name__}: {e}", param="endpoint")
        finally:
            self._response.close()
            if self.generation is None and self.error is None:
                self.error = ServerConnectionError(
                    f"the server at {self.backend.endpoint} ended request {self.request_id} "
                    "without its result", param="endpoint")
            self._done = True
            self._events.put(_END)

    # ------------------------------------------------------------------ consumer side

    def __iter__(self) -> Iterator[str]:
        self._one_reader.claim(self.request_id)
        try:
            while True:
                try:
                    item = self._events.get(timeout=_POLL_S)  # in slices: Ctrl-C gets through
                except queue.Empty:
                    if self._done and self._events.empty():  # iterated again after the end
                        break
                    continue
                if item is _END:
                    break
                if isinstance(item, dict):
                    if self.on_progress is not None:
                        self.on_progress(item)
                    continue
                yield str(item)
        except (KeyboardInterrupt, GeneratorExit):
            self.close()
            if self.error is not None:
                raise self.error from None
            return
        finally:
            self._one_reader.release()
        if self.error is not None:
            raise self.error

    def cancel(self) -> None:
        """Ask the server to stop this generation (its partial text is kept)."""
        if self._done or self.request_id is None:
            return
        with contextlib.suppress(RequestNotFoundError):  # it finished meanwhile
            self.backend.request("POST", f"/v1/requests/{self.request_id}/cancel")

    def close(self) -> None:
        self.cancel()
        self._reader.join()

    def result(self, timeout: float | None = None) -> Generation:
        """Wait for the end (Ctrl-C cancels and returns the partial generation)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not self._done:
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(
                        f"request {self.request_id} still running after {timeout} s")
                self._reader.join(_POLL_S)
        except KeyboardInterrupt:
            self.close()
        if self.error is not None:
            raise self.error
        assert self.generation is not None
        return self.generation
