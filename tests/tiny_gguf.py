"""Tiny GGUF models written with `gguf.GGUFWriter`, for tests that need a whole model file.

`write_tiny_llama` writes a 2-layer llama with random weights in several GGUF block formats and
a gpt2-style byte-level BPE vocabulary (256 byte tokens, a few merges, control tokens). It returns
the float weights as `gguf.quants.dequantize` expands them: the reference a numpy forward uses.
`write_tiny_spm` writes the same model with a SentencePiece (`llama`) vocabulary instead.
`write_tiny_arch` writes it as another architecture of the llama family (qwen2, qwen3, Llama 3,
gemma3), with that architecture's extra tensors (`ARCH_TENSORS`) and metadata keys.

Shapes are numpy order (rows first), as `gguf_io.TensorInfo.shape`; GGUF stores them reversed.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import gguf.quants
import numpy as np
from gguf import GGMLQuantizationType as QT

# --- hyper-parameters ------------------------------------------------------------------------

N_LAYERS = 2  # L
D_MODEL = 64  # D
N_HEADS = 4  # H
N_KV_HEADS = 2  # G
HEAD_DIM = 16  # K
D_FF = 96  # F
CONTEXT = 1024
ROPE_BASE = 10000.0
RMS_EPS = 1e-5

# Per-layer tensor → its GGUF type in layer 0 and layer 1. ffn_up differs between layers, which
# makes the `exact` layout expand it to f32 so that the layers still stack.
LAYER_TYPES: dict[str, tuple[QT, QT]] = {
    "attn_q": (QT.Q8_0, QT.Q8_0),
    "attn_k": (QT.Q4_0, QT.Q4_0),
    "attn_v": (QT.Q4_1, QT.Q4_1),
    "attn_output": (QT.Q5_0, QT.Q5_0),
    "ffn_gate": (QT.Q5_1, QT.Q5_1),
    "ffn_up": (QT.Q8_0, QT.Q4_1),
    "ffn_down": (QT.F16, QT.F16),
}

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# llama.cpp's token types, from gguf-py (typed int: the vocabularies below are list[int]).
TOKEN_NORMAL: int = gguf.TokenType.NORMAL
TOKEN_UNKNOWN: int = gguf.TokenType.UNKNOWN
TOKEN_CONTROL: int = gguf.TokenType.CONTROL
TOKEN_BYTE: int = gguf.TokenType.BYTE


def layer_shapes(head_dim: int = HEAD_DIM) -> dict[str, tuple[int, int] | tuple[int]]:
    q, kv = N_HEADS * head_dim, N_KV_HEADS * head_dim
    return {"attn_norm": (D_MODEL,), "attn_q": (q, D_MODEL), "attn_k": (kv, D_MODEL),
            "attn_v": (kv, D_MODEL), "attn_output": (D_MODEL, q), "ffn_norm": (D_MODEL,),
            "ffn_gate": (D_FF, D_MODEL), "ffn_up": (D_FF, D_MODEL), "ffn_down": (D_MODEL, D_FF)}


# --- vocabularies ----------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map (the ByteLevel alphabet)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


# Each merge joins two tokens that exist already (a byte character or an earlier merge).
GPT2_MERGES = (
    "h e", "l l", "Ġ t", "Ġt he", "i n", "e r", "o n", "Ġ a", "r e", "a t", "e n", "o r",
    "Ġ w", "Ġ s", "Ġ o", "he ll", "hell o", "Ġ hello", "l d", "Ġw or", "Ġwor ld",
    "Ġ c", "a n", "Ġ f", "Ġf o", "Ġfo x", "Ġ d", "Ġd o", "Ġdo g", "i s", "Ġ is", "Ġa n",
    "Ġan d", "Ġ 1",
)
CONTROL_TOKENS = ("<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>")


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    scores: list[float] | None
    bos_id: int
    eos_id: int
    model: str  # tokenizer.ggml.model


def gpt2_vocab() -> Vocab:
    """256 byte tokens in GPT-2 order, one token per merge, then the control tokens."""
    tokens = list(bytes_to_unicode().values())
    merges: list[str] = []
    for m in GPT2_MERGES:
        a, b = m.split(" ")
        assert a in tokens and b in tokens, m
        if a + b not in tokens:
            tokens.append(a + b)
            merges.append(m)
    types = [TOKEN_NORMAL] * len(tokens) + [TOKEN_CONTROL] * len(CONTROL_TOKENS)
    tokens += CONTROL_TOKENS
    return Vocab(tokens, types, merges, None, tokens.index("<|bos|>"), tokens.index("<|eos|>"),
                 "gpt2")


SPM_PIECES = ("▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "he", "ll", "lo", "▁he", "hel",
              "▁hel", "llo", "▁hello", "or", "▁w", "▁wor", "ld", "▁world", "a", "t", "▁t", "at")


def spm_vocab() -> Vocab:
    """SentencePiece vocabulary: <unk> <s> </s>, 256 <0xNN> byte tokens, scored pieces."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_CONTROL] + [TOKEN_BYTE] * 256
    scores = [0.0, 0.0, 0.0] + [0.0] * 256
    for i, piece in enumerate(SPM_PIECES):
        tokens.append(piece)
        types.append(TOKEN_NORMAL)
        scores.append(-float(i))  # earlier pieces merge first
    return Vocab(tokens, types, [], scores, 1, 2, "llama")


