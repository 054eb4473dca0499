"""Weights as pytrees: the one table that describes every tensor, and the two layouts.

Layouts (chosen per model at load time):
- `exact`: each matrix stays in its GGUF block format (a `quants.QuantArray` of uint8 blocks) and is
  dequantized inside the jitted forward, one layer at a time: bit-exact to `gguf.quants`, the
  reference. The embedding/head is the one matrix expanded to f32 at load: gathering rows and a
  [V, D] head matmul per token would otherwise expand the whole table every step.
- `fast`: every matrix re-quantized to int8 with one symmetric f32 scale per output row, and the
  activations rounded to int8 per row before each matmul (as llama.cpp rounds them to 8 bits), so
  the dot runs int8 x int8 → int32 (see `_int8_linear` for the measurements). Agreement with
  `exact` is measured by benchmarks/bench_engine.py.
- `packed`: each matrix stays as its GGUF blocks when the CPU kernel reads that type (Q4_0, Q4_1,
  Q8_0; others are re-encoded at load, without loss where the formats allow: `reencode`) and
  `linear` runs `cpu_kernels.quant_matmul`, llama.cpp's scheme: activations rounded to int8
  per 32-block, integer dot per block, here twice (value and residual, see PACKED_ACT_PLANES).
  Where the kernel is unavailable, or off the CPU backend, it dequantizes and uses an XLA dot.

`linear` is the single place that knows the formats: layer code never branches on them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import gguf.quants
import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGMLQuantizationType as QT

from . import cpu_kernels, quants, reencode
from .config import ModelConfig
from .errors import ShapeMismatchError
from .gguf_io import GGUFFile
from .quants import QuantArray

Matrix = Any  # jax.Array f32 | QuantArray | Int8Matrix | PackedMatrix, all [..., out, in]


@partial(jax.tree_util.register_dataclass, data_fields=["q", "scale"], meta_fields=["planes"])
@dataclass(frozen=True)
class Int8Matrix:
    """int8 weights in P planes: W ≈ sum_p q[p] * scale[p][:, None].

    q [..., P*O, I] int8 and scale [..., P*O] f32, plane p in rows p*O..(p+1)*O. One plane keeps
    ~8 bits per row; a second plane (the rounding residual of the first) makes it ~15 bits, for
    the matrices whose error shows most in the logits (the head).
    """

    q: jax.Array
    scale: jax.Array
    planes: int = 1

    @property
    def nbytes(self) -> int:
        return int(self.q.nbytes) + int(self.scale.nbytes)

    def rows(self, ids: jax.Array) -> jax.Array:
        """f32 rows W[ids] → [..., I]."""
        n_out = self.q.shape[-2] // self.planes
        out = self.q[ids].astype(jnp.float32) * self.scale[ids][..., None]
        for p in range(1, self.planes):
            j = ids + p * n_out
            out = out + self.q[j].astype(jnp.float32) * self.scale[j][..., None]
        return out


@partial(jax.tree_util.register_dataclass, data_fields=["raw", "layer"],
         meta_fields=["qtype", "n_rows", "n_cols", "act_planes"])
@dataclass(frozen=True)
class PackedMatrix:
    """GGUF blocks (Q4_0, Q4_1 or Q8_0) that the CPU kernel multiplies without expanding them.

    raw uint8 [..., ceil(O/16), nb * tile bytes]: the file's blocks reordered into tiles of 16
    rows (`cpu_kernels.interleave`, the same bytes); qtype, n_rows (O), n_cols and act_planes
    are static. act_planes 2 rounds the activations to 16 bits rather than 8 (see
    `cpu_kernels.quant_matmul`). `layer_at` makes the one-layer view of stacked layers: raw
    stays [L, ...] and `layer` says which, so the kernel reads it in place. A distinct class
    from `quants.QuantArray` (which `exact` expands with XLA) so that `linear` can tell them
    apart.
    """

    raw: jax.Array
    qtype: QT
    n_rows: int
    n_cols: int
    act_planes: int = 1
    layer: jax.Array | None = None  # int32 scalar: raw is [L, ...] and this is layer `layer`

    @property
    def tiles(self) -> jax.Array:
        """This matrix's tiles [G, nb * tile bytes] (a slice, hence a copy, for a layer view)."""
        return self.raw if self.layer is None else self.raw[self.layer]

    @property
    def nbytes(self) -> int:
        return int(self.raw.nbytes)

    def gguf_rows(self) -> jax.Array:
        """uint8 [..., O, row_bytes]: the blocks in the file's order."""
        return cpu_kernels.deinterleave(self.tiles, self.qtype, self.n_rows, self.n_cols)

    def dequantize(self) -> jax.Array:
        """f32 [..., O, n_cols]."""
        return quants.dequantize(self.gguf_rows(), self.qtype, self.n_cols)

    def rows(self, ids: jax.Array) -> jax.Array:
        """f32 rows W[ids] → [..., I]: the ids' tiles gathered, then their rows picked."""
        tiles = self.tiles[ids // cpu_kernels.GROUP]  # [..., nb * tile bytes]
        rows = cpu_kernels.deinterleave(tiles[..., None, :], self.qtype, cpu_kernels.GROUP,
                                        self.n_cols)  # [..., 16, row_bytes]
        picked = jnp.take_along_axis(rows, (ids % cpu_kernels.GROUP)[..., None, None], axis=-2)
        return quants.dequantize(picked[..., 0, :], self.qtype, self.n_cols)


def linear(x: jax.Array, w: Matrix) -> jax.Array:
    """y[..., o] = sum_i x[..., i] W[o, i] for any weight layout."""
    if isinstance(w, Int8Matrix):
        return _int8_linear(x, w)
    if isinstance(w, PackedMatrix):
        return _packed_linear(x, w)
    if isinstance(w, QuantArray):
        return jnp.einsum("...i,oi->...o", x, w.dequantize())
    return jnp.einsum("...i,oi->...o", x, w)


def _int8_linear(x: jax.Array, w: Int8Matrix) -> jax.Array:
    """int8 activations (one scale per row) x int8 weights, accumulated exactly in int32.

    Measured on this CPU (2 cores, XLA): for a [49152, 576] head, 0.9 ms at 4 rows and 2.2 ms at
    16, where f32 activations against int8 weights took 31-34 ms for any batch over 1 (the int8 →
    f32 convert fuses into a matrix-vector product only). Integer accumulation is also exact, so
    a row's result never depends on which other rows share the batch.
    """
    lead, n_in = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, n_in)
    n = rows.shape[0]
    amax = jnp.max(jnp.abs(rows), axis=-1, keepdims=True)
    a_hi = jnp.where(amax > 0, amax / 127.0, 1.0)
    hi = jnp.round(rows / a_hi)
    a_lo = a_hi / 254.0  # the residual lies in [-a_hi/2, a_hi/2]
    lo = jnp.clip(jnp.round((rows - hi * a_hi) / a_lo), -127, 127)
    xq = jnp.concatenate([hi, lo]).astype(jnp.int8)  # [2n, I]: both halves in one dot
    acc = jax.lax.dot_general(xq, w.q, (((1,), (1,)), ((), ())),
                              preferred_element_type=jnp.int32).astype(jnp.float32)
    y = (acc[:n] * a_hi + acc[n:] * a_lo) * w.scale  # [n, P*O]
    n_out = y.shape[-1] // w.planes
    out = y[:, :n_out]
    for p in range(1, w.planes):
        out = out + y[:, p * n_out : (p + 1) * n_out]
    return out.reshape(*lead, -1)


