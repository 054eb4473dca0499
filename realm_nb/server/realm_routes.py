"""realm-nb's own routes: the SDK's generate call, a tenant's requests, cancel and stats, and the
service endpoints (/health, /metrics)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..errors import InvalidRequestError, RequestNotFoundError
from .bodies import RealmGenerateRequest
from .context import CallerDep, ContextDep, TenantDep
from .streaming import SSE_DONE, error_payload, sse, sse_response

router = APIRouter(tags=["realm"])
service = APIRouter(tags=["service"])


# ------------------------------------------------------------------------------ service


@service.get("/health")
async def health(ctx: ContextDep) -> dict[str, Any]:
    from .. import __version__

    return {"status": "ok", "version": __version__,
            "models": [m.name for m in ctx.kernel.models() if m.loaded]}


@service.get("/metrics", response_class=Response)
async def prometheus_metrics(ctx: ContextDep) -> Response:
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)


# ------------------------------------------------------------------------------ the SDK's own call


@router.post("/v1/realm/generate", response_model=None)
async def realm_generate(body: RealmGenerateRequest, request: Request, ctx: ContextDep,
                         caller: CallerDep) -> Any:
    """A whole `Generation`, or (stream) SSE events: the request id, progress while a model
    loads, text pieces, then the generation (or an error)."""
    if (body.prompt is None) == (body.messages is None):
        raise InvalidRequestError("give exactly one of prompt and messages", param="prompt")
    pump = await ctx.start(caller, request, body.model, body.prompt, body.messages,
                           body.sampling(), echo=body.echo, logprobs=body.logprobs,
                           weights=body.weights)
    rid = pump.stream.request_id
    if not body.stream:
        g = await pump.result(request)
        return {"request_id": rid, "generation": g.to_dict()}

    async def events() -> AsyncIterator[str]:
        yield sse({"request_id": rid, "model": pump.stream.model})
        async for item in pump.events():
            if isinstance(item, dict):
                yield sse({"progress": item})
            elif isinstance(item, str):
                yield sse({"text": item})
            elif item.error is not None:
                yield sse(error_payload(item.error))
            elif item.generation is not None:
                yield sse({"generation": item.generation.to_dict()})
        yield SSE_DONE

    return sse_response(events(), rid)


# --------------------------------------------------------------------- this tenant's requests


@router.get("/v1/requests")
async def list_requests(ctx: ContextDep, tenant: TenantDep) -> dict[str, Any]:
    return {"object": "list", "data": ctx.kernel.running(tenant)}


@router.post("/v1/requests/{request_id}/cancel")
async def cancel_request(request_id: str, ctx: ContextDep, tenant: TenantDep) -> dict[str, Any]:
    if ctx.kernel.cancel(tenant, request_id) == 0:
        raise RequestNotFoundError(
            f"no running request {request_id!r} of this tenant (it finished, or is not "
            "yours); see GET /v1/requests", param="request_id")
    return {"id": request_id, "cancelled": True}


@router.post("/v1/cancel")
async def cancel_all(ctx: ContextDep, tenant: TenantDep) -> dict[str, Any]:
    """Cancel all of this tenant's requests: running ones, and ones still rendering their
    chat template or tokenizing."""
    return {"cancelled": ctx.kernel.cancel(tenant) + ctx.cancel_preparing(tenant)}


@router.get("/v1/stats")
async def tenant_stats(request: Request, ctx: ContextDep, tenant: TenantDep) -> dict[str, Any]:
    """This tenant's counters; the whole runtime's for a caller that speaks for many (the
    runtime a Jupyter server owns, or a server without keys)."""
    stats = ctx.kernel.stats()
    running = len(ctx.kernel.running(tenant))
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