# --- the model file --------------------------------------------------------------------------


@dataclass
class TinyModel:
    path: Path
    vocab: Vocab
    weights: dict[str, np.ndarray] = field(default_factory=dict)  # float32, as dequantized
    types: dict[str, QT] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab.tokens)

    @property
    def tied(self) -> bool:
        return "output.weight" not in self.weights


def _tensor_plan(vocab_size: int, tied: bool, rng: np.random.Generator,
                 head_dim: int = HEAD_DIM, n_layers: int = N_LAYERS
                 ) -> dict[str, tuple[np.ndarray, QT]]:
    plan: dict[str, tuple[np.ndarray, QT]] = {}
    shapes = layer_shapes(head_dim)
    for layer in range(n_layers):
        for short, shape in shapes.items():
            name = f"blk.{layer}.{short}.weight"
            if short.endswith("_norm"):
                plan[name] = ((1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32),
                              QT.F32)
            else:
                std = 1.5 / np.sqrt(shape[-1])  # fan-in
                plan[name] = ((std * rng.standard_normal(shape)).astype(np.float32),
                              LAYER_TYPES[short][layer % 2])
    plan["token_embd.weight"] = (rng.standard_normal((vocab_size, D_MODEL)).astype(np.float32),
                                 QT.Q8_0)
    plan["output_norm.weight"] = ((1.0 + 0.1 * rng.standard_normal(D_MODEL)).astype(np.float32),
                                  QT.F32)
    if not tied:
        plan["output.weight"] = (rng.standard_normal((vocab_size, D_MODEL)).astype(np.float32),
                                 QT.Q4_0)
    return plan


