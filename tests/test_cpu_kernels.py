"""realm_nb.cpu_kernels: the FFI quantized matmul against a numpy reference, its batch invariance,
its use inside jit and scan (stacked layers read in place), the tiled layout, the XLA fallback,
the `packed` layout on a tiny model, and the reproducible build.

Reference: weights as `gguf.quants.dequantize` expands them; activations rounded per 32-block the
way the kernel documents it (dx = amax/127 in f32, t = x * (1/dx) in f32, q1 = round-half-even(t);
with two planes Q = 256 q1 + clip(rint(256 t) - 256 q1, +-127) at scale dx/256); the product
summed in float64. The kernel computes the same sum with each block's dot exact in int32, so it
differs from the reference only by f32 rounding: per block, the int32 → f32 conversion and the
product d*s (2u relative to the term), one rounding per fused multiply-add into the accumulator
(nb, or 2 nb for Q4_1, each at most u of the magnitude of all terms), and for Q4_1 the rounding
of s*sum(Q) and of gguf's own d*q + m. With u = 2^-24 and the magnitude
sum_i (|d q_i| + |m|) |xq_i| <= sum_i (|W_i| + 2|m|) |xq_i|, the tolerance below is
(2 nb + 6) u times that magnitude: a bound, not a fitted constant.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import gguf.quants
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from realm_nb import cpu_kernels, weights
from realm_nb.errors import ShapeMismatchError
from realm_nb.weights import PackedMatrix

pytestmark = pytest.mark.skipif(not cpu_kernels.available(),
                                reason=f"CPU kernels unavailable: "
                                       f"{cpu_kernels.unavailable_reason()}")

U = 2.0**-24
TYPES = [QT.Q4_0, QT.Q4_1, QT.Q8_0]


# ================================================================ numpy reference


def activations(x: np.ndarray, planes: int = 1) -> np.ndarray:
    """The values the kernel multiplies, float64 [N, I]: s * Q per block (see module docstring)."""
    n, n_in = x.shape
    xb = x.reshape(n, n_in // 32, 32).astype(np.float32)
    dx = np.abs(xb).max(-1) / np.float32(127)
    inv = np.divide(np.float32(1), dx, out=np.zeros_like(dx), where=dx != 0)
    t = (xb * inv[..., None]).astype(np.float32)
    q1 = np.rint(t)
    assert np.abs(q1).max() <= 127
    if planes == 1:
        q, s = q1, dx.astype(np.float64)
    else:
        q2 = np.clip(np.rint(t * np.float32(256)) - 256 * q1, -127, 127)
        q, s = 256 * q1.astype(np.float64) + q2, dx.astype(np.float64) / 256
    return (q * s[..., None]).reshape(n, n_in)


def weight_magnitude(raw: np.ndarray, qtype: QT, w: np.ndarray) -> np.ndarray:
    """|W| + 2|m| per element (m = Q4_1's block minimum, else 0): bounds each term's size."""
    if qtype != QT.Q4_1:
        return np.abs(w)
    blocks = raw.reshape(raw.shape[0], -1, 20)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)  # [O, nb]
    return np.abs(w) + 2 * np.repeat(np.abs(m), 32, axis=-1)


def reference(x: np.ndarray, raw: np.ndarray, qtype: QT, planes: int = 1
              ) -> tuple[np.ndarray, np.ndarray]:
    """(y float64 [N, O], tolerance [N, O]) for the kernel on x f32 [N, I] and GGUF rows raw."""
    w = gguf.quants.dequantize(raw, qtype).astype(np.float64)  # [O, I]
    xq = activations(x, planes)
    nb = x.shape[1] // 32
    mag = weight_magnitude(raw, qtype, w).T
    tol = (2 * nb + 6) * U * (np.abs(xq) @ mag)
    return xq @ w.T, tol


def random_case(qtype: QT, n: int, n_out: int, n_in: int, seed: int = 0
                ) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_out, n_in)).astype(np.float32)
    x = rng.standard_normal((n, n_in)).astype(np.float32) * 3
    x[0, :32] = 0.0  # a block of zeros: scale 0, no division by zero
    return x, gguf.quants.quantize(w, qtype)


def run(x: np.ndarray, raw: np.ndarray, qtype: QT, planes: int = 1) -> np.ndarray:
    """The kernel on GGUF rows raw [O, row_bytes], tiled as the `packed` layout loads them."""
    f = jax.jit(cpu_kernels.quant_matmul,
                static_argnames=("qtype", "n_rows", "n_cols", "act_planes"))
    tiles = cpu_kernels.interleave(raw, qtype)
    return np.asarray(f(jnp.asarray(x), jnp.asarray(tiles), qtype=qtype, n_rows=raw.shape[0],
                        n_cols=x.shape[1], act_planes=planes))


# ================================================================ the kernel


@pytest.mark.parametrize("planes", [1, 2])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n", [1, 2, 3, 16])
def test_kernel_matches_reference(qtype: QT, n: int, planes: int) -> None:
    x, raw = random_case(qtype, n, n_out=37, n_in=160)  # odd O, odd block count (5)
    y = run(x, raw, qtype, planes)
    ref, tol = reference(x, raw, qtype, planes)
    assert y.shape == (n, 37) and y.dtype == np.float32
    assert np.all(np.abs(y - ref) <= tol), float(np.max(np.abs(y - ref) / tol))


def test_second_plane_shrinks_the_error() -> None:
    x, raw = random_case(QT.Q8_0, 4, n_out=64, n_in=256, seed=2)
    exact = x.astype(np.float64) @ gguf.quants.dequantize(raw, QT.Q8_0).astype(np.float64).T
    one, two = (np.abs(run(x, raw, QT.Q8_0, p) - exact).max() for p in (1, 2))
    assert two < one / 20, (one, two)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_large_matrix_split_over_threads_matches_reference(qtype: QT) -> None:
    x, raw = random_case(qtype, 5, n_out=1536, n_in=576, seed=3)
    for planes in (1, 2):
        ref, tol = reference(x, raw, qtype, planes)
        assert np.all(np.abs(run(x, raw, qtype, planes) - ref) <= tol)


@pytest.mark.parametrize("planes", [1, 2])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_a_row_does_not_depend_on_its_batch(qtype: QT, planes: int) -> None:
    x, raw = random_case(qtype, 16, n_out=1536, n_in=576, seed=4)
    batch = run(x, raw, qtype, planes)
    for i in range(16):
        np.testing.assert_array_equal(batch[i], run(x[i : i + 1], raw, qtype, planes)[0])
    # and not on the rows' order either
    np.testing.assert_array_equal(run(x[::-1].copy(), raw, qtype, planes)[::-1], batch)


def test_leading_dims_and_lax_scan_over_stacked_layers() -> None:
    """[L, G, bytes] stacked tiles read in place at a scan counter, activations [B, T, I]."""
    rng = np.random.default_rng(5)
    n_in, n_layers = 64, 3
    raws = [gguf.quants.quantize(rng.standard_normal((n_in, n_in)).astype(np.float32), QT.Q4_1)
            for _ in range(n_layers)]
    stacked = jnp.asarray(np.stack([cpu_kernels.interleave(r, QT.Q4_1) for r in raws]))
    x0 = rng.standard_normal((2, 3, n_in)).astype(np.float32)

    @jax.jit
    def stack(x: jax.Array, tiles: jax.Array) -> jax.Array:
        def layer(h: jax.Array, l: jax.Array) -> tuple[jax.Array, None]:
            y = cpu_kernels.quant_matmul(h, tiles, QT.Q4_1, n_in, n_in, layer=l)
            return jnp.maximum(y, 0) / 8, None
        return jax.lax.scan(layer, x, jnp.arange(n_layers, dtype=jnp.int32))[0]

    ours = np.asarray(stack(jnp.asarray(x0), stacked))
    h = x0.reshape(6, n_in)
    for raw in raws:  # the same layers one call at a time, outside scan
        h = np.maximum(run(h, raw, QT.Q4_1), 0) / 8  # exact in f32, like the jitted one
    assert ours.shape == (2, 3, n_in)
    np.testing.assert_array_equal(ours.reshape(6, n_in), h)


def test_a_layer_index_out_of_range_is_an_error_not_a_read() -> None:
    raw = random_case(QT.Q8_0, 1, 16, 64)[1]
    stacked = jnp.asarray(cpu_kernels.interleave(raw, QT.Q8_0)[None])  # one layer
    f = jax.jit(lambda x, t, l: cpu_kernels.quant_matmul(x, t, QT.Q8_0, 16, 64, layer=l))
    np.testing.assert_array_equal(np.asarray(f(jnp.ones((1, 64)), stacked, 0)),
                                  run(np.ones((1, 64), np.float32), raw, QT.Q8_0))
    with pytest.raises(Exception, match="layer index out of range"):
        np.asarray(f(jnp.ones((1, 64)), stacked, 1))
    with pytest.raises(ShapeMismatchError, match="layer index"):
        cpu_kernels.quant_matmul(jnp.ones((1, 64)), stacked, QT.Q8_0, 16, 64)  # stacked, no index


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_tiles_are_a_permutation_of_the_gguf_bytes(qtype: QT) -> None:
    """interleave / deinterleave round-trip exactly (odd O pads with zero rows), and an embedding
    lookup through the tiles gives gguf's own dequantized rows."""
    raw = random_case(qtype, 1, n_out=37, n_in=96, seed=7)[1]
    tiles = cpu_kernels.interleave(raw, qtype)
    assert tiles.shape == cpu_kernels.tiled_shape(qtype, 37, 96) == (3, 3 * 16 * raw.shape[1] // 3)
    assert sorted(tiles[:, :].tobytes()) == sorted(
        raw.tobytes() + bytes(tiles.size - raw.size))  # the same bytes, plus the padding
    back = jax.jit(cpu_kernels.deinterleave, static_argnums=(1, 2, 3))(
        jnp.asarray(tiles), qtype, 37, 96)
    np.testing.assert_array_equal(np.asarray(back), raw)
    w = PackedMatrix(jnp.asarray(tiles), qtype, 37, 96)
    ids = jnp.asarray([[0, 36, 17], [16, 15, 3]])
    np.testing.assert_array_equal(np.asarray(weights.embed_rows(w, ids)),
                                  gguf.quants.dequantize(raw, qtype)[np.asarray(ids)])


def test_rejects_a_type_the_kernel_does_not_read() -> None:
    raw = gguf.quants.quantize(np.ones((4, 32), np.float32), QT.Q5_0)
    with pytest.raises(cpu_kernels.ShapeMismatchError, match="Q5_0"):
        cpu_kernels.quant_matmul(jnp.ones((1, 32)), jnp.asarray(raw), QT.Q5_0, 4, 32)
    with pytest.raises(cpu_kernels.ShapeMismatchError, match="Q5_0"):
        cpu_kernels.interleave(raw, QT.Q5_0)


@pytest.mark.parametrize("path", ["scalar", "avx2"])
def test_slower_paths_match_reference_and_equal_this_one(path: str, tmp_path: Path) -> None:
    """The paths this CPU would not pick by itself (the portable loop; AVX2 on an AVX-512 CPU),
    forced with REALM_NB_KERNEL_ISA in a fresh process (the path is chosen once per process):
    each within the reference's bound, and bit-equal to the path this process runs (all paths
    form each block's integer dot exactly and then run the same f32 operations in one order)."""
    if path == "avx2" and cpu_kernels.isa() == "scalar":
        pytest.skip("this CPU has no AVX2")
    script = (
        "import sys\n"
        "import numpy as np\n"
        "import test_cpu_kernels as t\n"
        "from realm_nb import cpu_kernels\n"
        f"assert cpu_kernels.isa() == {path!r}, cpu_kernels.isa()\n"
        "out = {}\n"
        "for qt in t.TYPES:\n"
        "    for planes in (1, 2):\n"
        "        x, raw = t.random_case(qt, 3, 37, 160)\n"
        "        ref, tol = t.reference(x, raw, qt, planes)\n"
        "        y = t.run(x, raw, qt, planes)\n"
        "        assert np.all(np.abs(y - ref) <= tol), qt\n"
        "        out[f'{qt.name}_{planes}'] = y\n"
        "np.savez(sys.argv[1], **out)\n"
        "print('ok')\n")
    pythonpath = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "REALM_NB_KERNEL_ISA": path, "REALM_NB_XLA_CACHE": "0",
           "PYTHONPATH": pythonpath}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "y.npz")], env=env,
                          capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]
    theirs = np.load(tmp_path / "y.npz")
    for qt in TYPES:
        for planes in (1, 2):
            x, raw = random_case(qt, 3, 37, 160)
            np.testing.assert_array_equal(theirs[f"{qt.name}_{planes}"], run(x, raw, qt, planes))


