"""The OpenAI dialect's response builders: what a cancelled request says to an OpenAI client."""

from __future__ import annotations

from realm_nb.server.bodies import (
    chat_body,
    chat_chunk,
    completion_body,
    completion_chunk,
    openai_finish_reason,
)
from realm_nb.types import Generation

# OpenAI's finish_reason values (completions and chat completions)
OPENAI_FINISH_REASONS = {"stop", "length", "content_filter", "tool_calls", "function_call"}


def _generation(finish: str) -> Generation:
    return Generation(text="Once", token_ids=[1], prompt="p", prompt_ids=[2],
                      finish_reason=finish, model="m",  # type: ignore[arg-type]
                      usage={"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2})


def test_a_cancelled_request_ends_with_one_of_openais_finish_reasons() -> None:
    g = _generation("cancelled")
    reasons = [completion_body("r", g, g.text, None)["choices"][0]["finish_reason"],
               chat_body("r", g)["choices"][0]["finish_reason"],
               completion_chunk("r", "m", 0, "", g.finish_reason)["choices"][0]["finish_reason"],
               chat_chunk("r", "m", 0, {}, g.finish_reason)["choices"][0]["finish_reason"]]
    assert reasons == ["stop"] * 4
    assert set(reasons) <= OPENAI_FINISH_REASONS
    assert g.finish_reason == "cancelled", "the Generation (and the Realm endpoints) keep it"


def test_other_finish_reasons_pass_as_they_are() -> None:
    assert openai_finish_reason("length") == "length"
    assert openai_finish_reason("stop") == "stop"
    assert openai_finish_reason(None) is None  # a chunk before the last
