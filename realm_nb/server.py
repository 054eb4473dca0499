"""The HTTP face: an OpenAI-compatible FastAPI app over the same `RealmKernel` as local mode.

Endpoints (OpenAI's shapes where OpenAI has one):
  GET  /health, GET /metrics (Prometheus), GET /openapi.json, /docs
  GET  /v1/models, GET /v1/models/{name}, POST /v1/models/load, POST /v1/models/unload
  POST /v1/completions, POST /v1/chat/completions (stream: SSE `data:` chunks, `data: [DONE]`)
  POST /v1/realm/generate (the SDK's call: a whole `Generation`, or SSE text pieces ending in it)
  GET  /v1/requests, POST /v1/requests/{id}/cancel, POST /v1/cancel, GET /v1/stats (own tenant)

Each API key acts as one tenant with a role (see `server_auth`): admins load, unload and name
models, tenants use them. The event loop never does unbounded work: bodies are limited before they
are read, chat templates render (within their budget, cancellable) and prompts tokenize in worker
threads, generations run in kernel threads, and a small pump thread per request hands their pieces
to the event loop. A client that goes away mid-request, streaming or not, cancels its generation,
which frees its KV-cache slot. A full queue is a 503 with Retry-After before any stream starts.
JSON never carries NaN or infinities: a logprob of -inf is sent as -9999.0 (OpenAI's floor), NaN
as null.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import anyio
from fastapi import Depends, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import catalogue
from .errors import (
    GGUFFormatError,
    InvalidRequestError,
    ModelInUseError,
    ModelNameTakenError,
    ModelNotFoundError,
    PermissionDeniedError,
    QueueFullError,
    RealmError,
    RequestNotFoundError,
)
from .server_auth import (
    DEFAULT_TENANT,
    Caller,
    GateMiddleware,
    KeyConfig,
    ServerLimits,
    error_response,
    load_keys,
)
from .server_metrics import ServerMetrics
from .server_openai import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
    LoadModelRequest,
    RealmGenerateRequest,
    UnloadModelRequest,
    chat_body,
    chat_chunk,
    chat_logprobs,
    completion_body,
    completion_chunk,
    completion_logprobs,
    model_entry,
    usage_chunk,
)
from .types import Generation, SamplingParams

if TYPE_CHECKING:
    from .kernel import GenerationStream, RealmKernel

log = logging.getLogger("realm_nb.server")

__all__ = ["BackgroundServer", "KeyConfig", "ServerLimits", "create_app", "load_keys",
           "serve_from_args"]

LOGPROB_FLOOR = -9999.0  # what OpenAI sends for a token the model rules out (logprob -inf)


# ------------------------------------------------------------------------------ kernel → event loop


@dataclass
class _End:
    generation: Generation | None = None
    error: BaseException | None = None


class _Pump:
    """Moves a kernel stream's text pieces into the event loop from a thread of its own."""

    def __init__(self, stream: GenerationStream, on_done: Callable[[Generation], None]) -> None:
        self.stream = stream
        self.on_done = on_done
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[str | _End | dict[str, Any]] = asyncio.Queue()
        self.head: list[str | _End | dict[str, Any]] = []  # looked at, not yet handed out
        stream.on_progress = self._post  # cold-start events (dicts), before the first piece
        threading.Thread(target=self._run, name=f"realm-http-{stream.request_id}",
                         daemon=True).start()

    def _run(self) -> None:
        end = _End()
        try:
            for piece in self.stream:
                self._post(piece)
            end.generation = self.stream.generation
        except BaseException as e:  # handed to the request, never lost in this thread
            end.error = e
        if end.generation is not None:
            self.on_done(end.generation)
        self._post(end)

    def _post(self, item: str | _End | dict[str, Any]) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody listens any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def _next(self) -> str | _End | dict[str, Any]:
        return self.head.pop(0) if self.head else await self.queue.get()

    async def refuse_if_queue_full(self, grace_s: float) -> None:
        """Raise the QueueFullError a request meets at once (no slot and no room to wait), so
        that it becomes a 503 before any stream starts; wait no longer than `grace_s` for it."""
        deadline = self.loop.time() + grace_s
        while True:  # progress events may come first (a cold start); a piece means it runs
            try:
                item = await asyncio.wait_for(self.queue.get(), deadline - self.loop.time())
            except asyncio.TimeoutError:
                return
            self.head.append(item)
            if isinstance(item, _End) and isinstance(item.error, QueueFullError):
                raise item.error
            if not isinstance(item, dict):
                return

    async def events(self) -> AsyncIterator[str | _End | dict[str, Any]]:
        """Pieces (and progress dicts), then one _End. If the consumer stops early, the
        generation is cancelled."""
        try:
            while True:
                item = await self._next()
                yield item
                if isinstance(item, _End):
                    return
        finally:
            self.stream.cancel()  # a no-op once it has finished

    async def result(self, request: Request) -> Generation:
        """Wait for the end, cancelling the generation as soon as the client disconnects."""
        watcher = asyncio.ensure_future(_on_disconnect(request, self.stream.cancel))
        try:
            while True:
                item = await self._next()
                if isinstance(item, dict):
                    continue
                if isinstance(item, _End):
                    if item.error is not None:
                        raise item.error
                    assert item.generation is not None
                    return item.generation
        finally:
            watcher.cancel()
            self.stream.cancel()