def kernel_usable() -> bool:
    """Whether `packed` matrices go through the CPU kernel (else: dequantize + XLA dot)."""
    return jax.default_backend() == "cpu" and cpu_kernels.available()


def _packed_linear(x: jax.Array, w: PackedMatrix) -> jax.Array:
    if kernel_usable():
        return cpu_kernels.quant_matmul(x, w.raw, w.qtype, w.n_rows, w.n_cols, w.act_planes,
                                        w.layer)
    return packed_linear_fallback(x, w)


def linear_many(x: jax.Array, ws: tuple[Matrix, ...]) -> tuple[jax.Array, ...]:
    """`linear(x, w)` for each w of a group sharing its input (q/k/v, gate/up). Packed matrices
    go to the kernel as one call, which rounds x once and splits all outputs over the threads:
    at one row that halved the 30 layers' matmul time here (separate calls each paid a thread
    hand-off and a wait). Results equal `linear`'s exactly."""
    packed = all(isinstance(w, PackedMatrix) for w in ws)
    if (packed and len(ws) > 1 and kernel_usable()
            and len({(w.n_cols, w.act_planes, w.layer is None) for w in ws}) == 1
            and len({id(w.layer) for w in ws}) == 1):
        return cpu_kernels.quant_matmul_many(x, tuple(w.raw for w in ws),
                                             tuple(w.qtype for w in ws),
                                             tuple(w.n_rows for w in ws), ws[0].n_cols,
                                             ws[0].act_planes, ws[0].layer)
    return tuple(linear(x, w) for w in ws)


