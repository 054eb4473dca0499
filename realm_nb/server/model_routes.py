"""The model routes: OpenAI's list and get, and realm-nb's load and unload (admin keys only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter

from .. import catalogue, discovery
from ..errors import ModelInUseError, ModelNotFoundError
from .bodies import LoadModelRequest, UnloadModelRequest, model_entry
from .context import CallerDep, ContextDep

router = APIRouter(tags=["models"])


@router.get("/v1/models")
async def list_models(ctx: ContextDep, caller: CallerDep) -> dict[str, Any]:
    return {"object": "list",
            "data": [model_entry(m, admin=caller.admin) for m in ctx.kernel.models()]}


@router.post("/v1/models/load")
async def load_model(body: LoadModelRequest, ctx: ContextDep, caller: CallerDep) -> dict[str, Any]:
    """Load a catalogue model, a model found on the server's disk (GET /v1/models lists them)
    or a .gguf file from the model folders (admin keys only)."""
    ctx.need_admin(caller, "load")
    kernel = ctx.kernel
    source = body.model
    entry_cat = catalogue.find_entry(source)
    found = None
    if entry_cat is None:
        try:
            entry = kernel.store.get(source)
        except ModelNotFoundError:
            found = discovery.find_by_name(source)
            source = str(found.path) if found is not None else ctx.model_file(source)
        else:
            if body.name is None:
                await ctx.audited("load", caller, repr(entry.name),
                                  lambda: kernel.store.ensure_resident(entry))
                return model_entry(entry.info(), admin=True)
            source = str(entry.path)
    if body.name is not None:
        ctx.check_name_free(body.name, Path(source) if entry_cat is None
                            else catalogue.cached_path(entry_cat))
    info = await ctx.audited(
        "load", caller, f"{body.model!r}" + (f" as {body.name!r}" if body.name else ""),
        lambda: kernel.load_model(source, name=body.name, weights=body.weights))
    return model_entry(info, admin=True)


@router.post("/v1/models/unload")
async def unload_model(body: UnloadModelRequest, ctx: ContextDep,
                       caller: CallerDep) -> dict[str, Any]:
    """Unload a model, every layout of it (admin keys only; not while requests run on it)."""
    ctx.need_admin(caller, "unload")
    kernel = ctx.kernel
    entry = kernel.store.get(body.model)
    busy = sum(m.in_use for m in kernel.store.entries() if m.path == entry.path)
    if busy:
        raise ModelInUseError(
            f"model {entry.name} has {busy} request(s) running; unloading it now would "
            "take it from under them: cancel them or wait", param="model")
    info = await ctx.audited("unload", caller, repr(body.model),
                             lambda: kernel.unload_model(body.model))
    return model_entry(info, admin=True)


@router.get("/v1/models/{model:path}")
async def get_model(model: str, ctx: ContextDep, caller: CallerDep) -> dict[str, Any]:
    for m in ctx.kernel.models():
        if model in (m.name, m.id, *m.aliases):
            return model_entry(m, admin=caller.admin)
    raise ModelNotFoundError(f"no model is called {model!r}; see GET /v1/models",
                             param="model")
