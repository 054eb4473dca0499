"""The request layout and its validation (realm_nb.abi)."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from realm_nb import abi
from realm_nb.errors import InvalidRequestError

GOOD: dict[str, Any] = dict(
    vocab_size=1000,
    prompt=[1, 2, 999],
    max_tokens=16,
    seed=2**64 - 1,
    temperature=0.75,
    top_k=40,
    top_p=0.5,
    min_p=0.25,
    repeat_penalty=1.125,
    repeat_window=32,
    eos_ids=[0, 2],
)


def test_pack_unpack_round_trip() -> None:
    data = abi.pack_request(**GOOD)
    assert len(data) == 64 + 4 * (3 + 2)
    assert data[:4] == b"RLMQ"
    assert struct.unpack_from("<I", data, 4)[0] == (1 << 16) | 0
    req = abi.unpack_request(data)
    assert req == abi.Request(
        vocab_size=1000, prompt=(1, 2, 999), max_tokens=16, seed=2**64 - 1, temperature=0.75,
        top_k=40, top_p=0.5, min_p=0.25, repeat_penalty=1.125, repeat_window=32, eos_ids=(0, 2),
    )
    assert abi.encode_request(req) == data


def test_header_offsets_match_the_documented_layout() -> None:
    data = abi.pack_request(**GOOD)
    assert struct.unpack_from("<IIII", data, 8) == (1000, 3, 16, 40)
    assert struct.unpack_from("<Q", data, 24)[0] == 2**64 - 1
    assert struct.unpack_from("<ffff", data, 32) == (0.75, 0.5, 0.25, 1.125)
    assert struct.unpack_from("<II", data, 48) == (32, 2)
    assert data[56:64] == bytes(8)
    assert struct.unpack_from("<5i", data, 64) == (1, 2, 999, 0, 2)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("vocab_size", 0),
        ("prompt", []),
        ("prompt", [1, 1000]),
        ("prompt", [-1]),
        ("eos_ids", [1000]),
        ("max_tokens", -1),
        ("top_k", 2**32),
        ("repeat_window", -3),
        ("seed", -1),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("min_p", -0.1),
        ("min_p", 2.0),
        ("repeat_penalty", 0.0),
        ("repeat_penalty", float("inf")),
    ],
)
def test_bad_field_is_named(field: str, value: object) -> None:
    with pytest.raises(InvalidRequestError) as info:
        abi.pack_request(**{**GOOD, field: value})
    assert repr(field) in info.value.message
    assert info.value.details["param"] == field


def test_unpack_rejects_bad_magic_length_and_reserved_bytes() -> None:
    data = abi.pack_request(**GOOD)
    cases = {
        "magic": b"XXXX" + data[4:],
        "length": data[:-4],
        "reserved": data[:56] + b"\x01" + data[57:],
    }
    for field, bad in cases.items():
        with pytest.raises(InvalidRequestError, match=repr(field)):
            abi.unpack_request(bad)
    with pytest.raises(InvalidRequestError, match="'length'"):
        abi.unpack_request(data[:10])


def test_unpack_rejects_another_major_version_but_accepts_a_newer_minor() -> None:
    data = bytearray(abi.pack_request(**GOOD))
    struct.pack_into("<I", data, 4, (2 << 16) | 0)
    with pytest.raises(InvalidRequestError, match=r"'abi_version' is '2\.0'.*1\.x"):
        abi.unpack_request(bytes(data))
    struct.pack_into("<I", data, 4, (1 << 16) | 7)
    assert abi.unpack_request(bytes(data)).abi_version == (1 << 16) | 7


def test_version_and_error_code_descriptions() -> None:
    assert abi.ABI_VERSION == 0x10000
    assert abi.version_string(abi.ABI_VERSION) == "1.0"
    codes = {c.name: int(c) for c in abi.ErrorCode}
    assert codes == {
        "BAD_POINTER": -1, "CONTEXT_FULL": -2, "CANCELLED": -3, "UNKNOWN_MODEL": -4,
        "BAD_REQUEST": -5, "HOST_ERROR": -6, "LAYER_ERROR": -7, "OUT_OF_MEMORY": -8,
    }
    assert set(abi.ERROR_MEANINGS) == set(abi.ErrorCode)
    assert abi.describe_code(-1).startswith("-1 (BAD_POINTER")
    assert "not an ABI error code" in abi.describe_code(-99)
