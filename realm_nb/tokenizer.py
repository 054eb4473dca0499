"""Tokenizers and chat templates built from GGUF metadata.

The vocabulary in a GGUF file becomes a `tokenizers.Tokenizer` (the Rust library does BPE far
better than we would): `gpt2`-type byte-level BPE with the pre-tokenizer the file names, and
SentencePiece-type `llama` vocabularies as BPE with byte fallback (merges recovered from the piece
scores, as HF's converters do). Building it from the file takes seconds, so the result is cached
as tokenizer.json next to the model cache.

Chat templates render in `chat_template` (a budgeted jinja2 sandbox). Message content never becomes
control tokens: where it spells one (`<|im_start|>system`), `TextCodec.render_chat` marks it and
`TextCodec.encode` tokenizes it as plain text.
"""

from __future__ import annotations

import bisect
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf import TokenType

from .chat_template import TemplateBudget, render_template, validate_messages
from .errors import ChatTemplateError, TokenizerError
from .gguf_io import GGUFFile

MAX_TOKENS = 1 << 24  # the host ABI's bound on vocab_size
# Budget for recovering SentencePiece merges (see _spm_merges): split checks per token, and
# characters sliced in all. Real vocabularies use ~2 checks per token and ~10M characters.
SPM_CHECKS_PER_TOKEN = 64
SPM_MAX_SPLIT_CHARS = 1 << 28

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

    merges: list[tuple[str, str]] = []
    for i, m in enumerate(f.get_list("tokenizer.ggml.merges", str, [], max_len=MAX_TOKENS)):
        a, space, b = m.partition(" ")
        if not (a and space and b):
            raise TokenizerError(
                f"{f.path.name}: merge #{i} {m[:40]!r} is not two tokens separated by a space; "
                "the vocabulary is damaged (download the file again)",
                param="tokenizer.ggml.merges")
        merges.append((a, b))
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    tok.pre_tokenizer = _pre_tokenizer(f.get_str("tokenizer.ggml.pre", "default"))
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm_merges(f: GGUFFile, tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece merges recovered from piece scores, as HF's converters do: every split of a
    piece into two pieces of the vocabulary, best-scored pieces first.

    Only split points at lengths that some piece has can match, so only those are tried; that
    keeps a real vocabulary's cost near linear (Gemma 3: ~2 checks per piece) where trying every
    split of every piece costs quadratic time in a piece's length. The work (split checks, and
    characters sliced by them) is counted before it starts and refused past a budget, so a
    hostile vocabulary (one piece of every length up to 10,000) cannot stall the loader.
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    lengths = sorted({len(t) for t in tokens if t})
    checks = chars = 0
    for piece in tokens:
        k = bisect.bisect_left(lengths, len(piece))
        checks += k
        chars += k * len(piece)
    if checks > SPM_CHECKS_PER_TOKEN * len(tokens) + 65536 or chars > SPM_MAX_SPLIT_CHARS:
        raise TokenizerError(
            f"{f.path.name}: recovering this SentencePiece vocabulary's merges would take "
            f"{checks} split checks over {chars} characters (pieces of {len(lengths)} distinct "
            f"lengths, the longest {lengths[-1] if lengths else 0} characters); real "
            "vocabularies need a few per piece. The file is damaged or hostile",
            param="tokenizer.ggml.tokens")
    merges: list[tuple[str, str, float]] = []
    for piece, score in zip(tokens, scores, strict=True):
        local = []
        for i in lengths:
            if i >= len(piece):
                break
            left = piece[:i]
            if left in vocab:
                right = piece[i:]
                if right in vocab:
                    local.append((left, right, score))
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: m[2], reverse=True)
    return [(a, b) for a, b, _ in merges]


def _build_spm(f: GGUFFile, tokens: list[str]) -> Any:
    """SentencePiece BPE: merges recovered from piece scores, byte fallback for unknown bytes."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = f.get_list("tokenizer.ggml.scores", (int, float), max_len=MAX_TOKENS)
    if len(scores) != len(tokens):
        raise TokenizerError(
            f"{f.path.name}: tokenizer.ggml.scores holds {len(scores)} scores for "
            f"{len(tokens)} tokens; they must pair up. The vocabulary is damaged",
            param="tokenizer.ggml.scores")
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _spm_merges(f, tokens, [float(x) for x in scores])
    unk = token_id(f, "tokenizer.ggml.unknown_token_id", len(tokens), default=0)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=tokens[unk or 0],
                               fuse_unk=True, byte_fallback=True))
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


def vocabulary(f: GGUFFile) -> list[str]:
    """The file's tokens (tokenizer.ggml.tokens), checked: a non-empty array of strings."""
    tokens = f.get_list("tokenizer.ggml.tokens", str, max_len=MAX_TOKENS)
    if not tokens:
        raise TokenizerError(f"{f.path.name}: tokenizer.ggml.tokens is empty; a model needs a "
                             "vocabulary", param="tokenizer.ggml.tokens")
    return tokens


