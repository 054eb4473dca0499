"""Mesh specs, the rules table's divisibility rule, the faces' `mesh` option, and (in a process
of 8 CPU devices of its own) the sharded forward against the single-device one."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from jax.sharding import PartitionSpec as P

from realm_nb import cli
from realm_nb.errors import InvalidRequestError
from realm_nb.mesh import (
    CACHE_AXES,
    DATA,
    MODEL,
    build_mesh,
    describe,
    parse_mesh_spec,
    partition_spec,
)

CASES = Path(__file__).resolve().parent / "mesh_cases.py"

# ================================================================ specs


@pytest.mark.parametrize(("spec", "sizes"), [
    ("model=2,data=1", {MODEL: 2, DATA: 1}),
    (" data = 4 ", {MODEL: 1, DATA: 4}),
    ("model=8", {MODEL: 8, DATA: 1}),
    ({"model": 2, "data": 2}, {MODEL: 2, DATA: 2}),
])
def test_parse_mesh_spec(spec: object, sizes: dict[str, int]) -> None:
    assert parse_mesh_spec(spec) == sizes  # type: ignore[arg-type]


@pytest.mark.parametrize(("spec", "says"), [
    ("tensor=2", "unknown axis 'tensor'"),
    ("model=two", "model='two' is not a whole number"),
    ("model=0", "model='0' is not a whole number"),
    ("model=-1", "model='-1' is not a whole number"),
    ("model=1.5", "model='1.5' is not a whole number"),
    ({"model": True}, "model=True is not a whole number"),
    ("model=2,model=2", "axis 'model' is given twice"),
    ("model2", "'model2' is not AXIS=SIZE"),
    ("", "give the axes' sizes"),
])
def test_bad_mesh_specs_say_what_is_wrong(spec: object, says: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        parse_mesh_spec(spec)  # type: ignore[arg-type]
    assert says in err.value.message
    assert err.value.details["param"] == "mesh"


def test_mesh_needs_exactly_the_devices_at_hand() -> None:
    n = len(jax.local_devices())
    with pytest.raises(InvalidRequestError, match=rf"= {2 * n} device\(s\), but {n} cpu"):
        build_mesh(f"model=2,data={n}")


def test_one_device_is_the_plain_path_by_default() -> None:
    if len(jax.local_devices()) != 1:
        pytest.skip("this process has several devices")
    assert build_mesh(None) is None
    assert describe(None) == "model=1,data=1"
    mesh = build_mesh("model=1,data=1")  # asked for: the sharded path on one device
    assert mesh is not None and describe(mesh) == "model=1,data=1"


# ================================================================ the rules table


def test_a_dimension_splits_only_in_whole_units() -> None:
    """SmolLM2's shapes: q rows 576 in 16-row tiles split over model 2 and 4 (mid-head), not 8
    (576 / 16 = 36 tiles); attn_output's input of 18 Q4_1 blocks (20 bytes each) over 2, not
    4; 3 kv heads in the cache never over model 2, its 16 pages over data 2."""
    tiles = ("layers", "tiles", "bytes")
    units = (1, 16, 1)
    for model, want in ((2, P(None, MODEL, None)), (4, P(None, MODEL, None)),
                        (8, P(None, None, None))):
        got = partition_spec(tiles, (30, 576, 6480), {MODEL: model, DATA: 1}, units)
        assert got == want, model
    wo = ("layers", "embed", "heads")
    assert partition_spec(wo, (30, 576, 360), {MODEL: 2}, (1, 1, 20)) == P(None, None, MODEL)
    assert partition_spec(wo, (30, 576, 360), {MODEL: 4}, (1, 1, 20)) == P(None, None, None)
    cache = partition_spec(CACHE_AXES, (30, 16, 64, 3, 64), {MODEL: 2, DATA: 2})
    assert cache == P(None, DATA, None, None, None)
    cache = partition_spec(CACHE_AXES, (30, 16, 64, 4, 64), {MODEL: 2, DATA: 2})
    assert cache == P(None, DATA, None, MODEL, None)


def test_a_mesh_axis_splits_one_dimension_at_most() -> None:
    spec = partition_spec(("heads", "ffn"), (8, 8), {MODEL: 2})
    assert spec == P(MODEL, None)


# ================================================================ faces


def test_server_mode_refuses_a_mesh() -> None:
    from realm_nb.sdk import Realm

    with pytest.raises(InvalidRequestError, match="realm-nb serve --mesh"):
        Realm(mode="server", endpoint="http://127.0.0.1:9", mesh="model=2,data=1")


def test_local_realm_refuses_a_mesh_of_more_devices_than_there_are() -> None:
    from realm_nb.sdk import Realm

    n = len(jax.local_devices())
    with pytest.raises(InvalidRequestError, match=rf"spans {n + 1} x 1 = {n + 1} device"):
        Realm(mode="local", mesh=f"model={n + 1}")


@pytest.mark.parametrize(("spec", "says"), [
    ("model=2,data=4", "spans 2 x 4 = 8 device(s)"),
    ("tensor=2", "unknown axis 'tensor'"),
    ("model=x", "model='x' is not a whole number"),
])
def test_serve_with_a_bad_mesh_fails_before_loading(spec: str, says: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--mesh", spec, "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "realm-nb: error:" in err and says in err


# ================================================================ 8 CPU devices


@pytest.mark.slow
def test_sharded_forward_on_eight_cpu_devices(smollm2_path: Path) -> None:
    """tests/mesh_cases.py in its own process (jax reads XLA_FLAGS at import): mesh shapes
    (1,1), (2,1), (4,1), (1,2), (2,2) give the single-device logits and greedy ids, each
    device holds its share of the weights, the SDK's local mode runs on a mesh."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
    env = {**os.environ, "XLA_FLAGS": flags.strip()}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)],
        env=env, capture_output=True, text=True, timeout=900, check=False,
        cwd=CASES.parents[1])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    summary = re.search(r"(\d+) passed", out)
    assert summary and int(summary.group(1)) == 14 and "skipped" not in out, out[-3000:]
