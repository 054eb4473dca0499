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
