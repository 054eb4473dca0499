"""realm_nb.kvcache: pages taken as sequences grow and given back when they end; the pool follows.

The allocator is checked on its own (plain numpy); the paged forward on the tiny GGUF model
against a float64 numpy forward (test_model.reference_logits) and against its own recompute,
across a page boundary, across a pool growth, and with two sequences whose pages interleave.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import jax.numpy as jnp
import numpy as np
import pytest
from test_model import assert_close, reference_logits
from tiny_gguf import TinyModel, write_tiny_llama

from realm_nb.config import ModelConfig
from realm_nb.engine import Engine, _step
from realm_nb.errors import ContextLengthError, InvalidRequestError
from realm_nb.gguf_io import open_gguf
from realm_nb.kvcache import (
    PAGE,
    SCRATCH_PAGE,
    KVCache,
    PageAllocator,
    grow_pool,
    kv_dtype_for,
    shrink_pool,
)
from realm_nb.scheduler import Scheduler
from realm_nb.weights import ModelWeights, load_globals, load_layer, stack_layers, stack_types

# ================================================================ the allocator alone


def _locate(alloc: PageAllocator, slot: int, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    positions = (start + np.arange(n, dtype=np.int32))[None, :]
    return alloc.locate(np.array([slot], np.int32), positions, np.ones((1, n), bool))


def test_pages_are_taken_per_position() -> None:
    alloc = PageAllocator(n_slots=2, table_width=4, initial_pages=16)
    _locate(alloc, 0, 0, 1)
    assert alloc.held[0] == 1
    _locate(alloc, 0, 1, PAGE - 1)  # positions 1..PAGE-1: still the first page
    assert alloc.held[0] == 1
    page_ids, offsets = _locate(alloc, 0, PAGE, 1)  # position PAGE opens the second page
    assert alloc.held[0] == 2 and alloc.pages_used == 2
    assert page_ids[0, 0] == alloc.table[0, 1] and offsets[0, 0] == 0
    page_ids, offsets = _locate(alloc, 1, 0, PAGE + 3)  # another slot: pages of its own
    assert alloc.held[1] == 2
    assert set(alloc.table[1, :2]).isdisjoint(alloc.table[0, :2])
    np.testing.assert_array_equal(page_ids[0], alloc.table[1, np.arange(PAGE + 3) // PAGE])
    np.testing.assert_array_equal(offsets[0], np.arange(PAGE + 3) % PAGE)


def test_padding_and_untaken_entries_point_at_the_scratch_page() -> None:
    alloc = PageAllocator(n_slots=2, table_width=4, initial_pages=16)
    positions = np.arange(2 * PAGE, dtype=np.int32)[None, :]
    real = positions < 10  # a chunk of 10 real tokens padded to 2 pages' worth
    page_ids, _ = alloc.locate(np.array([0], np.int32), positions, real)
    assert alloc.held[0] == 1  # padding takes no page
    assert (page_ids[0, 10:] == SCRATCH_PAGE).all() and (page_ids[0, :10] != SCRATCH_PAGE).all()
    assert (alloc.table_rows(np.array([0, alloc.scratch_slot]), 4 * PAGE)[:, 1:]
            == SCRATCH_PAGE).all()


def test_scratch_page_is_never_handed_out() -> None:
    alloc = PageAllocator(n_slots=4, table_width=4, initial_pages=2)  # one usable page at first
    for slot in range(4):
        _locate(alloc, slot, 0, 4 * PAGE)  # every slot at its longest: the pool grows to fit
    taken = alloc.table[:4].ravel()
    assert SCRATCH_PAGE not in taken
    assert len(set(taken)) == 16 == alloc.pages_used
    assert alloc.n_pages == 32  # 2 → 4 → 8 → 16 → 32: doubled, a power of two each time


def test_release_hands_pages_back_for_reuse() -> None:
    alloc = PageAllocator(n_slots=2, table_width=4, initial_pages=16)
    _locate(alloc, 0, 0, 3 * PAGE)
    _locate(alloc, 1, 0, PAGE)
    first = set(alloc.table[0, :3])
    alloc.release(0)
    assert alloc.held[0] == 0 and alloc.pages_used == 1
    assert (alloc.table[0] == SCRATCH_PAGE).all()
    _locate(alloc, 0, 0, 2 * PAGE)  # the freed pages come back, lowest first
    assert set(alloc.table[0, :2]) <= first


def test_pool_doubles_when_the_free_list_runs_out_and_shrinks_when_idle() -> None:
    alloc = PageAllocator(n_slots=2, table_width=8, initial_pages=4)  # 3 usable pages
    _locate(alloc, 0, 0, 3 * PAGE)
    assert alloc.n_pages == 4
    _locate(alloc, 1, 0, 1)  # a 4th page: the pool doubles
    assert alloc.n_pages == 8 and alloc.pages_used == 4
    alloc.release(0)
    assert alloc.n_pages == 8  # slot 1 still holds a page: no shrink under a live sequence
    alloc.release(1)
    assert alloc.n_pages == 4 and alloc.pages_used == 0
    _locate(alloc, 0, 0, 3 * PAGE)  # after the shrink only pages of the small pool are handed out
    assert alloc.n_pages == 4 and max(alloc.table[0]) < 4


def test_positions_past_the_table_are_refused() -> None:
    alloc = PageAllocator(n_slots=1, table_width=2, initial_pages=4)
    with pytest.raises(ContextLengthError, match="page table"):
        _locate(alloc, 0, 0, 2 * PAGE + 1)
    with pytest.raises(InvalidRequestError, match="power of two"):
        PageAllocator(n_slots=1, table_width=2, initial_pages=6)


def test_grow_pool_keeps_the_old_pages_and_zeroes_the_new() -> None:
    rng = np.random.default_rng(0)
    k = rng.standard_normal((2, 4, PAGE, 2, 8)).astype(np.float16)  # [L, P, PAGE, G, K]
    v = rng.standard_normal((2, 4, PAGE, 2, 8)).astype(np.float16)
    grown = grow_pool(KVCache(jnp.asarray(k), jnp.asarray(v)), 8)
    assert grown.k.shape == (2, 8, PAGE, 2, 8) and grown.dtype == np.float16
    np.testing.assert_array_equal(np.asarray(grown.k)[:, :4], k)
    np.testing.assert_array_equal(np.asarray(grown.v)[:, :4], v)
    assert not np.asarray(grown.k)[:, 4:].any() and not np.asarray(grown.v)[:, 4:].any()
    small = shrink_pool(grown, 4)
    assert small.nbytes == grown.nbytes // 2 and not np.asarray(small.k).any()


# ================================================================ the paged forward on a tiny model


def tiny_engine(path: Path, layout: str = "exact", **kw: Any) -> Engine:
    f = open_gguf(path)
    cfg = ModelConfig.from_gguf(f)
    types = stack_types(f, cfg)
    layers = [load_layer(f, cfg, i, layout, types) for i in range(cfg.n_layers)]
    g = load_globals(f, cfg, layout)
    params = ModelWeights(embed=g["embed"], layers=stack_layers(layers), norm=g["norm"],
                          head=g["head"])
    sizes: dict[str, Any] = {"n_slots": 2, "max_context": 256, **kw}
    return Engine(cfg, params, kv_dtype=kv_dtype_for(layout), **sizes)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf", seed=1)


def _ids(model: TinyModel, n: int, seed: int) -> list[int]:
    return [int(i) for i in np.random.default_rng(seed).integers(0, model.vocab_size, n)]


def test_cached_decode_equals_recompute_across_a_page_boundary(tiny: TinyModel) -> None:
    engine = tiny_engine(tiny.path)
    ids = _ids(tiny, PAGE + 6, seed=3)
    start = PAGE - 4  # decode positions PAGE-4 .. PAGE+5 cross into the second page
    logits = engine.prefill(0, ids[:start], 0)
    ref = reference_logits(tiny, ids)
    for pos in range(start, len(ids)):
        assert_close(logits, ref[pos - 1])
        full = engine.prefill(1, ids[:pos], 0)  # no cache reuse
        assert_close(logits, full)
        logits = engine.decode_step([0], [ids[pos]], [pos])[0]
    assert engine.pages.held[0] == 2
    assert_close(logits, ref[-1])


def test_cached_decode_survives_a_pool_growth(tiny: TinyModel) -> None:
    engine = tiny_engine(tiny.path, kv_pool="grow", kv_initial_pages=4)  # 3 usable pages
    a, b = _ids(tiny, 2 * PAGE + 8, seed=4), _ids(tiny, PAGE + 8, seed=5)
    n0 = 2 * PAGE - 2
    la = engine.prefill(0, a[:n0], 0)  # 2 pages of a
    assert engine.kv_stats()["pages_total"] == 4
    engine.prefill(1, b, 0)  # 2 pages of b: the pool doubles while a's pages hold data
    stats = engine.kv_stats()
    assert stats["pages_total"] == 8 and stats["pages_used"] == 4
    assert stats["bytes"] == 2 * tiny_engine(tiny.path, kv_pool="grow",
                                             kv_initial_pages=4).cache_bytes
    ref = reference_logits(tiny, a)
    for pos in range(n0, len(a)):  # a's decode reads its pre-growth pages, then takes a 5th
        assert_close(la, ref[pos - 1])
        la = engine.decode_step([0], [a[pos]], [pos])[0]
    assert_close(la, ref[-1])
    assert engine.pages.held[0] == 3


def test_two_interleaved_sequences_equal_their_solo_runs(tiny: TinyModel) -> None:
    a, b = _ids(tiny, 150, seed=6), _ids(tiny, 140, seed=7)
    n_new = 6

    def solo(ids: list[int]) -> list[np.ndarray]:
        engine = tiny_engine(tiny.path)
        out = [engine.prefill(0, ids[:-n_new], 0)]
        for pos in range(len(ids) - n_new, len(ids)):
            out.append(engine.decode_step([0], [ids[pos]], [pos])[0])
        return out

    engine = tiny_engine(tiny.path)
    pair: list[tuple[np.ndarray, np.ndarray]] = []
    # prompts in alternating chunks, so the two sequences' pages interleave in the pool
    engine.prefill(0, a[:60], 0)
    engine.prefill(1, b[:70], 0)
    engine.prefill(0, a[60:100], 60)
    engine.prefill(1, b[70:120], 70)
    pair.append((engine.prefill(0, a[100:-n_new], 100), engine.prefill(1, b[120:-n_new], 120)))
    rows = engine.pages.table[:2, :3]
    assert sorted(rows.ravel()) == list(range(1, 7)) and rows[0, 1] > rows[1, 0]  # interleaved
    for i in range(n_new):
        pa, pb = len(a) - n_new + i, len(b) - n_new + i
        both = engine.decode_step([0, 1], [a[pa], b[pb]], [pa, pb])
        pair.append((both[0], both[1]))
    for (la, lb), sa, sb in zip(pair, solo(a), solo(b), strict=True):
        assert_close(la, sa)
        assert_close(lb, sb)
    assert not np.allclose(pair[-1][0], pair[-1][1], atol=1e-2)  # the sequences really differ


def test_pool_returns_to_its_initial_bytes_when_all_sequences_end(tiny: TinyModel) -> None:
    engine = tiny_engine(tiny.path, kv_pool="grow", kv_initial_pages=4)
    initial = engine.cache_bytes
    sched = Scheduler(lambda: engine, engine.n_slots, name="tiny")
    try:
        seqs = [sched.open("t1"), sched.open("t2")]
        for i, seq in enumerate(seqs):
            sched.forward(seq, np.asarray(_ids(tiny, 2 * PAGE, seed=8 + i), np.int32))
            sched.forward(seq, np.asarray([5], np.int32))
        assert engine.kv_stats()["pages_used"] == 6 and engine.cache_bytes == 2 * initial
        sched.close(seqs[0])
        assert engine.kv_stats()["pages_used"] == 3 and engine.cache_bytes == 2 * initial
        sched.close(seqs[1])
        stats = engine.kv_stats()
        assert 0 < int(stats.pop("resident_bytes")) <= initial + 8192  # measured: OS pages
        assert stats == {"pages_total": 4, "pages_used": 0, "page_size": PAGE, "bytes": initial,
                         "dtype": "float32", "pool": "grow", "pool_bytes": initial,
                         "step_shapes": 4}
        # and the engine still works from the small pool
        ids = _ids(tiny, 20, seed=10)
        seq = sched.open("t3")
        assert_close(sched.forward(seq, np.asarray(ids, np.int32)),
                     reference_logits(tiny, ids)[-1])
        sched.close(seq)
    finally:
        sched.stop()


def test_fast_layout_stores_f16_and_its_decode_equals_its_recompute(tiny: TinyModel) -> None:
    fast, exact = tiny_engine(tiny.path, "fast"), tiny_engine(tiny.path, "exact")
    assert fast.kv_stats()["dtype"] == "float16" and exact.kv_stats()["dtype"] == "float32"
    assert fast.cache.nbytes * 2 == exact.cache.nbytes
    ids = _ids(tiny, PAGE + 4, seed=12)
    logits = fast.prefill(0, ids[:PAGE - 2], 0)
    for pos in range(PAGE - 2, len(ids)):
        logits = fast.decode_step([0], [ids[pos]], [pos])[0]
    full = fast.prefill(1, ids, 0)
    # the same f16-rounded keys read back the same way; what differs is the fast layout's int8
    # rounding of activations, which a 1-row and a T-row matmul can do a little differently
    spread = float(np.std(full))
    np.testing.assert_allclose(logits, full, rtol=0, atol=2e-3 * spread)
    ref = exact.prefill(0, ids, 0)  # and f16 storage keeps it near the f32 reference
    assert float(np.max(np.abs(logits - ref))) < 0.3 * float(np.std(ref))


# ================================================================ the reserved pool


def _compiled() -> int:
    """Programs in the step's jit cache (one per shape it was called with)."""
    return int(cast(Any, _step)._cache_size())


