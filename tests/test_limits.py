"""One table of request limits (realm_nb/limits.py), and every layer keeps to it.

The faces (`SamplingParams`), the host (`abi.validate`) and the shipped guest (which reads the
packed float32/u32 header and must not trust its host) admit and refuse the same values at each
bound. The guest is driven with raw headers, written past the host's checks, so its own check is
what is tested.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from realm_nb import abi, guest_build, limits
from realm_nb.errors import InvalidRequestError
from realm_nb.limits import SAMPLING_LIMITS, Limit
from realm_nb.tenants import GuestError, Tenant
from realm_nb.types import SamplingParams

V = 64
# Where each sampling field sits in the guest's request header (abi.HEADER's documented layout).
HEADER_FIELDS = {"max_tokens": (16, "<I"), "top_k": (20, "<I"), "temperature": (32, "<f"),
                 "top_p": (36, "<f"), "min_p": (40, "<f"), "repeat_penalty": (44, "<f"),
                 "repeat_window": (48, "<I")}


class PeakHost:
    """A TenantHost whose forward returns logits with one clear peak (id 5); it ends a request
    after three tokens (max_tokens may be 2**32-1 here)."""

    def __init__(self) -> None:
        self.tokens: list[int] = []

    def forward(self, tokens: np.ndarray) -> np.ndarray:
        logits = np.linspace(-2.0, 0.0, V, dtype=np.float32)
        logits[5] = 4.0
        return logits

    def emit(self, token: int) -> int:
        self.tokens.append(token)
        return abi.EMIT_STOP if len(self.tokens) >= 3 else abi.EMIT_CONTINUE

    def load_layer(self, layer: int) -> None:
        pass

    def log(self, message: str) -> None:
        pass


@pytest.fixture(scope="module")
def tenant() -> Tenant:
    return Tenant("limits")


def f32_next(x: float, toward: float) -> float:
    return float(np.nextafter(np.float32(x), np.float32(toward)))


def edges(lim: Limit) -> tuple[list[Any], list[Any]]:
    """(admitted, refused) values at the limit's bounds, as the guest's float32 reads them."""
    if lim.integer:
        above = [int(lim.hi) + 1] if lim.hi < limits.U32_MAX else []
        return [int(lim.lo), int(lim.hi)], above
    inside: list[Any] = [lim.hi, f32_next(lim.hi, -math.inf)]
    outside: list[Any] = [f32_next(lim.hi, math.inf), math.nan, math.inf, -math.inf]
    if lim.lo_open:
        inside.append(f32_next(lim.lo, math.inf))  # the least float32 above it, a subnormal
        outside.append(lim.lo)
    else:
        inside.append(lim.lo)
        outside.append(f32_next(lim.lo, -math.inf))
    return inside, outside


VALID = abi.pack_request(vocab_size=V, prompt=(1, 2), max_tokens=3, temperature=0.5, seed=1)


def raw_request(name: str, value: Any) -> bytes:
    data = bytearray(VALID)
    offset, fmt = HEADER_FIELDS[name]
    struct.pack_into(fmt, data, offset, value)
    return bytes(data)


@pytest.fixture
def past_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tenant.run checks a request (abi.unpack_request) before the guest sees it; here the host
    reads the valid request instead, so that the edited bytes reach the guest's own check."""
    valid = abi.unpack_request(VALID)
    monkeypatch.setattr(abi, "unpack_request", lambda data: valid)


def test_every_sampling_field_is_in_the_table_and_the_header() -> None:
    fields = {f.name for f in SamplingParams.__dataclass_fields__.values()}
    assert set(SAMPLING_LIMITS) <= fields
    assert set(SAMPLING_LIMITS) == set(HEADER_FIELDS)
    request = abi.Request(vocab_size=V, prompt=(1,), max_tokens=1)
    assert all(hasattr(request, name) for name in SAMPLING_LIMITS)


def test_the_guests_copy_of_the_table_is_current() -> None:
    shipped = Path(guest_build.GUEST_SOURCE).parent / guest_build.LIMITS_NAME
    assert shipped.read_text() == limits.render_zig(), (
        "wasm/limits.zig is stale: run `python -m realm_nb.guest_build` and commit it")
    for lim in SAMPLING_LIMITS.values():  # each bound is written into the guest's check
        if not lim.integer:
            assert f"v {'>' if lim.lo_open else '>='} {float(lim.lo):.1f}" in shipped.read_text()


@pytest.mark.usefixtures("past_the_host")
@pytest.mark.parametrize("name", sorted(SAMPLING_LIMITS))
def test_the_guest_admits_and_refuses_what_the_table_says(tenant: Tenant, name: str) -> None:
    inside, outside = edges(SAMPLING_LIMITS[name])
    for value in inside:
        host = PeakHost()
        n = tenant.run(raw_request(name, value), host)
        assert n == len(host.tokens) and all(0 <= t < V for t in host.tokens), (name, value)
    for value in outside:
        with pytest.raises(GuestError) as err:
            tenant.run(raw_request(name, value), PeakHost())
        assert err.value.abi_code == abi.ErrorCode.BAD_REQUEST, (name, value)


@pytest.mark.usefixtures("past_the_host")
def test_the_guest_refuses_a_vocabulary_past_the_abis_bound(tenant: Tenant) -> None:
    data = bytearray(raw_request("temperature", 0.0))
    struct.pack_into("<I", data, 8, limits.MAX_VOCAB + 1)
    with pytest.raises(GuestError) as err:
        tenant.run(bytes(data), PeakHost())
    assert err.value.abi_code == abi.ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("name", sorted(SAMPLING_LIMITS))
def test_faces_and_host_admit_and_refuse_the_same_values(name: str) -> None:
    lim = SAMPLING_LIMITS[name]
    inside, outside = edges(lim)
    if not lim.integer:
        outside += [-1.0] if lim.lo == 0 else []
        outside.append(lim.hi * 2)
    else:
        outside += [-1, 1.5]
    def request(value: Any) -> abi.Request:
        fields: dict[str, Any] = {"max_tokens": 1, name: value}
        return abi.Request(vocab_size=V, prompt=(1,), **fields)

    for value in inside:
        SamplingParams(**{name: value})
        abi.validate(request(value))
    for value in outside:
        with pytest.raises(InvalidRequestError) as face:
            SamplingParams(**{name: value})
        assert face.value.details["param"] == name and lim.rule in face.value.message
        with pytest.raises(InvalidRequestError) as host:
            abi.validate(request(value))
        assert host.value.details["param"] == name
