"""The llama-family forward in plain JAX: embedding → L × (RMSNorm, GQA attention with RoPE,
SwiGLU) → RMSNorm → head. Pure functions; `engine.py` holds the only jit boundaries.

Architectures differ by small blocks the config switches on (config.ArchSpec), never by a copy
of the forward: q/k/v biases (qwen2), per-head q/k RMSNorm (qwen3, gemma3), RoPE on adjacent
pairs (llama) or on halves (NEOX: qwen2, qwen3, gemma3, phi3), scaled RoPE frequencies (Llama 3,
Phi-3's LongRoPE; phi3's fused tensors are split at load, config.split_fused_tensors), and
Gemma 3's pieces: embeddings scaled by √D, sliding-window (local) layers with their own RoPE base
between global ones, RMSNorm of each sub-block's output before the residual add, GELU-tanh gated
FFN, a query scale of its own and, where the file sets it, soft-capped logits.

Glossary: B batch rows, T new tokens per row, S cache slots, C cached positions (t_ctx), D width,
H query heads, G kv heads, R = H / G query heads per kv head, K head dim, F ffn, V vocab, L layers,
P pages of the KV pool, N = C / PAGE pages a row reads.

The KV cache is a pool of pages (kvcache.py); the engine says where each new token goes
(page_ids, offsets) and which pages each row reads (table_rows). The pool is carried whole through
`lax.scan` and updated in place (with the cache donated by the caller): passing per-layer slices
made XLA copy the cache every call (FACTS.md).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp

from .config import ModelConfig
from .kvcache import KVCache
from .weights import ModelWeights, embed_rows, layer_at, linear, linear_many

# ================================================================ building blocks


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * w


def post_norm(x: jax.Array, w: jax.Array | None, eps: float) -> jax.Array:
    """A sub-block's output RMS-normed before the residual add where the layer has the weight
    (gemma3's post_attention_norm, post_ffw_norm); else as it is."""
    return x if w is None else rms_norm(x, w, eps)


# 2π as a head with 12 significant bits (so k·head is exact in f32 for k < 2^12) and a tail.
_TWO_PI_HEAD = 6.28125
_TWO_PI_TAIL = 2 * 3.141592653589793 - 6.28125


def rope_angles(positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """position × frequency reduced to [-π, π] in f32 without losing the position's bits.

    The plain f32 product at position p carries an error of about ulp(p) radians (3e-5 at 286),
    which the tiny-file tests saw as 1.5e-4 logits against a float64 reference; llama.cpp has
    the same. Here the frequency is split into a 12-bit head (p × head is exact for p < 2^12)
    and a tail, whole turns are taken off the exact part with 2π in two pieces (Cody-Waite),
    and the tail's small product is added last. Written by hand: XLA has no extended-precision
    argument reduction for this product. positions [B, T] int, inv_freq [K/2] → [B, T, K/2].
    """
    p = positions.astype(jnp.float32)[..., None]
    bits = jax.lax.bitcast_convert_type(inv_freq, jnp.uint32)
    head = jax.lax.bitcast_convert_type(bits & jnp.uint32(0xFFFFF000), jnp.float32)
    tail = inv_freq - head
    exact = p * head  # exact: 12 × 12 significant bits for p < 2^12
    turns = jnp.round(exact / (2 * jnp.pi))
    return (exact - turns * _TWO_PI_HEAD) - turns * _TWO_PI_TAIL + p * tail


def rope_tables(positions: jax.Array, cfg: ModelConfig, *, local: bool = False
                ) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, 1, K/2] for integer positions [B, T]; frequency i is base^(-2i/K),
    divided by cfg.rope_freq_factors[i] where the file scales RoPE (Llama 3). `local`: the
    sliding-window layers' tables (their own base, never scaled: llama.cpp's gemma3)."""
    half = cfg.head_dim // 2
    base = cfg.rope_base_local if local and cfg.rope_base_local is not None else cfg.rope_base
    inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / cfg.head_dim)
    if cfg.rope_freq_factors is not None and not local:
        inv_freq = inv_freq / jnp.asarray(cfg.rope_freq_factors, jnp.float32)
    angles = rope_angles(positions, inv_freq)  # [B, T, K/2]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    if cfg.rope_attn_factor is not None:  # Phi-3 LongRoPE scales both (HF, llama.cpp's mscale)
        cos, sin = cos * cfg.rope_attn_factor, sin * cfg.rope_attn_factor
    return cos, sin


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate adjacent pairs (x[2i], x[2i+1]): the layout GGUF llama files store q/k weights in."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(x.shape)


def apply_rope_halves(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate (x[i], x[i + K/2]): llama.cpp's NEOX rope, for files whose q/k rows keep the
    checkpoint's order (qwen2, qwen3; llama's converter permutes them into adjacent pairs)."""
    x0, x1 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)


ROPE_STYLES = {"pairs": apply_rope, "halves": apply_rope_halves}

# The gate's activation in the gated FFN: SwiGLU (llama, qwen) or GeGLU with GELU's tanh
# approximation (Gemma; llama.cpp's ggml_gelu).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu, "gelu_tanh": partial(jax.nn.gelu, approximate=True)}