def write_tiny_llama(path: str | Path, *, seed: int = 0, tied: bool = True, arch: str = "llama",
                     vocab: Vocab | None = None, omit: Iterable[str] = (),
                     replace: Mapping[str, tuple[np.ndarray, QT]] | None = None,
                     metadata: Mapping[str, Any] | None = None,
                     chat_template: str | None = CHATML_TEMPLATE,
                     add_bos: bool | None = False, head_dim: int = HEAD_DIM,
                     rope_base: float = ROPE_BASE, pre: str = "default",
                     n_layers: int = N_LAYERS) -> TinyModel:
    """Write a tiny llama GGUF file; return its path, vocabulary and dequantized float weights.

    Args:
      omit: tensor names not to write (a damaged file for error tests).
      replace: name → (array, type) written instead of the planned tensor, or added where none
        is planned; a uint8 array is written as raw block bytes [rows, row_bytes] of that type
        (no quantization).
      metadata: extra or overriding {arch}.* keys, as {key without the arch prefix: value}; an
        int is written as uint32, a float as float32, a str as a string, a bool as a bool, a
        list as an array.
      add_bos: tokenizer.ggml.add_bos_token, or None to leave the key out (the kind's default).
      head_dim: K; where it is not D / H the file says so in {arch}.attention.key_length.
      pre: tokenizer.ggml.pre of a gpt2 vocabulary.
      n_layers: L (layer l's tensors take LAYER_TYPES' types of layer l % 2).
    """
    path = Path(path)
    vocab = vocab or gpt2_vocab()
    rng = np.random.default_rng(seed)
    plan = _tensor_plan(len(vocab.tokens), tied, rng, head_dim, n_layers)
    plan.update(replace or {})
    for name in omit:
        plan.pop(name)
    fused = _fuse(plan, n_layers) if arch in FUSED_ARCHS else {}

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-llama")
    w.add_block_count(n_layers)
    w.add_context_length(CONTEXT)
    w.add_embedding_length(D_MODEL)
    w.add_feed_forward_length(D_FF)
    w.add_head_count(N_HEADS)
    w.add_head_count_kv(N_KV_HEADS)
    if head_dim != D_MODEL // N_HEADS:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_freq_base(rope_base)
    w.add_layer_norm_rms_eps(RMS_EPS)
    for key, value in (metadata or {}).items():
        if isinstance(value, str):
            w.add_string(f"{arch}.{key}", value)
        elif isinstance(value, bool):
            w.add_bool(f"{arch}.{key}", value)
        elif isinstance(value, list):
            w.add_array(f"{arch}.{key}", value)
        elif isinstance(value, float):
            w.add_float32(f"{arch}.{key}", value)
        else:
            w.add_uint32(f"{arch}.{key}", int(value))
    w.add_tokenizer_model(vocab.model)
    if vocab.model == "gpt2":
        w.add_tokenizer_pre(pre)
        w.add_token_merges(vocab.merges)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
        w.add_unk_token_id(0)
        w.add_add_space_prefix(True)
    w.add_bos_token_id(vocab.bos_id)
    w.add_eos_token_id(vocab.eos_id)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    model = TinyModel(path, vocab)
    for name, (data, qtype) in plan.items():
        model.types[name] = qtype
        if data.dtype == np.uint8:  # raw block bytes, written as they are
            w.add_tensor(name, data, raw_dtype=qtype)
            continue
        if qtype == QT.F32:
            stored = data.astype(np.float32)
            w.add_tensor(name, stored)
        elif qtype == QT.F16:
            stored = data.astype(np.float16)
            w.add_tensor(name, stored)
        else:
            stored = gguf.quants.quantize(data, qtype)
            w.add_tensor(name, stored, raw_dtype=qtype)
        model.weights[name] = np.asarray(
            gguf.quants.dequantize(stored, qtype), np.float32).reshape(data.shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for name, parts in fused.items():  # the reference reads the parts, as stored
        whole = model.weights[name]
        start = 0
        for part, rows in parts:
            model.weights[part] = whole[start:start + rows]
            start += rows
    return model


# Architectures whose files hold q/k/v as one attn_qkv and gate/up as one ffn_up (Phi-3).
FUSED_ARCHS = ("phi3",)


def _fuse(plan: dict[str, tuple[np.ndarray, QT]], n_layers: int
          ) -> dict[str, list[tuple[str, int]]]:
    """Replace each layer's q/k/v by attn_qkv (rows q, k, v) and gate/up by ffn_up (rows gate,
    up), as llama.cpp's Phi-3 converter writes them, each in the type of its first part.
    Returns fused name → [(part name, rows)]."""
    fused: dict[str, list[tuple[str, int]]] = {}
    for layer in range(n_layers):
        p = f"blk.{layer}."
        for whole, parts in ((p + "attn_qkv.weight", ("attn_q", "attn_k", "attn_v")),
                             (p + "ffn_up.weight", ("ffn_gate", "ffn_up"))):
            arrays = [plan.pop(f"{p}{part}.weight") for part in parts]
            if whole in plan and whole != p + "ffn_up.weight":  # given as it is (a bad file)
                continue
            plan[whole] = (np.concatenate([a for a, _ in arrays]), arrays[0][1])
            fused[whole] = [(f"{p}{part}.weight", a.shape[0]) for part, (a, _) in
                            zip(parts, arrays, strict=True)]
    return fused


def write_tiny_spm(path: str | Path, *, seed: int = 0) -> TinyModel:
    """The tiny llama with a SentencePiece (`llama`) vocabulary with byte fallback."""
    return write_tiny_llama(path, seed=seed, vocab=spm_vocab(), chat_template=None, add_bos=None)


# --- other architectures of the llama family ---------------------------------------------------

# The tensors each architecture adds to every layer, as llama.cpp's converter names them
# (gguf.constants.MODEL_TENSORS): qwen2's q/k/v biases, qwen3's per-head q/k RMSNorm weights,
# gemma3's q/k norms and the norms of the attention and FFN outputs.
ARCH_TENSORS: dict[str, tuple[str, ...]] = {
    "qwen2": ("attn_q.bias", "attn_k.bias", "attn_v.bias"),
    "qwen3": ("attn_q_norm.weight", "attn_k_norm.weight"),
    "gemma3": ("attn_q_norm.weight", "attn_k_norm.weight", "post_attention_norm.weight",
               "post_ffw_norm.weight"),
}
QWEN_ROPE_BASE = 1000000.0  # what Qwen 2.5 / 3 files say in {arch}.rope.freq_base


def arch_tensors(arch: str, head_dim: int, rng: np.random.Generator, n_layers: int = N_LAYERS,
                 ) -> dict[str, tuple[np.ndarray, QT]]:
    """Random f32 extra tensors of `arch` for every layer (biases ~0.5, norm weights ~1: a
    gemma3 file's norm weights are 1 + w, as llama.cpp's converter stores Gemma's w)."""
    width = {"attn_q": N_HEADS * head_dim, "attn_k": N_KV_HEADS * head_dim,
             "attn_v": N_KV_HEADS * head_dim, "attn_q_norm": head_dim, "attn_k_norm": head_dim,
             "post_attention_norm": D_MODEL, "post_ffw_norm": D_MODEL}
    out: dict[str, tuple[np.ndarray, QT]] = {}
    for layer in range(n_layers):
        for short in ARCH_TENSORS.get(arch, ()):
            base, kind = short.rsplit(".", 1)
            noise = rng.standard_normal(width[base])
            data = 0.5 * noise if kind == "bias" else 1.0 + 0.2 * noise
            out[f"blk.{layer}.{short}"] = (data.astype(np.float32), QT.F32)
    return out


def write_tiny_arch(path: str | Path, arch: str, *, seed: int = 0, tied: bool = True,
                    head_dim: int = HEAD_DIM, rope_base: float = ROPE_BASE,
                    pre: str = "default",
                    extra: Mapping[str, tuple[np.ndarray, QT]] | None = None,
                    metadata: Mapping[str, Any] | None = None, vocab: Vocab | None = None,
                    add_bos: bool | None = False, n_layers: int = N_LAYERS) -> TinyModel:
    """The tiny llama written as `arch` (general.architecture and {arch}.* keys), with that
    architecture's extra tensors (ARCH_TENSORS) and any `extra` ones (e.g. rope_freqs.weight)."""
    tensors = arch_tensors(arch, head_dim, np.random.default_rng(seed + 1000), n_layers)
    tensors.update(extra or {})
    chat = CHATML_TEMPLATE if vocab is None or vocab.model == "gpt2" else None
    return write_tiny_llama(path, seed=seed, tied=tied, arch=arch, replace=tensors,
                            metadata=metadata, head_dim=head_dim, rope_base=rope_base, pre=pre,
                            vocab=vocab, chat_template=chat, add_bos=add_bos,
                            n_layers=n_layers)


# --- small and damaged files (loader and fuzz tests) -------------------------------------------


def mini_vocab(model: str = "gpt2") -> Vocab:
    """A vocabulary of a dozen tokens: the smallest that still exercises every tokenizer path
    (merges or scores, control tokens), so that a file parses in a few milliseconds."""
    if model == "llama":
        tokens = ["<unk>", "<s>", "</s>", "▁", "a", "b", "ab", "▁a", "▁ab", "<0x0A>"]
        types = [TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_CONTROL] + [TOKEN_NORMAL] * 6 + [TOKEN_BYTE]
        scores = [0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0, 0.0]
        return Vocab(tokens, types, [], scores, 1, 2, "llama")
    tokens = ["a", "b", "c", "Ġ", "ab", "Ġa", "Ġab", *CONTROL_TOKENS]
    types = [TOKEN_NORMAL] * 7 + [TOKEN_CONTROL] * len(CONTROL_TOKENS)
    return Vocab(tokens, types, ["a b", "Ġ a", "Ġa b"], None, 7, 8, "gpt2")


def patch_scalar(data: bytes, key: str, value: int,
                 vtype: gguf.GGUFValueType = gguf.GGUFValueType.UINT32) -> bytes:
    """`data` (a GGUF file written by GGUFWriter) with the 4-byte scalar `key` rewritten as
    `value` of type `vtype` (UINT32 or INT32), in place: nothing else moves."""
    needle = len(key).to_bytes(8, "little") + key.encode()
    at = data.index(needle) + len(needle)
    old_type = int.from_bytes(data[at : at + 4], "little")
    assert old_type in (gguf.GGUFValueType.UINT32, gguf.GGUFValueType.INT32), old_type
    fmt = "<i" if vtype == gguf.GGUFValueType.INT32 else "<I"
    return data[:at] + struct.pack("<I", vtype) + struct.pack(fmt, value) + data[at + 8 :]
