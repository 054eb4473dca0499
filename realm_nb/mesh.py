"""One mesh, one rules table: how a model's weights and KV cache spread over several devices.

A mesh has two axes: `model` (tensor parallel: heads, FFN columns, the vocabulary and the CPU
kernel's tiles are split over it) and `data` (the KV pool's pages are split over it). Every stored
array names its dimensions with logical axes (TENSOR_AXES: vocab, embed, heads, ...), and RULES
maps each logical axis to a mesh axis or to None (kept whole). That is the whole placement
policy, as in MaxText's logical_axis_rules or flax's partitioning: `placement.py` applies it to
each weight layout's arrays, `engine.py` compiles the step with those shardings as jit's
in/out shardings, and the forward (model.py) stays the same code on one device or many, XLA's
SPMD partitioner adding the collectives.

The one divisibility rule: a dimension is split over its mesh axis only where the axis size
divides it in whole units (`split_axis`): rows; 32-element blocks along a GGUF row; the CPU
kernel's 16-row tiles. Otherwise it stays whole, replicated over that axis. Heads are not a unit:
the flattened H*K rows of q (SmolLM2: 9 heads x 64 = 576) split in equal row ranges even where a
range ends inside a head (model=2: 4.5 heads per device); XLA moves the rows attention needs when
it reshapes to heads, so results do not change and every device holds 1/model of the matrix.
The cache's G axis is heads themselves: SmolLM2's 3 kv heads stay whole over model=2 (the pool
is then split over `data` only).

Glossary as in model.py; the mesh spec is written `model=2,data=1` (an axis left out is 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import AxisType, Mesh, PartitionSpec

from .errors import InvalidRequestError

MODEL = "model"
DATA = "data"
MESH_AXES = (DATA, MODEL)  # device order: `model` innermost, so its devices are neighbours

# ================================================================ the rules table

# logical axis -> mesh axis (None: never split)
RULES: dict[str, str | None] = {
    "vocab": MODEL,  # embedding / head rows: the head is column-parallel, logits gathered
    "heads": MODEL,  # q rows H*K, attn_output columns, the q bias
    "kv_heads": MODEL,  # k/v rows G*K, their biases; the cache's G
    "ffn": MODEL,  # gate/up rows F, down columns
    "tiles": MODEL,  # `packed`: the CPU kernel's 16-row tiles of every matrix (output rows)
    "pages": DATA,  # the KV pool's pages
    "embed": None,
    "layers": None,
    "head_dim": None,
    "page": None,
    "bytes": None,  # the bytes of one packed tile row
}

# Each tensor's logical axes: a matrix [O, I] as (output rows, input columns), a vector [n],
# the cache [L, P, PAGE, G, K]. Stacked layers add a leading "layers" axis.
MATRIX_AXES: dict[str, tuple[str, str]] = {
    "embed": ("vocab", "embed"),  # [V, D]
    "head": ("vocab", "embed"),  # [V, D]
    "wq": ("heads", "embed"),  # [H*K, D]
    "wk": ("kv_heads", "embed"),  # [G*K, D]
    "wv": ("kv_heads", "embed"),  # [G*K, D]
    "wo": ("embed", "heads"),  # [D, H*K]
    "w_gate": ("ffn", "embed"),  # [F, D]
    "w_up": ("ffn", "embed"),  # [F, D]
    "w_down": ("embed", "ffn"),  # [D, F]
}
VECTOR_AXES: dict[str, str] = {
    "norm": "embed", "attn_norm": "embed", "ffn_norm": "embed",
    "post_attn_norm": "embed", "post_ffn_norm": "embed",
    "bq": "heads", "bk": "kv_heads", "bv": "kv_heads",
    "q_norm": "head_dim", "k_norm": "head_dim",
}
CACHE_AXES = ("layers", "pages", "page", "kv_heads", "head_dim")  # [L, P, PAGE, G, K]
TENSOR_AXES: dict[str, tuple[str, ...]] = {
    **MATRIX_AXES, **{k: (v,) for k, v in VECTOR_AXES.items()}, "kv_cache": CACHE_AXES}


def split_axis(logical: str, size: int, unit: int, mesh_shape: Mapping[str, int]) -> str | None:
    """The mesh axis a dimension of `size` elements is split over, or None where it stays whole:
    RULES names no axis, the mesh lacks it or has size 1, or its size does not divide the
    dimension in whole units of `unit` elements."""
    axis = RULES[logical]
    n = mesh_shape.get(axis, 1) if axis is not None else 1
    if axis is None or n == 1 or size % unit or (size // unit) % n:
        return None
    return axis


def partition_spec(axes: Sequence[str], shape: Sequence[int], mesh_shape: Mapping[str, int],
                   units: Sequence[int] | None = None) -> PartitionSpec:
    """PartitionSpec of an array with these logical axes (one per dimension), by RULES and the
    divisibility rule; a mesh axis splits one dimension at most (the first that takes it)."""
    assert len(axes) == len(shape), (axes, shape)
    units = units or [1] * len(shape)
    taken: set[str] = set()
    spec: list[str | None] = []
    for logical, size, unit in zip(axes, shape, units, strict=True):
        axis = split_axis(logical, size, unit, mesh_shape)
        if axis in taken:
            axis = None
        if axis is not None:
            taken.add(axis)
        spec.append(axis)
    return PartitionSpec(*spec)


def kernel_shards(n_rows: int, tile_rows: int) -> int:
    """Into how many shards the CPU kernel splits a matrix of n_rows output rows while the
    step is traced under a mesh (`jax.set_mesh`): the `model` axis size where whole tiles
    divide, else 1. The same rule that `placement.py` places the tiles by."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or MODEL in mesh.manual_axes:  # no mesh, or already inside a shard_map
        return 1
    shape = dict(mesh.shape)
    axis = split_axis("tiles", n_rows, tile_rows, shape)
    return shape[axis] if axis is not None else 1


