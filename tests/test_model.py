"""realm_nb.model / engine: the jitted llama forward equals a plain numpy forward on a tiny model.

The reference below is written from the llama definition, not from our code: RMSNorm, RoPE on
adjacent pairs (x[2i], x[2i+1]) with theta_i = base^(-2i/K) (the order GGUF llama files store q/k
in), grouped-query attention (query head h reads kv head h // (H/G)), SwiGLU, and a head tied to
the embedding unless the file has output.weight. It runs in float64 over the weights as
`gguf.quants.dequantize` expands them. tests/test_architectures.py uses it with the pieces other
architectures add (q/k/v biases, per-head q/k RMSNorm, RoPE on halves, scaled RoPE frequencies).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tiny_gguf as tg
from tiny_gguf import TinyModel, write_tiny_llama

from realm_nb.config import ModelConfig
from realm_nb.engine import PREFILL_BUCKETS, Engine
from realm_nb.gguf_io import open_gguf
from realm_nb.kvcache import kv_dtype_for
from realm_nb.weights import (
    ModelWeights,
    check_tensors,
    load_globals,
    load_layer,
    stack_layers,
    stack_types,
)

RTOL = ATOL = 1e-4


def assert_close(ours: np.ndarray, ref: np.ndarray) -> None:
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=ATOL)

# ================================================================ numpy reference


def _rms_norm(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + tg.RMS_EPS) * w


def _rope(x: np.ndarray, positions: np.ndarray, *, halves: bool = False,
          base: float = tg.ROPE_BASE, freq_factors: np.ndarray | None = None) -> np.ndarray:
    """x [T, n_heads, K]: rotate each pair by pos * theta_i, theta_i = base^(-2i/K) (divided
    by freq_factors[i] where given). The pairs are (x[2i], x[2i+1]) in llama's GGUF order, or
    (x[i], x[i + K/2]) with `halves` (GPT-NeoX / HF rotate_half, as Qwen files store q/k)."""
    k = x.shape[-1]
    theta = base ** (-2.0 * np.arange(k // 2) / k)
    if freq_factors is not None:
        theta = theta / freq_factors
    angle = positions[:, None, None] * theta[None, None, :]  # [T, 1, K/2]
    cos, sin = np.cos(angle), np.sin(angle)
    first = (slice(0, k // 2) if halves else slice(0, None, 2))
    second = (slice(k // 2, None) if halves else slice(1, None, 2))
    a, b = x[..., first], x[..., second]
    out = np.empty_like(x)
    out[..., first] = a * cos - b * sin
    out[..., second] = a * sin + b * cos
    return out


def reference_logits(model: TinyModel, ids: list[int], *, rope_halves: bool = False,
                     rope_base: float = tg.ROPE_BASE,
                     rope_freq_factors: np.ndarray | None = None,
                     rope_attn_factor: float = 1.0) -> np.ndarray:
    """Logits [T, V] at every position of `ids` (one sequence from position 0), float64.

    Where the file has them, q/k/v biases are added to the projections (Qwen 2) and q and k are
    RMS-normed per head before RoPE (Qwen 3); K is read from attn_q's rows. `rope_attn_factor`
    multiplies RoPE's cos and sin (Phi-3 LongRoPE's scaling_factor in HF).
    """
    w = {k: v.astype(np.float64) for k, v in model.weights.items()}
    t = len(ids)
    pos = np.arange(t, dtype=np.float64)
    x = w["token_embd.weight"][np.asarray(ids)]  # [T, D]
    causal = np.tril(np.ones((t, t), dtype=bool))
    per_kv = tg.N_HEADS // tg.N_KV_HEADS
    head_dim = w["blk.0.attn_q.weight"].shape[0] // tg.N_HEADS

    def rope(x: np.ndarray) -> np.ndarray:
        return rope_attn_factor * _rope(x, pos, halves=rope_halves, base=rope_base,
                                        freq_factors=rope_freq_factors)

    for layer in range(tg.N_LAYERS):
        p = f"blk.{layer}."
        h = _rms_norm(x, w[p + "attn_norm.weight"])
        q, k, v = (h @ w[p + f"attn_{n}.weight"].T + w.get(p + f"attn_{n}.bias", 0.0)
                   for n in "qkv")
        q = q.reshape(t, tg.N_HEADS, head_dim)
        k = k.reshape(t, tg.N_KV_HEADS, head_dim)
        v = v.reshape(t, tg.N_KV_HEADS, head_dim)
        if p + "attn_q_norm.weight" in w:
            q = _rms_norm(q, w[p + "attn_q_norm.weight"])
            k = _rms_norm(k, w[p + "attn_k_norm.weight"])
        q, k = rope(q), rope(k)
        heads = []
        for head in range(tg.N_HEADS):
            g = head // per_kv
            scores = np.where(causal, q[:, head] @ k[:, g].T / np.sqrt(head_dim),
                              -np.inf)  # [T, T]
            probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
            probs /= probs.sum(axis=-1, keepdims=True)
            heads.append(probs @ v[:, g])
        x = x + np.concatenate(heads, axis=-1) @ w[p + "attn_output.weight"].T
        h = _rms_norm(x, w[p + "ffn_norm.weight"])
        gate = h @ w[p + "ffn_gate.weight"].T
        up = h @ w[p + "ffn_up.weight"].T
        x = x + (gate / (1.0 + np.exp(-gate)) * up) @ w[p + "ffn_down.weight"].T
    x = _rms_norm(x, w["output_norm.weight"])
    lm_head = w.get("output.weight", w["token_embd.weight"])
    return x @ lm_head.T


# ================================================================ fixtures


def build_engine(path: Path, layout: str, *, n_slots: int = 4, max_context: int = 512) -> Engine:
    f = open_gguf(path)
    cfg = ModelConfig.from_gguf(f)
    check_tensors(f, cfg)
    types = stack_types(f, cfg)
    layers = [load_layer(f, cfg, i, layout, types) for i in range(cfg.n_layers)]
    g = load_globals(f, cfg, layout)
    params = ModelWeights(embed=g["embed"], layers=stack_layers(layers), norm=g["norm"],
                          head=g["head"])
    return Engine(cfg, params, n_slots=n_slots, max_context=max_context,
                  kv_dtype=kv_dtype_for(layout))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf", seed=1)


@pytest.fixture(scope="module")
def tiny_untied(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "untied.gguf", seed=2, tied=False)


@pytest.fixture(scope="module")
def exact(tiny: TinyModel) -> Engine:
    return build_engine(tiny.path, "exact", max_context=320)


@pytest.fixture(scope="module")
def prompt(tiny: TinyModel) -> list[int]:
    return [int(i) for i in np.random.default_rng(7).integers(0, tiny.vocab_size, 20)]


# ================================================================ tests


def test_tiny_model_mixes_quant_types(tiny: TinyModel, exact: Engine) -> None:
    """The fixture really exercises several block formats and the unstacked-field path."""
    kinds = {t.name for t in tiny.types.values()}
    assert {"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "F32"} <= kinds
    assert exact.cfg.tied_embeddings
    assert exact.cfg.n_kv_heads < exact.cfg.n_heads  # grouped-query attention


@pytest.mark.parametrize("which", ["tied", "untied"])
def test_prefill_logits_equal_numpy_reference(which: str, tiny: TinyModel,
                                              tiny_untied: TinyModel, prompt: list[int]) -> None:
    model = tiny if which == "tied" else tiny_untied
    engine = build_engine(model.path, "exact")
    assert engine.cfg.tied_embeddings == (which == "tied")
    ours = engine.prefill(0, prompt, 0, all_logits=True)
    ref = reference_logits(model, prompt)
    assert ours.shape == (len(prompt), model.vocab_size)
    assert_close(ours, ref)


def test_greedy_continuation_equals_numpy_reference(tiny: TinyModel, exact: Engine,
                                                    prompt: list[int]) -> None:
    n_new = 12
    ours = exact.greedy(prompt, n_new, slot=1)
    assert len(ours) == n_new
    ref = reference_logits(tiny, prompt + ours)  # the reference scores our whole sequence
    for i, token in enumerate(ours):
        row = ref[len(prompt) - 1 + i]
        # our pick is the reference's argmax (or within float noise of it)
        assert row[token] >= row.max() - 1e-4, f"step {i}: {token} vs {int(row.argmax())}"
    assert ours == [int(np.argmax(ref[len(prompt) - 1 + i])) for i in range(n_new)]


def test_cached_decode_equals_full_recompute(tiny: TinyModel, exact: Engine,
                                             prompt: list[int]) -> None:
    seq = list(prompt[:8])
    logits = exact.prefill(2, seq, 0)
    ref = reference_logits(tiny, prompt)
    for step in range(8, len(prompt)):
        full = exact.prefill(3, seq, 0)  # the whole sequence again, no cache reuse
        assert_close(logits, full)
        assert_close(logits, ref[step - 1])
        seq.append(prompt[step])
        logits = exact.decode_step([2], [prompt[step]], [step])[0]


def test_prompt_longer_than_a_prefill_chunk(tiny: TinyModel, exact: Engine) -> None:
    n = PREFILL_BUCKETS[-1] + 44  # two chunks: 256 + 44
    assert n <= exact.max_context
    ids = [int(i) for i in np.random.default_rng(3).integers(0, tiny.vocab_size, n)]
    ours = exact.prefill(0, ids, 0, all_logits=True)
    ref = reference_logits(tiny, ids)
    assert ours.shape == ref.shape
    assert_close(ours, ref)
    # a decode step after the chunked prompt reads both chunks from the cache
    nxt = int(np.argmax(ours[-1]))
    step = exact.decode_step([0], [nxt], [n])[0]
    assert_close(step, reference_logits(tiny, [*ids, nxt])[-1])


def test_two_slots_in_one_batch_equal_their_solo_runs(tiny: TinyModel, exact: Engine) -> None:
    rng = np.random.default_rng(11)
    a = [int(i) for i in rng.integers(0, tiny.vocab_size, 9)]
    b = [int(i) for i in rng.integers(0, tiny.vocab_size, 14)]
    # solo: each sequence alone in its slot
    solo_a = [exact.prefill(0, a, 0)]
    solo_b = [exact.prefill(1, b, 0)]
    seq_a, seq_b = list(a), list(b)
    for _ in range(5):
        ta, tb = int(np.argmax(solo_a[-1])), int(np.argmax(solo_b[-1]))
        solo_a.append(exact.decode_step([0], [ta], [len(seq_a)])[0])
        seq_a.append(ta)
        solo_b.append(exact.decode_step([1], [tb], [len(seq_b)])[0])
        seq_b.append(tb)
    # together: the same sequences in other slots, decoded side by side in one batch
    pair = [(exact.prefill(2, a, 0), exact.prefill(3, b, 0))]
    for i in range(5):
        both = exact.decode_step([2, 3], [seq_a[len(a) + i], seq_b[len(b) + i]],
                                 [len(a) + i, len(b) + i])
        pair.append((both[0], both[1]))
    for i, (la, lb) in enumerate(pair):
        assert_close(la, solo_a[i])
        assert_close(lb, solo_b[i])
    assert not np.allclose(solo_a[-1], solo_b[-1], atol=1e-2)  # the slots really differ


def test_fast_layout_stays_close_to_exact(tiny: TinyModel, exact: Engine) -> None:
    fast = build_engine(tiny.path, "fast")
    ids = [int(i) for i in np.random.default_rng(5).integers(0, tiny.vocab_size, 40)]
    le = exact.prefill(0, ids, 0, all_logits=True)
    lf = fast.prefill(0, ids, 0, all_logits=True)
    spread = float(np.std(le))
    err = np.abs(lf - le)
    assert float(np.max(err)) < 0.3 * spread, (float(np.max(err)), spread)
    assert float(np.mean(err)) < 0.05 * spread, (float(np.mean(err)), spread)
    same = float(np.mean(np.argmax(lf, -1) == np.argmax(le, -1)))
    assert same >= 0.9, same
    assert not np.array_equal(lf, le)  # it is a different layout, not the same arrays


def test_a_tied_head_is_counted_once(tmp_path: Path) -> None:
    """The store's resident bytes count the tied embedding/head table once (it is one array)."""
    import jax

    from realm_nb.weights import nbytes

    tiny = write_tiny_llama(tmp_path / "tied.gguf", tied=True)
    params = build_engine(tiny.path, "fast").params
    assert params.head is params.embed
    every_leaf = sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(params))
    assert nbytes(params) == every_leaf - nbytes(params.embed) > 0
