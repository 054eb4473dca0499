"""Who is asking, and how often: API keys → tenants, per-key token buckets, request metrics.

`GateMiddleware` is a plain ASGI middleware (not BaseHTTPMiddleware, which would get in the way
of streaming and of disconnect detection). On every `/v1/...` request it finds the tenant of the
bearer key (401 when keys are configured and the key is missing or wrong), takes one token from
that key's bucket (429 with Retry-After when empty) and puts the tenant into
`scope["state"]["tenant"]`. On every request it counts the status and observes the latency.

A key with `name_tenants = true` speaks for many tenants: the request names its tenant in the
`X-Realm-Tenant` header. That is how the runtime a Jupyter server owns serves every notebook kernel
with one secret, each notebook its own tenant. A server without keys (loopback, one user) also
takes the header. Such callers also see every tenant in `/v1/stats`.
"""

from __future__ import annotations

import hmac
import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import (
    AuthenticationError,
    InvalidRequestError,
    PermissionDeniedError,
    RateLimitError,
    RealmError,
)
from .runtime import DEFAULT_TENANT, MAX_TENANT_CHARS
from .server_metrics import ServerMetrics

TENANT_HEADER = b"x-realm-tenant"
log = logging.getLogger("realm_nb.server")


@dataclass(frozen=True)
class KeyConfig:
    """One API key: the tenant it acts as, and its rate (requests/s) and burst (bucket size)."""

    tenant: str
    rate: float | None = None  # None: no limit
    burst: int = 10
    name_tenants: bool = False  # may act as any tenant named in X-Realm-Tenant


def load_keys(path: str | Path) -> dict[str, KeyConfig]:
    """Read the keys TOML: `[keys."sk-alice"] tenant = "alice"  rate = 5.0  burst = 10`."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise InvalidRequestError(f"API keys file {str(p)!r} does not exist",
                                  param="api_keys") from None
    except tomllib.TOMLDecodeError as e:
        raise InvalidRequestError(f"API keys file {str(p)!r} is not valid TOML: {e}",
                                  param="api_keys") from None
    table = data.get("keys")
    if not isinstance(table, dict) or not table:
        raise InvalidRequestError(
            f"API keys file {str(p)!r} has no [keys.\"...\"] tables; write e.g. "
            '[keys."sk-alice"] tenant = "alice" rate = 5.0 burst = 10', param="api_keys")
    keys: dict[str, KeyConfig] = {}
    for key, spec in table.items():
        if not isinstance(spec, dict):
            spec = {}
        tenant = spec.get("tenant", key)
        rate = spec.get("rate")
        burst = spec.get("burst", 10)
        if not isinstance(tenant, str) or not tenant:
            raise InvalidRequestError(f"key {key[:6]}...: tenant must be a non-empty string",
                                      param="tenant")
        if rate is not None and (not isinstance(rate, (int, float)) or rate <= 0):
            raise InvalidRequestError(f"key {key[:6]}...: rate={rate!r} must be a number > 0",
                                      param="rate")
        if not isinstance(burst, int) or burst < 1:
            raise InvalidRequestError(f"key {key[:6]}...: burst={burst!r} must be an integer "
                                      ">= 1", param="burst")
        name_tenants = spec.get("name_tenants", False)
        if not isinstance(name_tenants, bool):
            raise InvalidRequestError(f"key {key[:6]}...: name_tenants={name_tenants!r} must be "
                                      "true or false", param="name_tenants")
        keys[key] = KeyConfig(tenant=tenant, rate=None if rate is None else float(rate),
                              burst=burst, name_tenants=name_tenants)
    return keys


class TokenBucket:
    """`burst` tokens, refilled at `rate` per second; each request takes one."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = time.monotonic()
        self.lock = threading.Lock()

    def take(self) -> float:
        """Take a token; returns 0 when allowed, else the seconds until one is there."""
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= 1:
                self.tokens -= 1
                return 0.0
            return (1 - self.tokens) / self.rate


