"""Model configuration: GGUF metadata → a static, hashable `ModelConfig`.

The config is a frozen dataclass so it can be a static argument of `jax.jit`. Architectures grow
by entries in `ARCHITECTURES` (a table, not a copy of the forward).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UnsupportedArchitectureError
from .gguf_io import GGUFFile

# GGUF `general.architecture` values that run on the llama-family forward in model.py.
ARCHITECTURES: dict[str, str] = {
    "llama": "llama",  # Llama 1-3, SmolLM/SmolLM2, TinyLlama, Mistral 7B (GGUF files say "llama")
    "mistral": "llama",
}


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
        arch = f.arch
        if arch not in ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"{f.path.name}: architecture {arch!r} is not supported; realm-nb runs: "
                f"{', '.join(sorted(ARCHITECTURES))}",
                param="general.architecture",
            )

        def key(name: str) -> str:
            return f"{arch}.{name}"

        d_model = int(f.get(key("embedding_length")))
        n_heads = int(f.get(key("attention.head_count")))
        n_kv = int(f.get(key("attention.head_count_kv"), n_heads))
        head_dim = int(f.get(key("attention.key_length"), d_model // n_heads))
        embed = f.tensor("token_embd.weight")
        vocab = int(f.get(key("vocab_size"), embed.shape[0]))
        cfg = cls(
            arch=ARCHITECTURES[arch],
            n_layers=int(f.get(key("block_count"))),
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            d_ff=int(f.get(key("feed_forward_length"))),
            vocab_size=vocab,
            context_length=int(f.get(key("context_length"), 2048)),
            rope_base=float(f.get(key("rope.freq_base"), 10000.0)),
            rms_eps=float(f.get(key("attention.layer_norm_rms_epsilon"), 1e-5)),
            tied_embeddings="output.weight" not in f.tensors,
        )
        if n_heads % n_kv:
            raise UnsupportedArchitectureError(
                f"{f.path.name}: {n_heads} query heads are not a multiple of {n_kv} kv heads")
        return cfg
