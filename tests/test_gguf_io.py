"""realm_nb.gguf_io (+ config, weights.check_tensors): valid files open, damaged ones fail fast
with an error that names the file, the key or tensor, and the bad value."""

from __future__ import annotations

import re
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import tiny_gguf as tg
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from tiny_gguf import TinyModel, write_tiny_llama

from realm_nb.config import ModelConfig
from realm_nb.errors import (
    GGUFFormatError,
    MissingTensorError,
    ShapeMismatchError,
    UnsupportedArchitectureError,
    UnsupportedTensorTypeError,
)
from realm_nb.gguf_io import open_gguf
from realm_nb.weights import check_tensors

FAST_S = 1.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return write_tiny_llama(tmp_path_factory.mktemp("io") / "tiny.gguf")


@pytest.fixture
def damaged(tmp_path: Path, tiny: TinyModel) -> Callable[[Callable[[bytes], bytes]], Path]:
    """Write a copy of the tiny file changed by `edit(bytes) -> bytes`; return its path."""

    def make(edit: Callable[[bytes], bytes]) -> Path:
        out = tmp_path / "damaged.gguf"
        out.write_bytes(edit(tiny.path.read_bytes()))
        return out

    return make


@contextmanager
def fast() -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    elapsed = time.perf_counter() - t0
    assert elapsed < FAST_S, f"took {elapsed:.2f} s"


def open_and_check(path: Path) -> None:
    f = open_gguf(path)
    check_tensors(f, ModelConfig.from_gguf(f))


# --- a valid file --------------------------------------------------------------------------------


