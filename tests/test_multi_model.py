"""Several models at once: two tiny models resident and generating at the same time for two
tenants, each on its own scheduler; the store's budget evicts the least recently used idle model
and never one in use; listings show residency and size."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from tiny_gguf import write_tiny_llama

from realm_nb.errors import MemoryBudgetError
from realm_nb.kernel import RealmKernel
from realm_nb.store import LayerStore
from realm_nb.types import SamplingParams

pytestmark = pytest.mark.timeout(600)

GREEDY = SamplingParams(max_tokens=200, temperature=0)
PROMPT = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    d = tmp_path_factory.mktemp("multi")
    paths = [d / f"tiny-{name}.gguf" for name in ("a", "b", "c")]
    for seed, path in enumerate(paths):
        write_tiny_llama(path, seed=seed)
    return paths


@pytest.fixture(scope="module")
def model_bytes(tiny_models: list[Path]) -> int:
    """What one tiny model holds resident (weights and KV cache) in a 1-slot, 64-position store;
    the three have the same shapes and types."""
    store = LayerStore(n_slots=1, max_context=64)
    sizes = set()
    for path in tiny_models:
        entry = store.register(path)
        store.ensure_resident(entry)
        sizes.add(entry.resident_bytes)
    assert len(sizes) == 1
    return sizes.pop()


def test_two_models_generate_at_once_for_two_tenants(tiny_models: list[Path]) -> None:
    kernel = RealmKernel(n_slots=2, max_context=256)
    try:
        a, b = (kernel.model(str(p)) for p in tiny_models[:2])
        solo = {m.name: kernel.generate(tenant="solo", model=m.name, prompt=PROMPT,
                                        params=GREEDY).result().token_ids for m in (a, b)}
        assert solo[a.name] != solo[b.name]  # two different models

        # Each generation times itself from its start (perf_counter): first token at ttft_ms,
        # end at total_ms. Text pieces cannot tell: a tiny model's random bytes join into few.
        started, streams = {}, {}
        for tenant, m in (("alice", a), ("bob", b)):
            started[m.name] = time.perf_counter()  # at most this much before its own start
            streams[tenant] = kernel.generate(tenant=tenant, model=m.name, prompt=PROMPT,
                                              params=GREEDY)
        alice, bob = (streams[t].result(120) for t in ("alice", "bob"))
        assert alice.token_ids == solo[a.name] and alice.model == a.name
        assert bob.token_ids == solo[b.name] and bob.model == b.name
        assert len(alice.token_ids) == len(bob.token_ids) == GREEDY.max_tokens
        # the two decoded at the same time: each had its first token before the other ended
        spans = {g.model: (started[g.model] + g.timings["ttft_ms"] / 1e3,
                           started[g.model] + g.timings["total_ms"] / 1e3) for g in (alice, bob)}
        assert spans[a.name][0] < spans[b.name][1] and spans[b.name][0] < spans[a.name][1]

        stats = kernel.stats()
        assert set(stats["schedulers"]) == {a.id, b.id}  # one scheduler per model
        assert all(s["steps"] > 0 for s in stats["schedulers"].values())
        listed = {m.name: m for m in kernel.models()}
        for m in (a, b):  # both resident, each listed with what it holds and its file's size
            assert listed[m.name].loaded and listed[m.name].resident_bytes == m.resident_bytes > 0
            assert listed[m.name].size_bytes == m.path.stat().st_size
        assert kernel.store.resident_bytes() == a.resident_bytes + b.resident_bytes
    finally:
        kernel.shutdown()


def test_the_budget_evicts_the_least_recently_used_idle_model(tiny_models: list[Path],
                                                              model_bytes: int) -> None:
    store = LayerStore(budget_bytes=2 * model_bytes + model_bytes // 2, n_slots=1,
                       max_context=64)
    a, b, c = (store.register(p) for p in tiny_models)
    store.ensure_resident(a)
    store.ensure_resident(b)
    store.ensure_resident(a)  # a used again: b is now the least recently used
    store.ensure_resident(c)  # no room for three: b goes
    assert a.loaded and c.loaded and not b.loaded and b.resident_bytes == 0
    assert store.evictions == 1 and store.resident_bytes() == 2 * model_bytes
    listed = {m.name: m for m in store.list()}
    assert listed[b.name].resident_bytes == 0 and not listed[b.name].loaded
    assert listed[b.name].state == "on disk" and listed[a.name].state == "resident"


def test_a_model_in_use_is_never_evicted(tiny_models: list[Path], model_bytes: int) -> None:
    store = LayerStore(budget_bytes=2 * model_bytes + model_bytes // 2, n_slots=1,
                       max_context=64)
    a, b, c = (store.register(p) for p in tiny_models)
    store.ensure_resident(a)
    store.ensure_resident(b)
    a.in_use = 1  # a request runs on a (the kernel counts it so from the request's start)
    try:
        store.ensure_resident(c)  # a is the least recently used, but in use: b goes
        assert a.loaded and c.loaded and not b.loaded
        c.in_use = 1
        with pytest.raises(MemoryBudgetError, match="all in use"):
            store.ensure_resident(b)  # nothing idle to evict
        assert a.loaded and c.loaded and not b.loaded
    finally:
        a.in_use = c.in_use = 0
    store.ensure_resident(b)  # idle again: the least recently used of them (a) goes
    assert b.loaded and c.loaded and not a.loaded


def test_an_evicted_model_loses_its_scheduler_and_comes_back_the_same(
        tiny_models: list[Path], model_bytes: int) -> None:
    kernel = RealmKernel(n_slots=1, max_context=64, budget_bytes=model_bytes + model_bytes // 2)
    try:
        a, b = (kernel.model(str(p)) for p in tiny_models[:2])
        params = SamplingParams(max_tokens=8, temperature=0)
        first = kernel.generate(tenant="t", model=a.name, prompt=PROMPT, params=params).result()
        assert a.id in kernel.stats()["schedulers"]
        kernel.generate(tenant="u", model=b.name, prompt=PROMPT, params=params).result()
        # b's load evicted a, and a's scheduler went with it (its step thread held a's engine)
        assert not a.loaded and b.loaded and kernel.store.evictions == 1
        assert set(kernel.stats()["schedulers"]) == {b.id}
        again = kernel.generate(tenant="t", model=a.name, prompt=PROMPT, params=params).result()
        assert again.token_ids == first.token_ids and a.loaded and not b.loaded
    finally:
        kernel.shutdown()


def test_the_budget_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from realm_nb.errors import InvalidRequestError
    from realm_nb.kernel import _budget_from_env

    for text, want in (("6GiB", 6 * 2**30), ("512mib", 512 * 2**20), ("1000", 1000), ("", None)):
        monkeypatch.setenv("REALM_NB_MEMORY_BUDGET", text)
        assert _budget_from_env() == want
    monkeypatch.setenv("REALM_NB_MEMORY_BUDGET", "lots")
    with pytest.raises(InvalidRequestError, match="'lots' is not a size"):
        _budget_from_env()