def _fill(engine: Engine, tiny: TinyModel, slots: range, n: int) -> None:
    for slot in slots:
        engine.prefill(slot, _ids(tiny, n, seed=20 + slot), 0)


def test_a_reserved_pool_compiles_nothing_new_when_more_pages_are_held(tiny: TinyModel) -> None:
    """A compiled step keeps ~5 MiB for the life of the process (XLA:CPU). With a pool that
    doubled, the same short request compiled again at every pool size reached, and those
    programs stayed after the pool shrank (bench_soak.py: RSS after the run 1.10x its warm-up
    figure). A reserved pool has one shape: its programs depend on the batch shape only."""
    engine = tiny_engine(tiny.path, n_slots=5, max_context=512)  # 5 slots x 8 pages + scratch
    assert engine.kv_pool == "reserved" and engine.kv_stats()["pages_total"] == 41

    def short_request() -> None:
        ids = _ids(tiny, 20, seed=30)
        logits = engine.prefill(0, ids, 0)
        engine.decode_step([0], [int(np.argmax(logits))], [len(ids)])
        engine.release(0)

    short_request()
    shapes = set(engine.step_shapes)
    _fill(engine, tiny, range(1, 5), 4 * PAGE)  # 16 pages: past a grow pool's first 16 (+1)
    assert engine.kv_stats()["pages_used"] == 16
    compiled = _compiled()
    short_request()
    assert _compiled() == compiled  # the same request compiled nothing
    for slot in range(1, 5):
        engine.release(slot)
    short_request()
    assert _compiled() == compiled
    assert engine.step_shapes == shapes | {(41, 1, 256, 256, False)}  # + the fill's prefill
    assert engine.pool_moves == 0  # every step updated the pool in place


