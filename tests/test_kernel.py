"""RealmKernel through the SDK on the real model: logprobs and echo, chat templates, listings."""

from __future__ import annotations

import math
import time

import pytest

from realm_nb.errors import InvalidRequestError
from realm_nb.kernel import RealmKernel
from realm_nb.sdk import Realm
from realm_nb.types import Generation, SamplingParams

pytestmark = pytest.mark.slow  # the real SmolLM2 (the shared kernel)

MODEL = "smollm2-135m"
PROMPT = [504, 3575, 282, 4649, 314]  # "The capital of France is"
K = 3


def realm() -> Realm:
    return Realm(mode="local", default_model=MODEL, tenant="kernel-tests")


def _check_entry_top(entry_logprob: float, token_id: int, top: tuple) -> None:
    assert len(top) == K
    lps = [t.logprob for t in top]
    assert lps == sorted(lps, reverse=True)
    assert all(t.logprob <= 0 for t in top)
    assert top[0].logprob >= entry_logprob - 1e-9  # nothing beats the best
    for t in top:
        if t.token_id == token_id:
            assert math.isclose(t.logprob, entry_logprob, abs_tol=1e-6)


def test_logprobs_score_each_generated_token(kernel: RealmKernel) -> None:
    g = realm().generate(PROMPT, max_tokens=4, temperature=0, logprobs=K)
    assert isinstance(g, Generation) and g.logprobs is not None
    assert len(g.logprobs) == len(g.token_ids) == 4
    for entry, tok in zip(g.logprobs, g.token_ids, strict=True):
        assert entry.token_id == tok
        _check_entry_top(entry.logprob, tok, entry.top)
        assert entry.top[0].token_id == tok  # greedy picks the likeliest


def test_echo_scores_the_prompt_but_not_its_first_token(kernel: RealmKernel) -> None:
    g = realm().generate(PROMPT, max_tokens=3, temperature=0, logprobs=K, echo=True)
    assert isinstance(g, Generation) and g.logprobs is not None
    scored = g.prompt_ids[1:] + g.token_ids  # the first prompt token has no context to score
    assert [e.token_id for e in g.logprobs] == scored
    for entry in g.logprobs:
        _check_entry_top(entry.logprob, entry.token_id, entry.top)
    # the same generated tokens score the same with and without echo
    plain = realm().generate(PROMPT, max_tokens=3, temperature=0, logprobs=K)
    assert isinstance(plain, Generation) and plain.logprobs is not None
    for a, b in zip(g.logprobs[len(PROMPT) - 1:], plain.logprobs, strict=True):
        assert a.token_id == b.token_id and math.isclose(a.logprob, b.logprob, abs_tol=1e-3)


def test_no_logprobs_unless_asked(kernel: RealmKernel) -> None:
    g = realm().generate(PROMPT, max_tokens=2, temperature=0)
    assert isinstance(g, Generation) and g.logprobs is None


def test_chat_uses_the_gguf_template(kernel: RealmKernel) -> None:
    g = realm().chat([{"role": "user", "content": "Say hi."}], max_tokens=4, temperature=0)
    assert isinstance(g, Generation)
    assert g.prompt_ids[0] == 1  # <|im_start|>
    assert isinstance(g.prompt, str)
    assert "<|im_start|>user\nSay hi.<|im_end|>" in g.prompt
    assert g.prompt.endswith("<|im_start|>assistant\n")
    assert 0 < len(g.token_ids) <= 4


def test_models_lists_smollm2(kernel: RealmKernel) -> None:
    # one row per registered layout (another test may have registered "exact" too)
    rows = [m for m in realm().models()
            if m.name == MODEL and m.weights == kernel.store.default_layout]
    assert len(rows) == 1
    info = rows[0]
    assert (info.arch, info.quant, info.loaded) == ("llama", "Q4_1", True)
    assert info.size_bytes and info.size_bytes > 90_000_000


def test_cancel_while_waiting_for_a_slot_ends_cancelled(kernel: RealmKernel) -> None:
    """A request cancelled before it got a KV-cache slot still ends with a Generation."""
    entry = kernel.model(MODEL)
    sched = kernel.scheduler(entry)
    hogs = [sched.open(f"hog-{i}") for i in range(kernel.store.n_slots)]  # one slot each
    try:
        s = kernel.generate(tenant="kernel-tests", model=MODEL, prompt="Hi",
                            params=SamplingParams(max_tokens=4, temperature=0))
        deadline = time.monotonic() + 10
        while sched.queue_depth == 0 and time.monotonic() < deadline:
            time.sleep(0.01)  # it waits in the slot queue
        s.cancel()
        g = s.result(timeout=10)  # was an AssertionError: neither a generation nor an error
        assert g.finish_reason == "cancelled" and g.text == "" and g.token_ids == []
        assert g.usage["prompt_tokens"] == len(g.prompt_ids) > 0
        assert list(s) == []
    finally:
        for seq in hogs:
            sched.close(seq)
    assert sched.open_sequences == 0
    assert kernel.running("kernel-tests") == []
    assert entry.in_use == 0


@pytest.mark.parametrize("name", [3, None, "", "  "])
def test_model_name_must_be_a_string(kernel: RealmKernel, name: object) -> None:
    with pytest.raises(InvalidRequestError, match="model="):
        kernel.generate(tenant="kernel-tests", model=name, prompt="Hi",  # type: ignore[arg-type]
                        params=SamplingParams(max_tokens=1))
    with pytest.raises(InvalidRequestError, match="model="):
        kernel.load_model(name)  # type: ignore[arg-type]


def test_lone_surrogate_prompt_is_an_invalid_request(kernel: RealmKernel) -> None:
    with pytest.raises(InvalidRequestError, match="surrogate"):
        kernel.generate(tenant="kernel-tests", model=MODEL, prompt="a\ud800b",
                        params=SamplingParams(max_tokens=1))


def test_in_use_counts_a_request_from_its_start(kernel: RealmKernel) -> None:
    entry = kernel.model(MODEL)
    s = kernel.generate(tenant="kernel-tests", model=MODEL, prompt="Hi",
                        params=SamplingParams(max_tokens=2, temperature=0))
    assert entry.in_use >= 1  # before the request's thread has run: an unload must wait
    s.result()
    assert entry.in_use == 0
