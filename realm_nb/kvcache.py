"""The KV cache: a pool of fixed-size pages on the device, and the page bookkeeping on the host.

Memory follows use. Instead of reserving [L, S, Tmax, G, K] for every slot up front, keys and
values live in a pool of P pages of PAGE positions each, k, v [L, P, PAGE, G, K]. Each slot has a
row in a host-side page table (numpy int32 [S+1, W], W = pages of the longest attention window):
entry j is the page that holds the slot's positions j*PAGE .. (j+1)*PAGE-1.

- Page 0 is scratch, owned by nobody. Padding rows of a decode batch and padded positions of a
  prefill chunk write there, and table entries not (yet) taken point there. Attention reads them
  under the causal mask only (a taken page covers every position up to the query's own), and the
  pool starts zeroed, so the scratch page only ever holds finite values and adds exact zeros.
- Pages are taken as a sequence grows (`PageAllocator.locate`, by position) and handed back when
  it ends (`PageAllocator.release`). How the pool's memory follows them depends on its kind:
  - `reserved` (the default for one CPU device, Linux): the pool has its largest shape from the
    start (every slot at its longest, + scratch), but only its address space is reserved: the
    zeroed arrays are handed back to the OS at once (`madvise(MADV_DONTNEED)`, `drop_pages`), a
    page becomes resident when a step first writes it and is handed back when its sequence
    releases it. The pool's shape never changes, so the jitted
    steps compile once per batch shape, not once per batch shape and pool size: each compiled
    step holds ~5 MiB for the life of the process (XLA:CPU), and with a growing pool every size
    it reached multiplied the programs the process kept (benchmarks/bench_soak.py).
  - `grow` (other devices, a mesh, or REALM_NB_KV_POOL=grow): when the free list runs out the
    pool doubles (`grow_pool`: the old pages are copied into a larger zeroed pool); when no slot
    holds a page it shrinks back to its initial size (`shrink_pool`), so an idle runtime holds
    only the initial pool. Pool sizes stay powers of two because each size is a compiled shape.
- Storage dtype follows the weight layout: `exact` keeps f32 (it is the reference), `fast` stores
  f16 as llama.cpp does by default; the forward converts to f32 after the gather.

Glossary: L layers, P pages in the pool, S slots, W page-table width, B batch rows, T new tokens per
row, G kv heads, K head dim, C cached positions attention reads (a multiple of PAGE).

The allocator is plain Python and numpy (testable without JAX); the pool helpers run eagerly,
outside any jit (jit stays in engine.py).
"""

from __future__ import annotations

import ctypes
import heapq
import mmap
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig
from .errors import ContextLengthError, InvalidRequestError, MemoryBudgetError

PAGE = 64  # positions per page; divides every attention window (those are powers of two >= 128)
INITIAL_PAGES = 16  # pool size of an idle engine: scratch + 15 pages = 960 positions
SCRATCH_PAGE = 0

# Storage dtype of the cache per weight layout (see realm_nb.types.WEIGHT_LAYOUTS).
KV_DTYPES: dict[str, str] = {"exact": "float32", "fast": "float16", "packed": "float16"}


def kv_dtype_for(layout: str) -> np.dtype:
    """The cache's storage dtype for a weight layout."""
    if layout not in KV_DTYPES:
        raise InvalidRequestError(
            f"weights={layout!r} has no KV-cache dtype; choose one of {tuple(KV_DTYPES)}",
            param="weights")
    return np.dtype(KV_DTYPES[layout])


# ================================================================ the device pool


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class KVCache:
    k: jax.Array  # [L, P, PAGE, G, K] f32 or f16
    v: jax.Array  # [L, P, PAGE, G, K]

    @staticmethod
    def zeros(cfg: ModelConfig, n_pages: int, dtype: np.dtype | str = "float32",
              page_size: int = PAGE) -> KVCache:
        shape = (cfg.n_layers, n_pages, page_size, cfg.n_kv_heads, cfg.head_dim)
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def n_pages(self) -> int:
        return int(self.k.shape[1])

    @property
    def page_size(self) -> int:
        return int(self.k.shape[2])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.k.dtype)

    @property
    def nbytes(self) -> int:
        return int(self.k.nbytes) + int(self.v.nbytes)


# ================================================================ a reserved pool's memory

