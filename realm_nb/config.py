"""Model configuration: GGUF metadata → a static, hashable `ModelConfig`.

The config is a frozen dataclass so it can be a static argument of `jax.jit`. Architectures grow
by entries in `ARCHITECTURES` (a table, not a copy of the forward): each entry names the small
blocks of model.py that architecture switches on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import gguf.quants
import numpy as np

from .errors import GGUFFormatError, UnsupportedArchitectureError
from .gguf_io import GGUFFile


@dataclass(frozen=True)
class ArchSpec:
    """What sets an architecture apart from the plain llama forward.

    rope_style: "pairs" rotates adjacent pairs (x[2i], x[2i+1]): llama GGUF files, whose q/k rows
      the converter permuted into that order. "halves" rotates (x[i], x[i + K/2]): llama.cpp's
      NEOX rope, for architectures whose q/k rows are stored as the checkpoint has them (Qwen).
    qkv_bias: q/k/v projections carry biases (blk.N.attn_{q,k,v}.bias).
    qk_norm: an RMSNorm over each head's K dims of q and k before RoPE (attn_{q,k}_norm.weight).
    ffn_act: the gate's activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU with GELU's tanh
      approximation: Gemma).
    post_norms: the attention and FFN outputs are RMS-normed before they join the residual
      (blk.N.post_attention_norm / post_ffw_norm: Gemma 2 and 3).
    scale_embeddings: the embedding rows are multiplied by √D before the first layer (Gemma).
    swa_period: every swa_period-th layer (l % swa_period == swa_period - 1) attends to the
      whole context and the others to the last `{arch}.attention.sliding_window` positions only,
      unless the file says otherwise in `{arch}.attention.sliding_window_pattern` (llama.cpp's
      set_swa_pattern; 0: no sliding window).
    rope_base_local: RoPE base of the sliding-window layers, unless `{arch}.rope.freq_base_swa`
      says otherwise (the global layers take `{arch}.rope.freq_base`).
    fast_two_plane: the layer matrices (GGUF short names) that the `fast` layout keeps in two
      int8 planes (weights.planes_for); the head always has two.
    fused_qkv, fused_gate_up: q/k/v are stored as one `attn_qkv` (rows q, then k, then v) and
      gate/up as one `ffn_up` (rows gate, then up: llama.cpp's swiglu of the halves), read as
      views of their rows (GGUFFile.split_rows) so the forward and the layouts never see them.
    """

    family: str  # the name ModelConfig.arch reports
    rope_style: str = "pairs"
    qkv_bias: bool = False
    qk_norm: bool = False
    ffn_act: str = "silu"
    post_norms: bool = False
    scale_embeddings: bool = False
    swa_period: int = 0
    rope_base_local: float = 10000.0
    # SmolLM2, teacher-forced top-1 against `exact` over 502 positions: the head alone 97.4 %,
    # also attn_output and ffn_down 98.2 %, every matrix 100 % (benchmarks/bench_engine.py).
    fast_two_plane: tuple[str, ...] = ("attn_output", "ffn_down")
    fused_qkv: bool = False
    fused_gate_up: bool = False


# GGUF `general.architecture` values that run on the llama-family forward in model.py.
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama"),  # Llama 1-3, SmolLM/SmolLM2, TinyLlama, Mistral 7B
    "mistral": ArchSpec("llama"),
    "qwen2": ArchSpec("qwen2", rope_style="halves", qkv_bias=True),  # Qwen 2 / 2.5
    "qwen3": ArchSpec("qwen3", rope_style="halves", qk_norm=True),  # Qwen 3 (dense)
    # Gemma 3 (text): five sliding-window layers (RoPE base 10k) to one global layer (1M).
    # llama.cpp's converter stores Gemma's RMSNorm weights w as 1 + w, so the plain RMSNorm
    # reads them as they are.
    # `fast` keeps all its matrices in two planes: Gemma 3 270M against `exact` over the 157
    # teacher-forced positions of tests/test_gemma3.py, top-1 96.2 % with SmolLM2's choice, 98.1 %
    # adding ffn_gate/up, 100 % with all (mean |Δ logprob| 0.018 → 0.0007); its activations'
    # outliers are larger than SmolLM2's.
    "gemma3": ArchSpec("gemma3", rope_style="halves", qk_norm=True, ffn_act="gelu_tanh",
                       post_norms=True, scale_embeddings=True, swa_period=6,
                       fast_two_plane=("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                                       "ffn_up", "ffn_down")),
    # Phi-3 / 3.5: llama blocks with fused q/k/v and gate/up, NEOX rope and, in the 128k files,
    # LongRoPE (config.longrope). llama.cpp leaves Phi-3's sliding window off ("Phi SWA is
    # currently disabled"), and so does realm-nb.
    "phi3": ArchSpec("phi3", rope_style="halves", fused_qkv=True, fused_gate_up=True),
}

# Gemma 3 27B scales queries by (D / H)^-1/2 rather than K^-1/2 (its query_pre_attn_scalar,
# gemma_pytorch config.py; llama.cpp keys it on the layer count as here). GGUF files carry no
# query_pre_attn_scalar key, so the layer count is what tells the 27B apart.
GEMMA3_27B_LAYERS = 62

# `{arch}.rope.scaling.type` values, and what each does to RoPE's frequencies.
ROPE_SCALINGS = ("none", "linear", "llama3")
ROPE_FREQS_TENSOR = "rope_freqs.weight"  # llama.cpp's per-frequency divisors (Llama 3.1+ files)

# Sane bounds on the metadata, each far beyond any model realm-nb could hold (the largest llama
# models have 126 layers, width 16384, 128 heads, FFN 53248, vocabularies of 256k tokens).
MAX_LAYERS = 1024
MAX_WIDTH = 1 << 17  # embedding_length, key_length
MAX_HEADS = 1 << 12
MAX_FFN = 1 << 20
MAX_VOCAB = 1 << 24  # the host ABI's bound on vocab_size (abi.validate)
MAX_CONTEXT = 1 << 30
TENSORS_PER_LAYER = 6  # at least: attn_norm, attn_qkv/output, ffn_norm, ffn_up/down (Phi-3's)


@dataclass(frozen=True)
class ModelConfig:
    """Glossary: L layers, D width, H query heads, G kv heads, K head dim, F ffn, V vocab."""

    arch: str
    n_layers: int  # L
    d_model: int  # D
    n_heads: int  # H
    n_kv_heads: int  # G
    head_dim: int  # K
    d_ff: int  # F
    vocab_size: int  # V
    context_length: int
    rope_base: float
    rms_eps: float
    tied_embeddings: bool
    rope_style: str = "pairs"  # "pairs" | "halves" (ArchSpec)
    qkv_bias: bool = False
    qk_norm: bool = False
    # Divisors of RoPE's K/2 inverse frequencies (Llama 3 scaling, linear scaling), or None;
    # with a sliding window, of the global layers' frequencies only (as llama.cpp scales them).
    rope_freq_factors: tuple[float, ...] | None = None
    rope_attn_factor: float | None = None  # cos and sin x this (Phi-3 LongRoPE), or None
    ffn_act: str = "silu"  # "silu" | "gelu_tanh" (ArchSpec)
    post_norms: bool = False
    embed_scale: float | None = None  # embeddings x this (Gemma: √D), or None
    attn_scale: float | None = None  # query scale; None: K^-1/2
    final_logit_softcap: float | None = None  # logits → c·tanh(logits / c), or None
    sliding_window: int | None = None  # positions a local layer sees (its own included), or None
    local_layers: tuple[bool, ...] = ()  # [L] True where the layer attends to the window only
    rope_base_local: float | None = None  # RoPE base of the local layers
    fast_two_plane: tuple[str, ...] = ArchSpec.fast_two_plane  # (ArchSpec)

    @property
    def q_per_kv(self) -> int:
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> ModelConfig:
        """The config the file's metadata describes; every value checked for type and range
        (a GGUFFormatError names the key and the bad value) before anything is sized by it."""
        arch = f.arch
        if arch not in ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"{f.path.name}: general.architecture is {arch!r}, which realm-nb does not "
                f"run; supported: {', '.join(sorted(ARCHITECTURES))}. Convert the model to one "
                "of these, or use another model",
                param="general.architecture", value=arch,
            )
        spec = ARCHITECTURES[arch]

        def key(name: str) -> str:
            return f"{arch}.{name}"

        n_layers = f.get_int(key("block_count"), lo=1, hi=MAX_LAYERS)
        if n_layers * TENSORS_PER_LAYER > len(f.tensors):  # before anything loops over layers
            raise GGUFFormatError(
                f"{f.path.name}: metadata key {key('block_count')!r} is {n_layers}, but the file "
                f"holds {len(f.tensors)} tensors and each layer needs {TENSORS_PER_LAYER}; the "
                "file is damaged or incomplete", param=key("block_count"))
        d_model = f.get_int(key("embedding_length"), lo=1, hi=MAX_WIDTH)
        n_heads = f.get_int(key("attention.head_count"), lo=1, hi=MAX_HEADS)
        n_kv = f.get_int(key("attention.head_count_kv"), n_heads, lo=1, hi=n_heads)
        if n_heads % n_kv:
            raise UnsupportedArchitectureError(
                f"{f.path.name}: {n_heads} query heads are not a multiple of {n_kv} kv heads "
                f"({key('attention.head_count')}, {key('attention.head_count_kv')})",
                param=key("attention.head_count_kv"))
        head_dim = f.get_int(key("attention.key_length"), max(1, d_model // n_heads),
                             lo=1, hi=MAX_WIDTH)
        if f.get_int(key("attention.value_length"), head_dim, lo=1, hi=MAX_WIDTH) != head_dim:
            raise UnsupportedArchitectureError(
                f"{f.path.name}: {key('attention.value_length')} differs from "
                f"{key('attention.key_length')} ({head_dim}); realm-nb runs models whose "
                "values have the keys' head dim", param=key("attention.value_length"))
        if head_dim % 2:
            raise GGUFFormatError(
                f"{f.path.name}: head dim {head_dim} ({key('attention.key_length')}) is odd; "
                "RoPE needs an even head dim", param=key("attention.key_length"))
        rope_base = f.get_float(key("rope.freq_base"), 10000.0, lo=1.0, hi=1e12)
        embed = f.tensor("token_embd.weight")
        vocab = f.get_int(key("vocab_size"), embed.shape[0], lo=1, hi=MAX_VOCAB)
        tokens = f.get("tokenizer.ggml.tokens", None)
        if isinstance(tokens, list) and len(tokens) > vocab:  # every token id must be a row
            raise GGUFFormatError(
                f"{f.path.name}: the vocabulary (tokenizer.ggml.tokens) holds {len(tokens)} "
                f"tokens, more than the model's {vocab} (token_embd.weight rows or "
                f"{key('vocab_size')}); the file is damaged or was assembled from mismatched "
                "parts", param="tokenizer.ggml.tokens")
        d_ff = f.get_int(key("feed_forward_length"), lo=1, hi=MAX_FFN)
        split_fused_tensors(f, spec, n_layers, q_rows=n_heads * head_dim,
                            kv_rows=n_kv * head_dim, d_ff=d_ff)
        context = f.get_int(key("context_length"), 2048, lo=1, hi=MAX_CONTEXT)
        freq_factors, attn_factor, context = longrope(f, arch, head_dim, context)
        sliding_window, local_layers = sliding_window_layers(f, arch, spec, n_layers)
        scale: float | None = None
        if spec.family == "gemma3":  # query_pre_attn_scalar: K, or D / H for the 27B
            scale = (d_model / n_heads if n_layers == GEMMA3_27B_LAYERS else head_dim) ** -0.5
        softcap_key = key("final_logit_softcapping")
        softcap = (f.get_float(softcap_key, lo=1e-3, hi=1e6) if softcap_key in f.metadata
                   else None)
        return cls(
            arch=spec.family,
            n_layers=n_layers,
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            d_ff=d_ff,
            vocab_size=vocab,
            context_length=context,
            rope_base=rope_base,
            rms_eps=f.get_float(key("attention.layer_norm_rms_epsilon"), 1e-5, lo=1e-12,
                                hi=1e-1),
            tied_embeddings="output.weight" not in f.tensors,
            rope_style=spec.rope_style,
            qkv_bias=spec.qkv_bias,
            qk_norm=spec.qk_norm,
            rope_freq_factors=freq_factors or rope_freq_factors(f, arch, head_dim, rope_base),
            rope_attn_factor=attn_factor,
            ffn_act=spec.ffn_act,
            fast_two_plane=spec.fast_two_plane,
            post_norms=spec.post_norms,
            embed_scale=math.sqrt(d_model) if spec.scale_embeddings else None,
            attn_scale=scale,
            final_logit_softcap=softcap,
            sliding_window=sliding_window,
            local_layers=local_layers,
            rope_base_local=(f.get_float(key("rope.freq_base_swa"), spec.rope_base_local,
                                         lo=1.0, hi=1e12) if sliding_window else None),
        )


# ================================================================ fused tensors, LongRoPE


def split_fused_tensors(f: GGUFFile, spec: ArchSpec, n_layers: int, *, q_rows: int,
                        kv_rows: int, d_ff: int) -> None:
    """Let each layer's q/k/v and gate/up be read by their own names where the architecture
    stores them fused (ArchSpec.fused_qkv / fused_gate_up) and the file does so: a file with
    the separate tensors is read as it is, as llama.cpp does."""
    for layer in range(n_layers):
        p = f"blk.{layer}."
        if spec.fused_qkv and p + "attn_qkv.weight" in f.tensors:
            f.split_rows(p + "attn_qkv.weight", [(p + "attn_q.weight", q_rows),
                                                 (p + "attn_k.weight", kv_rows),
                                                 (p + "attn_v.weight", kv_rows)])
        if spec.fused_gate_up and p + "ffn_gate.weight" not in f.tensors:
            f.split_rows(p + "ffn_up.weight", [(p + "ffn_gate.weight", d_ff),
                                               (p + "ffn_up.weight", d_ff)])


ROPE_FACTORS_SHORT = "rope_factors_short.weight"  # Phi-3 128k LongRoPE, within the original
# context (its rope_factors_long.weight, for past it, is not read: see `longrope`)


def longrope(f: GGUFFile, arch: str, head_dim: int, context: int
             ) -> tuple[tuple[float, ...] | None, float | None, int]:
    """LongRoPE (Phi-3 128k files): the short factors, the attention factor and the context.

    The frequencies are divided by `rope_factors_short` while a sequence stays within
    `{arch}.rope.scaling.original_context_length`, and by `rope_factors_long` past it (HF
    Phi3LongRoPEScaledRotaryEmbedding; llama.cpp picks by its context size); cos and sin are
    multiplied by `{arch}.rope.scaling.attn_factor`. realm-nb runs such a file within the
    original context, with the short factors (its sequences are 2,048 positions by default):
    the context it reports is capped there. Files without the tensors: (None, None, context).
    """
    if ROPE_FACTORS_SHORT not in f.tensors:
        return None, None, context
    factors = rope_divisors(f, ROPE_FACTORS_SHORT, head_dim // 2)
    attn_factor = f.get_float(f"{arch}.rope.scaling.attn_factor", 1.0, lo=1e-3, hi=1e3)
    original = f.get_int(f"{arch}.rope.scaling.original_context_length", context, lo=1,
                         hi=MAX_CONTEXT)
    return tuple(float(x) for x in factors), attn_factor, min(context, original)


# ================================================================ sliding-window layers


def sliding_window_layers(f: GGUFFile, arch: str, spec: ArchSpec, n_layers: int
                          ) -> tuple[int | None, tuple[bool, ...]]:
    """The sliding window W and, per layer, whether it is local (sees positions p-W+1 .. p).

    `{arch}.attention.sliding_window_pattern` may say which layers are local: an integer n
    (layer l is local when l % n < n - 1: llama.cpp's set_swa_pattern) or one bool per layer;
    without it the architecture's swa_period does. Architectures without a period: (None, ()).
    """
    if not spec.swa_period:
        return None, ()
    window = f.get_int(f"{arch}.attention.sliding_window", lo=1, hi=MAX_CONTEXT)
    pattern_key = f"{arch}.attention.sliding_window_pattern"
    pattern = f.get(pattern_key, spec.swa_period)
    if isinstance(pattern, list):
        flags = f.get_list(pattern_key, bool, max_len=n_layers)
        if len(flags) != n_layers:
            raise GGUFFormatError(
                f"{f.path.name}: {pattern_key} holds {len(flags)} flags for {n_layers} layers "
                f"({arch}.block_count); it needs one per layer", param=pattern_key)
        return window, tuple(bool(x) for x in flags)
    period = f.get_int(pattern_key, spec.swa_period, lo=1, hi=MAX_LAYERS)
    return window, tuple(layer % period < period - 1 for layer in range(n_layers))


# ================================================================ RoPE frequency scaling


def rope_freq_factors(f: GGUFFile, arch: str, head_dim: int, rope_base: float
                      ) -> tuple[float, ...] | None:
    """Divisors of the K/2 inverse frequencies base^(-2i/K), or None where RoPE is unscaled.

    Llama 3.1+ files carry them as the tensor `rope_freqs.weight` (llama.cpp's converter writes
    the llama3 scaling so; llama.cpp divides each frequency by it). A file may instead name the
    scaling in metadata: `{arch}.rope.scaling.type` = "llama3" with `.factor`,
    `.low_freq_factor`, `.high_freq_factor`, `.original_context_length` (the factors computed
    as the converter does), or "linear" with `.factor` (every frequency divided by it, what
    llama.cpp's freq_scale = 1/factor does to positions). The tensor wins over llama3 keys.
    """
    half = head_dim // 2
    scaling_key = f"{arch}.rope.scaling.type"
    scaling = f.get_str(scaling_key, "none")
    if scaling not in ROPE_SCALINGS:
        raise UnsupportedArchitectureError(
            f"{f.path.name}: RoPE scaling {scaling!r} ({scaling_key}) is not supported; "
            f"realm-nb runs: {', '.join(ROPE_SCALINGS)}", param=scaling_key, value=scaling)
    factor = f.get_float(f"{arch}.rope.scaling.factor", 1.0, lo=1e-6, hi=1e6)
    factors: np.ndarray | None = None
    if ROPE_FREQS_TENSOR in f.tensors:
        factors = rope_divisors(f, ROPE_FREQS_TENSOR, half)
    elif scaling == "llama3":
        factors = llama3_rope_factors(
            head_dim, rope_base, factor,
            low=f.get_float(f"{arch}.rope.scaling.low_freq_factor", 1.0, lo=1e-6, hi=1e6),
            high=f.get_float(f"{arch}.rope.scaling.high_freq_factor", 4.0, lo=1e-6, hi=1e6),
            original_context=f.get_int(f"{arch}.rope.scaling.original_context_length", 8192,
                                       lo=1, hi=MAX_CONTEXT))
    if scaling == "linear" and factor != 1.0:
        factors = (np.ones(half) if factors is None else factors) * factor
    return None if factors is None else tuple(float(x) for x in factors)


def rope_divisors(f: GGUFFile, name: str, half: int) -> np.ndarray:
    """The [K/2] tensor `name` of RoPE frequency divisors, each checked finite and positive."""
    info = f.expect_shape(name, (half,))
    factors = np.asarray(gguf.quants.dequantize(np.asarray(f.raw(name)), info.qtype),
                         np.float64).reshape(half)
    if not (np.all(np.isfinite(factors)) and np.all(factors > 0)):
        raise GGUFFormatError(f"{f.path.name}: tensor {name!r} holds values that are not finite "
                              "and positive; the file is damaged", param=name)
    return factors


def llama3_rope_factors(head_dim: int, rope_base: float, factor: float, *, low: float,
                        high: float, original_context: int) -> np.ndarray:
    """[K/2] divisors of Llama 3's scaling: short wavelengths kept, long ones divided by
    `factor`, a smooth blend between (HF `_compute_llama3_parameters`, llama.cpp's converter)."""
    if high <= low:
        raise GGUFFormatError(
            f"rope.scaling.high_freq_factor ({high}) must exceed low_freq_factor ({low})",
            param="rope.scaling.high_freq_factor")
    out = []
    for i in range(head_dim // 2):
        wavelen = 2 * math.pi * rope_base ** (2 * i / head_dim)
        if wavelen < original_context / high:
            out.append(1.0)
        elif wavelen > original_context / low:
            out.append(factor)
        else:
            smooth = (original_context / wavelen - low) / (high - low)
            out.append(1.0 / ((1.0 - smooth) / factor + smooth))
    return np.asarray(out, np.float64)
