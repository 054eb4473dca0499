"""The loader does not trust the file: absurd counts, nesting, ids and sizes in a GGUF file end in a
`RealmError` that names the key and the bad value, quickly and in bounded memory, never in a
hang, a memory blow-up, ZeroDivisionError, IndexError or RecursionError (issue 10, item 4)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import tiny_gguf as tg
from gguf import GGUFValueType

from realm_nb.config import ModelConfig
from realm_nb.errors import GGUFFormatError, RealmError, TokenizerError
from realm_nb.gguf_io import MAX_ARRAY_DEPTH, open_gguf
from realm_nb.tokenizer import build_tokenizer, load_codec
from realm_nb.weights import check_tensors

FAST_S = 1.0


@contextmanager
def fast(limit: float = FAST_S) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    elapsed = time.perf_counter() - t0
    assert elapsed < limit, f"took {elapsed:.2f} s"


def raw_gguf(kvs: bytes, n_kv: int) -> bytes:
    """A GGUF v3 file with no tensors and `n_kv` metadata entries already encoded in `kvs`."""
    return b"GGUF" + struct.pack("<IQQ", 3, 0, n_kv) + kvs


def gguf_string(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


def load_everything(path: Path) -> None:
    """What `LayerStore.register` does with a file before any weight is read."""
    f = open_gguf(path)
    check_tensors(f, ModelConfig.from_gguf(f))
    load_codec(f)


def isolated(path: Path) -> dict[str, object]:
    """open_gguf in a fresh interpreter (no JAX) under a 1 GiB address-space cap; returns the
    outcome, its wall time and how much the process's peak RSS grew while opening."""
    code = textwrap.dedent(f"""
        import json, resource, sys, time
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        from realm_nb.gguf_io import open_gguf
        from realm_nb.errors import RealmError
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        try:
            open_gguf({str(path)!r})
            out = {{"error": None}}
        except RealmError as e:
            out = {{"error": type(e).__name__, "message": e.message}}
        except BaseException as e:
            out = {{"error": "not a RealmError: " + type(e).__name__, "message": str(e)[:200]}}
        out["seconds"] = time.perf_counter() - t0
        out["rss_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        print(json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return dict(json.loads(proc.stdout.splitlines()[-1]))


# --- metadata arrays --------------------------------------------------------------------------


def test_an_array_longer_than_the_file_is_refused_at_once(tmp_path: Path) -> None:
    # GGUFReader alone loops for ever here, one empty view per missing item, until memory runs out
    path = tmp_path / "long_array.gguf"
    kv = gguf_string(b"x") + struct.pack("<IIQ", GGUFValueType.ARRAY, GGUFValueType.UINT8, 2**40)
    path.write_bytes(raw_gguf(kv + bytes(16), 1))
    out = isolated(path)
    assert out["error"] == "GGUFFormatError", out
    assert "array 'x' declares 1099511627776 items" in str(out["message"])
    assert float(str(out["seconds"])) < FAST_S
    assert float(str(out["rss_mb"])) < 50


def test_deeply_nested_arrays_are_refused(tmp_path: Path) -> None:
    # 20,000 levels of array-of-array: GGUFReader recursed until RecursionError
    body = gguf_string(b"nest") + struct.pack("<I", GGUFValueType.ARRAY)
    body += struct.pack("<IQ", GGUFValueType.ARRAY, 1) * 20_000
    body += struct.pack("<IQ", GGUFValueType.UINT8, 0)
    path = tmp_path / "nested.gguf"
    path.write_bytes(raw_gguf(body, 1))
    with fast(), pytest.raises(GGUFFormatError,
                               match=rf"'nest' nests arrays more than {MAX_ARRAY_DEPTH} deep"):
        open_gguf(path)


def test_many_small_nested_arrays_stop_at_the_item_budget(tmp_path: Path) -> None:
    # each item an empty array of 12 bytes: the file holds them, but not past the item bound
    import realm_nb.gguf_io as gguf_io

    n = 3000
    body = gguf_string(b"many") + struct.pack("<IIQ", GGUFValueType.ARRAY, GGUFValueType.ARRAY, n)
    body += struct.pack("<IQ", GGUFValueType.UINT8, 0) * n
    path = tmp_path / "many.gguf"
    path.write_bytes(raw_gguf(body, 1))
    assert open_gguf(path).metadata["many"] == []  # nested arrays that fit are read
    old = gguf_io.MAX_ARRAY_ITEMS
    gguf_io.MAX_ARRAY_ITEMS = 1000
    try:
        with fast(), pytest.raises(GGUFFormatError, match=r"3000 array items; at most 1000"):
            open_gguf(path)
    finally:
        gguf_io.MAX_ARRAY_ITEMS = old


def test_an_unknown_value_type_is_named(tmp_path: Path) -> None:
    path = tmp_path / "type.gguf"
    path.write_bytes(raw_gguf(gguf_string(b"k") + struct.pack("<I", 77) + bytes(8), 1))
    with fast(), pytest.raises(GGUFFormatError, match=r"'k' has value type 77"):
        open_gguf(path)


# --- the model's numbers ----------------------------------------------------------------------


def test_a_huge_block_count_is_refused_before_building_names(tmp_path: Path) -> None:
    path = tg.write_tiny_llama(tmp_path / "blocks.gguf", metadata={"block_count": 2**32 - 1}).path
    f = open_gguf(path)
    with fast(), pytest.raises(GGUFFormatError,
                               match=r"'llama\.block_count'.*4294967295") as info:
        ModelConfig.from_gguf(f)
    assert info.value.details["param"] == "llama.block_count"


@pytest.mark.parametrize(("key", "value", "says"), [
    ("attention.head_count", 0, r"'llama\.attention\.head_count' is 0; it must be an integer"),
    ("attention.head_count_kv", 0, r"'llama\.attention\.head_count_kv' is 0"),
    ("embedding_length", 0, r"'llama\.embedding_length' is 0"),
    ("context_length", 0, r"'llama\.context_length' is 0"),
    ("block_count", 0, r"'llama\.block_count' is 0"),
])
def test_a_zero_in_the_model_numbers_is_a_format_error(tmp_path: Path, key: str, value: int,
                                                      says: str) -> None:
    path = tg.write_tiny_llama(tmp_path / "zero.gguf", metadata={key: value}).path
    with fast(), pytest.raises(GGUFFormatError, match=says):
        load_everything(path)


def test_a_number_of_the_wrong_type_is_named(tmp_path: Path) -> None:
    data = tg.write_tiny_llama(tmp_path / "ok.gguf").path.read_bytes()
    path = tmp_path / "float.gguf"
    key = "llama.feed_forward_length"
    at = data.index(gguf_string(key.encode())) + 8 + len(key)
    path.write_bytes(data[:at] + struct.pack("<If", GGUFValueType.FLOAT32, 96.5) + data[at + 8:])
    with fast(), pytest.raises(GGUFFormatError, match=r"'llama\.feed_forward_length' is 96\.5"):
        load_everything(path)


def test_tensor_shapes_that_disagree_with_the_metadata(tmp_path: Path) -> None:
    path = tg.write_tiny_llama(tmp_path / "ffn.gguf",
                               metadata={"feed_forward_length": tg.D_FF * 2}).path
    with fast(), pytest.raises(RealmError, match=r"'blk\.0\.ffn_gate\.weight'.*expected"):
        load_everything(path)


# --- the vocabulary ---------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "value", "vtype"), [
    ("tokenizer.ggml.bos_token_id", 10**6, GGUFValueType.UINT32),
    ("tokenizer.ggml.eos_token_id", 10**6, GGUFValueType.UINT32),
    ("tokenizer.ggml.eos_token_id", -1, GGUFValueType.INT32),
    ("tokenizer.ggml.bos_token_id", -1, GGUFValueType.INT32),
])
def test_a_special_token_id_outside_the_vocabulary_blames_the_file(
        tmp_path: Path, key: str, value: int, vtype: GGUFValueType) -> None:
    # bos 10**6 raised IndexError; eos -1 loaded, then every request was refused for "eos_ids"
    data = tg.write_tiny_llama(tmp_path / "ok.gguf", vocab=tg.mini_vocab()).path.read_bytes()
    path = tmp_path / "ids.gguf"
    path.write_bytes(tg.patch_scalar(data, key, value, vtype))
    with fast(), pytest.raises(TokenizerError) as info:
        load_everything(path)
    assert info.value.details["param"] == key
    assert f"is {value}, which is not a token of this vocabulary (ids 0..10)" in info.value.message


def test_a_long_sentencepiece_piece_costs_linear_time(tmp_path: Path) -> None:
    # every split of a 150,000-character piece was sliced and hashed: ~3 s; now ~1 ms
    vocab = tg.mini_vocab("llama")
    long = tg.Vocab([*vocab.tokens, "▁" * 150_000], [*vocab.types, tg.TOKEN_NORMAL], [],
                    [*(vocab.scores or []), -9.0], 1, 2, "llama")
    path = tg.write_tiny_llama(tmp_path / "long.gguf", vocab=long, chat_template=None).path
    f = open_gguf(path)
    with fast(0.5):
        tok = build_tokenizer(f)
    assert tok.encode("ab", add_special_tokens=False).ids == [8]


def test_a_vocabulary_built_to_cost_quadratic_time_is_refused(tmp_path: Path) -> None:
    tokens = ["<unk>", "<s>", "</s>"] + ["a" * n for n in range(1, 801)]
    vocab = tg.Vocab(tokens, [tg.TOKEN_NORMAL] * len(tokens), [], [0.0] * len(tokens), 1, 2,
                     "llama")
    path = tg.write_tiny_llama(tmp_path / "hostile.gguf", vocab=vocab, chat_template=None).path
    f = open_gguf(path)
    with fast(), pytest.raises(TokenizerError, match=r"800 distinct lengths.*hostile"):
        build_tokenizer(f)


def test_a_vocabulary_of_the_wrong_type_is_named(tmp_path: Path) -> None:
    data = tg.write_tiny_llama(tmp_path / "ok.gguf", vocab=tg.mini_vocab()).path.read_bytes()
    needle = gguf_string(b"tokenizer.ggml.tokens") + struct.pack("<II", GGUFValueType.ARRAY,
                                                                 GGUFValueType.STRING)
    at = data.index(needle)
    count = data[at + len(needle) : at + len(needle) + 8]
    path = tmp_path / "tokens.gguf"
    # the same bytes read as an array of uint8 (each string's length and text become numbers)
    n = int.from_bytes(count, "little")
    strings_end = at + len(needle) + 8
    for _ in range(n):
        strings_end += 8 + int.from_bytes(data[strings_end : strings_end + 8], "little")
    span = strings_end - (at + len(needle) + 8)
    bad = (gguf_string(b"tokenizer.ggml.tokens")
           + struct.pack("<IIQ", GGUFValueType.ARRAY, GGUFValueType.UINT8, span))
    path.write_bytes(data[:at] + bad + data[at + len(needle) + 8:])
    with fast(), pytest.raises(GGUFFormatError,
                               match=r"'tokenizer\.ggml\.tokens\[0\]' is \d+; items must be str"):
        load_codec(open_gguf(path))