async def _on_disconnect(request: Request, gone: Callable[[], None]) -> None:
    """Call `gone` when the client disconnects. Only for a request whose body has been read
    and whose response has not started (a StreamingResponse listens for itself)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            gone()
            return


_bearer = HTTPBearer(auto_error=False, description="API key (when the server has keys)")


def tenant_dep(request: Request,
               _key: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]) -> str:
    """The tenant the gate middleware found for this request's key (documents the key too)."""
    return str(request.scope.get("state", {}).get("tenant", DEFAULT_TENANT))


def caller_dep(request: Request,
               _key: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]) -> Caller:
    """Who the gate middleware found this request to be (tenant, role, key)."""
    caller = request.scope.get("state", {}).get("caller")
    return caller if isinstance(caller, Caller) else Caller(DEFAULT_TENANT, True, True, "keyless")


CallerDep = Annotated[Caller, Depends(caller_dep)]


def _finite(obj: Any) -> Any:
    """`obj` with each non-finite float replaced: -inf by LOGPROB_FLOOR, NaN and +inf by None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return LOGPROB_FLOOR if obj < 0 else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def json_text(obj: Any, *, ensure_ascii: bool = True) -> str:
    """Strict JSON (no NaN, no Infinity, which no JSON parser takes) of a response body."""
    try:
        return json.dumps(obj, separators=(",", ":"), allow_nan=False, ensure_ascii=ensure_ascii)
    except ValueError:
        return json.dumps(_finite(obj), separators=(",", ":"), allow_nan=False,
                          ensure_ascii=ensure_ascii)


class StrictJSONResponse(JSONResponse):
    """Every JSON body of the app: strict JSON (see `json_text`)."""

    def render(self, content: Any) -> bytes:
        try:
            return json_text(content, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: escaped, still valid JSON
            return json_text(content).encode("utf-8")


def _sse(obj: Any) -> str:
    return f"data: {json_text(obj)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def _error_payload(e: BaseException) -> dict[str, Any]:
    if isinstance(e, RealmError):
        return e.to_payload()
    return {"error": {"message": f"internal error: {type(e).__name__}: {e}",
                      "type": "InternalServerError", "code": "internal_error", "param": None}}


async def _openai_events(pump: _Pump, *, first: dict[str, Any] | None,
                         piece: Callable[[str], dict[str, Any]],
                         last: Callable[[Generation], dict[str, Any]],
                         usage: Callable[[Generation], dict[str, Any] | None],
                         ) -> AsyncIterator[str]:
    """OpenAI's SSE stream: an opening chunk, one chunk per piece, the closing chunk with the
    finish reason, the usage chunk when asked for, then [DONE]; an error becomes an error event."""
    if first is not None:
        yield _sse(first)
    async for item in pump.events():
        if isinstance(item, dict):  # progress: realm's own stream shows it, OpenAI's has no place
            continue
        if isinstance(item, str):
            yield _sse(piece(item))
        elif item.error is not None:
            yield _sse(_error_payload(item.error))
        elif item.generation is not None:
            yield _sse(last(item.generation))
            extra = usage(item.generation)
            if extra is not None:
                yield _sse(extra)
    yield SSE_DONE


def _sse_response(events: AsyncIterator[str], rid: str) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Realm-Request-Id": rid})


# ------------------------------------------------------------------------------ the app


def create_app(kernel: RealmKernel, *, api_keys: dict[str, KeyConfig] | None = None,
               models_dirs: Sequence[Path] = (),
               default_model: str = catalogue.DEFAULT_MODEL,
               limits: ServerLimits | None = None) -> FastAPI:
    """The FastAPI app over `kernel`; `api_keys=None` serves one default tenant, unauthenticated
    (one user on loopback: an admin)."""
    from . import __version__
    from .tenants import Cancelled

    limits = limits or ServerLimits()
    metrics = ServerMetrics(kernel)
    dirs = [Path(os.path.abspath(Path(d).expanduser())) for d in models_dirs]
    app = FastAPI(title="realm-nb", version=__version__,
                  default_response_class=StrictJSONResponse,
                  description="GGUF models as jitted JAX, each tenant in a WebAssembly guest; "
                              "OpenAI-compatible.")
    app.state.kernel = kernel
    app.state.metrics = metrics
    app.state.limits = limits
    app.add_middleware(GateMiddleware, api_keys=api_keys, metrics=metrics, limits=limits)
    render_limiter = anyio.CapacityLimiter(limits.render_threads)
    preparing: dict[str, set[threading.Event]] = {}  # tenant → requests rendering/tokenizing
    preparing_lock = threading.Lock()
    app.state.preparing = preparing

    # ---------------------------------------------------------------- errors → OpenAI bodies

    @app.exception_handler(RealmError)
    async def _realm_error(request: Request, e: RealmError) -> JSONResponse:
        if isinstance(e, QueueFullError) and "retry_after" not in e.details:
            e.details["retry_after"] = limits.queue_retry_after_s
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = loc[0] if loc else None
        if first.get("type") == "json_invalid":
            param = None
            message = f"the request body is not valid JSON: {first.get('ctx', {}).get('error')}"
        elif first.get("type") == "missing":
            message = f"{'.'.join(loc) or 'body'}: field required"
        else:
            got = first.get("input")
            shown = repr(got) if len(repr(got)) < 80 else repr(got)[:77] + "..."
            message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid')} (got {shown})"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem(s))"
        body = InvalidRequestError(message, param=param).to_payload()
        return JSONResponse(body, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        body = {"error": {"message": str(e.detail), "type": "invalid_request_error",
                          "code": "not_found" if e.status_code == 404 else "http_error",
                          "param": None}}
        return JSONResponse(body, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception) -> JSONResponse:
        return JSONResponse(_error_payload(e), status_code=500)

    # ---------------------------------------------------------------- helpers over the kernel

    def loaded_names() -> str:
        return ", ".join(m.name for m in kernel.models() if m.loaded) or "none"

    def resolve_model(name: str | None, caller: Caller, weights: str | None = None) -> str:
        """A registered model, or (for an admin) a catalogue name that loads on first use; a
        tenant never makes the server load anything, nor a second copy in another layout."""
        name = name or default_model
        try:
            kernel.store.get(name)
        except ModelNotFoundError:
            if catalogue.find_entry(name) is not None:
                if caller.admin:
                    return name
                raise PermissionDeniedError(
                    f"model {name!r} is not loaded on this server (loaded: {loaded_names()}), "
                    "and only an admin key loads models: ask the server's operator to load it, "
                    "or pick one of GET /v1/models", param="model") from None
            raise ModelNotFoundError(
                f"model {name!r} is not loaded on this server (loaded: {loaded_names()}); load "
                "it with POST /v1/models/load or pick one of GET /v1/models",
                param="model") from None
        if weights is not None and not caller.admin:
            try:
                kernel.store.get(name, weights)
            except ModelNotFoundError:
                raise PermissionDeniedError(
                    f"model {name!r} is not loaded with weights={weights!r}; that would load a "
                    "second copy of it, which only an admin key may do: leave weights out",
                    param="weights") from None
        return name

    def model_file(source: str) -> str:
        """A .gguf file under the configured model folders (the only files HTTP may load)."""
        if not dirs:
            raise InvalidRequestError(
                f"{source!r} is not a catalogue model, and this server loads no files: start it "
                "with --models-dir to allow .gguf files from a folder", param="model")
        raw = Path(source).expanduser()
        candidates = [raw] if raw.is_absolute() else [d / raw for d in dirs]
        for c in candidates:
            p = Path(os.path.normpath(c))  # no "..": links the operator placed there may stay
            if p.is_file() and any(p.is_relative_to(d) for d in dirs):
                with open(p, "rb") as f:  # say so here, and never echo what a file holds
                    if f.read(4) != b"GGUF":
                        raise GGUFFormatError(
                            f"{source!r} in the server's model folders is not a GGUF file; "
                            "realm-nb loads GGUF models only", param="model")
                return str(p)
        raise ModelNotFoundError(
            f"model {source!r} is neither a catalogue name nor a file under the server's model "
            f"folders ({', '.join(map(str, dirs))})", param="model")

    def check_name_free(name: str, target: Path) -> None:
        """A name given at load may stand for `target` only: never for another file (a
        catalogue name for its own file only), so what tenants run by name stays what it was."""
        named_cat = catalogue.find_entry(name)
        if named_cat is not None and \
                catalogue.cached_path(named_cat).resolve() != target.resolve():
            raise ModelNameTakenError(
                f"name={name!r} is the catalogue's name for another file: pick another name",
                param="name")
        try:
            taken = kernel.store.get(name)
        except ModelNotFoundError:
            return
        if taken.path.resolve() != target.resolve():
            raise ModelNameTakenError(
                f"name={name!r} already stands for {taken.path.name} (model {taken.id}); names "
                "are not rebound while loaded: pick another name, or unload that model first",
                param="name")

    def need_admin(caller: Caller, action: str) -> None:
        if not caller.admin:
            metrics.admin_actions.labels(action=action, outcome="denied",
                                         actor=caller.actor).inc()
            log.warning("denied: %s by %r (not an admin key)", action, caller.actor)
            raise PermissionDeniedError(
                f"{action} changes what every tenant runs: it needs an admin key (role = "
                f"\"admin\" in the keys file); this key acts as tenant {caller.tenant!r}",
                param="Authorization")

    async def audited(action: str, caller: Caller, what: str, work: Callable[[], Any]) -> Any:
        """Run an admin action in a worker thread, counting and logging its outcome."""
        try:
            result = await anyio.to_thread.run_sync(work)
        except BaseException:
            metrics.admin_actions.labels(action=action, outcome="failed",
                                         actor=caller.actor).inc()
            log.warning("failed: %s %s by %r", action, what, caller.actor)
            raise
        metrics.admin_actions.labels(action=action, outcome="done", actor=caller.actor).inc()
        log.warning("done: %s %s by %r", action, what, caller.actor)
        return result

    @contextlib.contextmanager
    def preparing_request(tenant: str, cancelled: threading.Event) -> Iterator[None]:
        with preparing_lock:
            preparing.setdefault(tenant, set()).add(cancelled)
        try:
            yield
        finally:
            with preparing_lock:
                mine = preparing.get(tenant, set())
                mine.discard(cancelled)
                if not mine:
                    preparing.pop(tenant, None)

    def cancel_preparing(tenant: str) -> int:
        with preparing_lock:
            mine = list(preparing.get(tenant, ()))
        for event in mine:
            event.set()
        return len(mine)

    async def start(caller: Caller, request: Request, model: str | None,
                    prompt: str | list[int] | None, messages: list[dict[str, Any]] | None,
                    params: SamplingParams, echo: bool = False, logprobs: int | None = None,
                    weights: str | None = None) -> _Pump:
        """Render and tokenize in a worker thread (cancellable: client gone, /v1/cancel), start
        the generation, and refuse it with a 503 if it finds the queue full."""
        name = resolve_model(model, caller, weights)
        cancelled = threading.Event()

        def check() -> None:
            if cancelled.is_set():
                raise Cancelled("the request was cancelled (client gone, or a cancel call) "
                                "before it started generating", param="request")

        def begin() -> GenerationStream:
            check()
            text = prompt if messages is None else kernel.render_chat(
                name, messages, budget=limits.template, check=check)
            if text is None:
                raise InvalidRequestError("give a prompt or messages", param="prompt")
            check()
            return kernel.generate(tenant=caller.tenant, model=name, prompt=text,
                                   params=params, echo=echo, logprobs=logprobs, weights=weights)

        with preparing_request(caller.tenant, cancelled):
            watcher = asyncio.ensure_future(_on_disconnect(request, cancelled.set))
            try:
                stream = await anyio.to_thread.run_sync(begin, limiter=render_limiter)
            finally:
                watcher.cancel()
        pump = _Pump(stream, metrics.observe_generation)
        await pump.refuse_if_queue_full(limits.queue_grace_s)
        return pump

    # ---------------------------------------------------------------- service endpoints

    @app.get("/health", tags=["service"])
    async def health() -> dict[str, Any]:
        return {"status": "ok", "version": __version__,
                "models": [m.name for m in kernel.models() if m.loaded]}

    @app.get("/metrics", tags=["service"], response_class=Response)
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # ---------------------------------------------------------------- models

    @app.get("/v1/models", tags=["models"])
    async def list_models(tenant: str = Depends(tenant_dep)) -> dict[str, Any]:
        return {"object": "list", "data": [model_entry(m) for m in kernel.models()]}

    @app.post("/v1/models/load", tags=["models"])
    async def load_model(body: LoadModelRequest,
                         caller: CallerDep) -> dict[str, Any]:
        """Load a catalogue model or a .gguf file from the model folders (admin keys only)."""
        need_admin(caller, "load")
        source = body.model
        entry_cat = catalogue.find_entry(source)
        if entry_cat is None:
            try:
                entry = kernel.store.get(source)
            except ModelNotFoundError:
                source = model_file(source)
            else:
                if body.name is None:
                    await audited("load", caller, repr(entry.name),
                                  lambda: kernel.store.ensure_resident(entry))
                    return model_entry(entry.info())
                source = str(entry.path)
        if body.name is not None:
            check_name_free(body.name, Path(source) if entry_cat is None
                            else catalogue.cached_path(entry_cat))
        info = await audited(
            "load", caller, f"{body.model!r}" + (f" as {body.name!r}" if body.name else ""),
            lambda: kernel.load_model(source, name=body.name, weights=body.weights))
        return model_entry(info)

    @app.post("/v1/models/unload", tags=["models"])
    async def unload_model(body: UnloadModelRequest,
                           caller: CallerDep) -> dict[str, Any]:
        """Unload a model, every layout of it (admin keys only; not while requests run on it)."""
        need_admin(caller, "unload")
        entry = kernel.store.get(body.model)
        busy = sum(m.in_use for m in kernel.store.entries() if m.path == entry.path)
        if busy:
            raise ModelInUseError(
                f"model {entry.name} has {busy} request(s) running; unloading it now would "
                "take it from under them: cancel them or wait", param="model")
        info = await audited("unload", caller, repr(body.model),
                             lambda: kernel.unload_model(body.model))
        return model_entry(info)

    @app.get("/v1/models/{model:path}", tags=["models"])
    async def get_model(model: str, tenant: str = Depends(tenant_dep)) -> dict[str, Any]:
        for m in kernel.models():
            if model in (m.name, m.id, *m.aliases):
                return model_entry(m)
        raise ModelNotFoundError(f"no model is called {model!r}; see GET /v1/models",
                                 param="model")

    # ---------------------------------------------------------------- OpenAI completions

    @app.post("/v1/completions", tags=["openai"], response_model=None)
    async def completions(body: CompletionRequest, request: Request,
                          caller: CallerDep) -> Any:
        params = body.sampling(COMPLETIONS_DEFAULT_MAX_TOKENS)
        prompt = body.single_prompt()
        pump = await start(caller, request, body.model, prompt, None, params, echo=body.echo,
                           logprobs=body.logprobs)
        rid = pump.stream.request_id
        codec = kernel.model(pump.stream.model).codec

        def prompt_text(g: Generation) -> str:
            return g.prompt if isinstance(g.prompt, str) else codec.decode(g.prompt_ids)

        def logprobs_of(g: Generation) -> dict[str, Any] | None:
            head = prompt_text(g)
            return completion_logprobs(g, echo=body.echo,
                                       first_prompt_token=codec.token_text(g.prompt_ids[0]),
                                       offset=0 if body.echo else len(head))

        if not body.stream:
            g = await pump.result(request)
            text = prompt_text(g) + g.text if body.echo else g.text
            return completion_body(rid, g, text, logprobs_of(g))

        created, model = int(time.time()), pump.stream.model
        head = None
        if body.echo:
            text = prompt if isinstance(prompt, str) else codec.decode(list(prompt))
            head = completion_chunk(rid, model, created, text)
        return _sse_response(_openai_events(
            pump, first=head,
            piece=lambda text: completion_chunk(rid, model, created, text),
            last=lambda g: completion_chunk(rid, model, created, "", g.finish_reason,
                                            logprobs_of(g)),
            usage=lambda g: usage_chunk(rid, model, created, "text_completion", g)
            if body.include_usage else None), rid)

    @app.post("/v1/chat/completions", tags=["openai"], response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request,
                               caller: CallerDep) -> Any:
        params = body.chat_sampling()
        pump = await start(caller, request, body.model, None, body.plain_messages(), params,
                           logprobs=body.chat_logprobs())
        rid = pump.stream.request_id
        if not body.stream:
            return chat_body(rid, await pump.result(request))

        created, model = int(time.time()), pump.stream.model
        return _sse_response(_openai_events(
            pump, first=chat_chunk(rid, model, created, {"role": "assistant", "content": ""}),
            piece=lambda text: chat_chunk(rid, model, created, {"content": text}),
            last=lambda g: chat_chunk(rid, model, created, {}, g.finish_reason,
                                      chat_logprobs(g)),
            usage=lambda g: usage_chunk(rid, model, created, "chat.completion.chunk", g)
            if body.include_usage else None), rid)

    # ---------------------------------------------------------------- the SDK's own call

    @app.post("/v1/realm/generate", tags=["realm"], response_model=None)
    async def realm_generate(body: RealmGenerateRequest, request: Request,
                             caller: CallerDep) -> Any:
        if (body.prompt is None) == (body.messages is None):
            raise InvalidRequestError("give exactly one of prompt and messages", param="prompt")
        pump = await start(caller, request, body.model, body.prompt, body.messages,
                           body.sampling(), echo=body.echo, logprobs=body.logprobs,
                           weights=body.weights)
        rid = pump.stream.request_id
        if not body.stream:
            g = await pump.result(request)
            return {"request_id": rid, "generation": g.to_dict()}

        async def events() -> AsyncIterator[str]:
            yield _sse({"request_id": rid, "model": pump.stream.model})
            async for item in pump.events():
                if isinstance(item, dict):
                    yield _sse({"progress": item})
                elif isinstance(item, str):
                    yield _sse({"text": item})
                elif item.error is not None:
                    yield _sse(_error_payload(item.error))
                elif item.generation is not None:
                    yield _sse({"generation": item.generation.to_dict()})
            yield SSE_DONE

        return _sse_response(events(), rid)

    # ---------------------------------------------------------------- this tenant's requests

    @app.get("/v1/requests", tags=["realm"])
    async def list_requests(tenant: str = Depends(tenant_dep)) -> dict[str, Any]:
        return {"object": "list", "data": kernel.running(tenant)}

    @app.post("/v1/requests/{request_id}/cancel", tags=["realm"])
    async def cancel_request(request_id: str,
                             tenant: str = Depends(tenant_dep)) -> dict[str, Any]:
        if kernel.cancel(tenant, request_id) == 0:
            raise RequestNotFoundError(
                f"no running request {request_id!r} of this tenant (it finished, or is not "
                "yours); see GET /v1/requests", param="request_id")
        return {"id": request_id, "cancelled": True}

    @app.post("/v1/cancel", tags=["realm"])
    async def cancel_all(tenant: str = Depends(tenant_dep)) -> dict[str, Any]:
        """Cancel all of this tenant's requests: running ones, and ones still rendering their
        chat template or tokenizing."""
        return {"cancelled": kernel.cancel(tenant) + cancel_preparing(tenant)}

    @app.get("/v1/stats", tags=["realm"])
    async def tenant_stats(request: Request,
                           tenant: str = Depends(tenant_dep)) -> dict[str, Any]:
        """This tenant's counters; the whole runtime's for a caller that speaks for many (the
        runtime a Jupyter server owns, or a server without keys)."""
        stats = kernel.stats()
        running = len(kernel.running(tenant))
        if request.scope.get("state", {}).get("sees_all_tenants"):
            return {"tenant": tenant, "tenants": stats["tenants"], "store": stats["store"],
                    "schedulers": stats["schedulers"], "requests": stats["requests"],
                    "running": running}
        own = [t for t in stats["tenants"] if t["id"] == tenant]
        mine = own[0] if own else {}
        return {"tenant": tenant, "tenants": own,
                "store": {k: stats["store"][k] for k in ("resident_bytes", "budget_bytes")},
                "schedulers": {},
                "requests": {k: int(mine.get(k, 0)) for k in ("requests", "tokens", "traps")},
                "running": running}

    return app


# ------------------------------------------------------------------------------ `realm-nb serve`


def serve_from_args(args: argparse.Namespace) -> int:
    """Build the kernel, load the --model list with progress bars, read the keys, run uvicorn."""
    import uvicorn
    from tqdm import tqdm

    from .kernel import RealmKernel

    weights = getattr(args, "weights", None)
    keys = load_keys(args.api_keys) if args.api_keys else None  # a bad file fails before loading
    kernel = RealmKernel.shared()
    names = []
    for source in args.models or [catalogue.DEFAULT_MODEL]:
        entry = kernel.store.register(source, layout=weights)
        if not args.lazy:
            with tqdm(total=entry.n_layers, desc=f"load {entry.name}", unit="layer",
                      file=sys.stderr) as bar:
                kernel.store.ensure_resident(entry, progress=lambda i, n: bar.update(i - bar.n))
        names.append(entry.name)
    dirs = [Path(d) for d in (args.models_dir or [])]
    limits = ServerLimits()
    if getattr(args, "max_body_bytes", None) is not None:
        if args.max_body_bytes < 1024:
            raise InvalidRequestError(f"--max-body-bytes {args.max_body_bytes}: give at least "
                                      "1024", param="max_body_bytes")
        limits = dataclasses.replace(limits, max_body_bytes=args.max_body_bytes)
    if getattr(args, "allowed_host", None):
        limits = dataclasses.replace(limits, allowed_hosts=tuple(args.allowed_host))
    app = create_app(kernel, api_keys=keys, models_dirs=dirs, default_model=names[0],
                     limits=limits)
    if args.fd is not None:  # a listening socket handed down by the Jupyter server extension
        sock = socket.socket(fileno=args.fd)
        host, port = sock.getsockname()[:2]
    else:
        sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET,
                             socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
        host, port = args.host, sock.getsockname()[1]
    who = (f"{len(keys)} API key(s), tenants {sorted({k.tenant for k in keys.values()})}"
           if keys else "no API keys: one user, an admin; loopback names only")
    print(f"realm-nb: serving {', '.join(names)} at http://{host}:{port}/v1 "
          f"({who}); docs at http://{host}:{port}/docs", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    if args.parent_pid is not None:
        _exit_with_parent(args.parent_pid, server)
    server.run(sockets=[sock])
    return 0


def _exit_with_parent(parent_pid: int, server: Any) -> None:
    """Stop serving when the owner process is gone, so a runtime never outlives its Jupyter
    server (a SIGKILLed owner runs no cleanup; on Linux PR_SET_PDEATHSIG covers that too)."""

    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        with contextlib.suppress(OSError, AttributeError):  # PR_SET_PDEATHSIG = 1
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        server.should_exit = True
        time.sleep(10)  # a graceful stop that hangs still ends
        os._exit(0)

    threading.Thread(target=watch, name="realm-parent-watch", daemon=True).start()


class BackgroundServer:
    """A uvicorn server on a daemon thread (tests, notebooks): `.url`, `.stop()`, a context.

    Binds the socket itself, so `port=0` picks a free port that `.url` then names.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        self.url = f"http://{host}:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       name="realm-uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server at {self.url} did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
