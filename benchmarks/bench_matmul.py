"""Why the `fast` layout looks the way it does: the matmul formulations XLA offers on this CPU,
and what a decode step costs as the context grows.

    python benchmarks/bench_matmul.py

1. The [V, D] = [49152, 576] head (SmolLM2's tied embedding) times R activation rows, as
   f32 weights, int8 weights with f32 activations (the convert is meant to fuse into the dot), and
   int8 x int8 accumulated in int32 (what `weights._int8_linear` does). Medians of 30 calls.
2. One `fast` decode step of the real model (one sequence) at context buckets 128 .. 2048.

There is no llama.cpp counterpart for these internals; the end-to-end comparison with llama.cpp
is benchmarks/bench_engine.py.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from realm_nb.store import LayerStore

V, D = 49152, 576


def median_ms(fn: Callable[..., Any], *args: Any, n: int = 30) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def head_products() -> None:
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.integers(-127, 128, (V, D), dtype=np.int8))
    scale = jnp.ones((V,), jnp.float32)
    w32 = q.astype(jnp.float32)
    f32 = jax.jit(lambda x, w: x @ w.T)
    f32_int8 = jax.jit(lambda x, q, s: (x @ q.T.astype(jnp.float32)) * s)
    int8_int8 = jax.jit(lambda x, q: jax.lax.dot_general(
        x, q, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32))
    print(f"head [{V}, {D}] x R rows, ms per call")
    print(f"{'rows':>5} {'f32 weights':>12} {'int8 w, f32 act':>16} {'int8 x int8':>12}")
    for rows in (1, 2, 4, 16):
        x32 = jnp.ones((rows, D), jnp.float32)
        x8 = jnp.ones((rows, D), jnp.int8)
        mixed = median_ms(f32_int8, x32, q, scale)
        print(f"{rows:5d} {median_ms(f32, x32, w32):12.2f} {mixed:16.2f}"
              f" {median_ms(int8_int8, x8, q):12.2f}")


def decode_by_context() -> None:
    store = LayerStore(n_slots=2, max_context=2048, layout="fast")
    engine = store.ensure_resident(store.register("smollm2-135m"))
    engine.prefill(0, [504, 3575, 282, 4649, 314], 0)
    print("\nfast decode step, one sequence, ms (median of 20)")
    print(f"{'position':>9} {'context read':>13} {'ms':>7}")
    for start in (6, 130, 300, 600, 1100):
        engine.decode_step([0], [5], [start])  # compile this context bucket
        times = []
        for i in range(20):
            t = time.perf_counter()
            engine.decode_step([0], [5], [start + i])
            times.append(time.perf_counter() - t)
        print(f"{start:9d} {engine._ctx_bucket(start + 1):13d} "
              f"{statistics.median(times) * 1000:7.2f}")


if __name__ == "__main__":
    head_products()
    decode_by_context()
