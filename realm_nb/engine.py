"""The only jit boundaries: `prefill` (one sequence, a chunk of tokens) and `decode_step`
(one new token for each of B sequences at once), over a paged KV cache of S slots that the engine
owns and donates to every call so XLA updates it in place.

The engine keeps the page bookkeeping (kvcache.PageAllocator) host-side: before each call it
takes the pages the new positions need, grows the device pool when the allocator did, and passes
the pages to write (page_ids, offsets [B, T]) and to read (table_rows [B, t_ctx / PAGE]).
`release(slot)` hands a finished sequence's pages back: a `reserved` pool (kvcache.py; one CPU
device) keeps its shape and gives those pages' memory back to the OS, a `grow` pool shrinks to its
initial size at the last release.

Shapes are bucketed so jit compiles a few programs only: prompt chunks pad to PREFILL_BUCKETS,
decode batches pad to DECODE_BUCKETS (padding rows belong to a scratch slot whose table points at
the scratch page), attention reads the first t_ctx cached positions, t_ctx a power of two
(>= 128), and a `grow` pool holds a power of two of pages (each size a shape); a `reserved` pool
has one size, so a step compiles once per (rows, tokens, t_ctx, all_logits). `step_shapes` counts
the shapes an engine has run: what it keeps compiled.

On a mesh (mesh.py; `mesh=` None is the plain single-device path, unchanged) the engine places
the weights and the pool with placement.py and compiles the same forward with those shardings
as jit's in/out shardings, traced under `jax.set_mesh` so that the CPU kernel runs per shard;
the logits come back replicated.
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import nullcontext
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .config import ModelConfig
from .errors import ContextLengthError, InvalidRequestError
from .kvcache import (
    INITIAL_PAGES,
    PAGE,
    KVCache,
    PageAllocator,
    can_reserve,
    drop_pages,
    grow_pool,
    host_buffer,
    reserved_pool,
    resident_bytes,
    shrink_pool,
    trim_heap,
)
from .mesh import describe
from .model import forward
from .placement import cache_sharding, place_params, shardings_of
from .weights import ModelWeights

# Small buckets keep a short prompt short: a 5-token prompt padded to 16 took ~220 ms here, to 8
# ~110 ms (the kernel's work grows with the rows); 32 keeps a 17-token prompt (16 + BOS) off 64.
PREFILL_BUCKETS = (4, 8, 16, 32, 64, 128, 256)
# int8 dots of a single row take a slow path (32 ms for the head against 1.1 ms for 2 rows);
# the fast layout always has >= 2 rows, its activations being two int8 planes.
DECODE_BUCKETS = (1, 2, 4, 8, 16, 32)
MIN_CTX_BUCKET = 128
KV_POOLS = ("reserved", "grow")
# a reserved pool is zeroed once at load (one array, k or v, resident at a time): past this many
# bytes per array the engine grows its pool instead
RESERVE_MAX_BYTES = 2 << 30


def _forward_step(params: ModelWeights, cache: KVCache, tokens: jax.Array,
                  positions: jax.Array, page_ids: jax.Array, offsets: jax.Array,
                  table_rows: jax.Array, last_index: jax.Array, *, cfg: ModelConfig,
                  all_logits: bool) -> tuple[jax.Array, KVCache]:
    return forward(params, cache, tokens, positions, page_ids, offsets, table_rows, last_index,
                   cfg=cfg, all_logits=all_logits)


_STATIC = ("cfg", "all_logits")
_step = jax.jit(_forward_step, static_argnames=_STATIC, donate_argnames=("cache",))


def _sharded_step(mesh: Mesh, params: ModelWeights, cache: KVCache, cfg: ModelConfig) -> Any:
    """`_step` for placed weights and pool: their shardings in and out, the six index arrays
    replicated, the logits replicated (jit takes no keyword arguments beside in_shardings, so
    cfg is bound and all_logits is the static ninth argument)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    cache_in = shardings_of(cache)

    def step(*args: Any) -> tuple[jax.Array, KVCache]:
        return _forward_step(*args[:8], cfg=cfg, all_logits=args[8])

    jitted = jax.jit(step, static_argnums=(8,), donate_argnums=(1,),
                     in_shardings=(shardings_of(params), cache_in, *[replicated] * 6),
                     out_shardings=(replicated, cache_in))
    return lambda *args, cfg, all_logits: jitted(*args, all_logits)