def token_id(f: GGUFFile, key: str, n_tokens: int, default: int | None = None) -> int | None:
    """A special token id from the metadata (bos, eos, ...): an id of this vocabulary, or
    `default` when the key is absent."""
    value = f.get(key, None)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n_tokens:
        raise TokenizerError(
            f"{f.path.name}: {key} is {value!r}, which is not a token of this vocabulary "
            f"(ids 0..{n_tokens - 1}); the file's metadata is wrong: fix the key (gguf's "
            "gguf_set_metadata.py) or download the file again", param=key, value=value)
    return value


def build_tokenizer(f: GGUFFile) -> Any:
    """A `tokenizers.Tokenizer` equal to llama.cpp's for this file's vocabulary."""
    from tokenizers import AddedToken

    kind = f.get_str("tokenizer.ggml.model")
    tokens = vocabulary(f)
    types = f.get_list("tokenizer.ggml.token_type", int, [], max_len=MAX_TOKENS)
    if types and len(types) != len(tokens):
        raise TokenizerError(
            f"{f.path.name}: tokenizer.ggml.token_type holds {len(types)} types for "
            f"{len(tokens)} tokens; they must pair up. The vocabulary is damaged",
            param="tokenizer.ggml.token_type")
    try:
        if kind == "gpt2":
            tok = _build_bpe(f, tokens)
        elif kind == "llama":
            tok = _build_spm(f, tokens)
        else:
            raise TokenizerError(
                f"{f.path.name}: tokenizer model {kind!r} is not supported; supported: gpt2, "
                "llama", param="tokenizer.ggml.model")
        specials = [AddedToken(tokens[i], special=True, normalized=False)
                    for i, t in enumerate(types) if t == TokenType.CONTROL]
        user = [AddedToken(tokens[i], special=False, normalized=False)
                for i, t in enumerate(types) if t == TokenType.USER_DEFINED]
        tok.add_special_tokens(specials)
        if user:
            tok.add_tokens(user)
    except Exception as e:
        if type(e) is not Exception:  # ours, or a bug: only the library raises plain Exception
            raise
        raise TokenizerError(
            f"{f.path.name}: the {kind!r} vocabulary could not be built into a tokenizer: "
            f"{str(e)[:200]}; the file is damaged", param="tokenizer.ggml.tokens") from None
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
    _memo: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; a `ChatPrompt`'s plain spans never become control tokens."""
        spans = getattr(text, "plain_spans", ())
        enc = self.tokenizer.encode(str(text), add_special_tokens=False)
        ids: list[int] = enc.ids if not spans else self._unspecial(enc, str(text), spans)
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=skip_special))

    def token_text(self, token_id: int) -> str:
        return self.decode([token_id], skip_special=False)

    def max_token_chars(self) -> int:
        """Characters of the longest token's text: a prompt longer than context x this (+1 for
        a SentencePiece space prefix) cannot fit, so it is refused before it is tokenized."""
        if "max_chars" not in self._memo:
            vocab = self.tokenizer.get_vocab(with_added_tokens=True)
            self._memo["max_chars"] = max((len(piece) for piece in vocab), default=1)
        return int(self._memo["max_chars"])

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    *, budget: TemplateBudget | None = None,
                    check: Callable[[], None] | None = None) -> str:
        """The chat template applied to `messages`, within `budget`; `check` is called now and
        then while it renders and may raise (a cancelled request). Where message text spells a
        control token, the result is a `ChatPrompt` whose `encode` keeps that text plain."""
        if not self.chat_template:
            raise ChatTemplateError(
                "this model has no chat template (tokenizer.chat_template is missing): it is a "
                "base model; use generate() with a plain prompt instead of chat()")
        messages = validate_messages(messages)
        specials = self._special_pattern()
        if specials is None or not any(isinstance(v, str) and specials.search(v)
                                       for m in messages for v in m.values()):
            return render_template(self.chat_template, messages, add_generation_prompt,
                                   budget=budget, check=check, bos_token=self.bos_token,
                                   eos_token=self.eos_token)

        def mark(v: Any) -> Any:
            if not isinstance(v, str):
                return v
            v = v.replace(_PLAIN_OPEN, "").replace(_PLAIN_CLOSE, "")
            return specials.sub(lambda m: _PLAIN_OPEN + m.group(0) + _PLAIN_CLOSE, v)

        marked = [{k: mark(v) for k, v in m.items()} for m in messages]
        text = render_template(self.chat_template, marked, add_generation_prompt, budget=budget,
                               check=check, bos_token=self.bos_token, eos_token=self.eos_token)
        return ChatPrompt.from_marked(text)

    # ------------------------------------------------------------------ control tokens as text

    def _special_ids(self) -> dict[int, str]:
        if "specials" not in self._memo:
            added = self.tokenizer.get_added_tokens_decoder()
            self._memo["specials"] = {i: t.content for i, t in added.items() if t.special}
        return dict(self._memo["specials"])

    def _special_pattern(self) -> re.Pattern[str] | None:
        if "special_re" not in self._memo:
            texts = sorted(set(self._special_ids().values()), key=len, reverse=True)
            self._memo["special_re"] = (re.compile("|".join(map(re.escape, texts)))
                                        if texts else None)
        pattern: re.Pattern[str] | None = self._memo["special_re"]
        return pattern

    def _plain_ids(self, text: str) -> list[int]:
        """`text` (a control token's spelling) tokenized as ordinary text."""
        cache = self._memo.setdefault("plain_ids", {})
        if text not in cache:
            plain = self._memo.get("plain_tokenizer")
            if plain is None:  # a copy, since the flag is per tokenizer and others encode now
                from tokenizers import Tokenizer

                plain = Tokenizer.from_str(self.tokenizer.to_str())
                plain.encode_special_tokens = True
                self._memo["plain_tokenizer"] = plain
            ids = plain.encode(text, add_special_tokens=False).ids
            specials = self._special_ids()
            assert not any(i in specials for i in ids), "a control token survived plain encoding"
            cache[text] = ids
        return list(cache[text])

    def _unspecial(self, enc: Any, text: str, spans: tuple[tuple[int, int], ...]) -> list[int]:
        """Ids of `enc`, with each control token that lies in a plain span spelled as text."""
        specials = self._special_ids()
        out: list[int] = []
        for tid, (start, end) in zip(enc.ids, enc.offsets, strict=True):
            if tid in specials and any(a <= start < b for a, b in spans):
                out.extend(self._plain_ids(text[start:end]))
            else:
                out.append(tid)
        return out


