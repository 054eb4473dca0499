"""realm_nb.tokenizer: llama.cpp's token ids on the real SmolLM2 vocabulary, chat templates in a
sandbox, and round trips on tiny gpt2 (byte-level BPE) and SentencePiece vocabularies."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_gguf import TinyModel, write_tiny_llama, write_tiny_spm

from realm_nb import catalogue
from realm_nb.errors import ChatTemplateError, InvalidRequestError
from realm_nb.gguf_io import open_gguf
from realm_nb.tokenizer import TextCodec, load_codec, render_template

# What transformers renders with SmolLM2-135M-Instruct's template (HF model card): ChatML with a
# default system message when the conversation has none.
SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def smollm2(smollm2_path: Path) -> TextCodec:
    return load_codec(open_gguf(smollm2_path), catalogue.cache_dir())


# --- the real SmolLM2 vocabulary against llama.cpp ---------------------------------------------


@pytest.mark.slow
def test_prompts_encode_to_llamacpp_ids(smollm2: TextCodec, llamacpp_refs: dict) -> None:
    for case in llamacpp_refs["cases"]:
        assert smollm2.encode(case["prompt"]) == case["prompt_ids"], case["prompt"]


@pytest.mark.slow
def test_greedy_ids_decode_to_llamacpp_text(smollm2: TextCodec, llamacpp_refs: dict) -> None:
    for case in llamacpp_refs["cases"]:
        assert smollm2.decode(case["greedy_ids"]) == case["greedy_text"], case["prompt"]


@pytest.mark.slow
def test_control_tokens_encode_as_single_ids(smollm2: TextCodec) -> None:
    assert smollm2.encode("<|im_start|>") == [1]
    assert smollm2.encode("<|im_end|>") == [2]
    ids = smollm2.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2 and 1 not in ids[1:-1] and 2 not in ids[1:-1]
    assert smollm2.bos_id == 1 and smollm2.eos_ids == (2,)
    assert not smollm2.add_bos  # llama.cpp adds no BOS for this gpt2 vocabulary


@pytest.mark.slow
def test_chat_template_renders_chatml(smollm2: TextCodec) -> None:
    text = smollm2.render_chat([{"role": "user", "content": "Hi"}])
    assert text == (f"<|im_start|>system\n{SMOLLM2_DEFAULT_SYSTEM}<|im_end|>\n"
                    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    text = smollm2.render_chat([{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Hi"}], add_generation_prompt=False)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{% set x = messages.append({'role': 'x', 'content': 'y'}) %}{{ x }}",
])
def test_hostile_template_is_refused(template: str) -> None:
    with pytest.raises(ChatTemplateError, match=r"is unsafe"):
        render_template(template, [{"role": "user", "content": "Hi"}], True)


def test_template_raise_exception_becomes_chat_template_error() -> None:
    template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        render_template(template, [{"role": "user", "content": "Hi"}], True)


@pytest.mark.slow
@pytest.mark.parametrize("messages", [
    [],
    "Hi",
    None,
    [{"role": "user"}],
    [{"content": "Hi"}],
    [{"role": "user", "content": 3}],
    [("user", "Hi")],
])
def test_messages_with_bad_shapes_are_refused(smollm2: TextCodec, messages: object) -> None:
    with pytest.raises(InvalidRequestError, match="messages"):
        smollm2.render_chat(messages)  # type: ignore[arg-type]


# --- tiny vocabularies -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return write_tiny_llama(tmp_path_factory.mktemp("tok") / "tiny.gguf")


TEXTS = ["hello world", "the fox and the dog is here", "  spaces\tand\nnewlines\n\n",
         "digits 12345 and punctuation!?", "café 日本語 🙂", ""]


@pytest.mark.parametrize("text", TEXTS)
def test_tiny_gpt2_round_trip(tiny: TinyModel, text: str) -> None:
    codec = load_codec(open_gguf(tiny.path))
    ids = codec.encode(text)
    assert all(0 <= i < tiny.vocab_size for i in ids)
    assert codec.decode(ids) == text


def test_tiny_gpt2_uses_merges_and_control_tokens(tiny: TinyModel) -> None:
    codec = load_codec(open_gguf(tiny.path))
    tokens = tiny.vocab.tokens
    assert codec.encode(" hello world") == [tokens.index("Ġhello"), tokens.index("Ġworld")]
    assert codec.encode("hello") == [tokens.index("hello")]
    ids = codec.encode("<|im_start|>hello<|eos|>")
    assert ids == [tokens.index("<|im_start|>"), tokens.index("hello"), tiny.vocab.eos_id]
    assert codec.decode(ids) == "hello"  # control tokens are skipped when decoding
    assert codec.decode(ids, skip_special=False) == "<|im_start|>hello<|eos|>"
    assert codec.render_chat([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def spm(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return write_tiny_spm(tmp_path_factory.mktemp("tok") / "spm.gguf")


@pytest.mark.parametrize("text", ["hello world", "hello world é", "at the 日 world", "wow"])
def test_tiny_sentencepiece_round_trip_with_byte_fallback(spm: TinyModel, text: str) -> None:
    codec = load_codec(open_gguf(spm.path))
    ids = codec.encode(text)
    assert codec.decode(ids) == text


def test_tiny_sentencepiece_falls_back_to_byte_tokens(spm: TinyModel) -> None:
    codec = load_codec(open_gguf(spm.path))
    tokens = spm.vocab.tokens
    ids = codec.encode("hello world é", add_bos=False)
    assert [tokens[i] for i in ids] == ["▁hello", "▁world", "▁", "<0xC3>", "<0xA9>"]
    # the file has no add_bos_token key: SentencePiece vocabularies add BOS by default
    assert codec.encode("hello") == [1, tokens.index("▁hello")]
