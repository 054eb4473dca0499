"""Who is asking, how often and how much: keys → tenants and roles, limits, request metrics.

`GateMiddleware` is a plain ASGI middleware (not BaseHTTPMiddleware, which would get in the way
of streaming and of disconnect detection). Before the app sees a request it checks, in order:

- the body size (`ServerLimits.max_body_bytes`): 413 from the Content-Length header, before one
  byte of the body is read (a chunked body is read up to the limit, no further);
- on a server without keys bound to loopback, the Host header (a loopback name, or one the
  operator allowed): a web page elsewhere cannot reach it by DNS rebinding;
- the API key, when keys are configured (401), on every path but `/health`; failed attempts
  from one address are throttled (429 with Retry-After); each key's token bucket (429);
- state-changing requests: a body must be JSON (415), and on a server without keys an `Origin`
  header must be the server's own (403): a cross-site form or fetch cannot cancel or load.

It puts the tenant, the role and the acting key's name into `scope["state"]`, and counts every
request's status and latency. Roles: an `admin` key loads, unloads and names shared models and
reads `/metrics`; a `tenant` key uses what is loaded. A key with `name_tenants = true` speaks for
many tenants (the request names its tenant in `X-Realm-Tenant`): the runtime a Jupyter server
owns serves every notebook kernel with one secret, each notebook its own tenant; such a key
stands for the server's owner and is an admin unless `role = "tenant"`. A server without keys
has one user on loopback: every request is that user, an admin.

Keys in the keys file may be stored hashed (`[keys."sha256:<hex>"]`, what `realm-nb keys add`
writes): the server hashes what a client sends and compares digests.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import secrets
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import (
    AuthenticationError,
    InvalidRequestError,
    PermissionDeniedError,
    RateLimitError,
    RealmError,
    RequestTooLargeError,
    UnsupportedMediaTypeError,
)
from ..limits import TemplateBudget
from ..runtime import DEFAULT_TENANT, MAX_TENANT_CHARS
from .metrics import ServerMetrics

TENANT_HEADER = b"x-realm-tenant"
HASH_PREFIX = "sha256:"
OPEN_PATHS = ("/health",)  # answered without a key
ADMIN_PATHS = ("/metrics",)  # every tenant's traffic: admins only
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
STATE_CHANGING = ("POST", "PUT", "PATCH", "DELETE")
log = logging.getLogger("realm_nb.server")

Role = Literal["admin", "tenant"]
ROLES: tuple[str, ...] = ("admin", "tenant")


@dataclass(frozen=True)
class ServerLimits:
    """Every limit of the HTTP face, in one place (`create_app(limits=...)`, `realm-nb serve`)."""

    max_body_bytes: int = 4 * 1024 * 1024  # far above any prompt that fits a context
    template: TemplateBudget = field(default_factory=TemplateBudget)
    auth_failures: int = 10  # failed key attempts per address within auth_window_s ...
    auth_window_s: float = 60.0  # ... before that address waits (429)
    allowed_hosts: tuple[str, ...] = ()  # Host names a keyless loopback server also answers
    queue_grace_s: float = 0.25  # how long a new request may take to find the queue full
    queue_retry_after_s: float = 2.0  # Retry-After of a 503 for a full queue
    render_threads: int = 4  # chat templates rendering at once (each within its budget)


@dataclass(frozen=True)
class KeyConfig:
    """One API key: its tenant, role, rate (requests/s) and burst (bucket size)."""

    tenant: str
    rate: float | None = None  # None: no limit
    burst: int = 10
    name_tenants: bool = False  # may act as any tenant named in X-Realm-Tenant
    role: Role | None = None  # None: admin for a key that names tenants, else tenant

    def __post_init__(self) -> None:
        if self.role is None:
            object.__setattr__(self, "role", "admin" if self.name_tenants else "tenant")

    @property
    def admin(self) -> bool:
        return self.role == "admin"


def hash_key(key: str) -> str:
    """How a key is stored in the keys file: "sha256:" and the hex digest of its UTF-8 bytes.
    (A fast hash is enough for keys `realm-nb keys add` makes: 256 random bits each.)"""
    return HASH_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def load_keys(path: str | Path) -> dict[str, KeyConfig]:
    """Read the keys TOML: `[keys."sk-alice"] tenant = "alice"  rate = 5.0  burst = 10`
    (a key may be written hashed, `[keys."sha256:<hex>"]`; `role = "admin"` for admins)."""
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
            '[keys."sk-alice"] tenant = "alice" rate = 5.0 burst = 10, or run '
            "`realm-nb keys add --tenant alice`", param="api_keys")
    return {key: _key_config(key, spec if isinstance(spec, dict) else {})
            for key, spec in table.items()}


def _key_config(key: str, spec: dict[str, object]) -> KeyConfig:
    shown = key[:len(HASH_PREFIX) + 8] if key.startswith(HASH_PREFIX) else key[:6]

    def bad(name: str, rule: str) -> InvalidRequestError:
        return InvalidRequestError(f"key {shown}...: {name}={spec.get(name)!r} {rule}",
                                   param=name)

    if key.startswith(HASH_PREFIX):
        digest = key[len(HASH_PREFIX):]
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise InvalidRequestError(
                f"key {shown}...: a hashed key is 'sha256:' and 64 lowercase hex digits "
                "(`realm-nb keys hash KEY` prints it)", param="api_keys")
    tenant = spec.get("tenant", key)
    rate = spec.get("rate")
    burst = spec.get("burst", 10)
    name_tenants = spec.get("name_tenants", False)
    role = spec.get("role")
    if not isinstance(tenant, str) or not tenant or (key.startswith(HASH_PREFIX)
                                                     and "tenant" not in spec):
        raise bad("tenant", "must be a non-empty string (a hashed key must name its tenant)")
    if rate is not None and (not isinstance(rate, (int, float)) or isinstance(rate, bool)
                             or rate <= 0):
        raise bad("rate", "must be a number > 0")
    if not isinstance(burst, int) or isinstance(burst, bool) or burst < 1:
        raise bad("burst", "must be an integer >= 1")
    if not isinstance(name_tenants, bool):
        raise bad("name_tenants", "must be true or false")
    if role is not None and role not in ROLES:
        raise bad("role", f"must be one of {', '.join(ROLES)}")
    return KeyConfig(tenant=tenant, rate=None if rate is None else float(rate), burst=burst,
                     name_tenants=name_tenants, role=role)  # type: ignore[arg-type]


def new_key() -> str:
    """A fresh API key: 256 random bits."""
    return "sk-" + secrets.token_urlsafe(32)


def add_key(path: str | Path, *, tenant: str, role: Role = "tenant", rate: float | None = None,
            burst: int | None = None, name_tenants: bool = False) -> str:
    """Make a new key, append it *hashed* to the keys file (created owner-only), return it:
    the file never holds the key itself, so whoever reads the file cannot use it."""
    key = new_key()
    spec: dict[str, object] = {"tenant": tenant, "role": role, "name_tenants": name_tenants}
    if rate is not None:
        spec["rate"] = rate
    if burst is not None:
        spec["burst"] = burst
    digest = hash_key(key)
    _key_config(digest, spec)  # the same checks as when the server reads it
    p = Path(path)
    if p.exists():
        load_keys(p)  # never append to a file the server could not read
    lines = [f'[keys."{digest}"]', f"tenant = {json.dumps(tenant, ensure_ascii=False)}",
             f'role = "{role}"']
    if name_tenants:
        lines.append("name_tenants = true")
    if rate is not None:
        lines.append(f"rate = {float(rate)!r}")
    if burst is not None:
        lines.append(f"burst = {int(burst)}")
    fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(("\n" if p.stat().st_size else "") + "\n".join(lines) + "\n")
    return key


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


class FailureThrottle:
    """Failed key attempts per client address: past `limit` within `window_s`, that address
    waits until the oldest of them is `window_s` old (a valid key from it waits too)."""

    MAX_ADDRESSES = 4096  # remembered at once; the oldest is forgotten first

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self.failures: OrderedDict[str, deque[float]] = OrderedDict()
        self.lock = threading.Lock()

    def wait(self, address: str) -> float:
        """Seconds this address must still wait (0: it may try)."""
        with self.lock:
            times = self.failures.get(address)
            if times is None:
                return 0.0
            now = time.monotonic()
            while times and now - times[0] > self.window_s:
                times.popleft()
            if len(times) < self.limit:
                return 0.0
            return self.window_s - (now - times[0])

    def fail(self, address: str) -> None:
        with self.lock:
            times = self.failures.pop(address, None) or deque(maxlen=self.limit)
            times.append(time.monotonic())
            self.failures[address] = times
            while len(self.failures) > self.MAX_ADDRESSES:
                self.failures.popitem(last=False)


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


def _is_loopback_address(host: object) -> bool:
    try:
        return ipaddress.ip_address(str(host)).is_loopback
    except ValueError:
        return False


def _host_name(netloc: str) -> str:
    """'127.0.0.1:8080' → '127.0.0.1', '[::1]:80' → '::1', 'Example.COM' → 'example.com'."""
    try:
        return (urlsplit("//" + netloc).hostname or "").lower()
    except ValueError:
        return ""


class KeyTable:
    """The keys of a keys file, plain and hashed, and the lookup of a key a client sent (the
    gate's, and the Ray ingress's when it picks a tenant's replica: `ray_app`)."""

    def __init__(self, keys: dict[str, KeyConfig]) -> None:
        self.plain = [(k.encode(), c) for k, c in keys.items() if not k.startswith(HASH_PREFIX)]
        self.hashed = [(k.encode(), c) for k, c in keys.items() if k.startswith(HASH_PREFIX)]

    def find(self, given: str) -> KeyConfig | None:
        """The config of a key, comparing in constant time against every key (plain and hashed
        alike), so the time taken tells nothing of which keys exist."""
        found = None
        raw = given.encode()
        digest = hash_key(given).encode()
        for key, config in self.plain:
            if hmac.compare_digest(key, raw):
                found = config
        for key, config in self.hashed:
            if hmac.compare_digest(key, digest):
                found = config
        return found


@dataclass
class Caller:
    """Who a request is: its tenant, whether it sees every tenant, its role, and the key's name
    (the tenant the key file gives it; 'keyless' on a server without keys) for the audit."""

    tenant: str
    sees_all: bool
    admin: bool
    actor: str


class GateMiddleware:
    """Limits, authentication, roles and request metrics in front of the FastAPI app."""

    def __init__(self, app: ASGIApp, *, api_keys: dict[str, KeyConfig] | None,
                 metrics: ServerMetrics, limits: ServerLimits | None = None) -> None:
        self.app = app
        self.keys = dict(api_keys or {})
        self.metrics = metrics
        self.limits = limits or ServerLimits()
        self.table = KeyTable(self.keys)
        self.buckets = {id(c): TokenBucket(c.rate, c.burst) for c in self.keys.values()
                        if c.rate is not None}
        self.throttle = FailureThrottle(self.limits.auth_failures, self.limits.auth_window_s)
        self.hosts = {*LOOPBACK_NAMES, *(h.lower() for h in self.limits.allowed_hosts)}

    # ------------------------------------------------------------------ checks

    def caller(self, scope: Scope, headers: dict[bytes, bytes]) -> Caller:
        """Who this request is; raises AuthenticationError, PermissionDeniedError (a plain key
        naming another tenant) or RateLimitError (throttled address, or the key's bucket)."""
        named = named_tenant(headers)
        if not self.keys:
            return Caller(named or DEFAULT_TENANT, True, True, "keyless")
        address = str((scope.get("client") or ("unknown",))[0])
        wait = self.throttle.wait(address)
        if wait > 0:
            self.metrics.auth_failures.labels(reason="throttled").inc()
            raise RateLimitError(
                f"too many failed API key attempts from {address} ({self.throttle.limit} within "
                f"{self.throttle.window_s:g} s); retry in {wait:.0f} s", retry_after=wait,
                param="Authorization")
        given = bearer_key(headers)
        config = self.table.find(given) if given is not None else None
        if config is None:
            self.throttle.fail(address)
            self.metrics.auth_failures.labels(
                reason="missing" if given is None else "invalid").inc()
            raise AuthenticationError(
                "missing API key: send it as 'Authorization: Bearer KEY'" if given is None
                else "invalid API key", param="Authorization")
        bucket = self.buckets.get(id(config))
        if bucket is not None:
            wait = bucket.take()
            if wait > 0:
                raise RateLimitError(
                    f"rate limit of {bucket.rate:g} requests/s (burst {bucket.burst}) reached "
                    f"for this key; retry in {wait:.2f} s", retry_after=wait)
        if named is None or named == config.tenant:
            return Caller(config.tenant, config.name_tenants, config.admin, config.tenant)
        if not config.name_tenants:
            raise PermissionDeniedError(
                f"this API key acts as tenant {config.tenant!r} and may not act as "
                f"{named!r}; drop the X-Realm-Tenant header, or use a key with "
                "name_tenants = true", param="X-Realm-Tenant")
        return Caller(named, True, config.admin, config.tenant)

    def check_host(self, scope: Scope, headers: dict[bytes, bytes]) -> None:
        """A keyless server on loopback answers only requests addressed to a loopback name."""
        if self.keys or not _is_loopback_address((scope.get("server") or ("",))[0]):
            return
        host = headers.get(b"host", b"").decode("latin-1")
        if host and _host_name(host) not in self.hosts and not \
                _host_name(host).endswith(".localhost"):
            raise PermissionDeniedError(
                f"Host {host[:80]!r} is not allowed: this server has no API keys and listens on "
                "loopback, so it answers only requests addressed to localhost, 127.0.0.1 or "
                "[::1] (a web page elsewhere could reach it by DNS rebinding); use "
                "http://127.0.0.1:PORT, or start the server with --allowed-host NAME or "
                "--api-keys", param="Host")

    def check_state_change(self, scope: Scope, headers: dict[bytes, bytes]) -> None:
        """A state-changing request carries JSON (or nothing); on a keyless server it comes
        from no other web origin (a browser adds Origin to every cross-site POST)."""
        if scope.get("method") not in STATE_CHANGING:
            return
        origin = headers.get(b"origin")
        if origin is not None and not self.keys:
            own = headers.get(b"host", b"").decode("latin-1").lower()
            try:
                theirs = urlsplit(origin.decode("latin-1")).netloc.lower()
            except ValueError:
                theirs = "?"
            if theirs != own:
                raise PermissionDeniedError(
                    f"a cross-site request (Origin {origin[:80].decode('latin-1')!r}) may not "
                    "change this server's state: it has no API keys, so only programs on this "
                    "machine may use it (a web page may not); start it with --api-keys to serve "
                    "others", param="Origin")
        ctype = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip()
        length = headers.get(b"content-length")
        has_body = (length is not None and length.strip() not in (b"", b"0")) or \
            b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        is_json = ctype.lower() == "application/json" or ctype.lower().endswith("+json")
        if (has_body or ctype) and not is_json:
            raise UnsupportedMediaTypeError(
                f"Content-Type {ctype or 'none'!r}: send the request body as JSON "
                "(Content-Type: application/json)", param="Content-Type")

    def body_length(self, headers: dict[bytes, bytes]) -> int | None:
        raw = headers.get(b"content-length")
        if raw is None:
            return None
        try:
            return int(raw)
        except ValueError:
            raise InvalidRequestError(f"Content-Length {raw[:20]!r} is not a number",
                                      param="Content-Length") from None

    def too_large(self, size: int | str) -> RequestTooLargeError:
        return RequestTooLargeError(
            f"the request body has {size} bytes; this server accepts at most "
            f"{self.limits.max_body_bytes} (start it with --max-body-bytes to change that); a "
            "prompt that fits a model's context is far smaller", param="body")

    async def read_limited(self, receive: Receive) -> list[Message] | None:
        """A body without Content-Length, read up to the limit (None: it is larger)."""
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return messages
            size += len(message.get("body", b""))
            if size > self.limits.max_body_bytes:
                return None
            if not message.get("more_body", False):
                return messages

    # ------------------------------------------------------------------ the middleware

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
            headers = dict(scope.get("headers") or [])
            path = scope["path"]
            try:
                length = self.body_length(headers)
                if length is not None and length > self.limits.max_body_bytes:
                    # Answer now, before the body is read; the connection then closes, so the
                    # client's unread bytes go nowhere.
                    await error_response(self.too_large(length), close=True)(
                        scope, receive, send_wrapper)
                    return
                self.check_host(scope, headers)
                if path not in OPEN_PATHS and (self.keys or path.startswith("/v1/")):
                    caller = self.caller(scope, headers)
                    if path in ADMIN_PATHS and not caller.admin:
                        raise PermissionDeniedError(
                            f"{path} shows every tenant's traffic: it needs an admin key "
                            "(role = \"admin\" in the keys file)", param="Authorization")
                    state = scope.setdefault("state", {})
                    state["tenant"], state["sees_all_tenants"] = caller.tenant, caller.sees_all
                    state["caller"] = caller
                self.check_state_change(scope, headers)
            except RealmError as e:
                await error_response(e)(scope, receive, send_wrapper)
                return
            if length is None and scope.get("method") in STATE_CHANGING and \
                    b"chunked" in headers.get(b"transfer-encoding", b"").lower():
                body = await self.read_limited(receive)
                if body is None:
                    await error_response(self.too_large(f"more than {self.limits.max_body_bytes}"),
                                         close=True)(scope, receive, send_wrapper)
                    return
                receive = _replay(body, receive)
            try:
                await self.app(scope, receive, send_wrapper)
            except Exception as e:
                # A bug of ours. Answer the 500 here: past this middleware Starlette sends its
                # 500 and re-raises, and uvicorn then drops the keep-alive connection, so the
                # client's *next* request fails too (the SDK would report an unreachable server).
                if started["yes"]:
                    raise
                log.exception("internal error on %s %s", scope.get("method"), scope["path"])
                body_ = {"error": {"message": f"internal error: {type(e).__name__}: {e}",
                                   "type": "InternalServerError", "code": "internal_error",
                                   "param": None}}
                await JSONResponse(body_, status_code=500)(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or (
                scope["path"] if scope["path"] in ("/health", "/metrics") else "other")
            self.metrics.requests.labels(endpoint=endpoint, status=str(status["code"])).inc()
            self.metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - t0)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A receive that hands out messages already read, then goes on with the real one."""
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


def error_response(e: RealmError, *, close: bool = False) -> JSONResponse:
    """A RealmError as its HTTP status and OpenAI-style body (with Retry-After on 429/503)."""
    headers = {}
    retry = e.details.get("retry_after")
    if isinstance(retry, (int, float)):
        headers["Retry-After"] = str(max(1, math.ceil(retry)))
    if close:
        headers["Connection"] = "close"
    return JSONResponse(e.to_payload(), status_code=e.status_code, headers=headers)