def enable_compilation_cache() -> None:
    """Keep compiled steps on disk (`REALM_NB_CACHE`/xla), so a new process skips the compiles
    (about a second per shape here). REALM_NB_XLA_CACHE=0 turns it off; a cache dir the user
    configured for JAX is left alone."""
    configured = getattr(jax.config, "jax_compilation_cache_dir", None)
    if os.environ.get("REALM_NB_XLA_CACHE", "1") == "0" or configured:
        return
    from .paths import cache_dir

    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def _bucket(n: int, buckets: tuple[int, ...]) -> int:
    for b in buckets:
        if n <= b:
            return b
    return buckets[-1]


class Engine:
    """Runs one model's weights over its own paged KV cache. Thread-safe (calls are serialized).

    kv_dtype: storage dtype of the cache (kvcache.kv_dtype_for(layout): f32 for `exact`, f16 for
    `fast`). kv_pool: `reserved` or `grow` (kvcache.py); None: REALM_NB_KV_POOL, else reserved
    where the pool lives in this process (one CPU device, Linux) and is at most RESERVE_MAX_BYTES
    per array, grow otherwise. kv_initial_pages: a `grow` pool's size when idle (a power of two;
    page 0 is scratch). mesh: the devices to spread the weights and pool over (mesh.build_mesh);
    None: one device.
    """

    def __init__(self, cfg: ModelConfig, params: ModelWeights, *, n_slots: int = 8,
                 max_context: int = 2048, kv_dtype: np.dtype | str = "float32",
                 kv_initial_pages: int = INITIAL_PAGES, mesh: Mesh | None = None,
                 kv_pool: str | None = None) -> None:
        if n_slots < 1 or n_slots > DECODE_BUCKETS[-1]:
            raise InvalidRequestError(
                f"n_slots={n_slots}: must be in 1..{DECODE_BUCKETS[-1]}", param="n_slots")
        enable_compilation_cache()
        self.cfg = cfg
        self.params = params
        self.n_slots = n_slots
        self.scratch_slot = n_slots  # padding rows of a batch belong here
        self.max_context = min(max_context, cfg.context_length)
        self.t_max = self._ctx_bucket(self.max_context)  # the widest window attention reads
        width = self.t_max // PAGE
        self.kv_pool = self._pool_kind(kv_pool, cfg, n_slots * width + 1, np.dtype(kv_dtype),
                                       mesh)
        self.pages = PageAllocator(n_slots, width, initial_pages=kv_initial_pages,
                                   reserved=self.kv_pool == "reserved")
        if self.kv_pool == "reserved":
            self.cache = reserved_pool(cfg, self.pages.n_pages, np.dtype(kv_dtype))
            if not can_reserve(self.cache):  # the arrays are not in this process's memory
                raise InvalidRequestError(
                    "kv_pool='reserved' needs the KV pool in this process's memory (one CPU "
                    "device, Linux); use kv_pool='grow'", param="kv_pool")
            self._pool_at = self._pool_address()
        else:
            self.cache = KVCache.zeros(cfg, self.pages.n_pages, np.dtype(kv_dtype))
        self.step_shapes: set[tuple[int, int, int, int, bool]] = set()  # (P, B, T, t_ctx, all)
        self.pool_moves = 0  # steps after which a reserved pool was not where it had been
        self.mesh = mesh
        self._step: Any = _step
        if mesh is not None:
            # pools are powers of two >= INITIAL_PAGES, so a `data` size that divides this one
            # divides every later one: the cache's shardings are fixed for the engine's life
            self._cache_sharding = cache_sharding(self.cache, mesh)
            self.params = place_params(params, mesh)
            self.cache = self._placed(self.cache)
            self._step = _sharded_step(mesh, self.params, self.cache, cfg)
        self._lock = threading.Lock()
        self.steps = 0

    @staticmethod
    def _pool_kind(kind: str | None, cfg: ModelConfig, n_pages: int, dtype: np.dtype,
                   mesh: Mesh | None) -> str:
        kind = kind or os.environ.get("REALM_NB_KV_POOL") or None
        if kind is not None:
            if kind not in KV_POOLS:
                raise InvalidRequestError(
                    f"kv_pool={kind!r}: choose one of {KV_POOLS} (REALM_NB_KV_POOL too)",
                    param="kv_pool")
            if kind == "reserved" and mesh is not None:
                raise InvalidRequestError("kv_pool='reserved' runs on one device, not a mesh; "
                                          "use kv_pool='grow'", param="kv_pool")
            return kind
        array_bytes = cfg.n_layers * n_pages * PAGE * cfg.n_kv_heads * cfg.head_dim \
            * dtype.itemsize
        one_cpu = jax.default_backend() == "cpu" and len(jax.local_devices()) == 1
        if (mesh is None and one_cpu and sys.platform.startswith("linux")
                and array_bytes <= RESERVE_MAX_BYTES):
            return "reserved"
        return "grow"

    def _placed(self, cache: KVCache) -> KVCache:
        """The pool where the engine's mesh keeps it (as it is on one device)."""
        if self.mesh is None:
            return cache
        return jax.device_put(cache, self._cache_sharding)

    @property
    def mesh_spec(self) -> str:
        """`model=M,data=N` of the mesh the engine runs on (`model=1,data=1`: one device)."""
        return describe(self.mesh)

    @property
    def cache_bytes(self) -> int:
        """Bytes of the KV pool in memory now, following the sequences: a grow pool's size; a
        reserved pool's pages in use and scratch (`resident_bytes` measures what the OS holds:
        that, give or take an OS page at the ends of a run of pages)."""
        if self.kv_pool == "reserved":
            return (self.pages.pages_used + 1) * (self.cache.nbytes // self.cache.n_pages)
        return self.cache.nbytes

    @property
    def resident_bytes(self) -> int:
        """Bytes of the pool the OS holds in memory now (mincore), where the pool is in this
        process's memory; else `cache_bytes`."""
        measured = [resident_bytes(x) for x in (self.cache.k, self.cache.v)]
        if any(m is None for m in measured):
            return self.cache_bytes
        return sum(m or 0 for m in measured)

    def kv_stats(self) -> dict[str, int | str]:
        with self._lock:
            return {**self.pages.stats(), "bytes": self.cache_bytes,
                    "resident_bytes": self.resident_bytes, "dtype": str(self.cache.dtype),
                    "pool": self.kv_pool, "pool_bytes": self.cache.nbytes,
                    "step_shapes": len(self.step_shapes)}

    def release(self, slot: int) -> None:
        """The sequence in `slot` ended: its pages go back (a reserved pool hands their memory
        to the OS; in a grow pool the last one out shrinks the pool)."""
        with self._lock:
            held = self.pages.table[slot, : self.pages.held[slot]].tolist() \
                if 0 <= slot < self.n_slots else []
            self.pages.release(slot)
            if self.kv_pool == "reserved":
                # with its free neighbours, so that an OS page two pool pages share goes too
                free = set(self.pages.free_pages())
                drop_pages(self.cache, {q for p in held for q in (p - 1, p, p + 1)
                                        if q == p or q in free})
            elif self.pages.n_pages < self.cache.n_pages:
                self.cache = self._placed(shrink_pool(self.cache, self.pages.n_pages))

    @staticmethod
    def _ctx_bucket(n_positions: int) -> int:
        c = MIN_CTX_BUCKET
        while c < n_positions:
            c *= 2
        return c

    def check_room(self, start: int, n_new: int) -> None:
        if start + n_new > self.max_context:
            raise ContextLengthError(
                f"the sequence would reach {start + n_new} tokens, past this model's context "
                f"of {self.max_context} tokens; shorten the prompt or lower max_tokens",
                param="messages")

    def prefill(self, slot: int, tokens: list[int] | np.ndarray, start: int,
                all_logits: bool = False) -> np.ndarray:
        """Append tokens at positions start.. of `slot`, in chunks.

        Returns f32 [V] logits of the last token, or [n, V] for every token if all_logits.
        """
        ids = np.asarray(tokens, dtype=np.int32)
        n = len(ids)
        if n == 0:
            raise InvalidRequestError("prefill needs at least one token", param="prompt")
        self.check_room(start, n)
        outs = []
        chunk_max = PREFILL_BUCKETS[-1]
        for at in range(0, n, chunk_max):
            chunk = ids[at : at + chunk_max]
            m = len(chunk)
            t_b = _bucket(m, PREFILL_BUCKETS)
            pos0 = start + at
            padded = np.zeros((1, t_b), np.int32)
            padded[0, :m] = chunk
            positions = (pos0 + np.arange(t_b, dtype=np.int32))[None, :]
            real = (np.arange(t_b) < m)[None, :]
            logits = self._run(padded, positions, real, np.array([slot], np.int32),
                               np.array([m - 1], np.int32), self._ctx_bucket(pos0 + m),
                               all_logits)
            outs.append(logits[0, :m] if all_logits else logits[0])
        return np.concatenate(outs, axis=0) if all_logits else outs[-1]

    def decode_step(self, slots: list[int], tokens: list[int], positions: list[int]) -> np.ndarray:
        """One new token for each of B sequences: returns f32 [B, V]."""
        b = len(slots)
        if b == 0:
            return np.zeros((0, self.cfg.vocab_size), np.float32)
        for p in positions:
            self.check_room(p, 1)
        rows = _bucket(b, DECODE_BUCKETS)
        tok = np.zeros((rows, 1), np.int32)
        pos = np.zeros((rows, 1), np.int32)
        slot_ids = np.full((rows,), self.scratch_slot, np.int32)
        tok[:b, 0] = tokens
        pos[:b, 0] = positions
        slot_ids[:b] = slots
        real = (np.arange(rows) < b)[:, None]
        logits = self._run(tok, pos, real, slot_ids, np.zeros((rows,), np.int32),
                           self._ctx_bucket(max(positions) + 1), False)
        return logits[:b]

    def _run(self, tokens: np.ndarray, positions: np.ndarray, real: np.ndarray,
             slots: np.ndarray, last_index: np.ndarray, t_ctx: int,
             all_logits: bool) -> np.ndarray:
        """One jitted step. tokens, positions, real [B, T]; slots, last_index [B]."""
        with self._lock:
            page_ids, offsets = self.pages.locate(slots, positions, real)
            if self.pages.n_pages > self.cache.n_pages:
                self.cache = self._placed(grow_pool(self.cache, self.pages.n_pages))
            table_rows = self.pages.table_rows(slots, t_ctx)  # [B, t_ctx / PAGE]
            with jax.set_mesh(self.mesh) if self.mesh is not None else nullcontext():
                logits, self.cache = self._step(self.params, self.cache, tokens, positions,
                                                page_ids, offsets, table_rows, last_index,
                                                cfg=self.cfg, all_logits=all_logits)
            self.steps += 1
            shape = (self.cache.n_pages, *tokens.shape, t_ctx, all_logits)
            out = np.asarray(logits)
            if shape not in self.step_shapes:  # this call compiled (or loaded) a program
                self.step_shapes.add(shape)
                trim_heap()
            if self.kv_pool == "reserved" and self._pool_address() != self._pool_at:
                self._pool_moved()
            return out

    def _pool_moved(self) -> None:
        """XLA did not update the donated pool in place: the new arrays are resident in full.
        Hand back every page no sequence holds (and note it: it costs a copy of the pool)."""
        self.pool_moves += 1
        held = {int(p) for slot in range(self.n_slots)
                for p in self.pages.table[slot, : self.pages.held[slot]]}
        drop_pages(self.cache, [p for p in range(1, self.pages.n_pages) if p not in held])
        self._pool_at = self._pool_address()

    def _pool_address(self) -> tuple[int | None, int | None]:
        return host_buffer(self.cache.k), host_buffer(self.cache.v)

    # ------------------------------------------------------------------ host-side reference loop

    def greedy(self, prompt_ids: list[int], max_tokens: int, slot: int = 0,
               stop_ids: tuple[int, ...] = ()) -> list[int]:
        """Greedy generation with the loop on the host: the reference the guest must equal."""
        logits = self.prefill(slot, prompt_ids, 0)
        out: list[int] = []
        pos = len(prompt_ids)
        while len(out) < max_tokens:
            token = int(np.argmax(logits))
            out.append(token)
            if token in stop_ids or len(out) == max_tokens:
                break
            logits = self.decode_step([slot], [token], [pos])[0]
            pos += 1
        return out