def named_tenant(headers: dict[bytes, bytes]) -> str | None:
    """The tenant a request names in X-Realm-Tenant (None when absent); checked for shape."""
    raw = headers.get(TENANT_HEADER)
    if raw is None:
        return None
    try:
        name = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        name = ""
    if not name or len(name) > MAX_TENANT_CHARS or not name.isprintable():
        raise InvalidRequestError(
            f"X-Realm-Tenant={raw[:40]!r}: a tenant name is 1..{MAX_TENANT_CHARS} printable "
            "characters (e.g. the notebook's path)", param="X-Realm-Tenant")
    return name


def bearer_key(headers: dict[bytes, bytes]) -> str | None:
    auth = headers.get(b"authorization", b"").decode("latin-1").strip()
    if auth.lower().startswith("bearer "):
        return auth[7:].strip() or None
    key = headers.get(b"x-api-key", b"").decode("latin-1").strip()
    return key or None


class GateMiddleware:
    """Authentication, rate limits and request metrics in front of the FastAPI app."""

    def __init__(self, app: ASGIApp, *, api_keys: dict[str, KeyConfig] | None,
                 metrics: ServerMetrics) -> None:
        self.app = app
        self.keys = dict(api_keys or {})
        self.metrics = metrics
        self.buckets = {k: TokenBucket(c.rate, c.burst) for k, c in self.keys.items()
                        if c.rate is not None}

    def tenant_of(self, scope: Scope) -> tuple[str, bool]:
        """(tenant, sees all tenants) of this request; raises AuthenticationError,
        PermissionDeniedError (a plain key naming another tenant) or RateLimitError."""
        headers = dict(scope.get("headers") or [])
        named = named_tenant(headers)
        if not self.keys:
            return named or DEFAULT_TENANT, True
        given = bearer_key(headers)
        found = None
        if given is not None:
            for key in self.keys:  # constant-time compare against every key
                if hmac.compare_digest(key.encode(), given.encode()):
                    found = key
        if found is None:
            raise AuthenticationError(
                "missing API key" if given is None else "invalid API key",
                param="Authorization")
        bucket = self.buckets.get(found)
        if bucket is not None:
            wait = bucket.take()
            if wait > 0:
                raise RateLimitError(
                    f"rate limit of {bucket.rate:g} requests/s (burst {bucket.burst}) reached "
                    f"for this key; retry in {wait:.2f} s", retry_after=wait)
        config = self.keys[found]
        if named is None or named == config.tenant:
            return config.tenant, config.name_tenants
        if not config.name_tenants:
            raise PermissionDeniedError(
                f"this API key acts as tenant {config.tenant!r} and may not act as "
                f"{named!r}; drop the X-Realm-Tenant header, or use a key with "
                "name_tenants = true", param="X-Realm-Tenant")
        return named, True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = {"code": 500}

        started = {"yes": False}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                started["yes"] = True
            await send(message)

        try:
            if scope["path"].startswith("/v1/"):
                try:
                    tenant, sees_all = self.tenant_of(scope)
                except RealmError as e:
                    await error_response(e)(scope, receive, send_wrapper)
                    return
                state = scope.setdefault("state", {})
                state["tenant"], state["sees_all_tenants"] = tenant, sees_all
            try:
                await self.app(scope, receive, send_wrapper)
            except Exception as e:
                # A bug of ours. Answer the 500 here: past this middleware Starlette sends its
                # 500 and re-raises, and uvicorn then drops the keep-alive connection, so the
                # client's *next* request fails too (the SDK would report an unreachable server).
                if started["yes"]:
                    raise
                log.exception("internal error on %s %s", scope.get("method"), scope["path"])
                body = {"error": {"message": f"internal error: {type(e).__name__}: {e}",
                                  "type": "InternalServerError", "code": "internal_error",
                                  "param": None}}
                await JSONResponse(body, status_code=500)(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or (
                scope["path"] if scope["path"] in ("/health", "/metrics") else "other")
            self.metrics.requests.labels(endpoint=endpoint, status=str(status["code"])).inc()
            self.metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - t0)


def error_response(e: RealmError) -> JSONResponse:
    """A RealmError as its HTTP status and OpenAI-style body (with Retry-After on 429)."""
    headers = {}
    retry = e.details.get("retry_after")
    if isinstance(retry, (int, float)):
        headers["Retry-After"] = str(max(1, math.ceil(retry)))
    return JSONResponse(e.to_payload(), status_code=e.status_code, headers=headers)

