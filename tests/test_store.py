"""The Memory64 layer store on the real model file: lazy residency, budget, eviction, registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from realm_nb.errors import MemoryBudgetError, ModelNotFoundError
from realm_nb.store import LayerStore

pytestmark = pytest.mark.slow  # every test registers the real SmolLM2


def small_store(budget_bytes: int | None = None) -> LayerStore:
    """A store whose engines keep a small KV cache (1 slot, 128 positions)."""
    return LayerStore(budget_bytes=budget_bytes, n_slots=1, max_context=128)


@pytest.fixture(scope="module")
def sizes(smollm2_path: Path) -> dict[str, int]:
    """Resident bytes of the whole model in each layout (measured in a store without budget)."""
    store = small_store()
    out = {}
    for layout in ("exact", "fast"):
        entry = store.register(smollm2_path, layout=layout)
        store.ensure_resident(entry)
        out[layout] = entry.resident_bytes
        store.unload(entry.id)
    return out


def test_register_loads_no_weights(smollm2_path: Path) -> None:
    store = small_store()
    entry = store.register(smollm2_path)
    assert entry.resident_bytes == 0 and entry.n_resident_layers == 0
    assert not entry.loaded and store.resident_bytes() == 0
    assert entry.n_layers == 30


def test_load_layer_then_ensure_resident(smollm2_path: Path) -> None:
    store = small_store()
    entry = store.register(smollm2_path)
    size = store.load_layer(entry, 3)
    assert size > 0
    assert entry.n_resident_layers == 1 and entry.layers[3] is not None
    assert entry.resident_bytes == size == store.resident_bytes()
    assert store.load_layer(entry, 3) == 0  # already resident

    engine = store.ensure_resident(entry)
    assert entry.loaded and entry.n_resident_layers == entry.n_layers
    assert entry.resident_bytes > 30 * size * 0.9
    assert store.ensure_resident(entry) is engine
    stats = store.stats()["models"]
    assert stats[0]["resident_layers"] == 30 and stats[0]["resident_bytes"] == entry.resident_bytes


def test_budget_evicts_the_idle_model_and_refuses_when_in_use(
        smollm2_path: Path, sizes: dict[str, int]) -> None:
    budget = max(sizes.values()) + (1 << 20)
    assert budget < sum(sizes.values())
    store = small_store(budget)
    exact = store.register(smollm2_path, layout="exact")
    fast = store.register(smollm2_path, layout="fast")
    assert exact is not fast and exact.id != fast.id

    store.ensure_resident(exact)
    store.ensure_resident(fast)  # does not fit beside exact: exact (idle) goes
    assert fast.loaded and not exact.loaded and exact.resident_bytes == 0
    assert store.evictions == 1 and store.resident_bytes() <= budget

    fast.in_use = 1  # a request is running on it
    try:
        with pytest.raises(MemoryBudgetError, match="budget"):
            store.ensure_resident(exact)
        assert fast.loaded  # the model in use was kept
    finally:
        fast.in_use = 0
    assert store.resident_bytes() <= budget


def test_unload_removes_it_from_the_list(smollm2_path: Path) -> None:
    store = small_store()
    entry = store.register(smollm2_path, layout="exact")
    assert entry.id in {m.id for m in store.list()}
    store.load_layer(entry, 0)
    assert store.unload(entry.id) == [entry]
    assert entry.resident_bytes == 0
    assert entry.id not in {m.id for m in store.list()}
    assert store.entries() == []
    with pytest.raises(ModelNotFoundError):
        store.get(entry.id)


def test_unknown_name_names_the_loaded_models(smollm2_path: Path) -> None:
    store = small_store()
    store.register("smollm2-135m")
    with pytest.raises(ModelNotFoundError, match="no-such-model") as info:
        store.get("no-such-model")
    assert "smollm2-135m" in str(info.value)
    assert info.value.details.get("param") == "model"


def test_reregistering_returns_the_same_entry(smollm2_path: Path) -> None:
    store = small_store()
    a = store.register(smollm2_path)
    b = store.register(str(smollm2_path), name="my-smol")
    c = store.register("smollm2-135m")
    assert a is b and len(store.entries()) == 1
    assert "my-smol" in a.aliases and store.get("my-smol") is a
    assert c is a  # a catalogue name for the same file: same content-hash id
    assert [m.loaded for m in store.list() if m.id == a.id] == [False]  # listed once
    assert len(a.id) == 16 and all(ch in "0123456789abcdef" for ch in a.id)
