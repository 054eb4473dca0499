"""reencode: blocks the CPU kernel does not read, re-encoded as types it does.

The reference is `gguf.quants` (llama.cpp's codecs in numpy): a lossless re-encoding dequantizes
to exactly the values the source blocks dequantize to; Q4_K → Q4_1 only rounds each sub-block's
scale and offset to f16.
"""

from __future__ import annotations

from pathlib import Path

import gguf.quants
import numpy as np
import pytest
import tiny_gguf as tg
from gguf import GGMLQuantizationType as QT

from realm_nb import reencode
from realm_nb.weights import PackedMatrix

ROWS, COLS = 24, 512


def random_q4_k(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Q4_K rows: any bytes are a valid super-block once d and dmin are sane f16 values
    (gguf.quants cannot quantize to Q4_K, so the blocks are drawn directly)."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // 256 * 144), dtype=np.uint8)
    blocks = raw.reshape(-1, 144)
    for at in (0, 2):  # d, dmin
        scale = rng.uniform(1e-3, 2e-2, len(blocks)).astype(np.float16)
        blocks[:, at:at + 2] = scale.view(np.uint8).reshape(-1, 2)
    return raw


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q5_0])
def test_q4_0_and_q5_0_become_q8_0_without_loss(qtype: QT) -> None:
    w = np.random.default_rng(1).standard_normal((ROWS, COLS)).astype(np.float32)
    w[3, 64:96] = 0.0  # a block of zeros: d = 0, no division by it
    raw = gguf.quants.quantize(w, qtype)
    target, exact = reencode.kernel_type({qtype, QT.Q8_0})  # layers of both types: one stack
    assert (target, exact) == (QT.Q8_0, True)
    out = reencode.reencode(raw, qtype, target)
    assert out.shape == (ROWS, COLS // 32 * 34)
    np.testing.assert_array_equal(gguf.quants.dequantize(out, QT.Q8_0),
                                  gguf.quants.dequantize(raw, qtype))


def test_q4_k_becomes_q4_1_rounding_only_scales_and_offsets() -> None:
    raw = random_q4_k(ROWS, COLS)
    target, exact = reencode.kernel_type({QT.Q4_K})
    assert (target, exact) == (QT.Q4_1, True)
    out = reencode.reencode(raw, QT.Q4_K, target)
    assert out.shape == (ROWS, COLS // 32 * 20)  # 4.5 bits per weight, as Q4_K's own
    ref = gguf.quants.dequantize(raw, QT.Q4_K).astype(np.float64)
    ours = gguf.quants.dequantize(out, QT.Q4_1).astype(np.float64)
    # value = scale·q + offset, q ≤ 15: each of the two rounds by ≤ 2^-11 relative (f16)
    blocks = raw.reshape(-1, 144)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float64)
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float64)
    bound = (15 * 63 * d + 63 * dmin) * 2.0 ** -11  # per super-block, 6-bit scales and mins
    err = np.abs(ours - ref).reshape(-1, 256)
    assert np.all(err <= bound)
    assert float(np.max(err)) > 0  # not a copy: the products were rounded
    # a fresh Q8_0 of the same values is worse: the point of re-encoding
    fresh = gguf.quants.dequantize(gguf.quants.quantize(ref.astype(np.float32), QT.Q8_0), QT.Q8_0)
    assert float(np.max(np.abs(fresh - ref))) > 2 * float(np.max(err))


def test_kernel_type_of_mixed_layers() -> None:
    assert reencode.kernel_type({QT.Q4_1}) == (QT.Q4_1, True)
    assert reencode.kernel_type({QT.Q5_0, QT.Q8_0}) == (QT.Q8_0, True)  # Gemma 3's attn_v
    assert reencode.kernel_type({QT.Q4_K, QT.Q6_K}) == (QT.Q8_0, False)  # its ffn_down
    assert reencode.kernel_type({QT.Q6_K}) == (QT.Q8_0, False)
    assert reencode.kernel_type({QT.Q4_K, QT.Q8_0}) == (QT.Q8_0, False)


def test_packed_layout_keeps_q5_0_and_q4_k_weights(tmp_path: Path) -> None:
    """A tiny file with a Q5_0 and a Q4_K matrix: the packed layout holds them as Q8_0 and Q4_1
    blocks whose values are the file's (Q5_0 exactly, Q4_K to f16 rounding)."""
    from test_model import build_engine

    w = np.random.default_rng(2).standard_normal((tg.D_FF, tg.D_MODEL)).astype(np.float32)
    q5 = gguf.quants.quantize(w, QT.Q5_0)
    path = tg.write_tiny_llama(tmp_path / "mixed.gguf", seed=3, replace={
        f"blk.{i}.ffn_up.weight": (q5, QT.Q5_0) for i in range(tg.N_LAYERS)}).path
    engine = build_engine(path, "packed")
    up = engine.params.layers.w_up
    assert isinstance(up, PackedMatrix) and up.qtype == QT.Q8_0
    np.testing.assert_array_equal(np.asarray(up.dequantize())[0],
                                  gguf.quants.dequantize(q5, QT.Q5_0))
