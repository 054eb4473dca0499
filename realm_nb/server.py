"""The HTTP face: an OpenAI-compatible FastAPI app over the same `RealmKernel` as local mode.

Endpoints (OpenAI's shapes where OpenAI has one):
  GET  /health, GET /metrics (Prometheus), GET /openapi.json, /docs
  GET  /v1/models, GET /v1/models/{name}, POST /v1/models/load, POST /v1/models/unload
  POST /v1/completions, POST /v1/chat/completions (stream: SSE `data:` chunks, `data: [DONE]`)
  POST /v1/realm/generate (the SDK's call: a whole `Generation`, or SSE text pieces ending in it)
  GET  /v1/requests, POST /v1/requests/{id}/cancel, POST /v1/cancel, GET /v1/stats (own tenant)

Each API key acts as one tenant (see `server_auth`). Generations run in kernel threads; a small
pump thread per request hands their pieces to the event loop, which never blocks. A client that
goes away mid-request cancels its generation, which frees its KV-cache slot.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
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
from .errors import InvalidRequestError, ModelNotFoundError, RealmError, RequestNotFoundError
from .server_auth import DEFAULT_TENANT, GateMiddleware, KeyConfig, error_response, load_keys
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

__all__ = ["BackgroundServer", "KeyConfig", "create_app", "load_keys", "serve_from_args"]

DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there


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

    async def events(self) -> AsyncIterator[str | _End | dict[str, Any]]:
        """Pieces (and progress dicts), then one _End. If the consumer stops early, the
        generation is cancelled."""
        try:
            while True:
                item = await self.queue.get()
                yield item
                if isinstance(item, _End):
                    return
        finally:
            self.stream.cancel()  # a no-op once it has finished

    async def result(self, request: Request) -> Generation:
        """Wait for the end, cancelling the generation if the client disconnects meanwhile."""
        try:
            while True:
                try:
                    item = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        self.stream.cancel()
                    continue
                if isinstance(item, dict):
                    continue
                if isinstance(item, _End):
                    if item.error is not None:
                        raise item.error
                    assert item.generation is not None
                    return item.generation
        finally:
            self.stream.cancel()


_bearer = HTTPBearer(auto_error=False, description="API key (when the server has keys)")


def tenant_dep(request: Request,
               _key: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]) -> str:
    """The tenant the gate middleware found for this request's key (documents the key too)."""
    return str(request.scope.get("state", {}).get("tenant", DEFAULT_TENANT))


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


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
               default_model: str = catalogue.DEFAULT_MODEL) -> FastAPI:
    """The FastAPI app over `kernel`; `api_keys=None` serves one default tenant, unauthenticated."""
    from . import __version__

    metrics = ServerMetrics(kernel)
    dirs = [Path(os.path.abspath(Path(d).expanduser())) for d in models_dirs]
    app = FastAPI(title="realm-nb", version=__version__,
                  description="GGUF models as jitted JAX, each tenant in a WebAssembly guest; "
                              "OpenAI-compatible.")
    app.state.kernel = kernel
    app.state.metrics = metrics
    app.add_middleware(GateMiddleware, api_keys=api_keys, metrics=metrics)
    # ---------------------------------------------------------------- errors → OpenAI bodies

    @app.exception_handler(RealmError)
    async def _realm_error(request: Request, e: RealmError) -> JSONResponse:
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

    def resolve_model(name: str | None) -> str:
        """A loaded model, or a catalogue name (loads on first use); never an arbitrary path."""
        name = name or default_model
        try:
            kernel.store.get(name)
            return name
        except ModelNotFoundError:
            if catalogue.find_entry(name) is not None:
                return name
            loaded = ", ".join(m.name for m in kernel.models() if m.loaded) or "none"
            raise ModelNotFoundError(
                f"model {name!r} is not loaded on this server (loaded: {loaded}); load it with "
                "POST /v1/models/load or pick one of GET /v1/models", param="model") from None

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
                return str(p)
        raise ModelNotFoundError(
            f"model {source!r} is neither a catalogue name nor a file under the server's model "
            f"folders ({', '.join(map(str, dirs))})", param="model")

    async def start(tenant: str, model: str | None, prompt: str | list[int] | None,
                    messages: list[dict[str, Any]] | None, params: SamplingParams,
                    echo: bool = False, logprobs: int | None = None,
                    weights: str | None = None) -> _Pump:
        name = resolve_model(model)

        def begin() -> GenerationStream:
            text = prompt if messages is None else kernel.render_chat(name, messages)
            if text is None:
                raise InvalidRequestError("give a prompt or messages", param="prompt")
            return kernel.generate(tenant=tenant, model=name, prompt=text, params=params,
                                   echo=echo, logprobs=logprobs, weights=weights)

        stream = await anyio.to_thread.run_sync(begin)  # may tokenize or open a model file
        return _Pump(stream, metrics.observe_generation)

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
                         tenant: str = Depends(tenant_dep)) -> dict[str, Any]:
        source = body.model
        if catalogue.find_entry(source) is None:
            try:
                entry = kernel.store.get(source)
                await anyio.to_thread.run_sync(kernel.store.ensure_resident, entry)
                return model_entry(entry.info())
            except ModelNotFoundError:
                source = model_file(source)
        info = await anyio.to_thread.run_sync(
            lambda: kernel.load_model(source, name=body.name, weights=body.weights))
        return model_entry(info)

    @app.post("/v1/models/unload", tags=["models"])
    async def unload_model(body: UnloadModelRequest,
                           tenant: str = Depends(tenant_dep)) -> dict[str, Any]:
        return model_entry(kernel.unload_model(body.model))

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
                          tenant: str = Depends(tenant_dep)) -> Any:
        params = body.sampling(COMPLETIONS_DEFAULT_MAX_TOKENS)
        prompt = body.single_prompt()
        pump = await start(tenant, body.model, prompt, None, params, echo=body.echo,
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
                               tenant: str = Depends(tenant_dep)) -> Any:
        params = body.chat_sampling()
        pump = await start(tenant, body.model, None, body.plain_messages(), params,
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
                             tenant: str = Depends(tenant_dep)) -> Any:
        if (body.prompt is None) == (body.messages is None):
            raise InvalidRequestError("give exactly one of prompt and messages", param="prompt")
        pump = await start(tenant, body.model, body.prompt, body.messages, body.sampling(),
                           echo=body.echo, logprobs=body.logprobs, weights=body.weights)
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
        return {"cancelled": kernel.cancel(tenant)}

    @app.get("/v1/stats", tags=["realm"])
    async def tenant_stats(request: Request,
                           tenant: str = Depends(tenant_dep)) -> dict[str, Any]:
        """This tenant's counters; every tenant's for a caller that speaks for many (the
        runtime a Jupyter server owns, or a server without keys)."""
        stats = kernel.stats()
        sees_all = bool(request.scope.get("state", {}).get("sees_all_tenants"))
        own = [t for t in stats["tenants"] if sees_all or t["id"] == tenant]
        return {"tenant": tenant, "tenants": own, "store": stats["store"],
                "schedulers": stats["schedulers"], "requests": stats["requests"],
                "running": len(kernel.running(tenant))}

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
    app = create_app(kernel, api_keys=keys, models_dirs=dirs, default_model=names[0])
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
           if keys else "no API keys (one default tenant)")
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
