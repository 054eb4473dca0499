"""What goes on the wire: strict JSON, Server-Sent Events, and the pump that carries a kernel
stream's pieces from its thread into the event loop.

JSON never carries NaN or infinities: a logprob of -inf is sent as -9999.0 (OpenAI's floor), NaN
as null. A consumer that stops reading a stream early cancels its generation, and a client that
goes away before a whole answer is sent cancels it too, which frees its KV-cache slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..errors import QueueFullError, RealmError
from ..types import Generation

if TYPE_CHECKING:
    from ..kernel import GenerationStream

LOGPROB_FLOOR = -9999.0  # what OpenAI sends for a token the model rules out (logprob -inf)
SSE_DONE = "data: [DONE]\n\n"


# ------------------------------------------------------------------------------ strict JSON


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


def error_payload(e: BaseException) -> dict[str, Any]:
    """The OpenAI-style error body of `e` (a bug of ours is an InternalServerError)."""
    if isinstance(e, RealmError):
        return e.to_payload()
    return {"error": {"message": f"internal error: {type(e).__name__}: {e}",
                      "type": "InternalServerError", "code": "internal_error", "param": None}}


# ------------------------------------------------------------------------------ SSE


def sse(obj: Any) -> str:
    """One Server-Sent Event carrying `obj` as strict JSON."""
    return f"data: {json_text(obj)}\n\n"


def sse_response(events: AsyncIterator[str], rid: str) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Realm-Request-Id": rid})


# ------------------------------------------------------------------------------ kernel → event loop


@dataclass
class End:
    """The last item of a pump: the whole generation, or the error that ended it."""

    generation: Generation | None = None
    error: BaseException | None = None


Item = str | End | dict[str, Any]  # a text piece, the end, or a progress event (cold start)


class Pump:
    """Moves a kernel stream's text pieces into the event loop from a thread of its own."""

    def __init__(self, stream: GenerationStream, on_done: Callable[[Generation], None]) -> None:
        self.stream = stream
        self.on_done = on_done
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Item] = asyncio.Queue()
        self.head: list[Item] = []  # looked at, not yet handed out
        stream.on_progress = self._post  # cold-start events (dicts), before the first piece
        threading.Thread(target=self._run, name=f"realm-http-{stream.request_id}",
                         daemon=True).start()

    def _run(self) -> None:
        end = End()
        try:
            for piece in self.stream:
                self._post(piece)
            end.generation = self.stream.generation
        except BaseException as e:  # handed to the request, never lost in this thread
            end.error = e
        if end.generation is not None:
            self.on_done(end.generation)
        self._post(end)

    def _post(self, item: Item) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody listens any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def _next(self) -> Item:
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
            if isinstance(item, End) and isinstance(item.error, QueueFullError):
                raise item.error
            if not isinstance(item, dict):
                return

    async def events(self) -> AsyncIterator[Item]:
        """Pieces (and progress dicts), then one End. If the consumer stops early, the
        generation is cancelled."""
        try:
            while True:
                item = await self._next()
                yield item
                if isinstance(item, End):
                    return
        finally:
            self.stream.cancel()  # a no-op once it has finished

    async def result(self, request: Request) -> Generation:
        """Wait for the end, cancelling the generation as soon as the client disconnects."""
        watcher = asyncio.ensure_future(on_disconnect(request, self.stream.cancel))
        try:
            while True:
                item = await self._next()
                if isinstance(item, dict):
                    continue
                if isinstance(item, End):
                    if item.error is not None:
                        raise item.error
                    assert item.generation is not None
                    return item.generation
        finally:
            watcher.cancel()
            self.stream.cancel()


async def on_disconnect(request: Request, gone: Callable[[], None]) -> None:
    """Call `gone` when the client disconnects. Only for a request whose body has been read
    and whose response has not started (a StreamingResponse listens for itself)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            gone()
            return