def packed_linear_fallback(x: jax.Array, w: PackedMatrix) -> jax.Array:
    """The same product without the kernel: f32 activations against the dequantized blocks."""
    return jnp.einsum("...i,oi->...o", x, w.dequantize())


def embed_rows(w: Matrix, ids: jax.Array) -> jax.Array:
    """Rows of an embedding table: ids [...] → f32 [..., D]."""
    if isinstance(w, Int8Matrix):
        return w.rows(ids)
    if isinstance(w, PackedMatrix):
        return w.rows(ids)
    if isinstance(w, QuantArray):
        return QuantArray(w.raw[ids], w.qtype, w.n_cols).dequantize()
    return w[ids]


# --- the tensor table -------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class LayerWeights:
    """One transformer block; in `ModelWeights.layers` every field has a leading L axis.

    The optional vectors are None where the architecture has no such tensor (None is a pytree
    without leaves, so stacking and `lax.scan` pass it through); they are f32 in every layout.
    """

    attn_norm: jax.Array  # [D]
    wq: Matrix  # [H*K, D]
    wk: Matrix  # [G*K, D]
    wv: Matrix  # [G*K, D]
    wo: Matrix  # [D, H*K]
    ffn_norm: jax.Array  # [D]
    w_gate: Matrix  # [F, D]
    w_up: Matrix  # [F, D]
    w_down: Matrix  # [D, F]
    bq: jax.Array | None = None  # [H*K]  q/k/v biases (cfg.qkv_bias: qwen2)
    bk: jax.Array | None = None  # [G*K]
    bv: jax.Array | None = None  # [G*K]
    q_norm: jax.Array | None = None  # [K]  per-head RMSNorm weights (cfg.qk_norm: qwen3, gemma3)
    k_norm: jax.Array | None = None  # [K]
    post_attn_norm: jax.Array | None = None  # [D]  sub-block output norms (cfg.post_norms: gemma3)
    post_ffn_norm: jax.Array | None = None  # [D]


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class ModelWeights:
    embed: Matrix  # [V, D]
    layers: LayerWeights  # stacked: [L, ...]
    norm: jax.Array  # [D]
    head: Matrix  # [V, D]; the same object as `embed` when the file ties them


LAYER_TENSORS: dict[str, str] = {
    "attn_norm": "attn_norm",
    "wq": "attn_q",
    "wk": "attn_k",
    "wv": "attn_v",
    "wo": "attn_output",
    "ffn_norm": "ffn_norm",
    "w_gate": "ffn_gate",
    "w_up": "ffn_up",
    "w_down": "ffn_down",
}
NORMS = ("attn_norm", "ffn_norm")
# Per-layer vectors only some architectures have (the config says which): field → tensor name.
OPTIONAL_VECTORS: dict[str, str] = {
    "bq": "attn_q.bias",
    "bk": "attn_k.bias",
    "bv": "attn_v.bias",
    "q_norm": "attn_q_norm.weight",
    "k_norm": "attn_k_norm.weight",
    "post_attn_norm": "post_attention_norm.weight",
    "post_ffn_norm": "post_ffw_norm.weight",
}


def layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of each per-layer tensor the config's architecture has (numpy order, rows first)."""
    d, q, kv, f = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.d_ff
    shapes: dict[str, tuple[int, ...]] = {
        "attn_norm": (d,), "wq": (q, d), "wk": (kv, d), "wv": (kv, d), "wo": (d, q),
        "ffn_norm": (d,), "w_gate": (f, d), "w_up": (f, d), "w_down": (d, f)}
    if cfg.qkv_bias:
        shapes.update(bq=(q,), bk=(kv,), bv=(kv,))
    if cfg.qk_norm:
        shapes.update(q_norm=(cfg.head_dim,), k_norm=(cfg.head_dim,))
    if cfg.post_norms:
        shapes.update(post_attn_norm=(d,), post_ffn_norm=(d,))
    return shapes


def tensor_name(field: str, layer: int) -> str:
    if field in OPTIONAL_VECTORS:
        return f"blk.{layer}.{OPTIONAL_VECTORS[field]}"
    return f"blk.{layer}.{LAYER_TENSORS[field]}.weight"


def default_layout() -> str:
    """`packed` where our CPU kernel runs (the default on CPU: it reads the GGUF blocks as they
    are, half the bytes of `fast`, and follows `exact` on 100 % of benchmarks/bench_engine.py's
    positions); `fast` elsewhere (XLA's own int8 dots: GPUs, TPUs, or no kernel for this CPU)."""
    return "packed" if kernel_usable() else "fast"


