"""The CPU kernel (`packed` layout) against the `fast` layout's int8 XLA dot, per matrix.

    python benchmarks/bench_kernels.py [--repeat 50]

Two of SmolLM2's matrices: the [49152, 576] Q8_0 head and a [1536, 576] Q4_1 FFN matrix, at
1, 2 and 16 activation rows. Per call: ms (median), GB/s of weights read (the bytes each layout
holds for that matrix) and GMAC/s. `fast` is `weights._int8_linear` on the matrix re-quantized
the way `fast` loads it (two int8 planes for the head, one for the FFN matrix). `packed` is the
kernel with two activation planes, as the layout uses it; "1-plane" is llama.cpp's single
rounding. Random weights; speed does not depend on the values.
"""

from __future__ import annotations

import argparse

import gguf.quants
import jax
import jax.numpy as jnp
import numpy as np
from bench_matmul import median_ms
from gguf import GGMLQuantizationType as QT

from realm_nb import cpu_kernels, weights

CASES = [("head", QT.Q8_0, 49152, 576, 2), ("ffn_up", QT.Q4_1, 1536, 576, 1)]
ROWS = (1, 2, 16)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=50)
    args = ap.parse_args()
    if not cpu_kernels.available():
        raise SystemExit(f"CPU kernels unavailable: {cpu_kernels.unavailable_reason()}")
    rng = np.random.default_rng(0)
    linear = jax.jit(weights.linear)
    print(f"kernel ISA: {cpu_kernels.isa()}; medians of {args.repeat} calls")
    print(f"{'matrix':8} {'rows':>4} | {'1-plane ms':>9} | {'packed ms':>9} {'GB/s':>6} "
          f"{'GMAC/s':>7} | "
          f"{'fast ms':>8} {'GB/s':>6} {'GMAC/s':>7} | {'fast/packed':>11}")
    for name, qtype, n_out, n_in, planes in CASES:
        w = rng.standard_normal((n_out, n_in)).astype(np.float32)
        raw = gguf.quants.quantize(w, qtype)
        tiles = jnp.asarray(cpu_kernels.interleave(raw, qtype))
        q, s = weights._to_int8(jnp.asarray(w), planes)
        fast = weights.Int8Matrix(q, s, planes)
        for rows in ROWS:
            x = jnp.asarray(rng.standard_normal((rows, n_in)).astype(np.float32))
            macs = rows * n_out * n_in
            one, two = (weights.PackedMatrix(tiles, qtype, n_out, n_in, p) for p in (1, 2))
            t_p1 = median_ms(linear, x, one, n=args.repeat)
            t_p = median_ms(linear, x, two, n=args.repeat)
            t_f = median_ms(linear, x, fast, n=args.repeat)
            print(f"{name:8} {rows:4d} | {t_p1:9.3f} | {t_p:9.3f} {tiles.nbytes / t_p / 1e6:6.1f} "
                  f"{macs / t_p / 1e6:7.1f} | {t_f:8.3f} {fast.nbytes / t_f / 1e6:6.1f} "
                  f"{macs / t_f / 1e6:7.1f} | {t_f / t_p:11.2f}")


if __name__ == "__main__":
    main()
