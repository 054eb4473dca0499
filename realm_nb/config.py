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
    """

    family: str  # the name ModelConfig.arch reports
    rope_style: str = "pairs"
    qkv_bias: bool = False
    qk_norm: bool = False


# GGUF `general.architecture` values that run on the llama-family forward in model.py.
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama"),  # Llama 1-3, SmolLM/SmolLM2, TinyLlama, Mistral 7B
    "mistral": ArchSpec("llama"),
    "qwen2": ArchSpec("qwen2", rope_style="halves", qkv_bias=True),  # Qwen 2 / 2.5
    "qwen3": ArchSpec("qwen3", rope_style="halves", qk_norm=True),  # Qwen 3 (dense)
}

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
TENSORS_PER_LAYER = 9  # attn_norm, attn_q/k/v/output, ffn_norm, ffn_gate/up/down


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
    # Divisors of RoPE's K/2 inverse frequencies (Llama 3 scaling, linear scaling), or None.
    rope_freq_factors: tuple[float, ...] | None = None

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
                f"{f.path.name}: architecture {arch!r} is not supported; realm-nb runs: "
                f"{', '.join(sorted(ARCHITECTURES))}",
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
        return cls(
            arch=spec.family,
            n_layers=n_layers,
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            d_ff=f.get_int(key("feed_forward_length"), lo=1, hi=MAX_FFN),
            vocab_size=vocab,
            context_length=f.get_int(key("context_length"), 2048, lo=1, hi=MAX_CONTEXT),
            rope_base=rope_base,
            rms_eps=f.get_float(key("attention.layer_norm_rms_epsilon"), 1e-5, lo=1e-12,
                                hi=1e-1),
            tied_embeddings="output.weight" not in f.tensors,
            rope_style=spec.rope_style,
            qkv_bias=spec.qkv_bias,
            qk_norm=spec.qk_norm,
            rope_freq_factors=rope_freq_factors(f, arch, head_dim, rope_base),
        )


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
        info = f.expect_shape(ROPE_FREQS_TENSOR, (half,))
        factors = np.asarray(gguf.quants.dequantize(np.asarray(f.raw(ROPE_FREQS_TENSOR)),
                                                    info.qtype), np.float64).reshape(half)
        if not (np.all(np.isfinite(factors)) and np.all(factors > 0)):
            raise GGUFFormatError(
                f"{f.path.name}: tensor {ROPE_FREQS_TENSOR!r} holds values that are not "
                "finite and positive; the file is damaged", param=ROPE_FREQS_TENSOR)
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
