"""Gemma 3 (config.ARCHITECTURES["gemma3"] plus small blocks in the one forward).

Tiny files (tiny_gguf.write_tiny_arch, the real tensor names and `gemma3.*` keys) are compared
with a float64 numpy forward written from Gemma 3's definition (HF `Gemma3ForCausalLM`,
gemma_pytorch), not from our code:
- embeddings x √D; RMSNorm as Gemma defines it, x / rms(x) * (1 + w), where llama.cpp's
  converter stores 1 + w in the file (so the reference takes the file's value minus one back);
- per layer: RMSNorm → q/k/v → per-head RMSNorm of q and k → NEOX RoPE (halves) with base 10k in
  sliding-window layers and `rope.freq_base` in global ones → queries x query_pre_attn_scalar^-½
  (the head dim for every Gemma 3 but the 27B) → causal GQA, a local layer seeing positions
  p - W + 1 .. p only → output projection → RMSNorm → residual; RMSNorm → GELU-tanh(gate) x up
  → down → RMSNorm → residual;
- layer l global when l % 6 == 5 unless `attention.sliding_window_pattern` says otherwise;
- final RMSNorm, tied head, and c·tanh(logits / c) where `final_logit_softcapping` is set.

The real Gemma 3 270M Q4_K_M (catalogue `gemma3-270m`) is compared with llama.cpp through the
public SDK (tests/data/gemma3_llamacpp.json, teacher-forced as in test_llamacpp_refs.py), and the
other layouts with `exact`.
"""

from __future__ import annotations

import json
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
    teacher_forced_vs_llamacpp,
)
from gguf import GGMLQuantizationType as QT
from test_model import build_engine
from tiny_gguf import TinyModel

from realm_nb.config import ARCHITECTURES, ModelConfig
from realm_nb.engine import PREFILL_BUCKETS, Engine
from realm_nb.errors import ShapeMismatchError, UnsupportedArchitectureError
from realm_nb.gguf_io import open_gguf
from realm_nb.kernel import RealmKernel
from realm_nb.types import Generation, SamplingParams
from realm_nb.weights import check_tensors

EXACT_TOL = 1e-4  # max abs logit error of `exact` (f32) against the float64 reference
WINDOW = 20  # sliding window of the tiny files: far shorter than their sequences, not a page
GLOBAL_BASE = 1e6  # gemma3.rope.freq_base
LOCAL_BASE = 10000.0  # Gemma 3's sliding-window layers (no key in the file)
HEAD_DIM = 2 * tg.HEAD_DIM  # H*K = 128 != D = 64, as Gemma 3 270M has 1024 != 640


@dataclass(frozen=True)
class Case:
    """One tiny gemma3 file: its layers' kinds and the keys that set them."""

    n_layers: int
    local_layers: tuple[bool, ...]  # what Gemma 3's definition makes of the keys below
    metadata: dict[str, Any] = field(default_factory=dict)
    softcap: float | None = None


CASES = {
    # no pattern key: every sixth layer global, the rest local (layers 0-4 and 6 local)
    "default-pattern": Case(7, (True, True, True, True, True, False, True)),
    # the pattern as one flag per layer, and final soft-capping strong enough to matter
    "flags-softcap": Case(3, (False, True, True),
                          {"attention.sliding_window_pattern": [False, True, True],
                           "final_logit_softcapping": 6.0}, softcap=6.0),
}


def write_case(path: Path, case: Case, seed: int = 5) -> TinyModel:
    return tg.write_tiny_arch(path, "gemma3", seed=seed, head_dim=HEAD_DIM, rope_base=GLOBAL_BASE,
                              vocab=tg.spm_vocab(), add_bos=True, n_layers=case.n_layers,
                              metadata={"attention.sliding_window": WINDOW, **case.metadata})


# ================================================================ float64 reference