def test_valid_tiny_file_opens_with_what_was_written(tiny: TinyModel) -> None:
    f = open_gguf(tiny.path)
    assert f.arch == "llama"
    assert f.get("llama.block_count") == tg.N_LAYERS
    assert f.get("tokenizer.ggml.model") == "gpt2"
    assert list(f.get("tokenizer.ggml.tokens")) == tiny.vocab.tokens
    assert f.get("tokenizer.chat_template") == tg.CHATML_TEMPLATE
    assert f.file_size == tiny.path.stat().st_size
    assert set(f.tensors) == set(tiny.types)
    for name, qtype in tiny.types.items():
        assert f.tensors[name].qtype == qtype
        assert f.tensors[name].shape == tiny.weights[name].shape
    cfg = ModelConfig.from_gguf(f)
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff,
            cfg.vocab_size, cfg.context_length) == (
        tg.N_LAYERS, tg.D_MODEL, tg.N_HEADS, tg.N_KV_HEADS, tg.HEAD_DIM, tg.D_FF,
        tiny.vocab_size, tg.CONTEXT)
    assert cfg.rope_base == tg.ROPE_BASE
    assert cfg.rms_eps == pytest.approx(tg.RMS_EPS)
    assert cfg.tied_embeddings
    check_tensors(f, cfg)
    # raw bytes of a tensor are where the table says
    info = f.tensors["blk.0.attn_q.weight"]
    assert f.raw("blk.0.attn_q.weight").shape == (64, info.n_bytes // 64)


# --- not GGUF, truncated, corrupt header -----------------------------------------------------


def test_bad_magic(damaged: Callable[..., Path]) -> None:
    path = damaged(lambda b: b"GGML" + b[4:])
    with fast(), pytest.raises(GGUFFormatError, match=rf"{path.name}.*not a GGUF file.*GGML"):
        open_gguf(path)


def test_truncated_in_tensor_data_names_the_tensor(tiny: TinyModel,
                                                   damaged: Callable[..., Path]) -> None:
    info = open_gguf(tiny.path).tensors["blk.1.attn_q.weight"]
    path = damaged(lambda b: b[: info.offset + info.n_bytes // 2])
    with fast(), pytest.raises(GGUFFormatError,
                               match=rf"{path.name}.*'blk\.1\.attn_q\.weight'.*truncated"):
        open_gguf(path)


@pytest.mark.parametrize("cut", [12, 300, 3000])
def test_truncated_in_header(cut: int, damaged: Callable[..., Path]) -> None:
    path = damaged(lambda b: b[:cut])
    with fast(), pytest.raises(GGUFFormatError, match=re.escape(path.name)):
        open_gguf(path)


@pytest.mark.parametrize(("offset", "what"), [(8, "tensors"), (16, "metadata entries")])
def test_counts_past_the_end_of_the_file(offset: int, what: str,
                                         damaged: Callable[..., Path]) -> None:
    huge = 10**12
    path = damaged(lambda b: b[:offset] + struct.pack("<Q", huge) + b[offset + 8:])
    with fast(), pytest.raises(GGUFFormatError, match=rf"{path.name}.*{huge} {what}"):
        open_gguf(path)


def test_more_metadata_than_written_fails_cleanly(tiny: TinyModel,
                                                  damaged: Callable[..., Path]) -> None:
    n_kv = struct.unpack("<Q", tiny.path.read_bytes()[16:24])[0]
    path = damaged(lambda b: b[:16] + struct.pack("<Q", n_kv + 500) + b[24:])
    with fast(), pytest.raises(GGUFFormatError, match=re.escape(path.name)):
        open_gguf(path)


@pytest.mark.parametrize("version", [1, 4, 0xFFFF])
def test_unsupported_version(version: int, damaged: Callable[..., Path]) -> None:
    path = damaged(lambda b: b[:4] + struct.pack("<I", version) + b[8:])
    with fast(), pytest.raises(GGUFFormatError, match=rf"{path.name}.*version {version}\b"):
        open_gguf(path)


# --- valid GGUF, but not a model realm-nb runs -----------------------------------------------


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "rwkv.gguf", arch="rwkv6").path
    with fast(), pytest.raises(UnsupportedArchitectureError,
                               match=rf"{path.name}.*'rwkv6'.*llama"):
        open_and_check(path)


def test_unsupported_tensor_type(tmp_path: Path) -> None:
    block, type_size = GGML_QUANT_SIZES[QT.IQ4_NL]
    rows, cols = tg.N_HEADS * tg.HEAD_DIM, tg.D_MODEL
    raw = np.random.default_rng(0).integers(0, 256, (rows, cols // block * type_size),
                                            dtype=np.uint8)
    path = write_tiny_llama(tmp_path / "iq.gguf",
                            replace={"blk.0.attn_q.weight": (raw, QT.IQ4_NL)}).path
    assert open_gguf(path).tensors["blk.0.attn_q.weight"].qtype == QT.IQ4_NL
    with fast(), pytest.raises(UnsupportedTensorTypeError,
                               match=rf"'blk\.0\.attn_q\.weight'.*{path.name}.*IQ4_NL.*Q4_0"):
        open_and_check(path)


def test_missing_tensor(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "missing.gguf", omit=["blk.1.ffn_up.weight"]).path
    with fast(), pytest.raises(MissingTensorError,
                               match=rf"{path.name}.*'blk\.1\.ffn_up\.weight'.*missing"):
        open_and_check(path)


def test_shape_mismatch(tmp_path: Path) -> None:
    wrong = np.ones((tg.N_HEADS * tg.HEAD_DIM // 2, tg.D_MODEL), np.float32)
    path = write_tiny_llama(tmp_path / "shape.gguf",
                            replace={"blk.0.attn_q.weight": (wrong, QT.Q8_0)}).path
    with fast(), pytest.raises(ShapeMismatchError,
                               match=rf"{path.name}.*'blk\.0\.attn_q\.weight'.*\[32, 64\]"
                                     r".*expected \[64, 64\]"):
        open_and_check(path)


def test_file_type_names_come_from_gguf_py() -> None:
    from realm_nb.gguf_io import file_type_name

    assert [file_type_name(v) for v in (0, 1, 3, 7, 15, 32)] == \
        ["F32", "F16", "Q4_1", "Q8_0", "Q4_K_M", "BF16"]
    assert file_type_name(9999) == "9999"  # a value gguf-py does not know: shown as it is
