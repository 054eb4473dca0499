"""Reading GGUF files: a thin, validating layer over the `gguf` package's `GGUFReader`.

`GGUFReader` parses the format; this module adds what a runtime needs on top: clear
`GGUFFormatError`s that name the file, key or tensor and the bad value (the reader itself raises
bare ValueErrors or silently truncates views), a bounded scan of the header before any parsing,
typed getters that check a metadata value's type and range, and 64-bit offsets and sizes
throughout (Python ints), so a file over 4 GiB needs nothing special.

Why a scan of our own before `GGUFReader`: the reader trusts every count it reads. An array that
declares 2**40 items past the end of the file makes it loop for ever, appending an empty view per
item (memory grows without bound); arrays nested 20,000 deep exhaust Python's recursion; and it
builds a numpy view per array item (~600 bytes and ~14 µs each: SmolLM2's 245k take 150 MB, 3 s),
so a count has to be checked against the bytes left, and all items together against a bound,
before the reader runs. `_HeaderScan` walks the metadata and the tensor table once over an mmap
(no tensor data is touched; strings are skipped, not decoded) and checks every length, count,
type, nesting depth, tensor shape and offset against the file's size and the bounds below. Only
a file that passes is handed to `GGUFReader`.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGMLQuantizationType,
    GGUFReader,
    GGUFValueType,
    LlamaFileType,
)

from .errors import GGUFFormatError, MissingTensorError, ShapeMismatchError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
# Smallest possible encodings, used to refuse counts that cannot fit in the file before parsing.
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, 1-char key, value type, 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, name, n_dims, one dim, type, offset

# Bounds on what a header may declare, each far above what real models need.
MAX_KEY_BYTES = 1 << 16
MAX_ARRAY_DEPTH = 3  # an array of arrays of arrays; llama.cpp's own reader accepts no nesting
# All arrays' items together. Gemma 3 (262,144 tokens, scores, types) needs ~0.8M, Llama 3
# (128k tokens, 280k merges, types) ~0.54M; GGUFReader spends ~600 bytes on each.
MAX_ARRAY_ITEMS = 1 << 21
MAX_TENSOR_NAME_BYTES = 255  # llama.cpp's limit is 63
MAX_TENSOR_DIMS = 4  # GGML_MAX_DIMS
MAX_ALIGNMENT = 1 << 20

_SCALAR_BYTES: dict[int, int] = {
    int(t): np.dtype(np_type).itemsize for t, np_type in GGUFReader.gguf_scalar_to_np.items()}
_VALUE_TYPES = {int(t) for t in GGUFValueType}
_QUANT_TYPES = {int(t) for t in GGML_QUANT_SIZES}


def file_type_name(value: object) -> str:
    """`general.file_type` as llama.cpp names it ("Q4_1", "Q4_K_M", "F32"), read from
    `gguf.LlamaFileType`; a value it does not know, as the value itself."""
    try:
        member = LlamaFileType(int(value))  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return str(value)
    return member.name.removeprefix("MOSTLY_").removeprefix("ALL_")


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
        return math.prod(self.shape[:-1])


_MISSING: Any = object()


class GGUFFile:
    """Metadata and tensor table of one GGUF file, with raw tensor bytes read through a memmap."""

    def __init__(self, path: Path, metadata: dict[str, Any], tensors: dict[str, TensorInfo],
                 file_size: int) -> None:
        self.path = path
        self.metadata = metadata
        self.tensors = tensors
        self.file_size = file_size
        self._mmap: np.memmap | None = None
        self._row_views: dict[str, TensorInfo] = {}  # split_rows: parts of fused tensors

    # --- metadata ---------------------------------------------------------------------------

    def get(self, key: str, default: Any = _MISSING) -> Any:
        if key in self.metadata:
            return self.metadata[key]
        if default is _MISSING:
            raise GGUFFormatError(
                f"{self.path.name}: metadata key {key!r} is missing; the file was not written for "
                "a model realm-nb supports, or is damaged",
                param=key,
            )
        return default

    def _bad(self, key: str, value: Any, rule: str) -> GGUFFormatError:
        shown = repr(value)
        if len(shown) > 80:
            shown = f"{shown[:60]}... ({type(value).__name__} of {len(shown)} characters)"
        return GGUFFormatError(
            f"{self.path.name}: metadata key {key!r} is {shown}; {rule}. The file is damaged "
            "or was not written for a model realm-nb runs (check it with gguf-dump, or "
            "download it again)", param=key, value=shown)

    def get_int(self, key: str, default: Any = _MISSING, *, lo: int, hi: int) -> int:
        """An integer value in lo..hi (a bool or a float is refused)."""
        value = self.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise self._bad(key, value, f"it must be an integer in {lo}..{hi}")
        return value

    def get_float(self, key: str, default: Any = _MISSING, *, lo: float, hi: float) -> float:
        """A finite number in [lo, hi] (an integer is accepted)."""
        value = self.get(key, default)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or not lo <= value <= hi:
            raise self._bad(key, value, f"it must be a finite number in [{lo:g}, {hi:g}]")
        return float(value)

    def get_str(self, key: str, default: Any = _MISSING) -> str:
        value = self.get(key, default)
        if not isinstance(value, str):
            raise self._bad(key, value, "it must be a string")
        return value

    def get_list(self, key: str, item: type | tuple[type, ...], default: Any = _MISSING, *,
                 max_len: int | None = None) -> list[Any]:
        """An array whose items are all of type `item` (bool never counts as int or float)."""
        value = self.get(key, default)
        if not isinstance(value, list):
            raise self._bad(key, value, f"it must be an array of {_type_names(item)}")
        if max_len is not None and len(value) > max_len:
            raise self._bad(key, f"<{len(value)} items>", f"it may hold at most {max_len} items")
        for i, x in enumerate(value):
            if not isinstance(x, item) or (isinstance(x, bool) and bool not in _as_tuple(item)):
                raise self._bad(f"{key}[{i}]", x, f"items must be {_type_names(item)}")
        return value

    @property
    def arch(self) -> str:
        return self.get_str("general.architecture")

    # --- tensors ----------------------------------------------------------------------------

    def tensor(self, name: str) -> TensorInfo:
        info = self._row_views.get(name) or self.tensors.get(name)
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

    def split_rows(self, fused: str, parts: list[tuple[str, int]]) -> None:
        """Make `parts` (name, rows) readable as tensors of their own: consecutive row ranges of
        the 2-D tensor `fused`, first part first (Phi-3 stores q/k/v as one attn_qkv, gate and up
        as one ffn_up). Rows are contiguous in the file, so each part is a view: no bytes move.
        A part may take the fused tensor's own name (Phi-3's up half of ffn_up); `tensors`
        keeps the file's table as it is."""
        info = self.tensors.get(fused)
        if info is None:
            raise MissingTensorError(f"{self.path.name}: tensor {fused!r} is missing; the file "
                                     "is incomplete or of another architecture", param=fused)
        want = sum(rows for _, rows in parts)
        if len(info.shape) != 2 or info.shape[0] != want:
            raise ShapeMismatchError(
                f"{self.path.name}: tensor {fused!r} has shape {list(info.shape)}; it should "
                f"hold {' + '.join(f'{n} ({r} rows)' for n, r in parts)} = {want} rows of "
                f"{info.n_cols}", param=fused)
        row_bytes = info.n_bytes // info.shape[0]
        start = 0
        for name, rows in parts:
            self._row_views[name] = TensorInfo(name, info.qtype, (rows, info.n_cols),
                                               info.offset + start * row_bytes, rows * row_bytes)
            start += rows

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