def test_a_reserved_pool_hands_released_pages_back_to_the_os(tiny: TinyModel) -> None:
    engine = tiny_engine(tiny.path, n_slots=5, max_context=512)
    page_bytes = engine.cache.nbytes // engine.pages.n_pages  # k and v, every layer
    idle = engine.resident_bytes  # measured (mincore): the pool's address space is not memory
    assert idle <= 4 * page_bytes < engine.cache.nbytes // 10
    assert engine.cache_bytes == page_bytes  # the scratch page
    _fill(engine, tiny, range(5), 4 * PAGE)
    held = engine.resident_bytes
    assert held - idle >= 0.9 * 20 * page_bytes and engine.cache_bytes == 21 * page_bytes
    for slot in (1, 3, 0, 4):  # out of order: the pages between runs go when both sides are free
        engine.release(slot)
    assert engine.resident_bytes - idle <= 0.3 * (held - idle)  # slot 2's 4 pages, + edges
    engine.release(2)
    assert engine.resident_bytes <= idle + 2 * page_bytes
    stats = engine.kv_stats()
    assert stats["bytes"] == page_bytes and stats["resident_bytes"] == engine.resident_bytes
    assert stats["pool"] == "reserved" and stats["pool_bytes"] == engine.cache.nbytes
    # released pages read as zeros (but for the OS pages they share with scratch page 0), and a
    # new sequence on them equals the reference
    assert not np.asarray(engine.cache.k)[:, 2:].any()
    ids = _ids(tiny, PAGE + 10, seed=31)
    assert_close(engine.prefill(3, ids, 0), reference_logits(tiny, ids)[-1])


def test_kv_pool_choice() -> None:
    with pytest.raises(InvalidRequestError, match="initial_pages"):
        PageAllocator(n_slots=1, table_width=2, initial_pages=3)  # grow pools: powers of two
    alloc = PageAllocator(n_slots=3, table_width=4, reserved=True)
    assert alloc.n_pages == alloc.max_pages == 13  # every slot at its longest + scratch
    for slot in range(3):
        _locate(alloc, slot, 0, 4 * PAGE)
    assert alloc.n_pages == 13 and alloc.pages_used == 12
