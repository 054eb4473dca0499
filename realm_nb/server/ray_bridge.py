"""HTTP across a Ray Serve handle: the ingress hands each request, whole, to a runtime replica,
which runs it through the very app `realm-nb serve` runs and streams the ASGI messages back.

Why messages and not a higher-level call: every endpoint (OpenAI's, realm-nb's, /metrics, the
errors' bodies, SSE) then behaves as on one machine, the gate included, with no second copy of
any route. A request is small (headers and a body the gate's limit bounds); the answer is a
stream: the response start, then body parts as the app sends them (one SSE event each while a
generation streams).

The two ends:

- `asgi_messages` (in the replica): runs the app on one request and yields its messages. When the
  caller goes away (the ingress cancels the call: the client left), the app sees
  `http.disconnect`, as under uvicorn, which cancels the generation and frees its KV slot.
- `relay` (in the ingress): sends those messages on to the client. If the replica dies first,
  the client gets a `ReplicaLostError` body instead: a 503 while no byte of the answer has gone
  out, else, in an event stream, an error event and `[DONE]`, as the server ends any stream
  that fails after it started.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import RealmError, ReplicaLostError
from .auth import error_response
from .streaming import SSE_DONE, error_payload, sse

REPLICA_HEADER = b"x-realm-replica"  # which replica answered (its Ray Serve replica id)
DRAIN_S = 5.0  # how long a replica's app may take to wind up a request whose caller left


@dataclass
class WireRequest:
    """One HTTP request as it crosses from the ingress to a replica (picklable)."""

    method: str
    path: str
    raw_path: bytes
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    client: tuple[str, int] | None
    server: tuple[str, int] | None
    scheme: str
    http_version: str
    body: bytes

    @classmethod
    def from_scope(cls, scope: Scope, body: bytes) -> WireRequest:
        client, server = scope.get("client"), scope.get("server")
        return cls(method=scope["method"], path=scope["path"],
                   raw_path=scope.get("raw_path") or scope["path"].encode(),
                   query_string=scope.get("query_string", b""),
                   headers=[(bytes(k), bytes(v)) for k, v in scope.get("headers") or []],
                   client=(str(client[0]), int(client[1])) if client else None,
                   server=(str(server[0]), int(server[1] or 0)) if server else None,
                   scheme=scope.get("scheme", "http"),
                   http_version=scope.get("http_version", "1.1"), body=body)

    def scope(self) -> Scope:
        # No "spec_version": Starlette's StreamingResponse then listens for http.disconnect,
        # which is how a caller that left reaches the app here (see `asgi_messages`).
        return {"type": "http", "asgi": {"version": "3.0"}, "http_version": self.http_version,
                "method": self.method, "scheme": self.scheme, "path": self.path,
                "raw_path": self.raw_path, "root_path": "", "query_string": self.query_string,
                "headers": self.headers, "client": self.client, "server": self.server,
                "state": {}}


# ------------------------------------------------------------------------------ replica side


async def asgi_messages(app: ASGIApp, request: WireRequest,
                        replica: str) -> AsyncGenerator[Message, None]:
    """Run `app` on `request` and yield its response messages, the start stamped with
    `replica`; closing the generator early is the client leaving."""
    queue: asyncio.Queue[Message | None] = asyncio.Queue()
    gone = asyncio.Event()
    body = [request.body]

    async def receive() -> Message:
        if body:
            return {"type": "http.request", "body": body.pop(), "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [*message.get("headers", []), (REPLICA_HEADER, replica.encode())]
            message = {**message, "headers": headers}
        await queue.put(message)

    async def run() -> None:
        try:
            await app(request.scope(), receive, send)
        finally:
            queue.put_nowait(None)

    task = asyncio.ensure_future(run())
    try:
        while (message := await queue.get()) is not None:
            yield message
        await task  # the app's own failure, if any, reaches the ingress
    finally:
        if not task.done():
            gone.set()  # the app cancels the generation on http.disconnect ...
            with contextlib.suppress(asyncio.TimeoutError, Exception):
                await asyncio.wait_for(asyncio.shield(task), DRAIN_S)
            task.cancel()  # ... and one that does not wind up in time stops here


# ------------------------------------------------------------------------------ ingress side


async def read_body(receive: Receive, limit: int) -> bytes | None:
    """The request body, at most `limit` bytes of it (the replica's gate refuses a longer one
    by what it sees: Content-Length, or a chunked body past its limit); None if the client left."""
    parts: list[bytes] = []
    size = 0
    while size < limit:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        part = message.get("body", b"")
        parts.append(part)
        size += len(part)
        if not message.get("more_body", False):
            break
    return b"".join(parts)[:limit]


async def on_disconnect(receive: Receive, gone: Callable[[], Any]) -> None:
    """Call `gone` when the client disconnects (after its body has been read)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    gone()


def replica_lost(error: BaseException) -> ReplicaLostError:
    return ReplicaLostError(
        "the realm-nb replica running this request stopped before it ended (its Ray actor "
        f"died or cannot be reached: {type(error).__name__}); the request is lost, retry it: "
        "a live replica takes this tenant now")


async def relay(messages: AsyncIterator[Message], scope: Scope, receive: Receive, send: Send,
                is_lost: Callable[[BaseException], bool]) -> None:
    """Send a replica's response messages on to the client; a replica lost on the way (as
    `is_lost` tells its exception) becomes a clear ReplicaLostError body (module docstring)."""
    start: Message | None = None  # held until the first body part: a 503 is possible till then
    started = event_stream = False
    try:
        async for message in messages:
            if message["type"] == "http.response.start":
                start = message
                ctype = dict(message.get("headers") or []).get(b"content-type", b"")
                event_stream = ctype.startswith(b"text/event-stream")
                continue
            if start is not None and not started:
                await send(start)
                started = True
            await send(message)
    except Exception as e:
        error: RealmError | BaseException = replica_lost(e) if is_lost(e) else e
        if not started:
            await _whole_error(error)(scope, receive, send)
        elif event_stream:
            tail = sse(error_payload(error)) + SSE_DONE
            await send({"type": "http.response.body", "body": tail.encode(), "more_body": False})
        else:  # a plain body cut short: the client sees it end early, nothing more can be said
            await send({"type": "http.response.body", "body": b"", "more_body": False})


def _whole_error(error: BaseException) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    if isinstance(error, RealmError):
        return error_response(error)
    from fastapi.responses import JSONResponse

    return JSONResponse(error_payload(error), status_code=500)
