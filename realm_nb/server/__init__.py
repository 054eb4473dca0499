"""The HTTP face: an OpenAI-compatible FastAPI app over the same `RealmKernel` as local mode.

Endpoints (OpenAI's shapes where OpenAI has one):
  GET  /health, GET /metrics (Prometheus), GET /openapi.json, /docs
  GET  /v1/models, GET /v1/models/{name}, POST /v1/models/load, POST /v1/models/unload
  POST /v1/completions, POST /v1/chat/completions (stream: SSE `data:` chunks, `data: [DONE]`)
  POST /v1/realm/generate (the SDK's call: a whole `Generation`, or SSE text pieces ending in it)
  GET  /v1/requests, POST /v1/requests/{id}/cancel, POST /v1/cancel, GET /v1/stats (own tenant)

Each API key acts as one tenant with a role (see `auth`): admins load, unload and name models,
tenants use them. The event loop never does unbounded work: bodies are limited before they are
read, chat templates render (within their budget, cancellable) and prompts tokenize in worker
threads, generations run in kernel threads, and a small pump thread per request hands their
pieces to the event loop. A client that goes away mid-request, streaming or not, cancels its
generation, which frees its KV-cache slot. A full queue is a 503 with Retry-After before any
stream starts. JSON never carries NaN or infinities (see `streaming`).

The parts, each a module:
  app            `create_app`: the FastAPI app, its middleware, error bodies and routers
  context        `ServerContext` (the kernel and the rules routes share) and the dependencies
  model_routes   /v1/models, /v1/models/{name}, /v1/models/load, /v1/models/unload
  openai_routes  /v1/completions, /v1/chat/completions
  realm_routes   /v1/realm/generate, /v1/requests, /v1/cancel, /v1/stats, /health, /metrics
  bodies         request bodies (pydantic) and OpenAI response and chunk builders
  streaming      strict JSON, SSE, the pump from a kernel stream to the event loop
  auth           keys → tenants and roles, limits, the gate middleware
  metrics        Prometheus metrics of one app
  serve          `realm-nb serve`, and `BackgroundServer` for tests and notebooks
  ray_app        `realm-nb serve --ray`: runtime replicas and an ingress under Ray Serve
  ray_routing    which replica answers: the tenant's own, while it lives (a Serve request router)
  ray_bridge     HTTP across a Serve handle as ASGI messages; a lost replica's error bodies

Imports are lazy, so `realm-nb keys` (which needs `auth` only) loads no FastAPI app.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import create_app
    from .auth import KeyConfig, ServerLimits, load_keys
    from .serve import BackgroundServer, serve_from_args
    from .streaming import json_text

__all__ = ["BackgroundServer", "KeyConfig", "ServerLimits", "create_app", "json_text",
           "load_keys", "serve_from_args"]

_LAZY = {"create_app": ".app", "KeyConfig": ".auth", "ServerLimits": ".auth",
         "load_keys": ".auth", "BackgroundServer": ".serve", "serve_from_args": ".serve",
         "json_text": ".streaming"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'realm_nb.server' has no attribute {name!r}")
