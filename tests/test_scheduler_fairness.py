"""Fairness between tenants in realm_nb.scheduler: slot shares, the order a freed slot is handed
out in, and long prompts advancing a chunk at a time between other tenants' decode steps.

The slot policy is checked on the scheduler alone (it needs no engine until a forward runs); the
chunked prefill on the tiny GGUF model against the float64 numpy forward.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import NoReturn

import numpy as np
import pytest
from test_kvcache import _ids, tiny, tiny_engine  # noqa: F401  (tiny is a fixture)
from test_model import assert_close, reference_logits
from tiny_gguf import TinyModel

from realm_nb import scheduler as scheduler_mod
from realm_nb.errors import QueueFullError
from realm_nb.scheduler import Scheduler


def _no_engine() -> NoReturn:
    raise AssertionError("no forward runs in these tests")


def _open_in_thread(sched: Scheduler, tenant: str) -> tuple[threading.Thread, list]:
    got: list = []
    t = threading.Thread(target=lambda: got.append(sched.open(tenant)), daemon=True)
    t.start()
    return t, got


def _wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.005)


def test_one_tenant_cannot_take_every_slot() -> None:
    sched = Scheduler(_no_engine, 4, name="share")  # default share: all slots but one
    assert sched.tenant_slots == 3
    held = [sched.open("greedy") for _ in range(3)]
    t, got = _open_in_thread(sched, "greedy")  # a fourth of its own waits...
    _wait_until(lambda: sched.waiting == 1)
    assert not got
    other = sched.open("polite")  # ...while another tenant gets the free slot at once
    assert other.slot not in {s.slot for s in held}
    sched.close(held[0])  # the greedy tenant's waiter goes on when it is under its share again
    t.join(5)
    assert got and got[0].tenant == "greedy"


def test_a_freed_slot_goes_to_the_tenant_holding_fewest() -> None:
    sched = Scheduler(_no_engine, 2, name="order", tenant_slots=2)
    a = [sched.open("a"), sched.open("a")]
    ta, got_a = _open_in_thread(sched, "a")  # waits first
    _wait_until(lambda: sched.waiting == 1)
    tb, got_b = _open_in_thread(sched, "b")  # waits second, but holds nothing
    _wait_until(lambda: sched.waiting == 2)
    sched.close(a[0])
    tb.join(5)
    assert got_b and not got_a  # b was served first although a waited longer
    sched.close(a[1])
    ta.join(5)
    assert got_a


def test_queue_limit_counts_waiters_of_every_tenant() -> None:
    sched = Scheduler(_no_engine, 1, name="full", max_queue=1, tenant_slots=1)
    sched.open("a")
    _open_in_thread(sched, "b")
    _wait_until(lambda: sched.waiting == 1)
    with pytest.raises(QueueFullError, match="queue limit 1"):
        sched.open("c")
    assert sched.queue_depth == 1


def test_a_long_prompt_lets_other_tenants_decode_between_its_chunks(
        tiny: TinyModel, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.setattr(scheduler_mod, "PREFILL_CHUNK", 16)
    monkeypatch.setattr(scheduler_mod, "PREFILL_BUDGET_S", 0.0)  # one chunk per round
    engine = tiny_engine(tiny.path)
    sched = Scheduler(lambda: engine, engine.n_slots, name="tiny", tenant_slots=2)
    chunks: list[int] = []
    real_prefill = engine.prefill

    def recording_prefill(slot, tokens, start, all_logits=False):
        chunks.append(len(tokens))
        return real_prefill(slot, tokens, start, all_logits)

    engine.prefill = recording_prefill  # type: ignore[method-assign]
    try:
        short = _ids(tiny, 5, seed=20)
        long = _ids(tiny, 200, seed=21)
        a, b = sched.open("decoder"), sched.open("long-prompt")
        sched.forward(a, np.asarray(short, np.int32))
        chunks.clear()
        results: dict[str, np.ndarray] = {}
        tb = threading.Thread(target=lambda: results.__setitem__(
            "b", sched.forward(b, np.asarray(long, np.int32), all_logits=True)), daemon=True)
        tb.start()
        _wait_until(lambda: len(chunks) >= 1)
        steps_a = []
        for i in range(3):  # decode steps of the other tenant finish while the prompt runs
            steps_a.append(sched.forward(a, np.asarray([short[-1]], np.int32)))
            assert "b" not in results, f"the whole prompt ran before decode step {i}"
        tb.join(60)
        assert set(chunks) == {16, 200 - 12 * 16} and sum(chunks) == 200  # chunk by chunk
        # chunked all-logits equal the numpy forward over the whole prompt
        ref = reference_logits(tiny, long)
        assert results["b"].shape == ref.shape
        for got, want in zip(results["b"][::37], ref[::37], strict=True):
            assert_close(got, want)
        assert_close(steps_a[0], reference_logits(tiny, [*short, short[-1]])[-1])
    finally:
        sched.stop()


def test_echo_logprobs_are_reduced_chunk_by_chunk(
        tiny: TinyModel, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """An echo+logprobs prompt's logits reach the host a chunk at a time and are scored as they
    come (host.score_rows), never held as [n, V]; the scores equal scoring each position alone."""
    from realm_nb.host import score, score_rows

    monkeypatch.setattr(scheduler_mod, "PREFILL_CHUNK", 16)
    engine = tiny_engine(tiny.path)
    sched = Scheduler(lambda: engine, engine.n_slots, name="tiny")
    ids = np.asarray(_ids(tiny, 50, seed=30), np.int64)
    seen: list[tuple[int, int]] = []

    def reduce(chunk: np.ndarray, at: int) -> list:
        seen.append((at, chunk.shape[0]))
        return score_rows(chunk, ids[at + 1 : at + 1 + len(chunk)], 3, str)

    try:
        last, parts = sched.forward_reduced(sched.open("echo"), ids.astype(np.int32), reduce)
        whole = sched.forward(sched.open("whole"), ids.astype(np.int32), all_logits=True)
    finally:
        sched.stop()
    assert seen == [(0, 16), (16, 16), (32, 16), (48, 2)]  # one chunk at a time
    scored = [s for part in parts for s in part]
    assert len(scored) == len(ids) - 1
    np.testing.assert_allclose(last, whole[-1], rtol=1e-5, atol=1e-5)
    for pos, got in enumerate(scored):
        want = score(whole[pos], int(ids[pos + 1]), 3, str)
        assert got.token_id == want.token_id
        assert abs(got.logprob - want.logprob) < 1e-4
        assert [t.token_id for t in got.top] == [t.token_id for t in want.top]
