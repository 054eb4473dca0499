"""OpenAI's generation routes: /v1/completions and /v1/chat/completions, whole or streamed.

A stream is OpenAI's SSE: an opening chunk, one chunk per text piece, the closing chunk with the
finish reason, the usage chunk when `stream_options.include_usage` asks for it, then
`data: [DONE]`; an error after the stream started becomes an error event.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request

from ..types import Generation
from .bodies import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
    chat_body,
    chat_chunk,
    chat_logprobs,
    completion_body,
    completion_chunk,
    completion_logprobs,
    usage_chunk,
)
from .context import CallerDep, ContextDep
from .streaming import SSE_DONE, Pump, error_payload, sse, sse_response

router = APIRouter(tags=["openai"])


async def openai_events(pump: Pump, *, first: dict[str, Any] | None,
                        piece: Callable[[str], dict[str, Any]],
                        last: Callable[[Generation], dict[str, Any]],
                        usage: Callable[[Generation], dict[str, Any] | None],
                        ) -> AsyncIterator[str]:
    """OpenAI's SSE stream of `pump`, each chunk built by `first`, `piece`, `last`, `usage`."""
    if first is not None:
        yield sse(first)
    async for item in pump.events():
        if isinstance(item, dict):  # progress: realm's own stream shows it, OpenAI's has no place
            continue
        if isinstance(item, str):
            yield sse(piece(item))
        elif item.error is not None:
            yield sse(error_payload(item.error))
        elif item.generation is not None:
            yield sse(last(item.generation))
            extra = usage(item.generation)
            if extra is not None:
                yield sse(extra)
    yield SSE_DONE


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request, ctx: ContextDep,
                      caller: CallerDep) -> Any:
    params = body.sampling(COMPLETIONS_DEFAULT_MAX_TOKENS)
    prompt = body.single_prompt()
    pump = await ctx.start(caller, request, body.model, prompt, None, params, echo=body.echo,
                           logprobs=body.logprobs)
    rid = pump.stream.request_id
    codec = ctx.kernel.model(pump.stream.model).codec

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
    return sse_response(openai_events(
        pump, first=head,
        piece=lambda text: completion_chunk(rid, model, created, text),
        last=lambda g: completion_chunk(rid, model, created, "", g.finish_reason,
                                        logprobs_of(g)),
        usage=lambda g: usage_chunk(rid, model, created, "text_completion", g)
        if body.include_usage else None), rid)


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request, ctx: ContextDep,
                           caller: CallerDep) -> Any:
    params = body.chat_sampling()
    pump = await ctx.start(caller, request, body.model, None, body.plain_messages(), params,
                           logprobs=body.chat_logprobs())
    rid = pump.stream.request_id
    if not body.stream:
        return chat_body(rid, await pump.result(request))

    created, model = int(time.time()), pump.stream.model
    return sse_response(openai_events(
        pump, first=chat_chunk(rid, model, created, {"role": "assistant", "content": ""}),
        piece=lambda text: chat_chunk(rid, model, created, {"content": text}),
        last=lambda g: chat_chunk(rid, model, created, {}, g.finish_reason, chat_logprobs(g)),
        usage=lambda g: usage_chunk(rid, model, created, "chat.completion.chunk", g)
        if body.include_usage else None), rid)
