"""Checks every architecture's tests share (test_architectures.py, test_gemma3.py): a quantized
layout held close to the float64 reference, and two tenants generating at once on one model."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from realm_nb.kernel import RealmKernel
from realm_nb.types import Generation


def assert_layout_close(ours: np.ndarray, ref: np.ndarray, step: np.ndarray,
                        ref_step: np.ndarray) -> None:
    """A `packed` or `fast` engine's prompt logits [T, V] and one decode step's [V] against the
    reference's: the rounding of a quantized layout, not a wrong forward (which errs by about
    the logits' own spread)."""
    spread = float(np.std(ref))
    err = np.abs(ours - ref)
    assert float(np.max(err)) < 0.3 * spread, (float(np.max(err)), spread)
    assert float(np.mean(err)) < 0.05 * spread, (float(np.mean(err)), spread)
    assert float(np.mean(np.argmax(ours, -1) == np.argmax(ref, -1))) >= 0.9
    assert float(np.max(np.abs(step - ref_step))) < 0.3 * spread


def generate_together(kernel: RealmKernel, model: str, tenants: list[str],
                      request: Callable[[int], dict[str, Any]]) -> list[Generation]:
    """Each tenant's `kernel.generate(**request(i))` started at the same moment in a thread of
    its own, so that their decode steps share the scheduler's batches; returns the results and
    checks that some steps held more than one row."""
    results: list[Generation | None] = [None] * len(tenants)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(tenants))

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = kernel.generate(tenant=tenants[i], model=model,
                                         **request(i)).result()
        except BaseException as e:  # handed to the test
            errors.append(e)

    sid = kernel.model(model).id
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(tenants))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    done = [g for g in results if g is not None]
    assert len(done) == len(tenants), "a generation did not end within 120 s"
    sched = kernel.stats()["schedulers"][sid]
    assert sched["decode_rows"] > sched["steps"]  # some decode steps held several tenants
    return done


def assert_batched_decode_equals_solo(engine: Any, a: list[int], b: list[int], tol: float
                                      ) -> tuple[np.ndarray, np.ndarray]:
    """Sequences a and b each decoded alone (slots 0, 1), then together in one step (slots 2,
    3): the batch changes no row beyond `tol`. Returns the solo logits [V] of a and b; every
    slot is released."""
    engine.prefill(0, a, 0)
    solo_a = engine.decode_step([0], [5], [len(a)])[0]
    engine.prefill(1, b, 0)
    solo_b = engine.decode_step([1], [6], [len(b)])[0]
    engine.prefill(2, a, 0)
    engine.prefill(3, b, 0)
    both = engine.decode_step([2, 3], [5, 6], [len(a), len(b)])
    for slot in range(4):
        engine.release(slot)
    np.testing.assert_allclose(both[0], solo_a, rtol=0, atol=tol)
    np.testing.assert_allclose(both[1], solo_b, rtol=0, atol=tol)
    assert not np.allclose(solo_a, solo_b, atol=1e-2)  # two different rows, not one twice
    return solo_a, solo_b


def assert_chunked_prefill_equals_reference(engine: Any, ids: list[int], ref: np.ndarray,
                                            tol: float, split: int = 100) -> None:
    """`ids` (past the largest prefill bucket: chunked inside the engine) in one call, and in two
    calls split at `split`, both give the reference's logits [T, V]; slots 0, 1 released."""
    whole = engine.prefill(0, ids, 0, all_logits=True)
    assert float(np.max(np.abs(whole - ref))) <= tol
    engine.prefill(1, ids[:split], 0)
    rest = engine.prefill(1, ids[split:], split, all_logits=True)
    engine.release(0)
    engine.release(1)
    np.testing.assert_allclose(rest, whole[split:], rtol=0, atol=tol)


def teacher_forced_vs_llamacpp(pairs: list[tuple[dict[str, Any], Generation]], near_tie: float,
                               *, first_agrees: bool = False) -> tuple[int, int, list[str]]:
    """llama.cpp's greedy ids scored by us (echo + logprobs over prompt + greedy ids): how many
    of llama.cpp's choices are our top-1 too, of how many, and the misses, each asserted to be a
    near-tie (our top-1 at most `near_tie` logprob above llama.cpp's choice) and, with
    `first_agrees`, never at the first generated position."""
    agree = total = 0
    misses: list[str] = []
    for case, g in pairs:
        ids = case["prompt_ids"] + case["greedy_ids"]
        assert g.prompt_ids == ids
        assert g.logprobs is not None and len(g.logprobs) >= len(ids) - 1
        first = len(case["prompt_ids"]) - 1
        for j in range(first, len(ids) - 1):  # logprobs[j] scores ids[j + 1] given ids[:j + 1]
            s = g.logprobs[j]
            assert s.token_id == ids[j + 1]
            total += 1
            if s.top[0].token_id == s.token_id:
                agree += 1
                continue
            gap = s.top[0].logprob - s.logprob
            misses.append(f"{case['prompt']!r} @ {j}: ours {s.top[0].token_id} vs llama.cpp "
                          f"{s.token_id}, {gap:.3f} apart")
            assert not (first_agrees and j == first), misses[-1]
            assert gap <= near_tie, misses[-1]
    assert total == sum(len(case["greedy_ids"]) for case, _ in pairs)
    return agree, total, misses
