"""Architectures beyond plain llama (config + small blocks in model.py) against numpy references.

Each tiny file is written with the real tensor names and metadata keys of its architecture
(tiny_gguf.write_tiny_arch) and compared with test_model's float64 reference, told what the
architecture's definition says:
- qwen2 (Qwen 2 / 2.5): q/k/v biases, rope base 1e6, NEOX RoPE on halves (llama.cpp's rope type
  for qwen2; its converter does not permute Qwen's q/k rows the way it does llama's);
- qwen3: per-head RMSNorm of q and k before RoPE, no biases, head dim K with H*K != D, NEOX RoPE;
- Llama 3: the `llama` arch with RoPE frequencies divided by `rope_freqs.weight` (what llama.cpp's
  converter writes for Llama 3.1+) or by the llama3 factors named in `llama.rope.scaling.*`;
- phi3 (Phi-3 / 3.5): q/k/v fused into attn_qkv and gate/up into ffn_up (rows in that order, as
  llama.cpp's converter writes them), NEOX RoPE; the 128k files' LongRoPE divides frequencies by
  `rope_factors_short` within the original context and multiplies cos and sin by
  `rope.scaling.attn_factor` (HF Phi3LongRoPEScaledRotaryEmbedding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tiny_gguf as tg
from arch_checks import (
    assert_batched_decode_equals_solo,
    assert_chunked_prefill_equals_reference,
    assert_layout_close,
    generate_together,
)
from gguf import GGMLQuantizationType as QT
from test_model import build_engine, reference_logits
from tiny_gguf import TinyModel

from realm_nb.config import ModelConfig, llama3_rope_factors
from realm_nb.engine import PREFILL_BUCKETS, Engine
from realm_nb.errors import MissingTensorError, ShapeMismatchError, UnsupportedArchitectureError
from realm_nb.gguf_io import open_gguf
from realm_nb.kernel import RealmKernel
from realm_nb.tokenizer import build_tokenizer
from realm_nb.types import SamplingParams
from realm_nb.weights import check_tensors

EXACT_TOL = 1e-4  # max abs logit error of `exact` (f32) against the float64 reference

# Llama 3 scaling with a short original context, so that most of the tiny model's frequencies
# are scaled (a real file says 8192; the formula is the same).
LLAMA3_KEYS: dict[str, Any] = {"rope.scaling.type": "llama3", "rope.scaling.factor": 8.0,
                               "rope.scaling.low_freq_factor": 1.0,
                               "rope.scaling.high_freq_factor": 4.0,
                               "rope.scaling.original_context_length": 64}
ROPE_FREQS = (1.0 + 7.0 * np.random.default_rng(5).random(tg.HEAD_DIM // 2)).astype(np.float32)
PHI3_ORIGINAL = 400  # the LongRoPE file's original context, under its context_length


@dataclass(frozen=True)
class Case:
    """One tiny file: how to write it, and what the architecture's definition says."""

    arch: str
    head_dim: int = tg.HEAD_DIM
    rope_base: float = tg.ROPE_BASE
    rope_halves: bool = False
    pre: str = "default"
    metadata: dict[str, Any] = field(default_factory=dict)
    rope_freqs: np.ndarray | None = None  # written as rope_freqs.weight
    longrope: bool = False  # rope_factors_short/long.weight (ROPE_FREQS and its reverse)
    attn_factor: float = 1.0  # what the definition does with rope.scaling.attn_factor

    def freq_factors(self) -> np.ndarray | None:
        if self.rope_freqs is not None:
            return self.rope_freqs.astype(np.float64)
        if self.longrope:  # within the original context: the short factors
            return ROPE_FREQS.astype(np.float64)
        if self.metadata.get("rope.scaling.type") == "llama3":
            return llama3_reference_factors(self.head_dim, self.rope_base, **{
                k.rsplit(".", 1)[1]: v for k, v in self.metadata.items()
                if k != "rope.scaling.type"})
        return None


