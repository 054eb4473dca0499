"""Quantized matmul over GGUF blocks on the CPU, as an XLA FFI custom call.

XLA cannot read 4-bit blocks at memory bandwidth on this CPU (FACTS.md: 17-36 ms for the 30
layers' matmuls in block formats against 5.5 ms for int8), so `csrc/realm_kernels.cc` does what
llama.cpp does: it rounds the activations per 32-block inside the kernel (to 16 bits held as two
int8 planes, or llama.cpp's 8) and runs integer dots against each Q4_0 / Q4_1 / Q8_0 weight block
(AVX-512 VNNI, AVX2 or scalar, picked at run time). The weights are the file's blocks reordered
once at load into tiles of 16 output rows (`interleave`; the layout is described in the C
source), so one vector instruction multiplies 4 inputs of 16 rows and no row needs a horizontal
sum. `quant_matmul` calls the kernel from jitted code; `deinterleave` gives the GGUF rows back
(for the XLA fallback and embedding lookups); `weights.PackedMatrix` is the layout that uses it.

The library ships built as `realm_nb/_kernels/librealm_kernels.so` (generic x86-64 Linux, glibc
2.28), compiled with the pinned Zig from the `ziglang` wheel (the `build` extra), reproducibly:
``python -m realm_nb.cpu_kernels --check`` rebuilds and exits 1 if the result differs from the
shipped file (the same source, Zig and jaxlib headers give the same bytes). If the shipped
library is missing or does not load, it is built into the realm-nb cache when ziglang is
installed; otherwise `available()` is False and callers fall back to XLA
(`unavailable_reason()` says why). REALM_NB_CPU_KERNELS=0 turns the kernels off.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from jax.sharding import PartitionSpec

from . import mesh
from .errors import KernelBuildError, ShapeMismatchError
from .guest_build import ZIG_VERSION

PACKAGE_DIR = Path(__file__).resolve().parent
KERNEL_DIR = PACKAGE_DIR / "_kernels"
KERNEL_ARTIFACT = KERNEL_DIR / "librealm_kernels.so"
SOURCE_CANDIDATES = (PACKAGE_DIR.parent / "csrc" / "realm_kernels.cc",  # a checkout
                     KERNEL_DIR / "realm_kernels.cc")  # the wheel (force-included)
ZIG_TARGET = "x86_64-linux-gnu.2.28"  # generic x86-64; the kernel picks AVX-512 / AVX2 itself
FFI_TARGET = "realm_quant_matmul"
HANDLER_SYMBOL = "RealmQuantMatmul"
FFI_TARGET_MANY = "realm_quant_matmul_many"  # several matrices sharing one x (q/k/v, gate/up)
HANDLER_SYMBOL_MANY = "RealmQuantMatmulMany"
ISA_NAMES = ("scalar", "avx2", "avx512-vnni")  # realm_kernels_isa() → name

# GGUF block formats the kernel reads: the rest are re-quantized to Q8_0 by the `packed` layout.
KERNEL_TYPES: tuple[QT, ...] = (QT.Q4_0, QT.Q4_1, QT.Q8_0)


# ================================================================ build


def kernel_source() -> Path:
    for path in SOURCE_CANDIDATES:
        if path.is_file():
            return path
    looked = ", ".join(map(str, SOURCE_CANDIDATES))
    raise KernelBuildError(f"kernel source not found (looked in {looked})")


def build_command(source_name: str, out_name: str, *, target: str | None = ZIG_TARGET
                  ) -> list[str]:
    """The compiler command, run in a directory holding `source_name` (relative paths only,
    so the output does not depend on where the build ran)."""
    if importlib.util.find_spec("ziglang") is None:
        raise KernelBuildError(
            f"building the CPU kernels needs Zig {ZIG_VERSION} from the ziglang wheel, which is "
            "not installed; pip install 'realm-nb[build]'")
    machine = ["-target", target, "-mcpu=x86_64"] if target else ["-mcpu=baseline"]
    return [sys.executable, "-m", "ziglang", "c++", "-shared", "-fPIC", "-O3", "-g0", "-s",
            "-std=c++17", "-ffp-contract=off", *machine, f"-I{jax.ffi.include_dir()}",
            "-o", out_name, source_name]


def build_kernels(out: Path | None = None, source: Path | None = None, *,
                  target: str | None = ZIG_TARGET) -> Path:
    """Compile the kernels into the shared library `out` (default: the shipped artifact)."""
    out = Path(out) if out is not None else KERNEL_ARTIFACT
    source = Path(source) if source is not None else kernel_source()
    if not source.is_file():
        raise KernelBuildError(f"kernel source {source} not found")
    with tempfile.TemporaryDirectory(prefix="realm-kernels-") as tmp:
        shutil.copyfile(source, Path(tmp) / "realm_kernels.cc")
        cmd = build_command("realm_kernels.cc", "librealm_kernels.so", target=target)
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, check=False)
        built = Path(tmp) / "librealm_kernels.so"
        if proc.returncode != 0 or not built.is_file():
            raise KernelBuildError(
                f"zig c++ failed (exit {proc.returncode}) for {source}:\n{proc.stderr}")
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built, out)
    return out


def _cache_build() -> Path:
    """Build for this machine into the realm-nb cache, keyed by source and jaxlib headers."""
    from .paths import cache_dir

    source = kernel_source()
    x86_linux = sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64")
    target = ZIG_TARGET if x86_linux else None
    key = hashlib.sha256(source.read_bytes() + jax.ffi.include_dir().encode()
                         + str(target).encode()).hexdigest()[:16]
    out = cache_dir() / "kernels" / key / KERNEL_ARTIFACT.name
    if not out.is_file():
        build_kernels(out, source, target=target)
    return out


# ================================================================ load and register


@functools.cache
def _load() -> ctypes.CDLL | str:
    """The loaded, registered library, or the reason there is none (computed once)."""
    if os.environ.get("REALM_NB_CPU_KERNELS", "1") == "0":
        return "turned off by REALM_NB_CPU_KERNELS=0"
    reasons = []
    lib = None
    if KERNEL_ARTIFACT.is_file():
        try:
            lib = ctypes.CDLL(str(KERNEL_ARTIFACT))
        except OSError as e:
            reasons.append(f"the shipped {KERNEL_ARTIFACT.name} did not load ({e})")
    else:
        reasons.append(f"{KERNEL_ARTIFACT} is missing")
    if lib is None:
        try:
            lib = ctypes.CDLL(str(_cache_build()))
        except (KernelBuildError, OSError) as e:
            reasons.append(getattr(e, "message", str(e)))
            return "; ".join(reasons)
    lib.realm_kernels_isa.restype = ctypes.c_int32
    for target, symbol in ((FFI_TARGET, HANDLER_SYMBOL), (FFI_TARGET_MANY, HANDLER_SYMBOL_MANY)):
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                    platform="cpu")
    return lib


def available() -> bool:
    """True when the kernels are loaded and registered with XLA's CPU backend."""
    return not isinstance(_load(), str)


