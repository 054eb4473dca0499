"""The Memory64 layer store: one copy of each model's weights, shared by every tenant.

Models are registered by content hash (id) and by name/aliases. Registering opens and validates
the file but loads no weights; layers become resident on first use (`ensure_resident`, called by
the first forward) or one at a time (`load_layer`, the guest's `memory64_load_layer`). Resident
bytes are accounted per model against a budget; when a load would pass it, models that no
request is using are evicted, least recently used first. Sizes and offsets are Python ints
(64-bit and beyond), so models over 4 GiB need nothing special.
"""

from __future__ import annotations

import builtins
import contextlib
import ctypes
import functools
import hashlib
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import catalogue, discovery
from .config import ModelConfig
from .engine import Engine
from .errors import InvalidRequestError, MemoryBudgetError, ModelNotFoundError
from .gguf_io import GGUFFile, file_type_name, open_gguf
from .hub import quant_of
from .kvcache import kv_dtype_for
from .mesh import build_mesh, describe
from .tokenizer import TextCodec, load_codec
from .types import ModelInfo, check_layout
from .weights import (
    LayerWeights,
    ModelWeights,
    check_tensors,
    default_layout,
    load_globals,
    load_layer,
    nbytes,
    stack_layers,
    stack_types,
)

ProgressFn = Callable[[int, int], None]  # (layers resident, layers in all)


def content_id(path: Path) -> str:
    """sha256 of the file, cached beside the model cache keyed by (path, size, mtime); the
    catalogue's or a content-addressed store's own hash where it names the file."""
    entry = next((e for e in catalogue.CATALOGUE
                  if catalogue.cached_path(e) == path and catalogue.is_pulled(e)), None)
    if entry is not None:
        return entry.sha256[:16]
    if (known := discovery.known_sha256(path)) is not None:
        return known[:16]
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    memo = catalogue.cache_dir() / "ids" / key
    if memo.is_file():
        return memo.read_text().strip()
    digest = catalogue.sha256_of(path)[:16]
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(digest)
    except OSError:
        pass  # the id is still right; only the next lookup is slower
    return digest


@dataclass
class ModelEntry:
    """One registered model: its file, config, tokenizer, and whatever of it is resident."""

    id: str
    name: str
    path: Path
    layout: str
    file: GGUFFile
    cfg: ModelConfig
    codec: TextCodec
    aliases: tuple[str, ...] = ()
    layers: list[LayerWeights | None] = field(default_factory=list)
    engine: Engine | None = None
    resident_bytes: int = 0
    last_used: float = field(default_factory=time.monotonic)
    in_use: int = 0
    source: str = "loaded"
    lock: threading.RLock = field(default_factory=threading.RLock)

    @property
    def loaded(self) -> bool:
        return self.engine is not None

    @property
    def n_resident_layers(self) -> int:
        return self.n_layers if self.engine else sum(x is not None for x in self.layers)

    @property
    def n_layers(self) -> int:
        return self.cfg.n_layers

    def info(self) -> ModelInfo:
        quant = self.file.metadata.get("general.file_type")
        qname = file_type_name(quant) if quant is not None else None
        return ModelInfo(id=self.id, name=self.name, path=str(self.path), arch=self.cfg.arch,
                         quant=qname, size_bytes=self.file.file_size, loaded=self.loaded,
                         weights=self.layout, aliases=self.aliases,
                         resident_bytes=self.resident_bytes, source=self.source)


def _return_freed_heap() -> None:
    """Give the heap freed by a load (f32 dequantization temporaries) back to the OS: glibc
    keeps it otherwise, ~130 MiB of resident memory for SmolLM2 (benchmarks/bench_memory.py)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).malloc_trim(0)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MMAP_THRESHOLD_BYTES = 1 << 20


@functools.cache
def _bound_heap_retention() -> None:
    """Serve every allocation of 1 MiB or more (KV pools, logits chunks, XLA buffers) from its own
    mapping, returned to the OS when freed. glibc's default threshold rises with each large
    free, after which such blocks stay in the heap: the soak benchmark's runtime kept +180 MiB
    (1.30x its warm-up RSS) after the KV pool grew and shrank back; with the fixed threshold
    1.10x, the rest a one-time compile of the larger pool (benchmarks/bench_soak.py)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


