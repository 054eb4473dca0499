"""The OpenAI dialect of the server: request bodies in, response and chunk bodies out.

Request models are pydantic (strict types, unknown fields allowed and ignored) so that FastAPI
documents them in the OpenAPI schema; ranges are checked once, by `SamplingParams`. Response
builders turn a kernel `Generation` into OpenAI's `text_completion` / `chat.completion` shapes.
"""

from __future__ import annotations

import os
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..errors import InvalidRequestError
from ..types import Generation, SamplingParams, TokenLogprob, WeightLayout

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


# ------------------------------------------------------------------------------ request bodies


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingFields(_Body):
    """OpenAI's sampling fields plus realm-nb's own (top_k, min_p, repeat_penalty/window)."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    repeat_window: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def sampling(self, default_max_tokens: int | None = None) -> SamplingParams:
        """The SamplingParams of this body (realm-nb's defaults for fields left out)."""
        if self.n != 1:
            raise InvalidRequestError(f"n={self.n} is not supported: realm-nb returns one choice "
                                      "per request (n=1); send several requests instead",
                                      param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value not in (None, 0, 0.0):
                raise InvalidRequestError(
                    f"{name}={value} is not supported; use repeat_penalty (multiplicative, "
                    "over the last repeat_window tokens) instead", param=name)
        if self.logit_bias:
            raise InvalidRequestError("logit_bias is not supported", param="logit_bias")
        fields: dict[str, Any] = {}
        for name in ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repeat_penalty",
                     "repeat_window", "seed"):
            value = getattr(self, name)
            if value is not None:
                fields[name] = value
        if "max_tokens" not in fields and default_max_tokens is not None:
            fields["max_tokens"] = default_max_tokens
        if self.stop is not None:
            fields["stop"] = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        return SamplingParams(**fields)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(default=None, description="top alternatives per token, 0..20")
    best_of: int | None = None
    suffix: str | None = None

    def single_prompt(self) -> str | list[int]:
        if self.best_of not in (None, 1):
            raise InvalidRequestError(f"best_of={self.best_of} is not supported (only 1)",
                                      param="best_of")
        if self.suffix:
            raise InvalidRequestError("suffix (insertion) is not supported", param="suffix")
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise InvalidRequestError(
                    f"prompt holds {len(p)} prompts; realm-nb completes one prompt per request",
                    param="prompt")
            return p[0]
        return p  # type: ignore[return-value]


class ChatMessage(_Body):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None

    def plain_messages(self) -> list[dict[str, Any]]:
        """Messages as the chat template wants them: role and text content."""
        if self.tools:
            raise InvalidRequestError("tools / function calling is not supported", param="tools")
        out = []
        for i, m in enumerate(self.messages):
            content = m.content
            if isinstance(content, list):
                texts = []
                for part in content:
                    if part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise InvalidRequestError(
                            f"messages[{i}].content has a part of type {part.get('type')!r}; "
                            "only text parts are supported", param=f"messages[{i}].content")
                    texts.append(part["text"])
                content = "".join(texts)
            out.append({"role": m.role, "content": content or ""})
        return out

    def chat_sampling(self) -> SamplingParams:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self.sampling()

    def chat_logprobs(self) -> int | None:
        if not self.logprobs:
            if self.top_logprobs:
                raise InvalidRequestError("top_logprobs needs logprobs=true",
                                          param="top_logprobs")
            return None
        return self.top_logprobs or 0


class LoadModelRequest(_Body):
    """POST /v1/models/load: a catalogue name or a .gguf file under the server's model folders."""

    model: str
    name: str | None = None
    weights: WeightLayout | None = None


class UnloadModelRequest(_Body):
    model: str


class RealmGenerateRequest(_Body):
    """POST /v1/realm/generate: the SDK's own call; answers with a whole `Generation`."""

    model: str | None = None
    prompt: str | list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    echo: bool = False
    logprobs: int | None = None
    weights: WeightLayout | None = None
    stream: bool = False

    def sampling(self) -> SamplingParams:
        p = dict(self.params)  # SamplingParams normalises and checks stop
        unknown = sorted(set(p) - set(SamplingParams.__dataclass_fields__))
        if unknown:
            raise InvalidRequestError(f"unknown sampling parameter(s) {unknown}",
                                      param=unknown[0])
        return SamplingParams(**p)


# ------------------------------------------------------------------------------ responses


def usage(g: Generation) -> dict[str, int]:
    return {"prompt_tokens": g.usage.get("prompt_tokens", len(g.prompt_ids)),
            "completion_tokens": g.usage.get("completion_tokens", len(g.token_ids)),
            "total_tokens": g.usage.get("total_tokens", len(g.prompt_ids) + len(g.token_ids))}


def completion_logprobs(g: Generation, *, echo: bool, first_prompt_token: str,
                        offset: int) -> dict[str, Any] | None:
    """OpenAI's legacy logprobs: tokens, token_logprobs, top_logprobs, text_offset.

    With echo the prompt's tokens come first; the very first one has no logprob (null).
    """
    if g.logprobs is None:
        return None
    scored: list[TokenLogprob] = list(g.logprobs)
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top: list[dict[str, float] | None] = []
    if echo:
        tokens.append(first_prompt_token)
        token_logprobs.append(None)
        top.append(None)
    for s in scored:
        tokens.append(s.token)
        token_logprobs.append(s.logprob)
        top.append({t.token: t.logprob for t in s.top})
    text_offset = []
    pos = offset
    for t in tokens:
        text_offset.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top,
            "text_offset": text_offset}