@pytest.mark.parametrize("planes", [1, 2])
@pytest.mark.parametrize("n", [1, 5, 17])
def test_one_call_for_several_matrices_equals_separate_calls(n: int, planes: int) -> None:
    """q/k/v and gate/up share x: the grouped call (mixed types, so x is rounded for each weight
    offset) gives each matrix exactly what its own call gives, and the reference within bound."""
    cases = [random_case(qt, n, n_out=o, n_in=96, seed=10 + i)
             for i, (qt, o) in enumerate([(QT.Q4_1, 70), (QT.Q8_0, 33), (QT.Q4_0, 260)])]
    x = cases[0][0]
    raws = tuple(jnp.asarray(raw) for _, raw in cases)
    many = jax.jit(cpu_kernels.quant_matmul_many,
                   static_argnames=("qtypes", "n_rows", "n_cols", "act_planes"))
    qts = tuple(TYPES[i] for i in (1, 2, 0))
    tiles = tuple(jnp.asarray(cpu_kernels.interleave(np.asarray(r), qt))
                  for r, qt in zip(raws, qts, strict=True))
    ys = many(jnp.asarray(x), tiles, qtypes=qts, n_rows=(70, 33, 260), n_cols=96,
              act_planes=planes)
    for (_, raw), qt, y in zip(cases, (QT.Q4_1, QT.Q8_0, QT.Q4_0), ys, strict=True):
        np.testing.assert_array_equal(np.asarray(y), run(x, raw, qt, planes))
        ref, tol = reference(x, raw, qt, planes)
        assert np.all(np.abs(np.asarray(y) - ref) <= tol)


