"""GGUF block formats dequantized in JAX, so weights stay packed on the device until used.

The model keeps every weight matrix in its GGUF block format as a uint8 array (a `QuantArray`)
and expands it to float32 inside jitted code, one layer at a time inside `lax.scan`. This is
written by hand because no JAX library reads ggml's block formats: the `gguf` package has the
reference dequantizers, but in NumPy on the host, which would hold every layer in float32 at
once. Each codec below mirrors `gguf.quants.<TYPE>.dequantize_blocks` operation for operation
(same byte layout, same float32 products in the same order), so results are bit-exact against
it; tests/test_quants.py checks that for every supported type.

Shapes: N blocks; every codec maps uint8 [N, type_size] -> float32 [N, block_size], with
(block_size, type_size) from `gguf.GGML_QUANT_SIZES`. A row of n_cols elements is
n_cols / block_size consecutive blocks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGML_QUANT_SIZES, QK_K
from gguf import GGMLQuantizationType as QT
from jax import lax

from .errors import ShapeMismatchError, UnsupportedTensorTypeError

# --- byte-field readers --------------------------------------------------------------------------


def _f16(b: jax.Array) -> jax.Array:
    """Little-endian float16 field: uint8 [..., 2] -> float32 [...]."""
    return lax.bitcast_convert_type(b, jnp.float16).astype(jnp.float32)


def _u32(b: jax.Array) -> jax.Array:
    """Little-endian uint32 field: uint8 [..., 4] -> uint32 [...]."""
    return lax.bitcast_convert_type(b, jnp.uint32)


def _nibbles(qs: jax.Array, width: int) -> jax.Array:
    """Split packed 4-bit values: uint8 [N, G*width] -> uint8 [N, G, 2, width].

    ggml packs each group of 2*width values as width bytes: low nibbles hold the first width
    values, high nibbles the next width.
    """
    q = qs.reshape(qs.shape[0], -1, 1, width)
    return jnp.concatenate([q & 0x0F, q >> 4], axis=2)


def _bits(b: jax.Array, n_bits: int) -> jax.Array:
    """Bit planes of each byte: uint8 [N, ..., W] -> uint8 [N, ..., n_bits, W] (bit i at i)."""
    shifts = jnp.arange(n_bits, dtype=jnp.uint8).reshape(n_bits, 1)
    return (b[..., None, :] >> shifts) & 1


# --- plain float types (block of one element) ----------------------------------------------------


def _dequant_f32(b: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(b, jnp.float32)[:, None]


def _dequant_f16(b: jax.Array) -> jax.Array:
    return _f16(b)[:, None]


def _dequant_bf16(b: jax.Array) -> jax.Array:
    # Shift the 16 bits into the top of a float32, as ggml does: keeps every bit, NaNs included.
    bits = lax.bitcast_convert_type(b, jnp.uint16).astype(jnp.uint32) << 16
    return lax.bitcast_convert_type(bits, jnp.float32)[:, None]


# --- 32-element blocks ---------------------------------------------------------------------------


def _dequant_q8_0(b: jax.Array) -> jax.Array:
    # d: f16 | qs: int8 [32]
    d = _f16(b[:, 0:2])[:, None]
    x = lax.bitcast_convert_type(b[:, 2:], jnp.int8).astype(jnp.float32)
    return x * d


def _dequant_q4_0(b: jax.Array) -> jax.Array:
    # d: f16 | qs: 4-bit [32] in 16 bytes; value = d * (q - 8)
    n = b.shape[0]
    d = _f16(b[:, 0:2])[:, None]
    q = _nibbles(b[:, 2:], 16).reshape(n, 32).astype(jnp.int8) - 8
    return d * q.astype(jnp.float32)


def _dequant_q4_1(b: jax.Array) -> jax.Array:
    # d: f16 | m: f16 | qs: 4-bit [32]; value = d * q + m
    n = b.shape[0]
    d = _f16(b[:, 0:2])[:, None]
    m = _f16(b[:, 2:4])[:, None]
    q = _nibbles(b[:, 4:], 16).reshape(n, 32).astype(jnp.float32)
    return d * q + m


def _five_bit(qh: jax.Array, qs: jax.Array) -> jax.Array:
    """Q5_0/Q5_1 values: qh uint8 [N, 4] (bit i = high bit of value i), qs [N, 16] -> [N, 32]."""
    n = qs.shape[0]
    high = (_u32(qh)[:, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
    low = _nibbles(qs, 16).reshape(n, 32)
    return low | (high.astype(jnp.uint8) << 4)


def _dequant_q5_0(b: jax.Array) -> jax.Array:
    # d: f16 | qh: u32 | qs: 4-bit [32]; value = d * (q - 16)
    d = _f16(b[:, 0:2])[:, None]
    q = _five_bit(b[:, 2:6], b[:, 6:]).astype(jnp.int8) - 16
    return d * q.astype(jnp.float32)


def _dequant_q5_1(b: jax.Array) -> jax.Array:
    # d: f16 | m: f16 | qh: u32 | qs: 4-bit [32]; value = d * q + m
    d = _f16(b[:, 0:2])[:, None]
    m = _f16(b[:, 2:4])[:, None]
    q = _five_bit(b[:, 4:8], b[:, 8:]).astype(jnp.float32)
    return d * q + m


# --- 256-element super-blocks (k-quants) ---------------------------------------------------------

_K_SCALE_SIZE = 12


def _scale_min_k4(scales: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Unpack Q4_K/Q5_K's 6-bit sub-block scales and mins: uint8 [N, 12] -> two [N, 8].

    Bytes 0-3 hold scales 0-3 (low 6 bits) and the top bits of scales 4-7; bytes 4-7 the same
    for mins; bytes 8-11 the low 4 bits of scales 4-7 (low nibble) and mins 4-7 (high nibble).
    """
    s = scales.reshape(scales.shape[0], 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = jnp.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = jnp.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _k4_scales(b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-sub-block scale and offset of Q4_K/Q5_K: [N, 8, 1] each, from d, dmin, scales."""
    n = b.shape[0]
    d = _f16(b[:, 0:2])[:, None]
    dmin = _f16(b[:, 2:4])[:, None]
    sc, mn = _scale_min_k4(b[:, 4 : 4 + _K_SCALE_SIZE])
    dl = (d * sc.astype(jnp.float32)).reshape(n, 8, 1)
    ml = (dmin * mn.astype(jnp.float32)).reshape(n, 8, 1)
    return dl, ml


def _dequant_q4_k(b: jax.Array) -> jax.Array:
    # d: f16 | dmin: f16 | scales: 12 | qs: 4-bit [256]; 8 sub-blocks of 32: dl * q - ml
    n = b.shape[0]
    dl, ml = _k4_scales(b)
    q = _nibbles(b[:, 4 + _K_SCALE_SIZE :], 32).reshape(n, 8, 32).astype(jnp.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _dequant_q5_k(b: jax.Array) -> jax.Array:
    # d: f16 | dmin: f16 | scales: 12 | qh: [32] (bit s = sub-block s) | qs: 4-bit [256]
    n = b.shape[0]
    dl, ml = _k4_scales(b)
    start = 4 + _K_SCALE_SIZE
    qh = _bits(b[:, start : start + QK_K // 8], 8)  # [N, 8, 32]
    ql = _nibbles(b[:, start + QK_K // 8 :], 32).reshape(n, 8, 32)
    q = (ql | (qh << 4)).astype(jnp.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _dequant_q6_k(b: jax.Array) -> jax.Array:
    # ql: 4-bit [256] | qh: 2-bit [256] | scales: int8 [16] | d: f16; 16 sub-blocks of 16
    n = b.shape[0]
    ql, qh = b[:, : QK_K // 2], b[:, QK_K // 2 : QK_K // 2 + QK_K // 4]
    scales = b[:, QK_K // 2 + QK_K // 4 : QK_K // 2 + QK_K // 4 + QK_K // 16]
    d = _f16(b[:, -2:])[:, None]
    dl = (d * lax.bitcast_convert_type(scales, jnp.int8).astype(jnp.float32)).reshape(n, 16, 1)
    low = _nibbles(ql, 64).reshape(n, 8, 32)
    shifts = jnp.array([0, 2, 4, 6], dtype=jnp.uint8).reshape(4, 1)
    high = ((qh.reshape(n, 2, 1, 32) >> shifts) & 0x03).reshape(n, 8, 32)
    q = (low | (high << 4)).astype(jnp.int8) - 32
    return (dl * q.reshape(n, 16, 16).astype(jnp.float32)).reshape(n, QK_K)


# --- the registry --------------------------------------------------------------------------------

_BLOCK_DEQUANTIZERS: dict[QT, Callable[[jax.Array], jax.Array]] = {
    QT.F32: _dequant_f32,
    QT.F16: _dequant_f16,
    QT.BF16: _dequant_bf16,
    QT.Q8_0: _dequant_q8_0,
    QT.Q4_0: _dequant_q4_0,
    QT.Q4_1: _dequant_q4_1,
    QT.Q5_0: _dequant_q5_0,
    QT.Q5_1: _dequant_q5_1,
    QT.Q4_K: _dequant_q4_k,
    QT.Q5_K: _dequant_q5_k,
    QT.Q6_K: _dequant_q6_k,
}

SUPPORTED_TYPES: tuple[QT, ...] = tuple(_BLOCK_DEQUANTIZERS)


def _unsupported_message(qtype: QT) -> str:
    name = getattr(qtype, "name", str(qtype))
    supported = ", ".join(t.name for t in SUPPORTED_TYPES)
    return f"has type {name}, which realm-nb does not support; supported: {supported}"


def check_supported(qtype: QT, *, tensor: str, file: str) -> None:
    """Raise UnsupportedTensorTypeError unless realm-nb can dequantize `qtype`."""
    if qtype in _BLOCK_DEQUANTIZERS:
        return
    raise UnsupportedTensorTypeError(
        f"tensor {tensor!r} in {file} {_unsupported_message(qtype)}. "
        "Use a GGUF file quantized to one of the supported types.",
        tensor=tensor,
        file=file,
        qtype=getattr(qtype, "name", str(qtype)),
    )


def _require_supported(qtype: QT) -> None:
    if qtype not in _BLOCK_DEQUANTIZERS:
        raise UnsupportedTensorTypeError(
            f"cannot dequantize: the data {_unsupported_message(qtype)}",
            qtype=getattr(qtype, "name", str(qtype)),
        )


def row_bytes(qtype: QT, n_cols: int) -> int:
    """Bytes of one row of n_cols elements stored as qtype (any type gguf knows the size of)."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if n_cols <= 0 or n_cols % block_size:
        raise ShapeMismatchError(
            f"a row of {n_cols} elements cannot be stored as {qtype.name}: n_cols must be a "
            f"positive multiple of its block size {block_size}",
            n_cols=n_cols,
            qtype=qtype.name,
            block_size=block_size,
        )
    return n_cols // block_size * type_size


def _check_raw(raw: jax.Array | np.ndarray, qtype: QT, n_cols: int, min_ndim: int) -> int:
    """Refuse bytes that are not uint8 rows of `qtype` blocks; returns the bytes per row."""
    _require_supported(qtype)
    nbytes = row_bytes(qtype, n_cols)
    if raw.dtype != np.uint8 or raw.ndim < min_ndim or raw.shape[-1] != nbytes:
        rows = "rows, " if min_ndim > 1 else ""
        raise ShapeMismatchError(
            f"{qtype.name} rows of {n_cols} elements need uint8 [..., {rows}{nbytes}], "
            f"got {raw.dtype} {list(raw.shape)}",
            shape=list(raw.shape), qtype=qtype.name, n_cols=n_cols,
        )
    return nbytes


def dequantize(raw: jax.Array | np.ndarray, qtype: QT, n_cols: int) -> jax.Array:
    """Expand GGUF rows to float32; jit- and scan-safe (qtype and n_cols are static).

    Args:
      raw: uint8 [..., row_bytes(qtype, n_cols)], NumPy, JAX or a tracer.
      qtype: the GGUF tensor type.
      n_cols: elements per row.
    Returns:
      float32 [..., n_cols].
    """
    raw = jnp.asarray(raw)
    _check_raw(raw, qtype, n_cols, min_ndim=1)
    lead = raw.shape[:-1]
    _, type_size = GGML_QUANT_SIZES[qtype]
    blocks = raw.reshape(-1, type_size)  # [N, type_size]
    return _BLOCK_DEQUANTIZERS[qtype](blocks).reshape(*lead, n_cols)


# --- QuantArray: a packed matrix as a pytree node ------------------------------------------------


@partial(jax.tree_util.register_dataclass, data_fields=["raw"], meta_fields=["qtype", "n_cols"])
@dataclass(frozen=True)
class QuantArray:
    """A matrix kept in its GGUF block format; layer code calls .dequantize() whatever the type.

    `raw` is the only pytree child, so a QuantArray passes through jit, scan and device_put
    like an array, with qtype and n_cols as static aux data.
    """

    raw: jax.Array  # uint8 [..., rows, row_bytes]; leading dims may be a stacked layer axis L
    qtype: QT
    n_cols: int

    def dequantize(self) -> jax.Array:
        """float32 [..., rows, n_cols]."""
        return dequantize(self.raw, self.qtype, self.n_cols)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the dequantized matrix: (..., rows, n_cols)."""
        return (*self.raw.shape[:-1], self.n_cols)

    @property
    def nbytes(self) -> int:
        """Bytes held in the packed form."""
        return math.prod(self.raw.shape)


def quant_array_from_numpy(raw: np.ndarray, qtype: QT, n_cols: int) -> QuantArray:
    """Wrap host bytes uint8 [..., rows, row_bytes] (e.g. from gguf.GGUFReader) as a QuantArray."""
    _check_raw(raw, qtype, n_cols, min_ndim=2)
    return QuantArray(raw=jnp.asarray(raw), qtype=qtype, n_cols=n_cols)