class LayerStore:
    """Registry and residency of models. Thread-safe."""

    def __init__(self, *, budget_bytes: int | None = None, n_slots: int = 8,
                 max_context: int = 2048, layout: str | None = None, mesh: Any = None) -> None:
        """mesh: where every model's weights and KV pool live (mesh.build_mesh: a spec like
        'model=2,data=1', a dict, a jax Mesh; None: all local devices, or one)."""
        _bound_heap_retention()
        self.mesh = build_mesh(mesh)
        self.budget_bytes = budget_bytes
        self.n_slots = n_slots
        self.max_context = max_context
        self.default_layout = check_layout(layout or default_layout())
        self._models: dict[str, ModelEntry] = {}  # by id
        self._lock = threading.RLock()
        self.evictions = 0
        # called with each model evicted to make room (the kernel stops its scheduler, whose
        # step thread would otherwise keep the evicted engine's arrays alive)
        self.on_evict: list[Callable[[ModelEntry], None]] = []

    # ------------------------------------------------------------------ registry

    def register(self, source: str | Path, name: str | None = None,
                 layout: str | None = None) -> ModelEntry:
        """Open and validate a model (catalogue name, .gguf path, Hub reference or a name
        discovery found on disk); load no weights yet."""
        layout = check_layout(layout or self.default_layout)
        src = str(source)
        path = discovery.resolve(src)
        entry_cat = catalogue.find_entry(src) or next(
            (e for e in catalogue.CATALOGUE if catalogue.cached_path(e) == path), None)
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise InvalidRequestError(f"name={name!r} must be a non-empty string", param="name")
        mid = content_id(path)
        with self._lock:
            for m in self._models.values():
                if m.id == mid and m.layout == layout:
                    if name and name not in (m.name, *m.aliases):
                        m.aliases = (*m.aliases, name)
                    return m
            taken = self._find(name) if name else None
            if taken is not None:
                raise InvalidRequestError(
                    f"the name {name!r} already names model {taken.id} ({taken.path.name}); "
                    "pick another name or unload that model first", param="name")
        f = open_gguf(path)
        cfg = ModelConfig.from_gguf(f)
        check_tensors(f, cfg)
        codec = load_codec(f, catalogue.cache_dir())
        found = None if entry_cat else discovery.find(str(path))
        default_name = entry_cat.name if entry_cat else found.name if found else path.stem
        others = () if entry_cat else tuple(dict.fromkeys(
            a for a in (src.strip(), str(path)) if a != default_name))
        aliases = tuple(a for a in (entry_cat.aliases if entry_cat else ()) + others if a)
        key = mid if layout == self.default_layout else f"{mid}:{layout}"
        entry = ModelEntry(id=key, name=name or default_name, path=path, layout=layout, file=f,
                           cfg=cfg, codec=codec, aliases=aliases,
                           layers=[None] * cfg.n_layers,
                           source="catalogue" if entry_cat else found.source if found
                           else "loaded")
        if name and found is not None:
            entry.aliases = (*entry.aliases, found.name)
        if name and entry_cat is not None:
            entry.aliases = (*entry.aliases, entry_cat.name)
        with self._lock:
            self._models[entry.id] = entry
        return entry

    def _find(self, key: str, layout: str | None = None) -> ModelEntry | None:
        """The entry a name, alias or id means; where one file is registered in both layouts,
        the asked-for layout, else the store's default one."""
        k = key.strip()
        cat = catalogue.find_entry(k)
        names = {k} | ({cat.name} if cat is not None else set())
        matches = [m for m in self._models.values()
                   if m.id == k or names & {m.name, *m.aliases}]
        if layout is not None:
            matches = [m for m in matches if m.layout == layout]
        matches.sort(key=lambda m: (m.id != k, m.layout != self.default_layout))
        return matches[0] if matches else None

    def get(self, key: str, layout: str | None = None) -> ModelEntry:
        with self._lock:
            m = self._find(key, layout)
        if m is None:
            known = ", ".join(sorted(x.name for x in self._models.values())) or "none"
            raise ModelNotFoundError(
                f"no loaded model is called {key!r} (loaded: {known}); load it first with "
                "load_model / `%realm load` / POST /v1/models/load", param="model")
        return m

    def entries(self) -> list[ModelEntry]:
        with self._lock:
            return list(self._models.values())

    def list(self) -> list[ModelInfo]:
        """Registered models, then catalogue models not registered yet, then GGUF files found
        on disk (discovery) that are not registered."""
        out = [m.info() for m in self.entries()]
        paths = {m.path.resolve() for m in self.entries()}
        names = {i.name for i in out} | {a for i in out for a in i.aliases}
        ids = {i.id for i in out}  # a catalogue file registered by path is listed once
        for e in catalogue.CATALOGUE:
            if e.name in names or e.sha256[:16] in ids:
                continue
            path = catalogue.cached_path(e)
            out.append(ModelInfo(id=e.sha256[:16], name=e.name,
                                 path=str(path) if catalogue.is_pulled(e) else None, arch=None,
                                 quant=None, size_bytes=e.size_bytes, loaded=False,
                                 aliases=e.aliases, source="catalogue"))
            paths.add(path.resolve())
        for f in discovery.found_models():
            if f.path.resolve() in paths or f.name in names:
                continue
            out.append(ModelInfo(
                id=(f.sha256 or hashlib.sha256(str(f.path.resolve()).encode()).hexdigest())[:16],
                name=f.name, path=str(f.path), arch=None, quant=quant_of(f.name),
                size_bytes=f.size_bytes, loaded=False, source=f.source))
        return out

    # ------------------------------------------------------------------ residency

    def load_layer(self, entry: ModelEntry, layer: int) -> int:
        """Make one layer resident; returns its bytes."""
        if not 0 <= layer < entry.n_layers:
            raise InvalidRequestError(
                f"layer {layer} does not exist; {entry.name} has layers 0..{entry.n_layers - 1}",
                param="layer")
        with entry.lock:
            if entry.engine is not None or entry.layers[layer] is not None:
                return 0
            weights = load_layer(entry.file, entry.cfg, layer, entry.layout,
                                 stack_types(entry.file, entry.cfg))
            size = nbytes(weights)
            self._make_room(size, keep=entry)
            entry.layers[layer] = weights
            entry.resident_bytes += size
            return size

    def ensure_resident(self, entry: ModelEntry, progress: ProgressFn | None = None) -> Engine:
        """All layers resident and stacked into the engine (loading what is missing)."""
        entry.last_used = time.monotonic()
        if entry.engine is not None:
            return entry.engine
        with entry.lock:
            if entry.engine is not None:
                return entry.engine
            for i in range(entry.n_layers):
                self.load_layer(entry, i)
                if progress is not None:
                    progress(i + 1, entry.n_layers)
            g = load_globals(entry.file, entry.cfg, entry.layout)
            layers = [x for x in entry.layers if x is not None]
            params = ModelWeights(embed=g["embed"], layers=stack_layers(layers), norm=g["norm"],
                                  head=g["head"])
            entry.layers = [None] * entry.n_layers  # the stacked copy replaces the per-layer ones
            engine = Engine(entry.cfg, params, n_slots=self.n_slots,
                            max_context=self.max_context, kv_dtype=kv_dtype_for(entry.layout),
                            mesh=self.mesh)
            total = nbytes(params) + engine.cache_bytes
            self._make_room(total - entry.resident_bytes, keep=entry)
            entry.engine = engine
            entry.resident_bytes = total
            entry.file.release_pages()
            _return_freed_heap()
            return engine

    def _make_room(self, needed: int, keep: ModelEntry) -> None:
        if self.budget_bytes is None:
            return
        while self.resident_bytes() + needed > self.budget_bytes:
            idle = [m for m in self.entries()
                    if m is not keep and m.in_use == 0 and m.resident_bytes > 0]
            if not idle:
                raise MemoryBudgetError(
                    f"loading {keep.name} needs {needed} more bytes but the store holds "
                    f"{self.resident_bytes()} of its {self.budget_bytes}-byte budget, all in use; "
                    "unload a model or raise the budget")
            victim = min(idle, key=lambda m: m.last_used)
            self.evict(victim)

    def evict(self, entry: ModelEntry) -> None:
        """Drop a model's resident weights (it stays registered and reloads on next use)."""
        with entry.lock:
            entry.engine = None
            entry.layers = [None] * entry.n_layers
            entry.resident_bytes = 0
            self.evictions += 1
        for hook in self.on_evict:
            hook(entry)

    def unload(self, key: str, layout: str | None = None) -> builtins.list[ModelEntry]:
        """Forget a model: every layout registered under that name, or only `layout`."""
        first = self.get(key, layout)
        with self._lock:
            if layout is None:
                same = [m for m in self._models.values()
                        if m.path == first.path and {m.name, *m.aliases} & {first.name, key}]
            else:
                same = [first]
            busy = [m for m in same if m.in_use]
            if busy:
                raise InvalidRequestError(
                    f"model {first.name} has {sum(m.in_use for m in busy)} request(s) running; "
                    "cancel them or wait before unloading", param="model")
            for m in same:
                self._models.pop(m.id, None)
        for m in same:
            self.evict(m)
        return same

    def resident_bytes(self) -> int:
        return sum(m.resident_bytes for m in self.entries())

    def stats(self) -> dict[str, Any]:
        return {
            "models": [{"id": m.id, "name": m.name, "layout": m.layout,
                        "resident_layers": m.n_resident_layers, "layers": m.n_layers,
                        "resident_bytes": m.resident_bytes, "in_use": m.in_use,
                        "kv": m.engine.kv_stats() if m.engine is not None else None}
                       for m in self.entries()],
            "resident_bytes": self.resident_bytes(),
            "budget_bytes": self.budget_bytes,
            "evictions": self.evictions,
            "mesh": describe(self.mesh),
        }