def test_grouped_call_refuses_mismatched_operands() -> None:
    x = jnp.zeros((2, 64), jnp.float32)
    tiles = jnp.asarray(cpu_kernels.interleave(random_case(QT.Q8_0, 2, 8, 64)[1], QT.Q8_0))
    with pytest.raises(ShapeMismatchError):
        cpu_kernels.quant_matmul_many(x, (tiles,), (QT.Q8_0, QT.Q8_0), (8,), 64)
    with pytest.raises(ShapeMismatchError):
        cpu_kernels.quant_matmul_many(x, (tiles, tiles[:, :10]), (QT.Q8_0, QT.Q8_0), (8, 8), 64)
    with pytest.raises(ShapeMismatchError):  # 40 rows do not fit one tile row of 16
        cpu_kernels.quant_matmul(x, tiles, QT.Q8_0, 40, 64)


# ================================================================ the packed layout


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_fallback_equals_kernel_within_activation_rounding(
        qtype: QT, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the kernel, `linear` dequantizes and uses XLA; the two differ by the kernel's
    rounding of x to int8 (at most dx/2 per element) plus the f32 bound above."""
    x, raw = random_case(qtype, 4, n_out=96, n_in=128, seed=6)
    w = PackedMatrix(jnp.asarray(cpu_kernels.interleave(raw, qtype)), qtype, 96, 128)
    kernel = np.asarray(jax.jit(lambda x, w: weights.linear(x, w))(jnp.asarray(x), w))
    monkeypatch.setattr(cpu_kernels, "_load", lambda: "turned off for this test")
    assert not weights.kernel_usable()
    fallback = np.asarray(jax.jit(lambda x, w: weights.linear(x, w))(jnp.asarray(x), w))  # retraced
    np.testing.assert_allclose(
        fallback, np.asarray(weights.packed_linear_fallback(jnp.asarray(x), w)), rtol=1e-5,
        atol=1e-5)
    wd = gguf.quants.dequantize(raw, qtype).astype(np.float64)
    _, tol = reference(x, raw, qtype)
    bound = np.abs(x - activations(x)) @ np.abs(wd).T + tol + 1e-5 * (np.abs(x) @ np.abs(wd).T)
    assert np.all(np.abs(kernel - fallback) <= bound)
    assert not np.array_equal(kernel, fallback)  # the kernel really ran the first time


def test_tiny_model_runs_in_packed(tmp_path: Path) -> None:
    from test_model import build_engine
    from tiny_gguf import write_tiny_llama

    tiny = write_tiny_llama(tmp_path / "tiny.gguf", seed=1)
    exact = build_engine(tiny.path, "exact")
    packed = build_engine(tiny.path, "packed")
    layers = packed.params.layers
    assert isinstance(layers.wq, PackedMatrix) and layers.wq.qtype == QT.Q8_0  # kept as is
    assert layers.wk.qtype == QT.Q4_0 and layers.wv.qtype == QT.Q4_1  # kept as is
    assert layers.wo.qtype == QT.Q8_0  # Q5_0 re-encoded, without loss (reencode)
    assert {layers.wq.act_planes, layers.w_up.act_planes, packed.params.head.act_planes} == {
        weights.PACKED_ACT_PLANES}
    assert layers.w_up.qtype == QT.Q8_0  # Q8_0 / Q4_1 in different layers: re-quantized
    assert layers.w_up.raw.shape[0] == 2
    ids = [int(i) for i in np.random.default_rng(5).integers(0, tiny.vocab_size, 40)]
    le = exact.prefill(0, ids, 0, all_logits=True)
    lp = packed.prefill(0, ids, 0, all_logits=True)
    spread = float(np.std(le))
    err = np.abs(lp - le)
    assert float(np.max(err)) < 0.3 * spread, (float(np.max(err)), spread)
    assert float(np.mean(err)) < 0.05 * spread, (float(np.mean(err)), spread)
    assert float(np.mean(np.argmax(lp, -1) == np.argmax(le, -1))) >= 0.9
    # decode continues the prefilled sequence as a longer prefill does (up to the XLA ops around
    # the kernel, which differ between the two shapes, over an f16 cache: 1.3e-3 at most seen on
    # an AVX2-only machine, where XLA fuses those ops otherwise)
    step = packed.decode_step([0], [ids[-1]], [len(ids)])[0]
    again = packed.prefill(1, [*ids, ids[-1]], 0)
    np.testing.assert_allclose(step, again, rtol=1e-3, atol=3e-3)


# ================================================================ the build

needs_zig = pytest.mark.skipif(importlib.util.find_spec("ziglang") is None,
                               reason="ziglang is not installed (pip install 'realm-nb[build]')")


@needs_zig
def test_build_is_reproducible_and_matches_the_shipped_library(tmp_path: Path) -> None:
    first = cpu_kernels.build_kernels(tmp_path / "a.so").read_bytes()
    second = cpu_kernels.build_kernels(tmp_path / "b.so").read_bytes()
    assert first[:4] == b"\x7fELF"
    assert first == second
    assert first == cpu_kernels.KERNEL_ARTIFACT.read_bytes(), (
        "realm_nb/_kernels/librealm_kernels.so is stale: run `realm-nb build-kernels`")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.so", "b.so"]  # no litter


def test_missing_source_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(cpu_kernels.KernelBuildError, match="not found"):
        cpu_kernels.build_kernels(tmp_path / "x.so", source=tmp_path / "nope.cc")