def attention(q: jax.Array, keys: jax.Array, values: jax.Array, positions: jax.Array,
              cfg: ModelConfig, window: jax.Array | None = None) -> jax.Array:
    """Grouped-query attention of new queries over cached keys.

    q [B, T, H, K]; keys, values [B, C, G, K]; positions [B, T] → [B, T, H*K].
    Cached position c is visible to a query at position p when c <= p (causal; it also hides
    stale entries past the sequence's end) and, given an int32 `window` W (a local layer of
    a sliding-window model), p - c < W: the positions older than the window stay in the paged
    cache (the global layers read them) but this layer never sees them.
    """
    b, t = q.shape[:2]
    c = keys.shape[1]
    qg = q.reshape(b, t, cfg.n_kv_heads, cfg.q_per_kv, cfg.head_dim)
    scale = cfg.head_dim ** -0.5 if cfg.attn_scale is None else cfg.attn_scale
    scores = jnp.einsum("btgrk,bcgk->btgrc", qg, keys) * scale
    cached = jnp.arange(c)[None, None, :]
    visible = cached <= positions[:, :, None]  # [B, T, C]
    if window is not None:
        visible &= cached > positions[:, :, None] - window
    scores = jnp.where(visible[:, :, None, None, :], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("btgrc,bcgk->btgrk", probs, values)
    return out.reshape(b, t, cfg.n_heads * cfg.head_dim)


# ================================================================ the forward


def forward(params: ModelWeights, cache: KVCache, tokens: jax.Array, positions: jax.Array,
            page_ids: jax.Array, offsets: jax.Array, table_rows: jax.Array,
            last_index: jax.Array, *, cfg: ModelConfig, all_logits: bool
            ) -> tuple[jax.Array, KVCache]:
    """Append tokens to their sequences' pages and return logits.

    Args:
      tokens, positions: [B, T] int32: new tokens and their absolute positions.
      page_ids, offsets: [B, T] int32: the pool page and the position in it each token's k/v
        goes to (padding goes to the scratch page 0).
      table_rows: [B, N] int32: the pages of each row's first C = N * PAGE positions, in order.
      last_index: [B] int32 index in T of each row's last real token (rows may be padded).
      all_logits: static; True → logits [B, T, V] for every position, else [B, V] at last_index.
    Returns: (logits, the updated cache).
    """
    b, t = tokens.shape
    n, page = table_rows.shape[1], cache.page_size
    x = embed_rows(params.embed, tokens)  # [B, T, D]
    if cfg.embed_scale is not None:  # gemma3: √D
        x = x * cfg.embed_scale
    cos, sin = rope_tables(positions, cfg)
    rope = ROPE_STYLES[cfg.rope_style]
    act = ACTIVATIONS[cfg.ffn_act]
    sliding = cfg.sliding_window is not None
    if sliding:  # gemma3: local layers have their own RoPE tables and see the window only
        cos_local, sin_local = rope_tables(positions, cfg, local=True)
        is_local = jnp.asarray(cfg.local_layers, bool)  # [L]

    def block(carry: tuple[jax.Array, jax.Array, jax.Array], l: jax.Array
              ) -> tuple[tuple[jax.Array, jax.Array, jax.Array], None]:
        x, k_cache, v_cache = carry  # x [B, T, D]; caches [L, P, PAGE, G, K]
        w = layer_at(params.layers, l)  # packed matrices are read in place, not sliced
        h = rms_norm(x, w.attn_norm, cfg.rms_eps)
        q, k, v = linear_many(h, (w.wq, w.wk, w.wv))
        # qwen2: q/k/v biases, added after the (packed) matmuls
        if w.bq is not None and w.bk is not None and w.bv is not None:
            q, k, v = q + w.bq, k + w.bk, v + w.bv
        q = q.reshape(b, t, cfg.n_heads, cfg.head_dim)
        k = k.reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
        v = v.reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
        # qwen3, gemma3: RMSNorm over each head's K dims, before RoPE
        if w.q_norm is not None and w.k_norm is not None:
            q, k = rms_norm(q, w.q_norm, cfg.rms_eps), rms_norm(k, w.k_norm, cfg.rms_eps)
        layer_cos, layer_sin, window = cos, sin, None
        if sliding:
            local = is_local[l]
            layer_cos = jnp.where(local, cos_local, cos)
            layer_sin = jnp.where(local, sin_local, sin)
            window = jnp.where(local, cfg.sliding_window or 0, jnp.iinfo(jnp.int32).max)
        q, k = rope(q, layer_cos, layer_sin), rope(k, layer_cos, layer_sin)
        k_cache = k_cache.at[l, page_ids, offsets].set(k.astype(k_cache.dtype))
        v_cache = v_cache.at[l, page_ids, offsets].set(v.astype(v_cache.dtype))
        shape = (b, n * page, cfg.n_kv_heads, cfg.head_dim)
        keys = k_cache[l, table_rows].reshape(shape).astype(jnp.float32)  # [B, C, G, K]
        values = v_cache[l, table_rows].reshape(shape).astype(jnp.float32)
        x = x + post_norm(linear(attention(q, keys, values, positions, cfg, window), w.wo),
                          w.post_attn_norm, cfg.rms_eps)
        h = rms_norm(x, w.ffn_norm, cfg.rms_eps)
        gate, up = linear_many(h, (w.w_gate, w.w_up))
        x = x + post_norm(linear(act(gate) * up, w.w_down), w.post_ffn_norm, cfg.rms_eps)
        return (x, k_cache, v_cache), None

    layer_ids = jnp.arange(cfg.n_layers, dtype=jnp.int32)
    (x, k_cache, v_cache), _ = jax.lax.scan(block, (x, cache.k, cache.v), layer_ids)
    if not all_logits:
        x = x[jnp.arange(b), last_index]  # [B, D]
    x = rms_norm(x, params.norm, cfg.rms_eps)
    logits = linear(x, params.head)
    if cfg.final_logit_softcap is not None:  # c·tanh(logits / c) where the file sets c
        logits = cfg.final_logit_softcap * jnp.tanh(logits / cfg.final_logit_softcap)
    return logits, KVCache(k_cache, v_cache)