CASES = {
    "qwen2": Case("qwen2", rope_base=tg.QWEN_ROPE_BASE, rope_halves=True, pre="qwen2"),
    "qwen3": Case("qwen3", head_dim=2 * tg.HEAD_DIM, rope_base=tg.QWEN_ROPE_BASE,
                  rope_halves=True, pre="qwen2"),
    "llama3-rope-freqs": Case("llama", rope_base=500000.0, pre="llama-bpe",
                              rope_freqs=ROPE_FREQS),
    "llama3-scaling-keys": Case("llama", pre="llama-bpe", metadata=LLAMA3_KEYS),
    "phi3": Case("phi3", rope_halves=True),
    "phi3-longrope": Case("phi3", rope_halves=True, longrope=True, attn_factor=1.19,
                          metadata={"rope.scaling.attn_factor": 1.19,
                                    "rope.scaling.original_context_length": PHI3_ORIGINAL}),
}


def llama3_reference_factors(head_dim: int, base: float, *, factor: float,
                             low_freq_factor: float, high_freq_factor: float,
                             original_context_length: int) -> np.ndarray:
    """Llama 3's frequency divisors, from Meta's `apply_scaling` (llama3 reference code)."""
    out = []
    for i in range(head_dim // 2):
        freq = base ** (-2.0 * i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < original_context_length / high_freq_factor:
            new = freq
        elif wavelen > original_context_length / low_freq_factor:
            new = freq / factor
        else:
            smooth = ((original_context_length / wavelen - low_freq_factor)
                      / (high_freq_factor - low_freq_factor))
            new = (1 - smooth) * freq / factor + smooth * freq
        out.append(freq / new)
    return np.asarray(out)


def write_case(path: Path, case: Case, seed: int = 3) -> TinyModel:
    extra = {}
    if case.rope_freqs is not None:
        extra["rope_freqs.weight"] = (case.rope_freqs, QT.F32)
    if case.longrope:
        extra["rope_factors_short.weight"] = (ROPE_FREQS, QT.F32)
        extra["rope_factors_long.weight"] = (ROPE_FREQS[::-1] * 4.0, QT.F32)
    return tg.write_tiny_arch(path, case.arch, seed=seed, tied=case.arch != "qwen3",
                              head_dim=case.head_dim, rope_base=case.rope_base, pre=case.pre,
                              extra=extra, metadata=case.metadata)


def reference(model: TinyModel, case: Case, ids: list[int]) -> np.ndarray:
    return reference_logits(model, ids, rope_halves=case.rope_halves, rope_base=case.rope_base,
                            rope_freq_factors=case.freq_factors(),
                            rope_attn_factor=case.attn_factor)


def random_ids(model: TinyModel, n: int, seed: int) -> list[int]:
    return [int(i) for i in np.random.default_rng(seed).integers(0, model.vocab_size, n)]


# ================================================================ fixtures


@pytest.fixture(scope="module", params=list(CASES))
def case_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[Case, TinyModel, Engine]:
    case = CASES[request.param]
    model = write_case(tmp_path_factory.mktemp("arch") / f"{request.param}.gguf", case)
    return case, model, build_engine(model.path, "exact", max_context=320)


# ================================================================ exact against the reference


def test_config_reads_the_architecture(case_model: tuple[Case, TinyModel, Engine]) -> None:
    case, _, engine = case_model
    cfg = engine.cfg
    assert cfg.rope_style == ("halves" if case.rope_halves else "pairs")
    assert cfg.qkv_bias == (case.arch == "qwen2")
    assert cfg.qk_norm == (case.arch == "qwen3")
    assert cfg.head_dim == case.head_dim and cfg.rope_base == case.rope_base
    assert cfg.rope_attn_factor == (pytest.approx(case.attn_factor) if case.longrope else None)
    assert cfg.context_length == (min(PHI3_ORIGINAL, tg.CONTEXT) if case.longrope
                                  else tg.CONTEXT)
    factors = case.freq_factors()
    if factors is None:
        assert cfg.rope_freq_factors is None
    else:
        assert cfg.rope_freq_factors is not None
        np.testing.assert_allclose(cfg.rope_freq_factors, factors, rtol=1e-6)


def test_prefill_logits_equal_numpy_reference(case_model: tuple[Case, TinyModel, Engine]
                                              ) -> None:
    case, model, engine = case_model
    ids = random_ids(model, 40, seed=7)
    ours = engine.prefill(0, ids, 0, all_logits=True)
    ref = reference(model, case, ids)
    assert ours.shape == ref.shape
    err = float(np.max(np.abs(ours - ref)))
    assert err <= EXACT_TOL, err


def test_the_architectures_pieces_matter(case_model: tuple[Case, TinyModel, Engine]) -> None:
    """The reference without the architecture's RoPE (plain llama pairs, no scaling) is far off:
    the tests above would catch a forward that ignored it."""
    case, model, engine = case_model
    ids = random_ids(model, 40, seed=7)
    ours = engine.prefill(0, ids, 0, all_logits=True)
    plain = reference_logits(model, ids, rope_base=case.rope_base)
    if case.rope_halves or case.freq_factors() is not None:
        assert float(np.max(np.abs(ours - plain))) > 100 * EXACT_TOL


def test_batched_decode_equals_solo(case_model: tuple[Case, TinyModel, Engine]) -> None:
    case, model, engine = case_model
    a, b = random_ids(model, 9, seed=11), random_ids(model, 14, seed=12)
    _, solo_b = assert_batched_decode_equals_solo(engine, a, b, EXACT_TOL)
    assert float(np.max(np.abs(solo_b - reference(model, case, [*b, 6])[-1]))) <= EXACT_TOL


def test_chunked_prefill_equals_one_prefill(case_model: tuple[Case, TinyModel, Engine]) -> None:
    """A prompt past the largest prefill bucket (chunked inside the engine) and a prompt fed in
    two calls both give the logits of the float64 reference over the whole sequence."""
    case, model, engine = case_model
    ids = random_ids(model, PREFILL_BUCKETS[-1] + 30, seed=13)
    assert_chunked_prefill_equals_reference(engine, ids, reference(model, case, ids), EXACT_TOL)


# ================================================================ the other layouts


@pytest.mark.parametrize("layout", ["packed", "fast"])
@pytest.mark.parametrize("name", ["qwen2", "qwen3", "phi3"])
def test_other_layouts_stay_close_to_the_reference(layout: str, name: str,
                                                   tmp_path: Path) -> None:
    case = CASES[name]
    model = write_case(tmp_path / f"{name}.gguf", case)
    engine = build_engine(model.path, layout, n_slots=2, max_context=128)
    assert engine.params.layers.bq is None or engine.params.layers.bq.dtype == np.float32
    ids = random_ids(model, 40, seed=9)
    ours = engine.prefill(0, ids, 0, all_logits=True)
    step = engine.decode_step([0], [3], [len(ids)])[0]  # one decode step, the kernel's path
    assert_layout_close(ours, reference(model, case, ids), step,
                        reference(model, case, [*ids, 3])[-1])


# ================================================================ files and errors


def test_unsupported_architecture_names_the_supported_ones(tmp_path: Path) -> None:
    path = tg.write_tiny_llama(tmp_path / "phi.gguf", arch="gptneox").path
    with pytest.raises(UnsupportedArchitectureError) as err:
        ModelConfig.from_gguf(open_gguf(path))
    message = str(err.value)
    assert "'gptneox'" in message
    for arch in ("llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3"):
        assert arch in message


def test_unsupported_rope_scaling_is_refused(tmp_path: Path) -> None:
    path = tg.write_tiny_arch(tmp_path / "yarn.gguf", "qwen2",
                              metadata={"rope.scaling.type": "yarn"}).path
    with pytest.raises(UnsupportedArchitectureError, match=r"'yarn'.*llama3"):
        ModelConfig.from_gguf(open_gguf(path))


def test_a_missing_bias_is_named(tmp_path: Path) -> None:
    tensors = tg.arch_tensors("qwen2", tg.HEAD_DIM, np.random.default_rng(0))
    del tensors["blk.1.attn_v.bias"]
    path = tg.write_tiny_llama(tmp_path / "nobias.gguf", arch="qwen2", replace=tensors).path
    f = open_gguf(path)
    with pytest.raises(MissingTensorError, match=r"blk\.1\.attn_v\.bias"):
        check_tensors(f, ModelConfig.from_gguf(f))


def test_llama3_factors_match_metas_formula() -> None:
    ours = llama3_rope_factors(128, 500000.0, 8.0, low=1.0, high=4.0, original_context=8192)
    ref = llama3_reference_factors(128, 500000.0, factor=8.0, low_freq_factor=1.0,
                                   high_freq_factor=4.0, original_context_length=8192)
    np.testing.assert_allclose(ours, ref, rtol=1e-12)
    assert ours[0] == 1.0 and ours[-1] == 8.0 and 1.0 < ours[30] < 8.0  # all three bands


@pytest.mark.parametrize(("pre", "expected"), [("default", ["a", "Ġ1"]),
                                               ("llama-bpe", ["a", "Ġ", "1"]),
                                               ("qwen2", ["a", "Ġ", "1"])])
def test_pre_tokenizer_follows_the_file(pre: str, expected: list[str], tmp_path: Path) -> None:
    """gpt2's regex keeps ' 1' whole (merged to 'Ġ1'); the Llama 3 and Qwen 2 regexes split
    digits from the space before them."""
    path = tg.write_tiny_llama(tmp_path / f"{pre}.gguf", pre=pre).path
    tok = build_tokenizer(open_gguf(path))
    assert tok.encode("a 1", add_special_tokens=False).tokens == expected


def test_phi3_fused_tensors_are_read_as_views_of_their_rows(tmp_path: Path) -> None:
    """The file holds attn_qkv and a double-height ffn_up, not q/k/v/gate; each part reads the
    fused tensor's rows in place (no copy), and a fused tensor of the wrong height is named."""
    model = write_case(tmp_path / "phi3.gguf", CASES["phi3"])
    f = open_gguf(model.path)
    assert "blk.0.attn_q.weight" not in f.tensors and "blk.0.ffn_gate.weight" not in f.tensors
    assert f.tensors["blk.0.ffn_up.weight"].shape == (2 * tg.D_FF, tg.D_MODEL)
    cfg = ModelConfig.from_gguf(f)
    check_tensors(f, cfg)
    qkv = f.tensors["blk.1.attn_qkv.weight"]
    k = f.tensor("blk.1.attn_k.weight")
    assert k.shape == (tg.N_KV_HEADS * tg.HEAD_DIM, tg.D_MODEL)
    assert k.offset == qkv.offset + qkv.n_bytes // qkv.shape[0] * tg.N_HEADS * tg.HEAD_DIM
    assert f.tensor("blk.1.ffn_up.weight").shape == (tg.D_FF, tg.D_MODEL)  # the up half

    bad = {"blk.1.attn_qkv.weight": (np.ones((tg.N_HEADS * tg.HEAD_DIM + 8, tg.D_MODEL),
                                             np.float32), QT.F32)}
    path = tg.write_tiny_arch(tmp_path / "bad.gguf", "phi3", extra=bad).path
    with pytest.raises(ShapeMismatchError) as err:
        ModelConfig.from_gguf(open_gguf(path))
    assert "'blk.1.attn_qkv.weight'" in str(err.value) and "attn_k" in str(err.value)


# ================================================================ inside the guest


def reference_greedy(model: TinyModel, case: Case, prompt: list[int], n: int) -> list[int]:
    out: list[int] = []
    while len(out) < n:
        token = int(np.argmax(reference(model, case, prompt + out)[-1]))
        out.append(token)
        if token == model.vocab.eos_id:
            break
    return out


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "phi3-longrope", "llama3-rope-freqs"])
def test_guest_greedy_batched_with_another_tenant_equals_reference(name: str,
                                                                   tmp_path: Path) -> None:
    """Two tenants generate at once on a tiny file of the architecture, through their guests,
    their decode steps batched by the scheduler; each gets the reference's greedy ids."""
    case = CASES[name]
    model = write_case(tmp_path / f"{name}-guest.gguf", case, seed=8)
    kernel = RealmKernel.shared()
    alias = f"{name}-tiny-guest"
    kernel.load_model(str(model.path), name=alias, weights="exact")
    prompts = [random_ids(model, 12, seed=21), random_ids(model, 7, seed=22)]
    n = 10
    expected = [reference_greedy(model, case, p, n) for p in prompts]
    try:
        results = generate_together(kernel, alias, [f"{name}-0", f"{name}-1"], lambda i: dict(
            prompt=prompts[i], params=SamplingParams(max_tokens=n, temperature=0)))
        assert [g.token_ids for g in results] == expected
    finally:
        kernel.unload_model(alias)
