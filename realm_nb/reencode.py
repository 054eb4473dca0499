"""GGUF blocks of types the CPU kernel does not read, re-encoded as types it does, losing as
little as each pair of formats allows.

The kernel (cpu_kernels) reads Q4_0, Q4_1 and Q8_0. Files such as Gemma 3's Q4_K_M mix in Q5_0,
Q4_K and Q6_K. Re-quantizing their values to Q8_0 from scratch (one new scale per 32, the block's
max / 127) moves every weight by up to a half step of the new scale; on Gemma 3 270M that left
`packed` agreeing with `exact` on 96.8 % of teacher-forced positions. Where a format's values
are exactly a smaller grid of the target's, this keeps them:

- Q4_0, Q5_0 → Q8_0, exact: a block's values are d·(q - 8) or d·(q - 16), integers within
  int8 times the same f16 d. Q8_0 keeps d and stores those integers.
- Q4_K → Q4_1: each 32-value sub-block is (d·sc)·q - dmin·m with a 4-bit q, which is Q4_1's
  form with scale d·sc and offset -dmin·m. Only the two products are rounded, to Q4_1's f16
  (relative error ≤ 2⁻¹¹ of the scale and the offset, against ≤ 1/254 of the block's range for a
  fresh Q8_0), and the weights stay at 4.5 bits.
- anything else (Q6_K, Q5_1, Q5_K, F16, ...) has no such grid: `weights` re-quantizes its values
  to Q8_0 (`gguf.quants`).

Written by hand because no library converts between block formats without going through
floats; `gguf.quants` is both the reference the tests check against and the Q8_0 fallback.
"""

from __future__ import annotations

import gguf.quants
import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

BLOCK = 32  # values per Q4_0 / Q4_1 / Q8_0 block

# Types whose values Q8_0 holds exactly: d·(integer in [-127, 127]) with an f16 d per 32 values.
EXACT_IN_Q8_0 = (QT.Q4_0, QT.Q5_0, QT.Q8_0)


def kernel_type(qtypes: set[QT]) -> tuple[QT, bool]:
    """The one kernel type the layers of a matrix, of these GGUF types, become, and whether
    `reencode` gets there without re-quantizing (else the values go to Q8_0 afresh)."""
    if len(qtypes) == 1 and (only := next(iter(qtypes))) in (QT.Q4_0, QT.Q4_1, QT.Q8_0):
        return only, True
    if qtypes == {QT.Q4_K}:
        return QT.Q4_1, True
    return QT.Q8_0, qtypes <= set(EXACT_IN_Q8_0)


def reencode(raw: np.ndarray, qtype: QT, target: QT) -> np.ndarray:
    """GGUF rows uint8 [O, row_bytes] of `qtype` → rows uint8 [O, row_bytes'] of `target`, for
    the pairs that `kernel_type` calls exact (see the module docstring)."""
    n_rows = raw.shape[0]
    if qtype == target:
        return raw
    if target == QT.Q4_1 and qtype == QT.Q4_K:
        return _q4_k_to_q4_1(raw.reshape(-1, GGML_QUANT_SIZES[qtype][1])).reshape(n_rows, -1)
    assert target == QT.Q8_0 and qtype in EXACT_IN_Q8_0, (qtype, target)  # kernel_type said so
    values = gguf.quants.dequantize(raw, qtype).astype(np.float32)  # [O, I]
    return _exact_q8_0(raw, qtype, values)


def _exact_q8_0(raw: np.ndarray, qtype: QT, values: np.ndarray) -> np.ndarray:
    """Q4_0 / Q5_0 rows → Q8_0 rows with the same d and the same values (d·q stays d·q)."""
    n_rows = raw.shape[0]
    blocks = raw.reshape(-1, GGML_QUANT_SIZES[qtype][1])
    d = np.ascontiguousarray(blocks[:, :2]).view(np.float16)  # [N, 1], d leads every block
    scale = d.astype(np.float32)
    q = np.divide(values.reshape(-1, BLOCK), scale, out=np.zeros((len(d), BLOCK), np.float32),
                  where=scale != 0)
    q = np.rint(q)
    assert np.all(np.abs(q) <= 127), "a Q4_0/Q5_0 block's integers always fit int8"
    out = np.concatenate([d.view(np.uint8), q.astype(np.int8).view(np.uint8)], axis=1)
    return out.reshape(n_rows, -1)


def _q4_k_to_q4_1(blocks: np.ndarray) -> np.ndarray:
    """Q4_K super-blocks uint8 [N, 144] → Q4_1 blocks uint8 [N·8, 20] (d, m, 16 nibble bytes)."""
    n = blocks.shape[0]
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # [N, 1]
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, m = gguf.quants.Q4_K.get_scale_min(blocks[:, 4:16])  # [N, 8] 6-bit each
    scale = (d * sc.astype(np.float32)).astype(np.float16).reshape(-1, 1)  # [N·8, 1]
    offset = (-dmin * m.astype(np.float32)).astype(np.float16).reshape(-1, 1)
    # Q4_K's 128 quant bytes: 4 groups of 32 bytes, low nibbles sub-block 2g, high ones 2g+1.
    qs = blocks[:, 16:].reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    q = (qs & 0x0F).reshape(n * 8, BLOCK)  # [N·8, 32] the sub-blocks in order
    packed = q[:, :16] | (q[:, 16:] << 4)  # Q4_1: value k low nibble, value k + 16 high
    return np.concatenate([scale.view(np.uint8), offset.view(np.uint8),
                           packed.astype(np.uint8)], axis=1)
