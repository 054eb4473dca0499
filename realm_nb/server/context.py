"""What every route needs: the app's `ServerContext` (the kernel and the server's rules over it)
and who is calling, as FastAPI dependencies.

`create_app` puts one `ServerContext` on `app.state.realm`; routes ask for it with `ContextDep`
and for the caller with `CallerDep` (or only the tenant, `TenantDep`). The gate middleware
(`auth.GateMiddleware`) has already found the caller by then; the dependencies also document the
API key in the OpenAPI schema.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import anyio
from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .. import catalogue, discovery
from ..errors import (
    Cancelled,
    GGUFFormatError,
    InvalidRequestError,
    ModelNameTakenError,
    ModelNotFoundError,
    PermissionDeniedError,
)
from ..types import SamplingParams
from .auth import DEFAULT_TENANT, Caller, ServerLimits
from .metrics import ServerMetrics
from .streaming import Pump, on_disconnect

if TYPE_CHECKING:
    from ..kernel import GenerationStream, RealmKernel

log = logging.getLogger("realm_nb.server")


class ServerContext:
    """One app's kernel, limits, metrics and model folders, and the rules the routes share:
    which model a caller may run, which files HTTP may load, who may change what."""

    def __init__(self, kernel: RealmKernel, *, limits: ServerLimits, metrics: ServerMetrics,
                 models_dirs: Sequence[Path], default_model: str) -> None:
        self.kernel = kernel
        self.limits = limits
        self.metrics = metrics
        self.dirs = [Path(os.path.abspath(Path(d).expanduser())) for d in models_dirs]
        self.default_model = default_model
        self.render_limiter = anyio.CapacityLimiter(limits.render_threads)
        self.preparing: dict[str, set[threading.Event]] = {}  # tenant → rendering/tokenizing
        self.preparing_lock = threading.Lock()

    # ---------------------------------------------------------------- models

    def loaded_names(self) -> str:
        return ", ".join(m.name for m in self.kernel.models() if m.loaded) or "none"

    def resolve_model(self, name: str | None, caller: Caller, weights: str | None = None) -> str:
        """A registered model, or (for an admin) a catalogue name or a model found on the
        server's disk (discovery) that loads on first use; a tenant never makes the server load
        anything, nor a second copy in another layout."""
        name = name or self.default_model
        try:
            self.kernel.store.get(name)
        except ModelNotFoundError:
            if catalogue.find_entry(name) is not None or discovery.find_by_name(name):
                if caller.admin:
                    return name
                raise PermissionDeniedError(
                    f"model {name!r} is not loaded on this server (loaded: "
                    f"{self.loaded_names()}), and only an admin key loads models: ask the "
                    "server's operator to load it, or pick one of GET /v1/models",
                    param="model") from None
            raise ModelNotFoundError(
                f"model {name!r} is not loaded on this server (loaded: {self.loaded_names()}); "
                "load it with POST /v1/models/load or pick one of GET /v1/models",
                param="model") from None
        if weights is not None and not caller.admin:
            try:
                self.kernel.store.get(name, weights)
            except ModelNotFoundError:
                raise PermissionDeniedError(
                    f"model {name!r} is not loaded with weights={weights!r}; that would load a "
                    "second copy of it, which only an admin key may do: leave weights out",
                    param="weights") from None
        return name

    def model_file(self, source: str) -> str:
        """A .gguf file under the configured model folders (the only files HTTP may load)."""
        if not self.dirs:
            raise InvalidRequestError(
                f"{source!r} is not a catalogue model, and this server loads no files: start it "
                "with --models-dir to allow .gguf files from a folder", param="model")
        raw = Path(source).expanduser()
        candidates = [raw] if raw.is_absolute() else [d / raw for d in self.dirs]
        for c in candidates:
            p = Path(os.path.normpath(c))  # no "..": links the operator placed there may stay
            if p.is_file() and any(p.is_relative_to(d) for d in self.dirs):
                with open(p, "rb") as f:  # say so here, and never echo what a file holds
                    if f.read(4) != b"GGUF":
                        raise GGUFFormatError(
                            f"{source!r} in the server's model folders is not a GGUF file; "
                            "realm-nb loads GGUF models only", param="model")
                return str(p)
        raise ModelNotFoundError(
            f"model {source!r} is neither a catalogue name nor a file under the server's model "
            f"folders ({', '.join(map(str, self.dirs))})", param="model")

    def check_name_free(self, name: str, target: Path) -> None:
        """A name given at load may stand for `target` only: never for another file (a
        catalogue name for its own file only), so what tenants run by name stays what it was."""
        named_cat = catalogue.find_entry(name)
        if named_cat is not None and \
                catalogue.cached_path(named_cat).resolve() != target.resolve():
            raise ModelNameTakenError(
                f"name={name!r} is the catalogue's name for another file: pick another name",
                param="name")
        try:
            taken = self.kernel.store.get(name)
        except ModelNotFoundError:
            return
        if taken.path.resolve() != target.resolve():
            raise ModelNameTakenError(
                f"name={name!r} already stands for {taken.path.name} (model {taken.id}); names "
                "are not rebound while loaded: pick another name, or unload that model first",
                param="name")

    # ---------------------------------------------------------------- admin actions

    def need_admin(self, caller: Caller, action: str) -> None:
        if not caller.admin:
            self.metrics.admin_actions.labels(action=action, outcome="denied",
                                              actor=caller.actor).inc()
            log.warning("denied: %s by %r (not an admin key)", action, caller.actor)
            raise PermissionDeniedError(
                f"{action} changes what every tenant runs: it needs an admin key (role = "
                f"\"admin\" in the keys file); this key acts as tenant {caller.tenant!r}",
                param="Authorization")

    async def audited(self, action: str, caller: Caller, what: str,
                      work: Callable[[], Any]) -> Any:
        """Run an admin action in a worker thread, counting and logging its outcome."""
        try:
            result = await anyio.to_thread.run_sync(work)
        except BaseException:
            self.metrics.admin_actions.labels(action=action, outcome="failed",
                                              actor=caller.actor).inc()
            log.warning("failed: %s %s by %r", action, what, caller.actor)
            raise
        self.metrics.admin_actions.labels(action=action, outcome="done",
                                          actor=caller.actor).inc()
        log.warning("done: %s %s by %r", action, what, caller.actor)
        return result

    # ---------------------------------------------------------------- starting a generation

    @contextlib.contextmanager
    def preparing_request(self, tenant: str, cancelled: threading.Event) -> Iterator[None]:
        """While the body runs, `cancel_preparing(tenant)` sets `cancelled`."""
        with self.preparing_lock:
            self.preparing.setdefault(tenant, set()).add(cancelled)
        try:
            yield
        finally:
            with self.preparing_lock:
                mine = self.preparing.get(tenant, set())
                mine.discard(cancelled)
                if not mine:
                    self.preparing.pop(tenant, None)

    def cancel_preparing(self, tenant: str) -> int:
        """Cancel the tenant's requests still rendering their template or tokenizing."""
        with self.preparing_lock:
            mine = list(self.preparing.get(tenant, ()))
        for event in mine:
            event.set()
        return len(mine)

    async def start(self, caller: Caller, request: Request, model: str | None,
                    prompt: str | list[int] | None, messages: list[dict[str, Any]] | None,
                    params: SamplingParams, echo: bool = False, logprobs: int | None = None,
                    weights: str | None = None) -> Pump:
        """Render and tokenize in a worker thread (cancellable: client gone, /v1/cancel), start
        the generation, and refuse it with a 503 if it finds the queue full."""
        name = self.resolve_model(model, caller, weights)
        cancelled = threading.Event()
        kernel = self.kernel

        def check() -> None:
            if cancelled.is_set():
                raise Cancelled("the request was cancelled (client gone, or a cancel call) "
                                "before it started generating", param="request")

        def begin() -> GenerationStream:
            check()
            text = prompt if messages is None else kernel.render_chat(
                name, messages, budget=self.limits.template, check=check)
            if text is None:
                raise InvalidRequestError("give a prompt or messages", param="prompt")
            check()
            return kernel.generate(tenant=caller.tenant, model=name, prompt=text,
                                   params=params, echo=echo, logprobs=logprobs, weights=weights)

        with self.preparing_request(caller.tenant, cancelled):
            watcher = asyncio.ensure_future(on_disconnect(request, cancelled.set))
            try:
                stream = await anyio.to_thread.run_sync(begin, limiter=self.render_limiter)
            finally:
                watcher.cancel()
        pump = Pump(stream, self.metrics.observe_generation)
        await pump.refuse_if_queue_full(self.limits.queue_grace_s)
        return pump


# ------------------------------------------------------------------------------ dependencies


_bearer = HTTPBearer(auto_error=False, description="API key (when the server has keys)")


def server_context(request: Request) -> ServerContext:
    """The ServerContext of the app serving this request."""
    ctx: ServerContext = request.app.state.realm
    return ctx


def tenant_dep(request: Request,
               _key: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]) -> str:
    """The tenant the gate middleware found for this request's key (documents the key too)."""
    return str(request.scope.get("state", {}).get("tenant", DEFAULT_TENANT))


def caller_dep(request: Request,
               _key: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]) -> Caller:
    """Who the gate middleware found this request to be (tenant, role, key)."""
    caller = request.scope.get("state", {}).get("caller")
    return caller if isinstance(caller, Caller) else Caller(DEFAULT_TENANT, True, True, "keyless")


ContextDep = Annotated[ServerContext, Depends(server_context)]
CallerDep = Annotated[Caller, Depends(caller_dep)]
TenantDep = Annotated[str, Depends(tenant_dep)]
