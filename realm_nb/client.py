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
import threading
import time
from collections import deque
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
from .types import Generation, ModelInfo, SamplingParams


def _model_info(d: dict[str, Any]) -> ModelInfo:
    """One row of GET /v1/models (OpenAI's model object plus our fields) → ModelInfo."""
    return ModelInfo(id=d.get("content_id") or d["id"], name=d["id"], path=d.get("path"),
                     arch=d.get("arch"), quant=d.get("quant"), size_bytes=d.get("size"),
                     loaded=bool(d.get("loaded")), weights=d.get("weights"),
                     aliases=tuple(d.get("aliases") or ()))


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

    def running(self) -> list[dict[str, str]]:
        return list(self.request("GET", "/v1/requests")["data"])

    def stats(self) -> dict[str, Any]:
        return dict(self.request("GET", "/v1/stats"))

    def close(self) -> None:
        self.client.close()


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
        self._pieces: deque[str] = deque()
        self._done = False
        self._lock = threading.RLock()
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
        with self._lock:
            self._pull()  # the first event names the request

    @property
    def tenant(self) -> str | None:
        return self.generation.tenant if self.generation else None

    @property
    def done(self) -> bool:
        return self._done

    @property
    def text(self) -> str:
        return self.generation.text if self.generation else ""

    def _pull(self) -> None:
        """Read one SSE event (caller holds the lock)."""
        try:
            for line in self._lines:
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "text" in event:
                    self._pieces.append(event["text"])
                elif "generation" in event:
                    self.generation = Generation.from_dict(event["generation"])
                elif "error" in event:
                    self.error = error_from_payload(event, 500)
                elif "request_id" in event:
                    self.request_id = event["request_id"]
                    self.model = event.get("model", self.model)
                elif "progress" in event:
                    if self.on_progress is not None:
                        self.on_progress(event["progress"])
                    continue
                return
        except httpx.TransportError as e:
            self.error = self.backend.unreachable(e) if self.request_id is None else \
                ServerConnectionError(
                    f"the realm-nb server at {self.backend.endpoint} dropped request "
                    f"{self.request_id} mid-way ({type(e).__name__}); it may have stopped or "
                    "crashed. A runtime owned by Jupyter restarts on the next request; "
                    "run the cell again", param="endpoint")
        self._done = True
        self._response.close()
        if self.generation is None and self.error is None:
            self.error = ServerConnectionError(
                f"the server at {self.backend.endpoint} ended request {self.request_id} "
                "without its result", param="endpoint")

    def __iter__(self) -> Iterator[str]:
        try:
            while True:
                with self._lock:
                    if self._pieces:
                        piece = self._pieces.popleft()
                    elif self._done:
                        break
                    else:
                        self._pull()
                        continue
                yield piece
        except (KeyboardInterrupt, GeneratorExit):
            self.close()
            if self.error is not None:
                raise self.error from None
            return
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
        with self._lock:
            while not self._done:
                self._pull()

    def result(self, timeout: float | None = None) -> Generation:
        """Wait for the end (Ctrl-C cancels and returns the partial generation)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            with self._lock:
                while not self._done:
                    if deadline is not None and time.monotonic() > deadline:
                        raise TimeoutError(
                            f"request {self.request_id} still running after {timeout} s")
                    self._pull()
        except KeyboardInterrupt:
            self.close()
        if self.error is not None:
            raise self.error
        assert self.generation is not None
        return self.generation