def unavailable_reason() -> str | None:
    lib = _load()
    return lib if isinstance(lib, str) else None


def isa() -> str:
    """The instruction set the kernel runs here: 'avx512-vnni', 'avx2' or 'scalar'."""
    return ISA_NAMES[_library().realm_kernels_isa()]


# ================================================================ the tiled layout

GROUP = 16  # output rows per tile
BLOCK = 32  # elements per GGUF block
SCALES_AT = {QT.Q4_0: (0,), QT.Q4_1: (0, 2), QT.Q8_0: (0,)}  # f16 fields in a GGUF block
VECTORS = {QT.Q4_0: 4, QT.Q4_1: 4, QT.Q8_0: 8}  # 64-byte quant vectors per tile


def tile_size(qtype: QT) -> int:
    """Bytes of one tile: 16 GGUF blocks."""
    return GROUP * GGML_QUANT_SIZES[qtype][1]


def tiled_shape(qtype: QT, n_rows: int, n_cols: int) -> tuple[int, int]:
    """Shape of the tiled array for an [n_rows, n_cols] matrix: [ceil(O/16), nb * tile bytes]."""
    return -(-n_rows // GROUP), n_cols // BLOCK * tile_size(qtype)


def interleave(raw: np.ndarray, qtype: QT) -> np.ndarray:
    """GGUF rows uint8 [..., O, row_bytes] → tiles uint8 [..., ceil(O/16), nb * tile bytes].

    Tile (g, b): the f16 fields of block b of rows 16g..16g+15 (d, then Q4_1's m: 16 each), then
    the quants so that 64-byte vector v holds bytes 4v..4v+3 of each row's quants, row after row
    (see csrc/realm_kernels.cc). Rows past O are zero blocks (scale 0). A permutation of bytes.
    """
    if qtype not in KERNEL_TYPES:
        raise ShapeMismatchError(f"interleave reads {'/'.join(t.name for t in KERNEL_TYPES)}, "
                                 f"not {getattr(qtype, 'name', qtype)}",
                                 qtype=getattr(qtype, "name", str(qtype)))
    ts = GGML_QUANT_SIZES[qtype][1]
    *lead, n_rows, row_bytes = raw.shape
    nb = row_bytes // ts
    groups = -(-n_rows // GROUP)
    padded = np.zeros((*lead, groups * GROUP, row_bytes), np.uint8)
    padded[..., :n_rows, :] = raw
    blocks = padded.reshape(*lead, groups, GROUP, nb, ts)
    blocks = np.moveaxis(blocks, -3, -2)  # [..., G, nb, 16 rows, ts]
    fields = [blocks[..., at : at + 2].reshape(*lead, groups, nb, 2 * GROUP)
              for at in SCALES_AT[qtype]]
    qs_at = 2 * len(SCALES_AT[qtype])
    qs = blocks[..., qs_at:].reshape(*lead, groups, nb, GROUP, VECTORS[qtype], 4)
    qs = np.moveaxis(qs, -3, -2).reshape(*lead, groups, nb, -1)  # [..., G, nb, v, 16 rows, 4]
    tiles = np.concatenate([*fields, qs], axis=-1)
    return np.ascontiguousarray(tiles.reshape(*lead, groups, nb * tile_size(qtype)))


def deinterleave(tiles: jax.Array, qtype: QT, n_rows: int, n_cols: int) -> jax.Array:
    """`interleave`'s inverse in JAX (usable in jit): uint8 [..., O, row_bytes] GGUF rows."""
    ts = GGML_QUANT_SIZES[qtype][1]
    *lead, groups, _ = tiles.shape
    nb = n_cols // BLOCK
    t = tiles.reshape(*lead, groups, nb, GROUP * ts)
    n_f = len(SCALES_AT[qtype])
    fields = [t[..., 2 * GROUP * i : 2 * GROUP * (i + 1)].reshape(*lead, groups, nb, GROUP, 2)
              for i in range(n_f)]
    qs = t[..., 2 * GROUP * n_f :].reshape(*lead, groups, nb, VECTORS[qtype], GROUP, 4)
    qs = jnp.swapaxes(qs, -3, -2).reshape(*lead, groups, nb, GROUP, -1)  # [..., G, nb, 16, q]
    blocks = jnp.concatenate([*fields, qs], axis=-1)  # [..., G, nb, 16, ts]
    rows = jnp.swapaxes(blocks, -3, -2).reshape(*lead, groups * GROUP, nb * ts)
    return rows[..., :n_rows, :]


# ================================================================ the call


def _check_operands(x: jax.Array, tiles: jax.Array, qtype: QT, n_rows: int, n_cols: int,
                    act_planes: int) -> None:
    shape = None
    if qtype in KERNEL_TYPES and n_cols % BLOCK == 0:
        shape = tiled_shape(qtype, n_rows, n_cols)
    if (shape is None or tiles.ndim not in (2, 3) or tuple(tiles.shape[-2:]) != shape
            or x.shape[-1] != n_cols or act_planes not in (1, 2)):
        raise ShapeMismatchError(
            f"quant_matmul needs x [..., {n_cols}] and tiles uint8 [L?, "
            f"{', '.join(map(str, shape or ['?']))}] (cpu_kernels.interleave of {n_rows} rows) "
            f"of {'/'.join(t.name for t in KERNEL_TYPES)}, act_planes 1 or 2; got x "
            f"{list(x.shape)}, tiles {list(tiles.shape)} of {getattr(qtype, 'name', qtype)}, "
            f"act_planes {act_planes}",
            shape=list(tiles.shape), qtype=getattr(qtype, "name", str(qtype)))


def _library() -> ctypes.CDLL:
    lib = _load()
    if isinstance(lib, str):
        raise KernelBuildError(f"the CPU kernels are unavailable: {lib}")
    return lib


def quant_matmul(x: jax.Array, tiles: jax.Array, qtype: QT, n_rows: int, n_cols: int,
                 act_planes: int = 1, layer: jax.Array | int | None = None) -> jax.Array:
    """y[..., o] = sum_i x[..., i] W[o, i], W given as its tiled GGUF blocks; usable inside jit
    and scan.

    The kernel rounds x per 32-block as llama.cpp does, to int8 (act_planes=1) or to 16 bits held
    as two int8 planes (act_planes=2: x ~ dx/256 * (256*q1 + q2), twice the integer work for the
    same weight reads), so results differ from an f32 matmul by that rounding. Each row of x is
    computed independently of the others.

    Args:
      x: f32 [..., I], I = n_cols.
      tiles: uint8 [ceil(O/16), nb * tile bytes], `interleave` of the O = n_rows GGUF rows of
        qtype (one of KERNEL_TYPES); or [L, ...] of L layers with `layer` the one to use, read
        in place (inside `lax.scan`, a slice tiles[l] would be a copy of the layer).
      qtype, n_rows, n_cols, act_planes: static.
      layer: int32 scalar (traced or not), for stacked tiles.
    Returns:
      f32 [..., O].
    """
    return quant_matmul_many(x, (tiles,), (qtype,), (n_rows,), n_cols, act_planes, layer)[0]


def quant_matmul_many(x: jax.Array, tiles: tuple[jax.Array, ...], qtypes: tuple[QT, ...],
                      n_rows: tuple[int, ...], n_cols: int, act_planes: int = 1,
                      layer: jax.Array | int | None = None) -> tuple[jax.Array, ...]:
    """`quant_matmul` of one x against several matrices (all stacked or none) in one kernel
    call: x is rounded once and one parallel split covers all outputs. Each result equals
    `quant_matmul`'s exactly (the same per-row instruction sequence)."""
    _library()
    if len(tiles) != len(qtypes) or len(tiles) != len(n_rows) or not tiles:
        raise ShapeMismatchError(f"quant_matmul_many needs one qtype and row count per matrix; "
                                 f"got {len(tiles)} matrices, {len(qtypes)} qtypes and "
                                 f"{len(n_rows)} row counts")
    for t, qtype, o in zip(tiles, qtypes, n_rows, strict=True):
        _check_operands(x, t, qtype, o, n_cols, act_planes)
    stacked = {t.ndim == 3 for t in tiles}
    if stacked != {layer is not None}:
        raise ShapeMismatchError("quant_matmul: stacked tiles [L, G, bytes] need a layer index, "
                                 "and a layer index needs stacked tiles; got tiles of "
                                 f"{sorted(t.ndim for t in tiles)} dimensions, layer {layer!r}")
    if layer is None:
        tiles, layer = tuple(t[None] for t in tiles), 0
    layer_arg = jnp.asarray(layer, jnp.int32).reshape(())
    lead = x.shape[:-1]
    rows = x.reshape(-1, n_cols).astype(jnp.float32)
    shards = {mesh.kernel_shards(o, GROUP) for o in n_rows}
    if len(shards) > 1:  # some matrices split over the mesh, some whole: one call each
        return tuple(quant_matmul_many(x, (t,), (q,), (o,), n_cols, act_planes, layer_arg)[0]
                     for t, q, o in zip(tiles, qtypes, n_rows, strict=True))
    n_shards = shards.pop()
    call: Callable[..., tuple[jax.Array, ...]] = functools.partial(
        _call, qtypes=qtypes, n_rows=tuple(o // n_shards for o in n_rows), act_planes=act_planes)
    if n_shards > 1:
        call = _per_shard(call, len(tiles))
    ys = call(rows, layer_arg, *tiles)
    return tuple(y.reshape(*lead, o) for y, o in zip(ys, n_rows, strict=True))


def _call(rows: jax.Array, layer: jax.Array, *tiles: jax.Array, qtypes: tuple[QT, ...],
          n_rows: tuple[int, ...], act_planes: int) -> tuple[jax.Array, ...]:
    """The custom call: rows f32 [N, I], layer int32 [], tiles [L, O/16, bytes] → [N, O] each."""
    out_types = [jax.ShapeDtypeStruct((rows.shape[0], o), jnp.float32) for o in n_rows]
    target = FFI_TARGET if len(tiles) == 1 else FFI_TARGET_MANY
    attrs: dict[str, Any] = (
        {"qtype": np.int32(int(qtypes[0]))} if len(tiles) == 1
        else {"qtypes": np.asarray([int(q) for q in qtypes], np.int32)})
    return tuple(jax.ffi.ffi_call(target, out_types)(rows, layer, *tiles, **attrs,
                                                     act_planes=np.int32(act_planes)))


def _per_shard(call: Callable[..., tuple[jax.Array, ...]], n_matrices: int
               ) -> Callable[..., tuple[jax.Array, ...]]:
    """`call` run on each device of the mesh being traced, on its own tiles (placement.py
    splits every packed matrix by 16-row tiles over `model`): each device gets x whole,
    computes its rows of the output, and the rows are gathered. A custom call given sharded
    operands would have them gathered instead. Measured here (2 forced CPU devices on 2 cores,
    30 layers of a [1536, 576] Q4_1 matrix at 2 rows, one scan): 2.7 ms per shard with the
    gather, 9.0 ms with the tiles gathered into the call, 46 ms for the XLA fallback
    (dequantize + dot); 0.8-1.4 ms on one device. Splitting by output rows only (no input
    split and psum for attn_output / ffn_down) keeps every output row the same instruction
    sequence as on one device: results equal bit for bit."""
    tile_spec = PartitionSpec(None, mesh.MODEL, None)  # [L, O/16, bytes]

    def gathered(*args: jax.Array) -> tuple[jax.Array, ...]:
        return tuple(jax.lax.all_gather(y, mesh.MODEL, axis=1, tiled=True) for y in call(*args))

    return jax.shard_map(gathered, mesh=jax.sharding.get_abstract_mesh(),
                         in_specs=(PartitionSpec(), PartitionSpec(), *[tile_spec] * n_matrices),
                         out_specs=(PartitionSpec(),) * n_matrices, check_vma=False)


# ================================================================ CLI


def main(argv: list[str] | None = None) -> int:
    """``python -m realm_nb.cpu_kernels [--check]``."""
    parser = argparse.ArgumentParser(prog="realm-nb build-kernels", description=__doc__)
    parser.add_argument("--check", action="store_true",
                        help="build into a temporary file and exit 1 if it differs from the "
                             "shipped library")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output (default {KERNEL_ARTIFACT})")
    args = parser.parse_args(argv)
    try:
        if args.check:
            from .guest_build import check_shipped

            with tempfile.TemporaryDirectory() as tmp:
                built = build_kernels(Path(tmp) / KERNEL_ARTIFACT.name).read_bytes()
            return check_shipped(built, KERNEL_ARTIFACT, "python -m realm_nb.cpu_kernels")
        path = build_kernels(args.out)
    except KernelBuildError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    print(f"built {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
