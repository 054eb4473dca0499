"""The sharded forward on 8 CPU devices, against the single-device one (SmolLM2).

Not collected by a plain `pytest` run (the name has no test_ prefix): jax reads XLA_FLAGS once, at
import, so `tests/test_mesh.py::test_sharded_forward_on_eight_cpu_devices` runs this module in a
process of its own with XLA_FLAGS=--xla_force_host_platform_device_count=8, and fails with it.
Run it by hand the same way:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest -q tests/mesh_cases.py
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

from realm_nb.config import ModelConfig
from realm_nb.engine import Engine
from realm_nb.gguf_io import open_gguf
from realm_nb.kvcache import kv_dtype_for
from realm_nb.mesh import DATA, MODEL, build_mesh
from realm_nb.weights import (
    ModelWeights,
    load_globals,
    load_layer,
    stack_layers,
    stack_types,
)

N_DEVICES = 8
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(jax.device_count() != N_DEVICES,
                       reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8 "
                              "(tests/test_mesh.py runs this module so)"),
]

SHAPES = [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2)]  # (model, data)
PROMPTS = ([504, 3458, 282, 4649, 314], [1, 9690, 28, 1074, 253, 1944, 282, 32414, 30])
N_NEW = 8
# `fast` rounds every activation row to int8 at amax/127, so a last-bit change anywhere becomes a
# rounding step. XLA's program for several devices differs in the last bits from the one for one
# device even where every array is replicated (where it fuses, presumably): mesh
# model=1,data=2 with the pool unsplit gives the same
# 9.7e-3 on PROMPTS[0] (its own ops alone, the head, wq, wo, embedding rows, norm, softmax, agree
# to the bit; the first difference comes after 16 of the 30 layers and grows). Greedy ids agree;
# `exact` holds the 1e-4, `packed` (the CPU default) is bit for bit.
TOLERANCE = {"packed": 0.0, "exact": 1e-4, "fast": 2e-2}


@cache
def weights(path: str, layout: str) -> tuple[ModelConfig, ModelWeights]:
    """The model's weights on the default device, as the store builds them."""
    f = open_gguf(Path(path))
    cfg = ModelConfig.from_gguf(f)
    types = stack_types(f, cfg)
    layers = [load_layer(f, cfg, i, layout, types) for i in range(cfg.n_layers)]
    g = load_globals(f, cfg, layout)
    return cfg, ModelWeights(embed=g["embed"], layers=stack_layers(layers), norm=g["norm"],
                             head=g["head"])


def engine(path: str, layout: str, shape: tuple[int, int] | None) -> Engine:
    cfg, params = weights(path, layout)
    mesh = None
    if shape is not None:
        model, data = shape
        mesh = build_mesh({MODEL: model, DATA: data}, devices=jax.devices()[: model * data])
    return Engine(cfg, params, n_slots=2, max_context=256, kv_dtype=kv_dtype_for(layout),
                  mesh=mesh)


@cache
def run(path: str, layout: str, shape: tuple[int, int] | None) -> dict[str, Any]:
    """Logits of both prompts' prefills (two slots at once), of one decode step over both
    slots, and each prompt's greedy ids."""
    e = engine(path, layout, shape)
    prefill = [e.prefill(slot, p, 0) for slot, p in enumerate(PROMPTS)]
    nxt = [int(np.argmax(x)) for x in prefill]
    decode = e.decode_step([0, 1], nxt, [len(p) for p in PROMPTS])
    for slot in (0, 1):
        e.release(slot)
    greedy = [e.greedy(p, N_NEW) for p in PROMPTS]
    e.release(0)
    return {"logits": np.stack([*prefill, *decode]), "greedy": greedy, "engine": e}


def check_agrees(path: str, layout: str, shape: tuple[int, int]) -> None:
    ref, got = run(path, layout, None), run(path, layout, shape)
    assert ref["engine"].mesh is None and got["engine"].mesh is not None
    diff = float(np.max(np.abs(got["logits"] - ref["logits"])))
    assert diff <= TOLERANCE[layout], f"{layout} on {shape}: logits differ by {diff}"
    assert got["greedy"] == ref["greedy"]


def shard_bytes(x: jax.Array) -> tuple[dict[int, int], int]:
    """Bytes per device, and the bytes of the distinct shards (each index once)."""
    per_device: dict[int, int] = {}
    distinct: dict[str, int] = {}
    for s in x.addressable_shards:
        per_device[s.device.id] = per_device.get(s.device.id, 0) + s.data.nbytes
        distinct[repr(s.index)] = s.data.nbytes
    return per_device, sum(distinct.values())


@pytest.mark.parametrize("shape", SHAPES, ids=[f"model{m}-data{d}" for m, d in SHAPES])
def test_packed_logits_and_greedy_equal_one_device(smollm2_path: Path,
                                                   shape: tuple[int, int]) -> None:
    check_agrees(str(smollm2_path), "packed", shape)


@pytest.mark.parametrize("layout", ["exact", "fast"])
def test_xla_layouts_agree_with_one_device(smollm2_path: Path, layout: str) -> None:
    check_agrees(str(smollm2_path), layout, (2, 2))


@pytest.mark.parametrize("shape", SHAPES, ids=[f"model{m}-data{d}" for m, d in SHAPES])
def test_each_device_holds_its_share_of_the_weights(smollm2_path: Path,
                                                    shape: tuple[int, int]) -> None:
    model, data = shape
    e = run(str(smollm2_path), "packed", shape)["engine"]
    leaves = list({id(x): x for x in jax.tree_util.tree_leaves(e.params)}.values())
    total = sum(x.nbytes for x in leaves)
    norms = sum(x.nbytes for x in (e.params.norm, e.params.layers.attn_norm,
                                   e.params.layers.ffn_norm))
    per_device: dict[int, int] = {}
    replicated = 0
    for x in leaves:
        devices, distinct = shard_bytes(x)
        assert distinct == x.nbytes, "the distinct shards make up the array exactly"
        assert len(devices) == model * data
        for d, n in devices.items():
            per_device[d] = per_device.get(d, 0) + n
        if x.sharding.is_fully_replicated:
            replicated += x.nbytes
    if model > 1:
        assert replicated == norms, "only the norms stay whole: every matrix is split"
    for d, n in per_device.items():
        assert n <= total / model + replicated, (d, n, total, model)
    assert sum(per_device.values()) == data * (total - replicated) + model * data * replicated
    # the KV pool: pages over `data`; SmolLM2's 3 kv heads stay whole over `model`
    for pool in (e.cache.k, e.cache.v):
        devices, distinct = shard_bytes(pool)
        assert distinct == pool.nbytes
        assert set(devices.values()) == {pool.nbytes // data}
        assert tuple(pool.sharding.spec)[3:] in ((), (None,), (None, None))


def test_default_mesh_is_every_local_device() -> None:
    from realm_nb.store import LayerStore

    store = LayerStore()
    assert store.stats()["mesh"] == f"model={N_DEVICES},data=1"


def test_local_realm_generates_the_same_text_on_a_mesh(smollm2_path: Path) -> None:
    """The SDK's local mode on model=4,data=2: the guest's greedy ids equal the single-device
    engine's."""
    from realm_nb.kernel import RealmKernel
    from realm_nb.sdk import Realm

    realm = Realm(mode="local", mesh="model=4,data=2", weights="packed")
    gen = realm.generate(PROMPTS[0], max_tokens=N_NEW, temperature=0.0)
    assert RealmKernel.shared().store.stats()["mesh"] == "model=4,data=2"
    assert gen.token_ids == run(str(smollm2_path), "packed", None)["greedy"][0]