def check_tensors(f: GGUFFile, cfg: ModelConfig) -> None:
    """Every tensor present, of the expected shape and a supported type: fail before loading."""
    shapes = layer_shapes(cfg)
    names = [(tensor_name(k, i), s) for i in range(cfg.n_layers) for k, s in shapes.items()]
    names += [("token_embd.weight", (cfg.vocab_size, cfg.d_model)),
              ("output_norm.weight", (cfg.d_model,))]
    if not cfg.tied_embeddings:
        names.append(("output.weight", (cfg.vocab_size, cfg.d_model)))
    for name, shape in names:
        try:
            info = f.expect_shape(name, shape)
        except ShapeMismatchError as e:
            raise ShapeMismatchError(
                f"{e.message}: {_dims_legend(f, cfg)}. The tensor and the metadata disagree: "
                "the file is damaged, or was converted for another variant of the "
                f"architecture", param=name) from None
        quants.check_supported(info.qtype, tensor=name, file=str(f.path))


def _dims_legend(f: GGUFFile, cfg: ModelConfig) -> str:
    """Where the expected shapes come from: each dimension and the metadata keys behind it."""
    a = f.arch
    k = f"{a}.attention.key_length"
    return "; ".join([
        f"width D = {cfg.d_model} ({a}.embedding_length)",
        f"q rows H*K = {cfg.n_heads} x {cfg.head_dim} ({a}.attention.head_count x {k})",
        f"k/v rows G*K = {cfg.n_kv_heads} x {cfg.head_dim} ({a}.attention.head_count_kv x {k})",
        f"head dim K = {cfg.head_dim} ({k}, else D / H)",
        f"FFN F = {cfg.d_ff} ({a}.feed_forward_length)",
        f"vocabulary V = {cfg.vocab_size} ({a}.vocab_size, else token_embd.weight's rows)"])


# --- conversion to a layout -------------------------------------------------------------------


def _dequantize_f32(f: GGUFFile, name: str) -> jax.Array:
    info = f.tensor(name)
    raw = jnp.asarray(np.ascontiguousarray(f.raw(name)))
    return quants.dequantize(raw, info.qtype, info.n_cols).reshape(info.shape)


@partial(jax.jit, static_argnames=("planes",))
def _to_int8(w: jax.Array, planes: int) -> tuple[jax.Array, jax.Array]:
    qs, scales = [], []
    for _ in range(planes):
        amax = jnp.max(jnp.abs(w), axis=-1)
        scale = jnp.where(amax > 0, amax / 127.0, 1.0)
        q = jnp.clip(jnp.round(w / scale[..., None]), -127, 127)
        qs.append(q.astype(jnp.int8))
        scales.append(scale.astype(jnp.float32))
        w = w - q * scale[..., None]  # the next plane holds what this one rounded away
    return jnp.concatenate(qs, axis=-2), jnp.concatenate(scales, axis=-1)


# Kept with two int8 planes in `fast` in every architecture: the embedding / head, whose error
# shows most in the logits. Which layer matrices also get two: ModelConfig.fast_two_plane.
TWO_PLANE_TENSORS = ("token_embd.weight", "output.weight")


def planes_for(name: str, cfg: ModelConfig) -> int:
    two = name in TWO_PLANE_TENSORS or name.split(".")[-2] in cfg.fast_two_plane
    return 2 if two else 1


# Activation planes in `packed`. Teacher-forced top-1 agreement with `exact` over 502 positions
# (benchmarks/bench_engine.py, SmolLM2): one plane everywhere (llama.cpp's rounding) 97.0 %; two
# for `fast`'s two-plane tensors 97.6 %; two everywhere 100 % (perplexity +0.01 %). The second
# plane is free at one row, where reading the weights dominates, and doubles the integer work at
# 16 rows and in prefill (benchmarks/bench_kernels.py).
PACKED_ACT_PLANES = 2


def _packed(f: GGUFFile, name: str, layer_types: set[QT] | None = None) -> PackedMatrix:
    """The tensor as blocks the kernel reads: its own where it can, else re-encoded without loss
    where the formats allow (`reencode`: Q4_0/Q5_0 → Q8_0, Q4_K → Q4_1), else its values
    re-quantized to Q8_0. `layer_types`: the types of this tensor across the layers, which must
    all become one type to stack (default: this tensor's own)."""
    info = f.tensor(name)
    target, exact = reencode.kernel_type(layer_types or {info.qtype})
    if exact:
        rows = reencode.reencode(np.asarray(f.raw(name)), info.qtype, target)
    else:
        rows = gguf.quants.quantize(np.asarray(_dequantize_f32(f, name)), QT.Q8_0)
    tiles = cpu_kernels.interleave(rows, target)
    return PackedMatrix(jnp.asarray(tiles), target, info.shape[0], info.n_cols, PACKED_ACT_PLANES)


