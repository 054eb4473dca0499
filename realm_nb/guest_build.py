"""Build the WebAssembly guest (wasm/guest.zig) into realm_nb/realm_guest.wasm with Zig.

Zig comes from the `ziglang` wheel (the `build` extra: ``pip install 'realm-nb[build]'``); the
built guest ships inside the package, so users never need it. The build runs in a temporary
directory and is byte-for-byte reproducible: ``python -m realm_nb.guest_build --check`` rebuilds
and exits 1 if the result differs from the committed artifact.

wasm/limits.zig, which the guest imports, is written from realm_nb/limits.py (the one table of
request limits the host checks too): the build writes it, `--check` fails when it is stale.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from . import abi, limits
from .errors import GuestBuildError

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
GUEST_SOURCE = REPO_DIR / "wasm" / "guest.zig"
GUEST_ARTIFACT = PACKAGE_DIR / "realm_guest.wasm"
LIMITS_NAME = "limits.zig"  # beside the guest source, which imports it
ZIG_VERSION = "0.17.1"


def zig_command() -> list[str]:
    """The command that runs the pinned Zig from the `ziglang` wheel."""
    if importlib.util.find_spec("ziglang") is None:
        raise GuestBuildError(
            f"building the guest needs Zig {ZIG_VERSION} from the ziglang wheel, which is not "
            "installed; pip install 'realm-nb[build]'"
        )
    return [sys.executable, "-m", "ziglang"]


def build_guest(out: Path | None = None, source: Path = GUEST_SOURCE) -> Path:
    """Compile `source` to wasm32-freestanding (ReleaseFast, stripped) at `out`; return `out`."""
    out = Path(out) if out is not None else GUEST_ARTIFACT
    if not source.is_file():
        raise GuestBuildError(
            f"guest source {source} not found; build from a checkout of realm-nb (the wasm/ "
            "folder is not part of the wheel)"
        )
    write_limits(source.parent / LIMITS_NAME)
    exports = [f"--export={name}" for name in abi.EXPORTS]
    with tempfile.TemporaryDirectory(prefix="realm-guest-") as tmp:
        built = Path(tmp) / "realm_guest.wasm"
        cmd = [
            *zig_command(),
            "build-exe",
            str(source),
            "-target", "wasm32-freestanding",
            "-mcpu", "generic+simd128",
            "-O", "ReleaseFast",
            "-fno-entry",
            "-fstrip",
            *exports,
            "--cache-dir", str(Path(tmp) / "cache"),
            f"-femit-bin={built}",
        ]
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not built.is_file():
            raise GuestBuildError(
                f"zig build-exe failed (exit {proc.returncode}) for {source}:\n{proc.stderr}"
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built, out)
    return out


def write_limits(path: Path) -> None:
    """Write the guest's copy of limits.py's table, unless it is already current."""
    text = limits.render_zig()
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def limits_current(path: Path) -> bool:
    return path.is_file() and path.read_text() == limits.render_zig()


def check_shipped(built: bytes, artifact: Path, rebuild: str) -> int:
    """Compare a fresh build with the shipped artifact (CI's reproducibility check): 0 when
    byte-identical, else 1 with what to run."""
    shipped = artifact.read_bytes() if artifact.is_file() else b""
    if built != shipped:
        print(f"{artifact} is stale ({len(shipped)} bytes shipped, {len(built)} built); run "
              f"`{rebuild}` and commit it", file=sys.stderr)
        return 1
    print(f"{artifact} is up to date ({len(built)} bytes)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m realm_nb.guest_build [--check]``."""
    parser = argparse.ArgumentParser(prog="realm-nb build-guest", description=__doc__)
    parser.add_argument(
        "--check", action="store_true",
        help="build into a temporary file and exit 1 if it differs from the committed guest",
    )
    parser.add_argument("--out", type=Path, default=None, help=f"output (default {GUEST_ARTIFACT})")
    args = parser.parse_args(argv)
    try:
        if args.check:
            if not limits_current(GUEST_SOURCE.parent / LIMITS_NAME):
                print(f"{GUEST_SOURCE.parent / LIMITS_NAME} does not match realm_nb/limits.py; "
                      "run `python -m realm_nb.guest_build` and commit both", file=sys.stderr)
                return 1
            with tempfile.TemporaryDirectory() as tmp:
                built = build_guest(Path(tmp) / "realm_guest.wasm").read_bytes()
            return check_shipped(built, GUEST_ARTIFACT, "python -m realm_nb.guest_build")
        path = build_guest(args.out)
    except GuestBuildError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    print(f"built {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
