"""The guest builds reproducibly, and the committed realm_nb/realm_guest.wasm is that build."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from realm_nb import guest_build

needs_zig = pytest.mark.skipif(
    importlib.util.find_spec("ziglang") is None,
    reason="ziglang is not installed (pip install 'realm-nb[build]'); cannot rebuild the guest",
)


@needs_zig
def test_two_builds_are_identical_and_match_the_committed_guest(tmp_path: Path) -> None:
    first = guest_build.build_guest(tmp_path / "a.wasm").read_bytes()
    second = guest_build.build_guest(tmp_path / "b.wasm").read_bytes()
    assert first[:4] == b"\0asm"
    assert first == second
    assert first == guest_build.GUEST_ARTIFACT.read_bytes(), (
        "realm_nb/realm_guest.wasm is stale: run `python -m realm_nb.guest_build` and commit it"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wasm", "b.wasm"]  # no litter


@needs_zig
def test_check_mode_reports_a_stale_artifact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert guest_build.main(["--check"]) == 0
    stale = tmp_path / "realm_guest.wasm"
    stale.write_bytes(b"\0asm\1\0\0\0")
    monkeypatch.setattr(guest_build, "GUEST_ARTIFACT", stale)
    assert guest_build.main(["--check"]) == 1


def test_missing_source_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(guest_build.GuestBuildError, match=r"guest source .* not found"):
        guest_build.build_guest(tmp_path / "out.wasm", source=tmp_path / "nope.zig")
