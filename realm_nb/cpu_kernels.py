"""Quantized matmul over raw GGUF blocks on the CPU, as an XLA FFI custom call.

XLA cannot read 4-bit blocks at memory bandwidth on this CPU (FACTS.md: 17-36 ms for the 30
layers' matmuls in block formats against 5.5 ms for int8), so `csrc/realm_kernels.cc` does what
llama.cpp does: it rounds the activations to int8 per 32-block inside the kernel and runs an
integer dot against each Q4_0 / Q4_1 / Q8_0 weight block (AVX-512 VNNI, AVX2 or scalar, picked at
run time). `quant_matmul` calls it from jitted code; `weights.PackedMatrix` is the layout that
uses it.

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
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from .errors import RealmError, ShapeMismatchError
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


class KernelBuildError(RealmError):
    """The CPU kernels could not be built (no Zig, no source, or the compiler failed)."""

    code = "kernel_build_failed"


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
            "-std=c++17", *machine, f"-I{jax.ffi.include_dir()}", "-o", out_name, source_name]


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


# ================================================================ the call


def _check_operands(x: jax.Array, raw: jax.Array, qtype: QT, n_cols: int,
                    act_planes: int) -> None:
    row_bytes = None
    if qtype in KERNEL_TYPES and n_cols % 32 == 0:
        block, type_size = GGML_QUANT_SIZES[qtype]
        row_bytes = n_cols // block * type_size
    if (row_bytes is None or raw.ndim != 2 or raw.shape[1] != row_bytes
            or x.shape[-1] != n_cols or act_planes not in (1, 2)):
        raise ShapeMismatchError(
            f"quant_matmul needs x [..., {n_cols}] and raw uint8 [O, row_bytes] of "
            f"{'/'.join(t.name for t in KERNEL_TYPES)}, act_planes 1 or 2; got x "
            f"{list(x.shape)}, raw {list(raw.shape)} of {getattr(qtype, 'name', qtype)}, "
            f"act_planes {act_planes}",
            shape=list(raw.shape), qtype=getattr(qtype, "name", str(qtype)))


def _library() -> ctypes.CDLL:
    lib = _load()
    if isinstance(lib, str):
        raise KernelBuildError(f"the CPU kernels are unavailable: {lib}")
    return lib


def quant_matmul(x: jax.Array, raw: jax.Array, qtype: QT, n_cols: int, act_planes: int = 1
                 ) -> jax.Array:
    """y[..., o] = sum_i x[..., i] W[o, i], W given as its GGUF blocks; usable inside jit and scan.

    The kernel rounds x to int8 per 32-block (one f32 scale each) as llama.cpp does, so results
    differ from an f32 matmul by that rounding; with act_planes=2 it also rounds the residual
    (x ≈ dx*q + dx2*q2), for ~14-bit activations at twice the integer work and the same weight
    reads. Each row of x is computed independently of the others.

    Args:
      x: f32 [..., I], I = n_cols.
      raw: uint8 [O, row_bytes], rows of qtype blocks (one of KERNEL_TYPES).
      qtype, n_cols, act_planes: static.
    Returns:
      f32 [..., O].
    """
    _library()
    _check_operands(x, raw, qtype, n_cols, act_planes)
    lead, n_out = x.shape[:-1], raw.shape[0]
    rows = x.reshape(-1, n_cols).astype(jnp.float32)
    out_type = jax.ShapeDtypeStruct((rows.shape[0], n_out), jnp.float32)
    y = jax.ffi.ffi_call(FFI_TARGET, out_type)(rows, raw, qtype=np.int32(int(qtype)),
                                               act_planes=np.int32(act_planes))
    return y.reshape(*lead, n_out)


def quant_matmul_many(x: jax.Array, raws: tuple[jax.Array, ...], qtypes: tuple[QT, ...],
                      n_cols: int, act_planes: int = 1) -> tuple[jax.Array, ...]:
    """`quant_matmul` of one x against several matrices in one kernel call: x is rounded once
    and one parallel split covers all outputs. Each result equals `quant_matmul`'s exactly (the
    same per-row instruction sequence)."""
    _library()
    if len(raws) != len(qtypes) or not raws:
        raise ShapeMismatchError(f"quant_matmul_many needs one qtype per matrix; got "
                                 f"{len(raws)} matrices and {len(qtypes)} qtypes")
    for raw, qtype in zip(raws, qtypes, strict=True):
        _check_operands(x, raw, qtype, n_cols, act_planes)
    lead = x.shape[:-1]
    rows = x.reshape(-1, n_cols).astype(jnp.float32)
    out_types = [jax.ShapeDtypeStruct((rows.shape[0], raw.shape[0]), jnp.float32)
                 for raw in raws]
    ys = jax.ffi.ffi_call(FFI_TARGET_MANY, out_types)(
        rows, *raws, qtypes=np.asarray([int(q) for q in qtypes], np.int32),
        act_planes=np.int32(act_planes))
    return tuple(y.reshape(*lead, raw.shape[0]) for y, raw in zip(ys, raws, strict=True))


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