def load_matrix(f: GGUFFile, name: str, layout: str, cfg: ModelConfig) -> Matrix:
    """One matrix of the file in the given layout, as device arrays."""
    info = f.tensor(name)
    if layout == "packed":
        return _packed(f, name)
    if layout == "fast":
        planes = planes_for(name, cfg)
        q, s = _to_int8(_dequantize_f32(f, name), planes)
        return Int8Matrix(q, s, planes)
    if info.qtype in (QT.F32, QT.F16, QT.BF16):
        return _dequantize_f32(f, name)
    return quants.quant_array_from_numpy(np.ascontiguousarray(f.raw(name)), info.qtype,
                                         info.n_cols)


def load_vector(f: GGUFFile, name: str) -> jax.Array:
    return _dequantize_f32(f, name)


def load_layer(f: GGUFFile, cfg: ModelConfig, layer: int, layout: str,
               stack_types: dict[str, set[QT]]) -> LayerWeights:
    """Layer `layer` as device arrays. A field whose type differs between layers
    (stack_types[field] holds several) is expanded to f32 in `exact` and made one kernel type in
    `packed` (`_packed`), so all layers can be stacked."""
    parts: dict[str, Any] = {}
    for field in layer_shapes(cfg):
        name = tensor_name(field, layer)
        if field in NORMS or field in OPTIONAL_VECTORS:
            parts[field] = load_vector(f, name)
        elif layout == "exact" and len(stack_types[field]) > 1:
            parts[field] = _dequantize_f32(f, name)
        elif layout == "packed":
            parts[field] = _packed(f, name, stack_types[field])
        else:
            parts[field] = load_matrix(f, name, layout, cfg)
    return LayerWeights(**parts)


def stack_types(f: GGUFFile, cfg: ModelConfig) -> dict[str, set[QT]]:
    """Per field, the tensor types of its layers (one, unless the file mixes them: Q4_K_M files
    take Q6_K for some layers' ffn_down and attn_v)."""
    return {field: {f.tensor(tensor_name(field, i)).qtype for i in range(cfg.n_layers)}
            for field in LAYER_TENSORS}


def layer_at(layers: LayerWeights, layer: jax.Array) -> LayerWeights:
    """Layer `layer` (an int32 scalar, e.g. a `lax.scan` counter) of the stacked layers.

    Packed matrices stay whole and carry the index, so the kernel reads the layer in place:
    scanning over the stacked arrays instead made XLA copy every packed matrix out of the stack
    each step before the custom call (~8 ms of a ~16 ms SmolLM2 decode step, jax.profiler).
    Other arrays are indexed, which XLA fuses into their consumers.
    """
    def pick(x: Any) -> Any:
        if isinstance(x, PackedMatrix):
            return replace(x, layer=layer)
        return x[layer]
    return jax.tree_util.tree_map(pick, layers, is_leaf=lambda x: isinstance(x, PackedMatrix))


def stack_layers(layers: list[LayerWeights]) -> LayerWeights:
    """[L] per-layer pytrees → one pytree with a leading L axis (what lax.scan walks)."""
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)


def load_globals(f: GGUFFile, cfg: ModelConfig, layout: str) -> dict[str, Any]:
    """Embedding, final norm and head. In `exact` the table is f32 (see module docstring)."""
    if layout == "exact":
        embed: Matrix = _dequantize_f32(f, "token_embd.weight")
        head = embed if cfg.tied_embeddings else _dequantize_f32(f, "output.weight")
    else:
        embed = load_matrix(f, "token_embd.weight", layout, cfg)
        head = embed if cfg.tied_embeddings else load_matrix(f, "output.weight", layout, cfg)
    return {"embed": embed, "norm": load_vector(f, "output_norm.weight"), "head": head}


def nbytes(tree: Any) -> int:
    """Bytes held by a pytree's arrays (64-bit Python int), each array once: a tied head is the
    embedding's own array, not a second copy."""
    unique = {id(x): x for x in jax.tree_util.tree_leaves(tree)}
    return sum(int(x.nbytes) for x in unique.values())
