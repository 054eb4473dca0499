"""Weights and KV cache placed on a mesh: each layout's stored arrays named by mesh.TENSOR_AXES,
split by mesh.RULES (see mesh.py for the policy and the divisibility rule).

What each layout stores, and so what is split:
- `exact`: f32 matrices [.., O, I] split as their logical axes say; a GGUF block matrix
  (QuantArray) [.., O, row bytes] likewise, its input axis only in whole 32-element blocks.
- `fast`: Int8Matrix q [.., P*O, I] and scale [.., P*O] split by their logical axes.
- `packed`: every matrix's 16-row tiles [.., O/16, tile bytes] split over `model` by output
  rows, so that the CPU kernel runs per shard on whole tiles under `shard_map`
  (cpu_kernels.quant_matmul_many): q/k/v, gate/up and the head as Megatron splits them,
  attn_output and ffn_down also by output rows rather than by input (no psum). Each call's
  output rows are gathered, so the rest of the forward runs whole on every device and the
  logits equal the single-device ones bit for bit (tests/mesh_cases.py).
- vectors (norms, biases) by their logical axes: the norms stay whole on every device.
A tied head stays the embedding's own array.
"""

from __future__ import annotations

from typing import Any

import jax
from gguf import GGML_QUANT_SIZES
from jax.sharding import Mesh, NamedSharding

from . import cpu_kernels
from .kvcache import KVCache
from .mesh import CACHE_AXES, MATRIX_AXES, VECTOR_AXES, partition_spec
from .quants import QuantArray
from .weights import Int8Matrix, LayerWeights, ModelWeights, PackedMatrix


def _sharding(mesh: Mesh, axes: tuple[str, ...], shape: tuple[int, ...],
              units: tuple[int, ...] | None = None) -> NamedSharding:
    return NamedSharding(mesh, partition_spec(axes, shape, dict(mesh.shape), units))


def _place_matrix(w: Any, field: str, mesh: Mesh) -> Any:
    out_axis, in_axis = MATRIX_AXES[field]

    def lead(x: jax.Array, n: int) -> tuple[str, ...]:
        return ("layers",) * (x.ndim - n)

    if isinstance(w, PackedMatrix):
        raw = w.raw  # [.., O/16, tile bytes]: split by tiles, as the kernel's shards read them
        axes = (*lead(raw, 2), "tiles", "bytes")
        # the tile axis counted in rows, so that a padded last tile (O % 16) never splits
        shape = (*raw.shape[:-2], w.n_rows, raw.shape[-1])
        units = (*[1] * (raw.ndim - 2), cpu_kernels.GROUP, 1)
        return _replace(w, raw=jax.device_put(raw, _sharding(mesh, axes, shape, units)))
    if isinstance(w, QuantArray):  # [.., O, row bytes]: whole blocks along the row only
        block_bytes = GGML_QUANT_SIZES[w.qtype][1]
        axes = (*lead(w.raw, 2), out_axis, in_axis)
        units = (*[1] * (w.raw.ndim - 1), block_bytes)
        return QuantArray(jax.device_put(w.raw, _sharding(mesh, axes, w.raw.shape, units)),
                          w.qtype, w.n_cols)
    if isinstance(w, Int8Matrix):  # q [.., P*O, I], scale [.., P*O]
        q = jax.device_put(w.q, _sharding(mesh, (*lead(w.q, 2), out_axis, in_axis), w.q.shape))
        s = jax.device_put(w.scale, _sharding(mesh, (*lead(w.scale, 1), out_axis),
                                              w.scale.shape))
        return Int8Matrix(q, s, w.planes)
    return jax.device_put(w, _sharding(mesh, (*lead(w, 2), out_axis, in_axis), w.shape))


def _replace(w: PackedMatrix, raw: jax.Array) -> PackedMatrix:
    return PackedMatrix(raw, w.qtype, w.n_rows, w.n_cols, w.act_planes, w.layer)


def _place_vector(v: jax.Array | None, field: str, mesh: Mesh) -> jax.Array | None:
    if v is None:
        return None
    axes = (*("layers",) * (v.ndim - 1), VECTOR_AXES[field])
    return jax.device_put(v, _sharding(mesh, axes, v.shape))


def place_params(params: ModelWeights, mesh: Mesh) -> ModelWeights:
    """The weights as arrays sharded over `mesh` (the arrays of `params` are left as they are)."""
    layer_parts: dict[str, Any] = {}
    for name in LayerWeights.__dataclass_fields__:
        value = getattr(params.layers, name)
        layer_parts[name] = (_place_matrix(value, name, mesh) if name in MATRIX_AXES
                             else _place_vector(value, name, mesh))
    embed = _place_matrix(params.embed, "embed", mesh)
    head = embed if params.head is params.embed else _place_matrix(params.head, "head", mesh)
    norm = _place_vector(params.norm, "norm", mesh)
    assert norm is not None
    return ModelWeights(embed=embed, layers=LayerWeights(**layer_parts), norm=norm, head=head)


def cache_sharding(cache: KVCache, mesh: Mesh) -> KVCache:
    """Shardings of the pool's k and v [L, P, PAGE, G, K]: pages over `data`, kv heads over
    `model` where they divide (a pytree shaped like the cache, for jit and device_put)."""
    s = _sharding(mesh, CACHE_AXES, tuple(cache.k.shape))
    return KVCache(s, s)  # type: ignore[arg-type]  # shardings in the arrays' places


def shardings_of(tree: Any) -> Any:
    """The sharding of every array of a placed pytree, in its shape (jit's in/out_shardings)."""
    return jax.tree_util.tree_map(lambda x: x.sharding, tree)