_MADV_DONTNEED = 4  # linux/mman.h
_OS_PAGE = mmap.PAGESIZE


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def trim_heap() -> None:
    """Give the OS the heap a compile freed: glibc keeps the compiler's temporaries in its
    arenas otherwise (2-3 MiB per new step shape of SmolLM2's, measured with malloc_trim after
    each). The engine calls it once per new shape, beside a compile of about a second."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def host_buffer(x: jax.Array) -> int | None:
    """The address of x's memory where it lives in this process (one CPU device), else None."""
    if _LIBC is None or len(x.devices()) != 1 or next(iter(x.devices())).platform != "cpu":
        return None
    try:
        return int(x.unsafe_buffer_pointer())
    except (RuntimeError, ValueError, AttributeError):
        return None


def can_reserve(cache: KVCache) -> bool:
    """Whether this pool's pages can be handed back to the OS one by one (`drop_pages`)."""
    return host_buffer(cache.k) is not None and host_buffer(cache.v) is not None


def _page_runs(pages: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted pages as [start, end) runs of consecutive ones."""
    runs: list[tuple[int, int]] = []
    for p in sorted(set(pages)):
        if runs and runs[-1][1] == p:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((p, p + 1))
    return runs


def drop_pages(cache: KVCache, pages: Iterable[int]) -> int:
    """Hand the memory of these pool pages back to the OS (k and v, every layer); they read as
    zeros afterwards. Only the OS pages wholly inside a run of pool pages go (a run's ends may
    share an OS page with a neighbour, which keeps its bytes: a page is always written before
    it is read, so what a released page holds never matters). Returns the bytes handed back;
    0 where the pool is not in this process's memory. Call it only while no step runs on it."""
    runs = _page_runs(pages)
    return _drop(cache.k, runs) + _drop(cache.v, runs)


def _drop(x: jax.Array, runs: list[tuple[int, int]]) -> int:
    base = host_buffer(x)
    if base is None or _LIBC is None or not runs:
        return 0
    n_layers, n_pages = int(x.shape[0]), int(x.shape[1])
    page_bytes = int(x.nbytes) // (n_layers * n_pages)
    dropped = 0
    for layer in range(n_layers):
        for a, b in runs:
            start = base + (layer * n_pages + a) * page_bytes
            end = base + (layer * n_pages + b) * page_bytes
            lo = -(-start // _OS_PAGE) * _OS_PAGE
            hi = end // _OS_PAGE * _OS_PAGE
            if hi > lo and _LIBC.madvise(lo, hi - lo, _MADV_DONTNEED) == 0:
                dropped += hi - lo
    return dropped


def resident_bytes(x: jax.Array) -> int | None:
    """How many bytes of x's memory are resident now (mincore), or None where x does not live
    in this process's memory."""
    base = host_buffer(x)
    if base is None or _LIBC is None:
        return None
    lo = base // _OS_PAGE * _OS_PAGE
    n = -(-(base + int(x.nbytes) - lo) // _OS_PAGE)
    vec = (ctypes.c_ubyte * n)()
    if _LIBC.mincore(lo, n * _OS_PAGE, vec) != 0:
        return None
    return sum(b & 1 for b in bytes(vec)) * _OS_PAGE


def reserved_pool(cfg: ModelConfig, n_pages: int, dtype: np.dtype | str) -> KVCache:
    """A zeroed pool of n_pages whose memory is handed back to the OS at once (k, then v, so
    that at most one array is resident at a time): a page becomes resident when written."""
    shape = (cfg.n_layers, n_pages, PAGE, cfg.n_kv_heads, cfg.head_dim)
    every = [(0, n_pages)]
    k = jnp.zeros(shape, dtype).block_until_ready()
    _drop(k, every)
    v = jnp.zeros(shape, dtype).block_until_ready()
    _drop(v, every)
    return KVCache(k, v)


def grow_pool(cache: KVCache, n_pages: int) -> KVCache:
    """A pool of n_pages (> the current count) holding the old pages at the same indices."""
    old = cache.n_pages
    assert n_pages > old, (n_pages, old)

    def grown(x: jax.Array) -> jax.Array:  # [L, P, PAGE, G, K] → [L, n_pages, PAGE, G, K]
        extra = jnp.zeros((x.shape[0], n_pages - old, *x.shape[2:]), x.dtype)
        return jnp.concatenate([x, extra], axis=1)

    return KVCache(grown(cache.k), grown(cache.v))


def shrink_pool(cache: KVCache, n_pages: int) -> KVCache:
    """A fresh zeroed pool of n_pages: only when no sequence holds a page (contents are dropped)."""
    shape = (cache.k.shape[0], n_pages, *cache.k.shape[2:])
    return KVCache(jnp.zeros(shape, cache.k.dtype), jnp.zeros(shape, cache.v.dtype))


# ================================================================ host-side page bookkeeping


class PageAllocator:
    """Page table and free list for S slots (+ the scratch slot S, whose row is all scratch).

    `n_pages` is the pool size the device pool must have; it doubles when the free list runs out
    (up to `max_pages`, enough for every slot at its longest) and returns to `initial_pages`
    when the last page comes back. reserved: the pool has `max_pages` = every slot at its
    longest + scratch from the start (no power of two needed) and never changes size.
    """

    def __init__(self, n_slots: int, table_width: int, *, initial_pages: int = INITIAL_PAGES,
                 page_size: int = PAGE, reserved: bool = False) -> None:
        if reserved:
            initial_pages = n_slots * table_width + 1
        elif initial_pages < 2 or initial_pages & (initial_pages - 1):
            raise InvalidRequestError(
                f"initial_pages={initial_pages}: the pool needs a power of two >= 2 pages "
                "(page 0 is scratch)", param="initial_pages")
        self.n_slots = n_slots
        self.page_size = page_size
        self.scratch_slot = n_slots
        self.table = np.full((n_slots + 1, table_width), SCRATCH_PAGE, np.int32)  # [S+1, W]
        self.held = [0] * (n_slots + 1)  # pages taken per slot (a prefix of its table row)
        self.initial_pages = initial_pages
        self.reserved = reserved
        self.max_pages = initial_pages if reserved else max(
            initial_pages, _next_pow2(n_slots * table_width + 1))
        self.n_pages = initial_pages
        self._free = list(range(1, initial_pages))  # a heap: the lowest free page goes first

    @property
    def pages_used(self) -> int:
        return sum(self.held)

    def _take(self) -> int:
        if not self._free:
            if self.n_pages >= self.max_pages:
                raise MemoryBudgetError(
                    f"the KV pool is full at {self.n_pages} pages of {self.page_size} positions "
                    f"and cannot grow past {self.max_pages}; end a sequence first")
            grown = self.n_pages * 2
            self._free = list(range(self.n_pages, grown))
            self.n_pages = grown
        return heapq.heappop(self._free)

    def reserve(self, slot: int, n_positions: int) -> None:
        """Take pages so that positions 0 .. n_positions-1 of `slot` each have one."""
        need = -(-n_positions // self.page_size)
        if not 0 <= slot < self.n_slots:
            raise InvalidRequestError(
                f"slot={slot}: the cache has slots 0..{self.n_slots - 1}", param="slot")
        if need > self.table.shape[1]:
            raise ContextLengthError(
                f"slot {slot} would hold {n_positions} positions, past the page table's "
                f"{self.table.shape[1] * self.page_size}; shorten the sequence",
                param="messages")
        while self.held[slot] < need:
            self.table[slot, self.held[slot]] = self._take()
            self.held[slot] += 1

    def locate(self, slots: np.ndarray, positions: np.ndarray,
               real: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where each new token's k/v goes, taking pages as needed.

        Args:
          slots: [B] int32 slot of each row (the scratch slot for padding rows).
          positions: [B, T] int32 absolute positions.
          real: [B, T] bool, False for padding (written to the scratch page).
        Returns: page_ids, offsets [B, T] int32.
        """
        for row, slot in enumerate(slots):
            if real[row].any():
                self.reserve(int(slot), int(positions[row][real[row]].max()) + 1)
        pages = np.where(real, positions // self.page_size, 0)
        page_ids = np.where(real, self.table[slots[:, None], pages], SCRATCH_PAGE)
        return page_ids.astype(np.int32), (positions % self.page_size).astype(np.int32)

    def table_rows(self, slots: np.ndarray, n_ctx: int) -> np.ndarray:
        """Pages of the first n_ctx positions of each row's slot: [B, n_ctx // PAGE] int32."""
        assert n_ctx % self.page_size == 0, (n_ctx, self.page_size)
        return self.table[slots, : n_ctx // self.page_size]

    def release(self, slot: int) -> None:
        """Hand the slot's pages back; when no slot holds any, the pool returns to its start."""
        if not 0 <= slot < self.n_slots:
            raise InvalidRequestError(
                f"slot={slot}: the cache has slots 0..{self.n_slots - 1}", param="slot")
        for page in self.table[slot, : self.held[slot]]:
            heapq.heappush(self._free, int(page))
        self.table[slot] = SCRATCH_PAGE
        self.held[slot] = 0
        if self.pages_used == 0 and self.n_pages != self.initial_pages:
            self.n_pages = self.initial_pages
            self._free = list(range(1, self.initial_pages))

    def free_pages(self) -> list[int]:
        """Pages no slot holds (scratch aside), in no particular order."""
        return list(self._free)

    def stats(self) -> dict[str, int]:
        return {"pages_total": self.n_pages, "pages_used": self.pages_used,
                "page_size": self.page_size}


def _next_pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p