# ================================================================ mesh specs


def parse_mesh_spec(spec: str | Mapping[str, int]) -> dict[str, int]:
    """`model=2,data=1` (or {"model": 2, "data": 1}) → {"data": 1, "model": 2}; an axis left out
    is 1. Raises InvalidRequestError naming the bad part."""
    items: list[tuple[str, Any]]
    if isinstance(spec, Mapping):
        items = [(str(k), v) for k, v in spec.items()]
    elif isinstance(spec, str) and spec.strip():
        items = []
        for part in spec.split(","):
            name, eq, value = part.partition("=")
            if not eq:
                raise InvalidRequestError(
                    f"mesh={spec!r}: {part.strip()!r} is not AXIS=SIZE; write e.g. "
                    "model=2,data=1", param="mesh")
            items.append((name.strip(), value.strip()))
    else:
        raise InvalidRequestError(
            f"mesh={spec!r}: give the axes' sizes as 'model=2,data=1' (or a dict of them)",
            param="mesh")
    sizes = {DATA: 1, MODEL: 1}
    seen: set[str] = set()
    for name, value in items:
        if name not in MESH_AXES:
            raise InvalidRequestError(
                f"mesh={spec!r}: unknown axis {name!r}; the axes are {MODEL!r} (tensor parallel) "
                f"and {DATA!r} (KV cache pages)", param="mesh")
        if name in seen:
            raise InvalidRequestError(f"mesh={spec!r}: axis {name!r} is given twice",
                                      param="mesh")
        seen.add(name)
        n_devices = _positive_int(value)
        if n_devices is None:
            raise InvalidRequestError(
                f"mesh={spec!r}: {name}={value!r} is not a whole number of devices >= 1",
                param="mesh")
        sizes[name] = n_devices
    return sizes


def _positive_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 1 else None
    if isinstance(value, str) and value.isdigit() and int(value) >= 1:
        return int(value)
    return None


def describe(mesh: Mesh | None) -> str:
    """`model=2,data=1`, or `model=1,data=1` for the single-device path (no mesh)."""
    if mesh is None:
        return f"{MODEL}=1,{DATA}=1"
    return f"{MODEL}={mesh.shape[MODEL]},{DATA}={mesh.shape[DATA]}"


def build_mesh(spec: str | Mapping[str, int] | Mesh | None = None,
               devices: Sequence[Any] | None = None) -> Mesh | None:
    """The mesh a model runs on, or None for the plain single-device path.

    spec None: all local devices of the default backend on `model` (tensor parallel), or None
    where there is one device only (today's path, unchanged). A spec ('model=2,data=1', a dict,
    or a jax Mesh with axes model and data) must use exactly the given devices (default: the
    local devices): the product of the sizes is their count.
    """
    if isinstance(spec, Mesh):
        if set(spec.axis_names) != set(MESH_AXES):
            raise InvalidRequestError(
                f"mesh has axes {tuple(spec.axis_names)}; realm-nb needs exactly {MESH_AXES}",
                param="mesh")
        return spec
    devs = list(devices) if devices is not None else jax.local_devices()
    if spec is None:
        if len(devs) == 1:
            return None
        sizes = {DATA: 1, MODEL: len(devs)}
    else:
        sizes = parse_mesh_spec(spec)
    n = math.prod(sizes.values())
    if n != len(devs):
        raise InvalidRequestError(
            f"mesh={spec!r} spans {sizes[MODEL]} x {sizes[DATA]} = {n} device(s), but "
            f"{len(devs)} {devs[0].platform} device(s) are at hand; give sizes whose product is "
            f"{len(devs)} (XLA_FLAGS=--xla_force_host_platform_device_count=N makes N CPU "
            "devices)", param="mesh")
    grid = [sizes[a] for a in MESH_AXES]
    return jax.make_mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devs)

