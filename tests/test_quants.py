"""realm_nb.quants: every supported GGUF type dequantizes bit-exactly like gguf.quants."""

from __future__ import annotations

import gguf.quants
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from realm_nb.errors import ShapeMismatchError, UnsupportedTensorTypeError
from realm_nb.quants import (
    SUPPORTED_TYPES,
    QuantArray,
    check_supported,
    dequantize,
    quant_array_from_numpy,
    row_bytes,
)

ROWS, COLS = 4, 512  # 512 = two 256-element super-blocks, sixteen 32-element blocks
QUANTIZABLE = (QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1)
# Byte offsets of the float16 scale fields inside one block of each block type.
F16_FIELDS: dict[QT, tuple[int, ...]] = {
    QT.Q8_0: (0,),
    QT.Q4_0: (0,),
    QT.Q4_1: (0, 2),
    QT.Q5_0: (0,),
    QT.Q5_1: (0, 2),
    QT.Q4_K: (0, 2),
    QT.Q5_K: (0, 2),
    QT.Q6_K: (208,),
}


def quantized_rows(qtype: QT, lead: tuple[int, ...], seed: int) -> np.ndarray:
    """Random float rows quantized by gguf.quants: uint8 [*lead, row_bytes]."""
    data = np.random.default_rng(seed).standard_normal((*lead, COLS)).astype(np.float32)
    return np.ascontiguousarray(gguf.quants.quantize(data, qtype)).view(np.uint8)


def crafted_rows(qtype: QT, lead: tuple[int, ...], seed: int) -> np.ndarray:
    """Random block bytes whose f16 scale fields hold finite, moderate values."""
    rng = np.random.default_rng(seed)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = int(np.prod(lead)) * COLS // block_size
    blocks = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    for offset in F16_FIELDS[qtype]:
        scale = (rng.standard_normal(n_blocks) * 0.05).astype(np.float16)
        blocks[:, offset : offset + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(*lead, -1)


def random_rows(qtype: QT, lead: tuple[int, ...], seed: int = 0) -> np.ndarray:
    if qtype in QUANTIZABLE:
        return quantized_rows(qtype, lead, seed)
    return crafted_rows(qtype, lead, seed)


def reference(raw: np.ndarray, qtype: QT) -> np.ndarray:
    return np.asarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32)


def assert_bit_exact(got: jax.Array | np.ndarray, want: np.ndarray) -> None:
    got = np.asarray(got)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.array_equal(got, want)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))  # signed zeros too


def test_supported_types_are_the_promised_ones() -> None:
    assert set(SUPPORTED_TYPES) == {
        QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1,
        QT.Q5_0, QT.Q5_1, QT.Q4_K, QT.Q5_K, QT.Q6_K,
    }  # fmt: skip


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda t: t.name)
def test_dequantize_matches_gguf_reference(qtype: QT) -> None:
    raw = random_rows(qtype, (ROWS,))
    assert raw.shape == (ROWS, row_bytes(qtype, COLS))
    assert_bit_exact(dequantize(raw, qtype, COLS), reference(raw, qtype))


@pytest.mark.parametrize("qtype", tuple(F16_FIELDS), ids=lambda t: t.name)
def test_dequantize_random_bytes_matches_gguf_reference(qtype: QT) -> None:
    # Every bit pattern in the quant fields, not only those a quantizer would write.
    raw = crafted_rows(qtype, (ROWS,), seed=1)
    assert_bit_exact(dequantize(raw, qtype, COLS), reference(raw, qtype))


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda t: t.name)
def test_dequantize_under_jit_and_scan(qtype: QT) -> None:
    stacked = random_rows(qtype, (2, ROWS), seed=2)  # [L=2, rows, row_bytes]
    want = reference(stacked, qtype)

    jitted = jax.jit(lambda raw: dequantize(raw, qtype, COLS))
    assert_bit_exact(jitted(stacked), want)

    def step(carry: jax.Array, raw: jax.Array) -> tuple[jax.Array, jax.Array]:
        return carry + 1, dequantize(raw, qtype, COLS)

    n_steps, per_layer = jax.jit(lambda xs: jax.lax.scan(step, jnp.int32(0), xs))(stacked)
    assert int(n_steps) == 2
    assert_bit_exact(per_layer, want)


def test_quant_array_is_a_pytree_node() -> None:
    raw = random_rows(QT.Q4_K, (2, ROWS), seed=3)
    qa = quant_array_from_numpy(raw, QT.Q4_K, COLS)
    assert qa.shape == (2, ROWS, COLS)
    assert qa.nbytes == raw.size

    leaves, treedef = jax.tree_util.tree_flatten(qa)
    assert len(leaves) == 1 and np.array_equal(np.asarray(leaves[0]), raw)
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert rebuilt.qtype == QT.Q4_K and rebuilt.n_cols == COLS

    want = reference(raw, QT.Q4_K)
    assert_bit_exact(jax.jit(QuantArray.dequantize)(qa), want)

    def layer_sums(x: jax.Array, w: QuantArray) -> tuple[jax.Array, jax.Array]:
        return x, w.dequantize().sum(axis=-1)

    _, sums = jax.jit(lambda q: jax.lax.scan(layer_sums, jnp.float32(0), q))(qa)
    assert sums.shape == (2, ROWS)


def test_check_supported_names_type_tensor_and_file() -> None:
    check_supported(QT.Q6_K, tensor="output.weight", file="m.gguf")
    with pytest.raises(UnsupportedTensorTypeError) as info:
        check_supported(QT.IQ2_XXS, tensor="blk.3.attn_q.weight", file="m.gguf")
    message = str(info.value)
    assert "'blk.3.attn_q.weight'" in message and "m.gguf" in message
    assert "IQ2_XXS" in message and "Q4_K" in message


def test_dequantize_refuses_unsupported_type() -> None:
    raw = np.zeros((1, row_bytes(QT.IQ2_XXS, 256)), dtype=np.uint8)
    with pytest.raises(UnsupportedTensorTypeError, match="IQ2_XXS"):
        dequantize(raw, QT.IQ2_XXS, 256)


def test_row_bytes_rejects_partial_blocks() -> None:
    assert row_bytes(QT.Q4_K, 512) == 2 * 144
    assert row_bytes(QT.F16, 7) == 14
    with pytest.raises(ShapeMismatchError, match="100") as info:
        row_bytes(QT.Q4_K, 100)
    assert "256" in str(info.value)


def test_dequantize_rejects_wrong_row_width() -> None:
    raw = np.zeros((2, row_bytes(QT.Q8_0, 64) + 1), dtype=np.uint8)
    with pytest.raises(ShapeMismatchError, match="Q8_0"):
        dequantize(raw, QT.Q8_0, 64)
