"""Tokenizers and chat templates built from GGUF metadata.

The vocabulary in a GGUF file becomes a `tokenizers.Tokenizer` (the Rust library does BPE far
better than we would): `gpt2`-type byte-level BPE with the pre-tokenizer the file names, and
SentencePiece-type `llama` vocabularies as BPE with byte fallback (merges recovered from the piece
scores, as HF's converters do). Building it from the file takes seconds, so the result is cached
as tokenizer.json next to the model cache. Chat templates are untrusted input: they render in
jinja2's `SandboxedEnvironment`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ChatTemplateError, TokenizerError
from .gguf_io import GGUFFile

# llama.cpp token types
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre_tokenizer(pre: str) -> Any:
    from tokenizers import Regex, pre_tokenizers

    byte_level_regex = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    byte_level_plain = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    table: dict[str, Any] = {
        "default": byte_level_regex,
        "gpt2": byte_level_regex,
        "smollm": pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"), byte_level_regex]),
        "llama-bpe": pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"), byte_level_plain]),
        "llama3": None,
        "qwen2": pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"), byte_level_plain]),
    }
    table["llama3"] = table["llama-bpe"]
    if pre not in table:
        raise TokenizerError(
            f"pre-tokenizer {pre!r} is not supported; supported: {', '.join(sorted(table))}",
            param="tokenizer.ggml.pre")
    return table[pre]


def _build_bpe(f: GGUFFile, tokens: list[str]) -> Any:
    from tokenizers import Tokenizer, decoders, models

    merges_raw = f.get("tokenizer.ggml.merges", [])
    merges = [tuple(m.split(" ", 1)) for m in merges_raw]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    tok.pre_tokenizer = _pre_tokenizer(str(f.get("tokenizer.ggml.pre", "default")))
    tok.decoder = decoders.ByteLevel()
    return tok


def _build_spm(f: GGUFFile, tokens: list[str]) -> Any:
    """SentencePiece BPE: merges recovered from piece scores, byte fallback for unknown bytes."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = [float(s) for s in f.get("tokenizer.ggml.scores")]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges: list[tuple[str, str, float]] = []
    for piece, score in zip(tokens, scores, strict=False):
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: m[2], reverse=True)
    unk = int(f.get("tokenizer.ggml.unknown_token_id", 0))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for a, b, _ in merges],
                               unk_token=tokens[unk], fuse_unk=True, byte_fallback=True))
    steps: list[Any] = [normalizers.Replace(" ", "▁")]
    add_space_prefix = bool(f.get("tokenizer.ggml.add_space_prefix", True))
    if add_space_prefix:
        steps.insert(0, normalizers.Prepend("▁"))
    tok.normalizer = normalizers.Sequence(steps)
    decode_steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:  # drop the space the normalizer prepended, as llama.cpp and HF do
        decode_steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(decode_steps)
    return tok


def build_tokenizer(f: GGUFFile) -> Any:
    """A `tokenizers.Tokenizer` equal to llama.cpp's for this file's vocabulary."""
    from tokenizers import AddedToken

    kind = str(f.get("tokenizer.ggml.model"))
    tokens = [str(t) for t in f.get("tokenizer.ggml.tokens")]
    if kind == "gpt2":
        tok = _build_bpe(f, tokens)
    elif kind == "llama":
        tok = _build_spm(f, tokens)
    else:
        raise TokenizerError(
            f"{f.path.name}: tokenizer model {kind!r} is not supported; supported: gpt2, llama",
            param="tokenizer.ggml.model")
    types = f.get("tokenizer.ggml.token_type", [])
    specials = [AddedToken(tokens[i], special=True, normalized=False)
                for i, t in enumerate(types) if int(t) == _TOKEN_CONTROL]
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(types) if int(t) == _TOKEN_USER_DEFINED]
    tok.add_special_tokens(specials)
    if user:
        tok.add_tokens(user)
    return tok


@dataclass
class TextCodec:
    """Tokenizer plus the file's special ids and chat template: what a model needs for text."""

    tokenizer: Any
    bos_id: int | None
    eos_ids: tuple[int, ...]
    add_bos: bool
    chat_template: str | None
    bos_token: str
    eos_token: str

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=skip_special))

    def token_text(self, token_id: int) -> str:
        return self.decode([token_id], skip_special=False)

    def render_chat(self, messages: list[dict[str, Any]],
                    add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ChatTemplateError(
                "this model has no chat template (tokenizer.chat_template is missing): it is a "
                "base model; use generate() with a plain prompt instead of chat()")
        return render_template(self.chat_template, messages, add_generation_prompt,
                               bos_token=self.bos_token, eos_token=self.eos_token)


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    from .errors import InvalidRequestError

    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError(
            f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r}",
            param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(
                m.get("content"), str):
            raise InvalidRequestError(
                f"messages[{i}] = {m!r} must be a dict with string 'role' and 'content'",
                param="messages")
    return messages


def render_template(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool,
                    **extra: Any) -> str:
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ChatTemplateError(f"the model's chat template refused the messages: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(
            messages=validate_messages(messages), add_generation_prompt=add_generation_prompt,
            **extra)
    except TemplateError as e:
        raise ChatTemplateError(f"the model's chat template failed to render: {e}") from None


def _cache_key(f: GGUFFile) -> str:
    st = f.path.stat()
    return hashlib.sha256(f"{f.path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()


def load_codec(f: GGUFFile, cache_root: Path | None = None) -> TextCodec:
    """Build (or load from cache) the text codec of a GGUF file."""
    from tokenizers import Tokenizer

    tok = None
    cache_file = None
    if cache_root is not None:
        cache_file = cache_root / "tokenizers" / f"{_cache_key(f)}.json"
        if cache_file.is_file():
            try:
                tok = Tokenizer.from_file(str(cache_file))
            except Exception:  # a damaged cache entry is rebuilt, never fatal
                tok = None
    if tok is None:
        tok = build_tokenizer(f)
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(".tmp")
            tok.save(str(tmp))
            tmp.replace(cache_file)
    tokens = f.get("tokenizer.ggml.tokens")
    bos = f.get("tokenizer.ggml.bos_token_id", None)
    eos = f.get("tokenizer.ggml.eos_token_id", None)
    eos_ids = {int(eos)} if eos is not None else set()
    eot = f.get("tokenizer.ggml.eot_token_id", None)
    if eot is not None:
        eos_ids.add(int(eot))
    template = f.get("tokenizer.chat_template", None)
    return TextCodec(
        tokenizer=tok,
        bos_id=None if bos is None else int(bos),
        eos_ids=tuple(sorted(eos_ids)),
        add_bos=bool(f.get("tokenizer.ggml.add_bos_token", kind_default_add_bos(f))),
        chat_template=None if template is None else str(template),
        bos_token=str(tokens[int(bos)]) if bos is not None else "",
        eos_token=str(tokens[int(eos)]) if eos is not None else "",
    )


def kind_default_add_bos(f: GGUFFile) -> bool:
    # llama.cpp adds BOS by default for SentencePiece vocabularies, not for gpt2 BPE ones.
    return str(f.get("tokenizer.ggml.model")) == "llama"


