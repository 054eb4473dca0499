"""The host side of emit: incremental detokenization, UTF-8 held back, stop strings."""

from __future__ import annotations

import threading

import pytest

from realm_nb.host import RequestHost
from realm_nb.scheduler import Sequence
from realm_nb.types import SamplingParams

pytestmark = pytest.mark.slow  # the real SmolLM2 (the shared kernel)

TEXT = "Caf\u00e9 \U0001f389 party: \u65e5\u672c\u8a9e and \U0001f600\U0001f600 done."


def make_host(kernel, stop=(), max_tokens=1000):
    entry = kernel.model("smollm2-135m")
    pieces: list[str] = []
    host = RequestHost(store=kernel.store, entry=entry, scheduler=kernel.scheduler(entry),
                       seq=Sequence(0, "test", 0), prompt_ids=[1], params=SamplingParams(
                           max_tokens=max_tokens, stop=stop), logprobs=None, echo=False,
                       on_text=pieces.append, cancel_event=threading.Event())
    return host, pieces, entry.codec


def feed(host, ids):
    """Emit ids one by one as the guest would; True when the host said stop."""
    return any(host.emit(t) == 1 for t in ids)


def test_multibyte_characters_split_across_tokens_never_stream_replacement_chars(kernel):
    host, pieces, codec = make_host(kernel)
    ids = codec.encode(TEXT)
    assert len(ids) > len(TEXT.split())  # the emoji and CJK take several byte-level tokens
    assert not feed(host, ids)
    host.finish_text()
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == host.text == codec.decode(ids) == TEXT


@pytest.mark.parametrize("stop", ["\U0001f389", "party: \u65e5", "\u672c\u8a9e and"])
def test_stop_strings_spanning_tokens_cut_the_text_and_never_stream(kernel, stop):
    host, pieces, codec = make_host(kernel, stop=(stop,))
    assert feed(host, codec.encode(TEXT))
    assert host.finish_reason == "stop"
    assert host.text == TEXT[: TEXT.index(stop)]
    assert "".join(pieces) == host.text


def test_stop_string_at_the_very_start_gives_empty_text(kernel):
    host, pieces, codec = make_host(kernel, stop=("Caf",))
    assert feed(host, codec.encode(TEXT))
    assert (host.text, "".join(pieces), host.finish_reason) == ("", "", "stop")


def test_max_tokens_ends_with_length_and_the_settled_text(kernel):
    host, pieces, codec = make_host(kernel, max_tokens=3)
    ids = codec.encode(TEXT)
    assert feed(host, ids)
    assert host.finish_reason == "length"
    assert host.text == codec.decode(ids[:3]) == "".join(pieces)


def test_a_cut_inside_a_character_drops_the_partial_character(kernel):
    host, pieces, codec = make_host(kernel, max_tokens=1)
    ids = codec.encode("\U0001f389")
    assert len(ids) > 1  # the emoji spans several byte-level tokens
    assert feed(host, ids)
    assert host.finish_reason == "length"
    assert host.text == "" == "".join(pieces)
