"""Model configuration: GGUF metadata → a static, hashable `ModelConfig`.

The config is a frozen dataclass so it can be a static argument of `jax.jit`. Architectures grow
by entries in `ARCHITECTURES` (a table, not a copy of the forward).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import GGUFFormatError, UnsupportedArchitectureError
from .gguf_io import GGUFFile

# GGUF `general.architecture` values that run on the llama-family forward in model.py.
ARCHITECTURES: dict[str, str] = {
    "llama": "llama",  # Llama 1-3, SmolLM/SmolLM2, TinyLlama, Mistral 7B (GGUF files say "llama")
    "mistral": "llama",
}

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
                param="general.architecture",
            )

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
            arch=ARCHITECTURES[arch],
            n_layers=n_layers,
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            d_ff=f.get_int(key("feed_forward_length"), lo=1, hi=MAX_FFN),
            vocab_size=vocab,
            context_length=f.get_int(key("context_length"), 2048, lo=1, hi=MAX_CONTEXT),
            rope_base=f.get_float(key("rope.freq_base"), 10000.0, lo=1.0, hi=1e12),
            rms_eps=f.get_float(key("attention.layer_norm_rms_epsilon"), 1e-5, lo=1e-12,
                                hi=1e-1),
            tied_embeddings="output.weight" not in f.tensors,
        )
