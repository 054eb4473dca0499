"""The app factory: one FastAPI app over a `RealmKernel`, its gate, its error bodies, its routes.

`create_app` builds the app's `ServerContext` (the kernel and the rules the routes share), puts
the gate middleware in front (limits, keys, roles, request metrics), turns every error into an
OpenAI-style body, and mounts the routers: service, models, OpenAI, realm-nb's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__, catalogue
from ..errors import InvalidRequestError, QueueFullError, RealmError
from . import model_routes, openai_routes, realm_routes
from .auth import GateMiddleware, KeyConfig, ServerLimits, error_response
from .context import ServerContext
from .metrics import ServerMetrics
from .streaming import StrictJSONResponse, error_payload

if TYPE_CHECKING:
    from ..kernel import RealmKernel


def create_app(kernel: RealmKernel, *, api_keys: dict[str, KeyConfig] | None = None,
               models_dirs: Sequence[Path] = (),
               default_model: str = catalogue.DEFAULT_MODEL,
               limits: ServerLimits | None = None) -> FastAPI:
    """The FastAPI app over `kernel`; `api_keys=None` serves one default tenant, unauthenticated
    (one user on loopback: an admin)."""
    limits = limits or ServerLimits()
    metrics = ServerMetrics(kernel)
    ctx = ServerContext(kernel, limits=limits, metrics=metrics, models_dirs=models_dirs,
                        default_model=default_model)
    app = FastAPI(title="realm-nb", version=__version__,
                  default_response_class=StrictJSONResponse,
                  description="GGUF models as jitted JAX, each tenant in a WebAssembly guest; "
                              "OpenAI-compatible.")
    app.state.realm = ctx
    app.state.kernel = kernel
    app.state.metrics = metrics
    app.state.limits = limits
    app.state.preparing = ctx.preparing  # tenant → requests rendering or tokenizing now
    app.add_middleware(GateMiddleware, api_keys=api_keys, metrics=metrics, limits=limits)
    app.exception_handler(RealmError)(realm_error)
    app.exception_handler(RequestValidationError)(validation_error)
    app.exception_handler(StarletteHTTPException)(http_error)
    app.exception_handler(Exception)(internal_error)
    app.include_router(realm_routes.service)
    app.include_router(model_routes.router)
    app.include_router(openai_routes.router)
    app.include_router(realm_routes.router)
    return app


# ---------------------------------------------------------------------- errors → OpenAI bodies


async def realm_error(request: Request, e: RealmError) -> JSONResponse:
    """A RealmError as its status and body; a full queue says when to retry."""
    if isinstance(e, QueueFullError) and "retry_after" not in e.details:
        e.details["retry_after"] = request.app.state.limits.queue_retry_after_s
    return error_response(e)


async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    """A body FastAPI refused, as a 400 naming the first bad field and what it got."""
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


async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    """Starlette's own errors (no such route, wrong method) in OpenAI's shape."""
    body = {"error": {"message": str(e.detail), "type": "invalid_request_error",
                      "code": "not_found" if e.status_code == 404 else "http_error",
                      "param": None}}
    return JSONResponse(body, status_code=e.status_code, headers=e.headers)


async def internal_error(request: Request, e: Exception) -> JSONResponse:
    return JSONResponse(error_payload(e), status_code=500)