def _as_tuple(item: type | tuple[type, ...]) -> tuple[type, ...]:
    return item if isinstance(item, tuple) else (item,)


def _type_names(item: type | tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in _as_tuple(item))


def _fail(path: Path, what: str) -> GGUFFormatError:
    return GGUFFormatError(f"{path}: {what}")


# --- the header scan -----------------------------------------------------------------------------


def _prescan(path: Path, size: int) -> tuple[int, int]:
    """Refuse non-GGUF files and impossible counts at once; return (n_tensors, n_kv)."""
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
    return n_tensors, n_kv


class _HeaderScan:
    """One bounded pass over a GGUF header: metadata entries, then the tensor table.

    Reads little-endian fields from `buf` (an mmap of the file) at `pos`; every read is checked
    against the bytes left first, so nothing is allocated or looped over for a count the file
    cannot hold. Yields the tensor table (validated) and the data section's alignment.
    """

    def __init__(self, path: Path, buf: Any, size: int) -> None:
        self.path = path
        self.buf = buf
        self.size = size
        self.pos = 24
        self.items = 0  # array items so far, all arrays together
        self.alignment = GGUF_DEFAULT_ALIGNMENT

    def fail(self, what: str) -> GGUFFormatError:
        return _fail(self.path, f"{what} (header byte {self.pos}); the file is corrupt or "
                                "truncated (download it again)")

    def take(self, n: int, what: str) -> int:
        """Step over n bytes; return where they start."""
        left = self.size - self.pos
        if n > left:
            raise self.fail(f"{what} needs {n} bytes, but only {left} are left in the file")
        start = self.pos
        self.pos += n
        return start

    def u32(self, what: str) -> int:
        return int(struct.unpack_from("<I", self.buf, self.take(4, what))[0])

    def u64(self, what: str) -> int:
        return int(struct.unpack_from("<Q", self.buf, self.take(8, what))[0])

    def text(self, what: str, limit: int) -> str:
        n = self.u64(f"the length of {what}")
        if n > limit:
            raise self.fail(f"{what} is {n} bytes long; at most {limit} are allowed")
        start = self.take(n, what)
        try:
            return bytes(self.buf[start : start + n]).decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not UTF-8 ({e.reason} at byte {e.start})") from None

    def value(self, vtype: int, key: str, depth: int = 0) -> None:
        """Step over one value of type `vtype` (arrays: their items, nested at most
        MAX_ARRAY_DEPTH deep, each count checked against the bytes left)."""
        if vtype in _SCALAR_BYTES:
            self.take(_SCALAR_BYTES[vtype], f"the value of {key!r}")
        elif vtype == GGUFValueType.STRING:
            n = self.u64(f"the length of a string in {key!r}")
            self.take(n, f"a string of {n} bytes in {key!r}")
        elif vtype == GGUFValueType.ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise self.fail(f"metadata key {key!r} nests arrays more than {MAX_ARRAY_DEPTH} "
                                "deep")
            itype = self.u32(f"the item type of array {key!r}")
            count = self.u64(f"the length of array {key!r}")
            if itype not in _VALUE_TYPES:
                raise self.fail(f"array {key!r} has item type {itype}, which is not a GGUF "
                                f"value type (0..{max(_VALUE_TYPES)})")
            smallest = _SCALAR_BYTES.get(itype, 8 if itype == GGUFValueType.STRING else 12)
            left = self.size - self.pos
            if count * smallest > left:
                raise self.fail(f"array {key!r} declares {count} items, more than the {left} "
                                "bytes left can hold")
            self.items += count
            if self.items > MAX_ARRAY_ITEMS:
                raise self.fail(f"array {key!r} brings the metadata to {self.items} array items; "
                                f"at most {MAX_ARRAY_ITEMS} are allowed")
            if itype in _SCALAR_BYTES:
                self.take(count * smallest, f"the items of array {key!r}")
            else:
                for _ in range(count):
                    self.value(itype, key, depth + 1)
        else:
            raise self.fail(f"metadata key {key!r} has value type {vtype}, which is not a GGUF "
                            f"value type (0..{max(_VALUE_TYPES)})")

    def metadata(self, n_kv: int) -> None:
        seen: set[str] = set()
        for i in range(n_kv):
            key = self.text(f"the key of metadata entry #{i}", MAX_KEY_BYTES)
            if not key or key in seen:
                raise self.fail(f"metadata entry #{i} has {'a duplicate' if key else 'an empty'} "
                                f"key {key!r}")
            seen.add(key)
            vtype = self.u32(f"the value type of {key!r}")
            at = self.pos
            self.value(vtype, key)
            if key == "general.alignment":
                if vtype != GGUFValueType.UINT32:
                    raise self.fail(f"'general.alignment' has value type {vtype}; it must be a "
                                    "uint32")
                align = int(struct.unpack_from("<I", self.buf, at)[0])
                if not 0 < align <= MAX_ALIGNMENT or align & (align - 1):
                    raise self.fail(f"'general.alignment' is {align}; it must be a power of two "
                                    f"up to {MAX_ALIGNMENT}")
                self.alignment = align

    def tensor_table(self, n_tensors: int) -> list[TensorInfo]:
        entries: list[tuple[str, tuple[int, ...], int, int]] = []
        names: set[str] = set()
        for i in range(n_tensors):
            name = self.text(f"the name of tensor #{i}", MAX_TENSOR_NAME_BYTES)
            if name in names:
                raise self.fail(f"tensor {name!r} appears twice")
            names.add(name)
            n_dims = self.u32(f"the dimension count of tensor {name!r}")
            if not 1 <= n_dims <= MAX_TENSOR_DIMS:
                raise self.fail(f"tensor {name!r} has {n_dims} dimensions; GGUF tensors have "
                                f"1..{MAX_TENSOR_DIMS}")
            ne = struct.unpack_from(f"<{n_dims}Q", self.buf,
                                    self.take(8 * n_dims, f"the shape of tensor {name!r}"))
            qtype = self.u32(f"the type of tensor {name!r}")
            offset = self.u64(f"the offset of tensor {name!r}")
            entries.append((name, tuple(int(d) for d in ne), qtype, offset))
        data_start = -(-self.pos // self.alignment) * self.alignment
        return [self._tensor(data_start, *e) for e in entries]

    def _tensor(self, data_start: int, name: str, ne: tuple[int, ...], raw_type: int,
                offset: int) -> TensorInfo:
        shape = list(reversed(ne))
        if raw_type not in _QUANT_TYPES:
            raise _fail(self.path, f"tensor {name!r} has type {raw_type}, which is not a GGML "
                                   "tensor type; the file is corrupt")
        qtype = GGMLQuantizationType(raw_type)
        block, type_size = GGML_QUANT_SIZES[qtype]
        if min(ne) < 1:
            raise ShapeMismatchError(f"{self.path}: tensor {name!r} has shape {shape}; every "
                                     "dimension must be at least 1", param=name)
        if ne[0] % block:
            raise ShapeMismatchError(
                f"{self.path}: tensor {name!r} has {ne[0]} columns, not a multiple of the "
                f"{qtype.name} block size {block}", param=name)
        n_bytes = math.prod(ne) // block * type_size  # Python ints: no overflow
        begin = data_start + offset
        if offset % self.alignment:
            raise _fail(self.path, f"tensor {name!r} starts at data offset {offset}, not a "
                                   f"multiple of the file's alignment {self.alignment}; the file "
                                   "is corrupt")
        if begin + n_bytes > self.size:
            raise _fail(self.path, f"tensor {name!r} ({qtype.name}, shape {shape}) needs bytes "
                                   f"{begin}..{begin + n_bytes}, past the end of the "
                                   f"{self.size}-byte file; the file is truncated (download it "
                                   "again)")
        return TensorInfo(name, qtype, tuple(shape), begin, n_bytes)


def _scan(path: Path, size: int) -> list[TensorInfo]:
    """The bounded header scan (see the module docstring); returns the tensor table."""
    n_tensors, n_kv = _prescan(path, size)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        scan = _HeaderScan(path, buf, size)
        scan.metadata(n_kv)
        return scan.tensor_table(n_tensors)


def open_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Open and validate a GGUF file: header, metadata, and every tensor's place in the file.

    The tensor table is the scan's (each entry checked there); the metadata values are
    GGUFReader's, read only once the scan has bounded every count it will follow."""
    p = Path(path)
    if not p.is_file():
        raise GGUFFormatError(f"{p}: no such file", param="path")
    size = p.stat().st_size
    tensors = {t.name: t for t in _scan(p, size)}
    try:
        reader = GGUFReader(p, "r")
    except (ValueError, IndexError, KeyError, TypeError, struct.error, OverflowError,
            MemoryError, RecursionError) as e:  # the scan passed, so this is the reader's limit
        raise _fail(p, f"could not be parsed ({type(e).__name__}: {e}); the file is truncated "
                       "or corrupt") from None
    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            metadata[key] = field.contents()
        except (ValueError, IndexError) as e:  # UnicodeDecodeError is a ValueError
            raise _fail(p, f"metadata key {key!r} could not be decoded: {e}") from None
    return GGUFFile(p, metadata, tensors, size)
