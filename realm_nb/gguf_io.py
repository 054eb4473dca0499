"""Reading GGUF files: a thin, validating layer over the `gguf` package's `GGUFReader`.

`GGUFReader` parses the format; this module adds what a runtime needs on top: clear
`GGUFFormatError`s that name the file, key or tensor and the bad value (the reader itself raises
bare ValueErrors or silently truncates views), a cheap pre-scan that refuses absurd counts before
any parsing, and 64-bit offsets and sizes throughout (Python ints), so a file over 4 GiB needs
nothing special.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

from .errors import GGUFFormatError, MissingTensorError, ShapeMismatchError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
# Smallest possible encodings, used to refuse counts that cannot fit in the file before parsing.
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, 1-char key, value type, 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, name, n_dims, one dim, type, offset


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in the file. `shape` is numpy order: rows first, ne[0] last."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file (64-bit)
    n_bytes: int

    @property
    def n_cols(self) -> int:
        return self.shape[-1]

    @property
    def n_rows(self) -> int:
        return int(np.prod(self.shape[:-1], dtype=np.int64)) if len(self.shape) > 1 else 1


class GGUFFile:
    """Metadata and tensor table of one GGUF file, with raw tensor bytes read through a memmap."""

    def __init__(self, path: Path, metadata: dict[str, Any], tensors: dict[str, TensorInfo],
                 file_size: int) -> None:
        self.path = path
        self.metadata = metadata
        self.tensors = tensors
        self.file_size = file_size
        self._mmap: np.memmap | None = None

    # --- metadata ---------------------------------------------------------------------------

    def get(self, key: str, default: Any = ...) -> Any:
        if key in self.metadata:
            return self.metadata[key]
        if default is ...:
            raise GGUFFormatError(
                f"{self.path.name}: metadata key {key!r} is missing; the file was not written for "
                "a model realm-nb supports, or is damaged",
                param=key,
            )
        return default

    @property
    def arch(self) -> str:
        return str(self.get("general.architecture"))

    # --- tensors ----------------------------------------------------------------------------

    def tensor(self, name: str) -> TensorInfo:
        info = self.tensors.get(name)
        if info is None:
            raise MissingTensorError(
                f"{self.path.name}: tensor {name!r} is missing (the file has "
                f"{len(self.tensors)} tensors); it is incomplete or of another architecture",
                param=name,
            )
        return info

    def expect_shape(self, name: str, shape: tuple[int, ...]) -> TensorInfo:
        info = self.tensor(name)
        if info.shape != shape:
            raise ShapeMismatchError(
                f"{self.path.name}: tensor {name!r} has shape {list(info.shape)}, expected "
                f"{list(shape)} from the model's metadata",
                param=name,
            )
        return info

    def release_pages(self) -> None:
        """Drop the file's pages from this process's resident memory once the weights live in
        device arrays (~the file's size). They stay in the OS page cache, and the next `raw`
        read faults them back in: the mapping is private and read-only, so this is always safe."""
        mapped = getattr(self._mmap, "_mmap", None)  # np.memmap's mmap.mmap
        if mapped is not None and hasattr(mmap, "MADV_DONTNEED"):
            with contextlib.suppress(OSError, ValueError):
                mapped.madvise(mmap.MADV_DONTNEED)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as uint8 [rows, row_bytes] (a view of the memmapped file)."""
        info = self.tensor(name)
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        flat = self._mmap[info.offset : info.offset + info.n_bytes]
        return flat.reshape(info.n_rows, info.n_bytes // info.n_rows)


def _fail(path: Path, what: str) -> GGUFFormatError:
    return GGUFFormatError(f"{path}: {what}")


def _prescan(path: Path, size: int) -> None:
    """Refuse non-GGUF files and impossible counts at once, before the reader walks the file."""
    if size < 24:
        raise _fail(path, f"is {size} bytes long, too short for a GGUF header (24 bytes); "
                          "the file is truncated or not a GGUF model")
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:4] != GGUF_MAGIC:
        raise _fail(path, f"is not a GGUF file: it starts with {head[:4]!r}, not b'GGUF'. "
                          "realm-nb reads GGUF models (convert others with llama.cpp's tools)")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in SUPPORTED_VERSIONS:
        raise _fail(path, f"has GGUF version {version}; supported versions: {SUPPORTED_VERSIONS}")
    if n_kv * _MIN_KV_BYTES > size:
        raise _fail(path, f"declares {n_kv} metadata entries, more than its {size} bytes "
                          "can hold; the header is corrupt")
    if n_tensors * _MIN_TENSOR_INFO_BYTES > size:
        raise _fail(path, f"declares {n_tensors} tensors, more than its {size} bytes can hold; "
                          "the header is corrupt")


class _CheckedReader(GGUFReader):
    """GGUFReader that names the tensor a truncated file cuts short; the plain reader fails
    later with a bare reshape ValueError that names neither the tensor nor the cause."""

    def __init__(self, path: Path) -> None:
        self._checked_path = path
        super().__init__(path, "r")

    def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
        size = len(self.data)
        for field in fields:
            _, name_data, _, dims, raw_dtype, offset_tensor = field.parts
            qtype = int(raw_dtype[0])
            if qtype not in GGML_QUANT_SIZES:  # unknown type: the reader's own error says so
                continue
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
            n_bytes = int(np.prod(dims, dtype=np.int64)) * type_size // block
            begin = int(start_offs) + int(offset_tensor[0])
            if begin + n_bytes > size:
                name = bytes(name_data).decode("utf-8", "replace")
                shape = [int(d) for d in reversed(dims.tolist())]
                raise _fail(self._checked_path,
                            f"tensor {name!r} ({GGMLQuantizationType(qtype).name}, shape {shape}) "
                            f"needs bytes {begin}..{begin + n_bytes}, past the end of the "
                            f"{size}-byte file; the file is truncated (download it again)")
        super()._build_tensors(start_offs, fields)


def _field_value(field: Any) -> Any:
    types = field.types
    if types and types[0] == GGUFValueType.ARRAY:
        return field.contents()
    return field.contents()


def open_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Open and validate a GGUF file: header, metadata, and every tensor's place in the file."""
    p = Path(path)
    if not p.is_file():
        raise GGUFFormatError(f"{p}: no such file", param="path")
    size = p.stat().st_size
    _prescan(p, size)
    try:
        reader = _CheckedReader(p)
    except (ValueError, IndexError, KeyError, struct.error, OverflowError, MemoryError) as e:
        raise _fail(p, f"could not be parsed ({type(e).__name__}: {e}); the file is truncated "
                       "or corrupt") from None
    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            metadata[key] = _field_value(field)
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            raise _fail(p, f"metadata key {key!r} could not be decoded: {e}") from None
    tensors: dict[str, TensorInfo] = {}
    for t in reader.tensors:
        qtype = GGMLQuantizationType(int(t.tensor_type))
        ne = [int(d) for d in t.shape]  # GGUF order: ne[0] (columns) first
        shape = tuple(reversed(ne))
        offset = int(t.data_offset)
        n_elems = int(np.prod(ne, dtype=np.int64))
        block, type_size = GGML_QUANT_SIZES[qtype]
        if ne[0] % block:
            raise ShapeMismatchError(
                f"{p}: tensor {t.name!r} has {ne[0]} columns, not a multiple of the {qtype.name} "
                f"block size {block}", param=t.name)
        n_bytes = n_elems // block * type_size
        if offset + n_bytes > size:
            raise _fail(p, f"tensor {t.name!r} ({qtype.name}, shape {list(shape)}) needs bytes "
                           f"{offset}..{offset + n_bytes}, past the end of the {size}-byte file; "
                           "the file is truncated (download it again)")
        tensors[t.name] = TensorInfo(t.name, qtype, shape, offset, n_bytes)
    return GGUFFile(p, metadata, tensors, size)