def gemma_rms_norm(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Gemma's RMSNorm: x / sqrt(mean(x²) + eps) * (1 + w)."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + tg.RMS_EPS) * (1.0 + w)


def rope_neox(x: np.ndarray, pos: np.ndarray, base: float) -> np.ndarray:
    """x [T, n, K]: rotate (x[i], x[i + K/2]) by pos * base^(-2i/K) (HF rotate_half)."""
    half = x.shape[-1] // 2
    angle = pos[:, None, None] * base ** (-2.0 * np.arange(half) / x.shape[-1])
    cos, sin = np.cos(angle), np.sin(angle)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def reference_logits(model: TinyModel, case: Case, ids: list[int], *,
                     window: int | None = WINDOW) -> np.ndarray:
    """Logits [T, V] of `ids` from position 0, float64 (window None: no sliding window)."""
    w = {k: v.astype(np.float64) for k, v in model.weights.items()}

    def norm(x: np.ndarray, name: str) -> np.ndarray:  # the file holds 1 + w
        return gemma_rms_norm(x, w[name] - 1.0)

    t, h, g, k = len(ids), tg.N_HEADS, tg.N_KV_HEADS, HEAD_DIM
    pos = np.arange(t, dtype=np.float64)
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    x = w["token_embd.weight"][np.asarray(ids)] * math.sqrt(tg.D_MODEL)  # [T, D]
    query_pre_attn_scalar = k  # Gemma 3 1B-12B and 270M; the 27B uses D / H
    for layer in range(case.n_layers):
        p = f"blk.{layer}."
        local = case.local_layers[layer]
        base = LOCAL_BASE if local else GLOBAL_BASE
        allowed = j <= i
        if local and window is not None:
            allowed = allowed & (i - j < window)
        a = norm(x, p + "attn_norm.weight")
        q = (a @ w[p + "attn_q.weight"].T).reshape(t, h, k)
        kk = (a @ w[p + "attn_k.weight"].T).reshape(t, g, k)
        v = (a @ w[p + "attn_v.weight"].T).reshape(t, g, k)
        q = rope_neox(norm(q, p + "attn_q_norm.weight"), pos, base)
        kk = rope_neox(norm(kk, p + "attn_k_norm.weight"), pos, base)
        q = q * query_pre_attn_scalar ** -0.5
        heads = []
        for head in range(h):
            kv = head // (h // g)
            scores = np.where(allowed, q[:, head] @ kk[:, kv].T, -np.inf)
            probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
            heads.append((probs / probs.sum(axis=-1, keepdims=True)) @ v[:, kv])
        attn = np.concatenate(heads, axis=-1) @ w[p + "attn_output.weight"].T
        x = x + norm(attn, p + "post_attention_norm.weight")
        f = norm(x, p + "ffn_norm.weight")  # Gemma's pre_feedforward_layernorm
        f = (gelu_tanh(f @ w[p + "ffn_gate.weight"].T) * (f @ w[p + "ffn_up.weight"].T)
             @ w[p + "ffn_down.weight"].T)
        x = x + norm(f, p + "post_ffw_norm.weight")
    logits = norm(x, "output_norm.weight") @ w["token_embd.weight"].T
    if case.softcap is not None:
        logits = case.softcap * np.tanh(logits / case.softcap)
    return logits


def random_ids(model: TinyModel, n: int, seed: int) -> list[int]:
    return [int(i) for i in np.random.default_rng(seed).integers(0, model.vocab_size, n)]


def reference_greedy(model: TinyModel, case: Case, prompt: list[int], n: int,
                     eos: int) -> list[int]:
    out: list[int] = []
    while len(out) < n:
        token = int(np.argmax(reference_logits(model, case, prompt + out)[-1]))
        out.append(token)
        if token == eos:
            break
    return out


# ================================================================ fixtures


@pytest.fixture(scope="module", params=list(CASES))
def case_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[Case, TinyModel, Engine]:
    case = CASES[request.param]
    model = write_case(tmp_path_factory.mktemp("gemma3") / f"{request.param}.gguf", case)
    return case, model, build_engine(model.path, "exact", max_context=320)


# ================================================================ exact against the reference


def test_config_reads_gemma3(case_model: tuple[Case, TinyModel, Engine]) -> None:
    case, _, engine = case_model
    cfg = engine.cfg
    assert cfg.arch == "gemma3" and cfg.rope_style == "halves" and cfg.qk_norm
    assert cfg.ffn_act == "gelu_tanh" and cfg.post_norms
    assert cfg.local_layers == case.local_layers and cfg.sliding_window == WINDOW
    assert cfg.rope_base == GLOBAL_BASE and cfg.rope_base_local == LOCAL_BASE
    assert cfg.embed_scale == pytest.approx(math.sqrt(tg.D_MODEL))
    assert cfg.attn_scale == pytest.approx(HEAD_DIM ** -0.5)
    assert cfg.final_logit_softcap == case.softcap


def test_prefill_logits_equal_numpy_reference(case_model: tuple[Case, TinyModel, Engine]
                                              ) -> None:
    case, model, engine = case_model
    ids = random_ids(model, 45, seed=7)  # past the window twice over
    ours = engine.prefill(0, ids, 0, all_logits=True)
    engine.release(0)
    ref = reference_logits(model, case, ids)
    assert ours.shape == ref.shape
    err = float(np.max(np.abs(ours - ref)))
    assert err <= EXACT_TOL, err


def test_the_sliding_window_matters(case_model: tuple[Case, TinyModel, Engine]) -> None:
    """Without the window the reference is far from ours past position W, and equal before it:
    the tests above would catch a forward that let local layers see the whole context."""
    case, model, engine = case_model
    ids = random_ids(model, 45, seed=7)
    ours = engine.prefill(0, ids, 0, all_logits=True)
    engine.release(0)
    unwindowed = reference_logits(model, case, ids, window=None)
    assert float(np.max(np.abs(ours[:WINDOW] - unwindowed[:WINDOW]))) <= EXACT_TOL
    assert float(np.max(np.abs(ours[WINDOW:] - unwindowed[WINDOW:]))) > 100 * EXACT_TOL


def test_batched_decode_equals_solo(case_model: tuple[Case, TinyModel, Engine]) -> None:
    """Two rows decoded in one step past the window (at positions 30 and 71, on another page)
    get the logits each gets alone, and the reference's."""
    case, model, engine = case_model
    a, b = random_ids(model, 30, seed=11), random_ids(model, 71, seed=12)
    _, solo_b = assert_batched_decode_equals_solo(engine, a, b, EXACT_TOL)
    ref_b = reference_logits(model, case, [*b, 6])[-1]
    assert float(np.max(np.abs(solo_b - ref_b))) <= EXACT_TOL


def test_chunked_prefill_equals_one_prefill(case_model: tuple[Case, TinyModel, Engine]) -> None:
    """A prompt past the largest prefill bucket (chunked inside the engine, the window spanning
    chunk and page boundaries) and a prompt fed in two calls both give the reference's logits."""
    case, model, engine = case_model
    ids = random_ids(model, PREFILL_BUCKETS[-1] + 30, seed=13)
    assert_chunked_prefill_equals_reference(engine, ids, reference_logits(model, case, ids),
                                            EXACT_TOL)


# ================================================================ the other layouts


@pytest.mark.parametrize("layout", ["packed", "fast"])
def test_other_layouts_stay_close_to_the_reference(layout: str, tmp_path: Path) -> None:
    case = CASES["flags-softcap"]
    model = write_case(tmp_path / "gemma3.gguf", case)
    engine = build_engine(model.path, layout, n_slots=2, max_context=128)
    assert engine.params.layers.post_attn_norm is not None
    assert engine.params.layers.post_attn_norm.dtype == np.float32
    ids = random_ids(model, 40, seed=9)
    ours = engine.prefill(0, ids, 0, all_logits=True)
    step = engine.decode_step([0], [3], [len(ids)])[0]  # one decode step, the kernel's path
    assert_layout_close(ours, reference_logits(model, case, ids), step,
                        reference_logits(model, case, [*ids, 3])[-1])


# ================================================================ inside the guest


def test_guest_greedy_batched_with_another_tenant_equals_reference(tmp_path: Path) -> None:
    """Two tenants generate at once on a tiny gemma3 (their decode steps batched by the
    scheduler) past the window; each gets the reference's greedy ids, and the echoed prompt's
    logprobs are the reference's."""
    case = CASES["default-pattern"]
    model = write_case(tmp_path / "gemma3-guest.gguf", case, seed=8)
    kernel = RealmKernel.shared()
    name = "gemma3-tiny-guest"
    kernel.load_model(str(model.path), name=name, weights="exact")
    bos = model.vocab.bos_id
    prompts = [[bos, *random_ids(model, 14, seed=21)], [bos, *random_ids(model, 9, seed=22)]]
    n = 16
    eos = model.vocab.eos_id
    expected = [reference_greedy(model, case, p, n, eos) for p in prompts]
    try:
        results = generate_together(kernel, name, ["gemma3-0", "gemma3-1"], lambda i: dict(
            prompt=prompts[i], params=SamplingParams(max_tokens=n, temperature=0), echo=True,
            logprobs=1))
        for i, g in enumerate(results):
            assert g.prompt_ids == prompts[i]
            assert g.token_ids == expected[i], i
            ids = g.prompt_ids + g.token_ids
            ref = reference_logits(model, case, ids)
            shifted = ref - ref.max(-1, keepdims=True)
            ref_lp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
            assert g.logprobs is not None and len(g.logprobs) == len(ids) - 1
            for j, s in enumerate(g.logprobs):  # logprobs[j] scores ids[j + 1]
                assert s.token_id == ids[j + 1]
                assert abs(s.logprob - ref_lp[j, ids[j + 1]]) <= 10 * EXACT_TOL
    finally:
        kernel.unload_model(name)


# ================================================================ files and errors


def test_default_pattern_and_query_scale_of_the_27b(tmp_path: Path) -> None:
    """62 layers (Gemma 3 27B): queries scaled by (D / H)^-½, llama.cpp's and gemma_pytorch's
    query_pre_attn_scalar for that size; an integer pattern key n makes layer l local when
    l % n < n - 1."""
    path = tg.write_tiny_arch(tmp_path / "g27.gguf", "gemma3", head_dim=HEAD_DIM, n_layers=62,
                              vocab=tg.spm_vocab(),
                              metadata={"attention.sliding_window": WINDOW,
                                        "attention.sliding_window_pattern": 4}).path
    cfg = ModelConfig.from_gguf(open_gguf(path))
    assert cfg.attn_scale == pytest.approx((tg.D_MODEL / tg.N_HEADS) ** -0.5)
    assert cfg.local_layers == tuple(layer % 4 < 3 for layer in range(62))


def test_unsupported_architecture_says_what_runs_and_what_the_file_says(tmp_path: Path) -> None:
    path = tg.write_tiny_llama(tmp_path / "gemma2.gguf", arch="gemma2").path
    with pytest.raises(UnsupportedArchitectureError) as err:
        ModelConfig.from_gguf(open_gguf(path))
    message = str(err.value)
    assert "'gemma2'" in message and "general.architecture" in message
    for arch in ARCHITECTURES:
        assert arch in message


def test_a_norm_of_the_wrong_width_is_named_with_its_reason(tmp_path: Path) -> None:
    case = CASES["flags-softcap"]
    wrong = {"blk.2.post_ffw_norm.weight": (np.ones(tg.D_MODEL // 2, np.float32), QT.F32)}
    path = tg.write_tiny_arch(tmp_path / "wrong.gguf", "gemma3", head_dim=HEAD_DIM,
                              vocab=tg.spm_vocab(), n_layers=case.n_layers, extra=wrong,
                              metadata={"attention.sliding_window": WINDOW}).path
    f = open_gguf(path)
    with pytest.raises(ShapeMismatchError) as err:
        check_tensors(f, ModelConfig.from_gguf(f))
    message = str(err.value)
    assert "'blk.2.post_ffw_norm.weight'" in message and "[32]" in message
    assert "gemma3.embedding_length" in message  # why [64]: the key it comes from


# ================================================================ the real Gemma 3 270M

REFS = Path(__file__).resolve().parent / "data" / "gemma3_llamacpp.json"
MIN_AGREEMENT = 0.95  # teacher-forced top-1 agreement with llama.cpp over all positions
NEAR_TIE = 0.3  # logprob gap allowed where the top-1 differs
MIN_LAYOUT_AGREEMENT = 0.98  # `fast` against `exact`, top-1 over the same positions


@pytest.fixture(scope="module")
def gemma3_refs() -> dict:
    return json.loads(REFS.read_text())


@pytest.fixture(scope="module")
def scored(gemma3_refs: dict) -> dict[str, list[Generation]]:
    """Per layout: each case's prompt ids + llama.cpp's greedy ids, echoed and scored; and
    under "text", each case's prompt text (tokenized by us) with one greedy token, in `exact`.
    Each layout is unloaded before the next one loads."""
    from realm_nb.sdk import Realm

    out: dict[str, list[Generation]] = {}
    for layout in ("exact", "fast", "packed"):
        realm = Realm(mode="local", default_model="gemma3-270m", weights=layout)
        runs = []
        for case in gemma3_refs["cases"]:
            g = realm.generate(case["prompt_ids"] + case["greedy_ids"], max_tokens=1,
                               temperature=0, echo=True, logprobs=1)
            assert isinstance(g, Generation)
            runs.append(g)
        out[layout] = runs
        if layout == "exact":
            out["text"] = []
            for case in gemma3_refs["cases"]:
                g = realm.generate(case["prompt"], max_tokens=1, temperature=0)
                assert isinstance(g, Generation)
                out["text"].append(g)
        realm.unload_model("gemma3-270m")
    return out


@pytest.mark.slow
def test_gemma3_prompt_ids_and_first_token_equal_llamacpp(
        gemma3_refs: dict, scored: dict[str, list[Generation]]) -> None:
    for case, g in zip(gemma3_refs["cases"], scored["text"], strict=True):
        assert g.prompt_ids == case["prompt_ids"], case["prompt"]  # BOS included
        assert g.token_ids == [case["first_top5"][0][0]], case["prompt"]


@pytest.mark.slow
def test_gemma3_teacher_forced_top1_agrees_with_llamacpp(gemma3_refs: dict,
                                                         scored: dict[str, list[Generation]]
                                                         ) -> None:
    pairs = list(zip(gemma3_refs["cases"], scored["exact"], strict=True))
    agree, total, misses = teacher_forced_vs_llamacpp(pairs, NEAR_TIE, first_agrees=True)
    rate = agree / total
    print(f"\ngemma3-270m exact vs llama.cpp, teacher-forced top-1: {agree}/{total} = {rate:.1%}")
    for m in misses:
        print("  near-tie:", m)
    assert rate >= MIN_AGREEMENT, misses


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["fast", "packed"])
def test_gemma3_layouts_agree_with_exact(layout: str, scored: dict[str, list[Generation]]
                                         ) -> None:
    agree = total = 0
    for exact, other in zip(scored["exact"], scored[layout], strict=True):
        assert exact.logprobs is not None and other.logprobs is not None
        for e, o in zip(exact.logprobs, other.logprobs, strict=True):
            total += 1
            agree += e.top[0].token_id == o.top[0].token_id
    rate = agree / total
    print(f"\ngemma3-270m {layout} vs exact, teacher-forced top-1: {agree}/{total} = {rate:.1%}")
    assert rate >= MIN_LAYOUT_AGREEMENT