def chat_logprobs(g: Generation) -> dict[str, Any] | None:
    """OpenAI's chat logprobs: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    if g.logprobs is None:
        return None
    return {"content": [
        {"token": s.token, "logprob": s.logprob, "bytes": list(s.token.encode()),
         "top_logprobs": [{"token": t.token, "logprob": t.logprob,
                           "bytes": list(t.token.encode())} for t in s.top]}
        for s in g.logprobs]}


def openai_finish_reason(reason: str | None) -> str | None:
    """OpenAI's finish_reason for ours: its enum has no "cancelled", and a request stopped early
    ended at a stop point of the caller's choosing, so it says "stop" (the Realm endpoints keep
    "cancelled")."""
    return "stop" if reason == "cancelled" else reason


def completion_body(rid: str, g: Generation, text: str,
                    logprobs: dict[str, Any] | None) -> dict[str, Any]:
    return {"id": f"cmpl-{rid}", "object": "text_completion", "created": int(time.time()),
            "model": g.model, "system_fingerprint": None,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs,
                         "finish_reason": openai_finish_reason(g.finish_reason)}],
            "usage": usage(g)}


def chat_body(rid: str, g: Generation) -> dict[str, Any]:
    return {"id": f"chatcmpl-{rid}", "object": "chat.completion", "created": int(time.time()),
            "model": g.model, "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": g.text},
                         "logprobs": chat_logprobs(g),
                         "finish_reason": openai_finish_reason(g.finish_reason)}],
            "usage": usage(g)}


def completion_chunk(rid: str, model: str, created: int, text: str,
                     finish_reason: str | None = None,
                     logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": f"cmpl-{rid}", "object": "text_completion", "created": created,
            "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs,
                         "finish_reason": openai_finish_reason(finish_reason)}]}


def chat_chunk(rid: str, model: str, created: int, delta: dict[str, Any],
               finish_reason: str | None = None,
               logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": f"chatcmpl-{rid}", "object": "chat.completion.chunk", "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs,
                         "finish_reason": openai_finish_reason(finish_reason)}]}


def usage_chunk(rid: str, model: str, created: int, obj: str, g: Generation) -> dict[str, Any]:
    prefix = "chatcmpl" if obj.startswith("chat") else "cmpl"
    return {"id": f"{prefix}-{rid}", "object": obj, "created": created, "model": model,
            "choices": [], "usage": usage(g)}


def model_entry(info: Any, *, admin: bool) -> dict[str, Any]:
    """One row of GET /v1/models: OpenAI's model object plus realm-nb's fields. Where the file
    lives on the server is the admin's business: other callers get `path` null (and no alias
    that is a path) and only whether a file is there (`on_disk`)."""
    return {"id": info.name, "object": "model", "created": 0, "owned_by": "realm-nb",
            "content_id": info.id, "arch": info.arch, "quant": info.quant,
            "size": info.size_bytes, "loaded": info.loaded,
            "path": info.path if admin else None, "on_disk": bool(info.path),
            "weights": info.weights,
            "aliases": [a for a in info.aliases if admin or not os.path.isabs(a)],
            "resident_bytes": info.resident_bytes, "source": info.source}