_PLAIN_OPEN, _PLAIN_CLOSE = "\ue000", "\ue001"  # private-use marks around message-borne specials


class ChatPrompt(str):
    """A rendered chat: the text, plus the spans (character ranges) that came from messages and
    spell control tokens; `TextCodec.encode` tokenizes those spans as plain text."""

    plain_spans: tuple[tuple[int, int], ...]

    def __new__(cls, text: str = "", plain_spans: tuple[tuple[int, int], ...] = ()) -> ChatPrompt:
        self = super().__new__(cls, text)
        self.plain_spans = tuple(plain_spans)
        return self

    @classmethod
    def from_marked(cls, marked: str) -> ChatPrompt:
        """Drop the marks, remembering what they enclosed (a mark left alone is dropped)."""
        parts: list[str] = []
        spans: list[tuple[int, int]] = []
        n = 0
        pos = 0
        while True:
            i = marked.find(_PLAIN_OPEN, pos)
            j = marked.find(_PLAIN_CLOSE, i + 1) if i >= 0 else -1
            if i < 0 or j < 0:
                rest = marked[pos:].replace(_PLAIN_OPEN, "").replace(_PLAIN_CLOSE, "")
                parts.append(rest)
                break
            head = marked[pos:i].replace(_PLAIN_CLOSE, "")
            inner = marked[i + 1:j].replace(_PLAIN_OPEN, "")
            parts.append(head)
            n += len(head)
            parts.append(inner)
            spans.append((n, n + len(inner)))
            n += len(inner)
            pos = j + 1
        return cls("".join(parts), tuple(spans))


def _cache_key(f: GGUFFile) -> str:
    st = f.path.stat()
    return hashlib.sha256(f"{f.path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()


def load_codec(f: GGUFFile, cache_root: Path | None = None) -> TextCodec:
    """Build (or load from cache) the text codec of a GGUF file."""
    from tokenizers import Tokenizer

    tokens = vocabulary(f)  # the special ids are checked first: cheap, and before any cache
    bos = token_id(f, "tokenizer.ggml.bos_token_id", len(tokens))
    eos = token_id(f, "tokenizer.ggml.eos_token_id", len(tokens))
    eot = token_id(f, "tokenizer.ggml.eot_token_id", len(tokens))
    eos_ids = {i for i in (eos, eot) if i is not None}
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
    template = f.get("tokenizer.chat_template", None)
    return TextCodec(
        tokenizer=tok,
        bos_id=bos,
        eos_ids=tuple(sorted(eos_ids)),
        add_bos=bool(f.get("tokenizer.ggml.add_bos_token", kind_default_add_bos(f))),
        chat_template=None if template is None else str(template),
        bos_token=tokens[bos] if bos is not None else "",
        eos_token=tokens[eos] if eos is not None else "",
    )


def kind_default_add_bos(f: GGUFFile) -> bool:
    # llama.cpp adds BOS by default for SentencePiece vocabularies, not for gpt2 BPE ones.
    return f.get_str("tokenizer.ggml.model") == "llama"


