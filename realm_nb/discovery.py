"""Models already on disk: GGUF files other tools keep, listed under readable names, never copied.

Where we look (source), and the name each file gets:

- `models-dir`: each folder of `REALM_NB_MODELS_DIR` (os.pathsep-separated), recursively; named
  by the path below the folder without `.gguf` (`local:` before it where a catalogue name is the
  same).
- `hf-cache`: the Hugging Face cache (`HF_HUB_CACHE`, `HF_HOME/hub`), the current snapshot of
  each model repository; named `hf://OWNER/REPO/FILE.gguf`, the form `realm-nb pull` takes.
- `ollama`: `OLLAMA_MODELS`, `~/.ollama/models`, `/usr/share/ollama/.ollama/models`; each
  manifest's layer of media type `application/vnd.ollama.image.model` names the blob; named
  `ollama:MODEL:TAG` (`ollama:NAMESPACE/MODEL:TAG` outside the library).
- `lm-studio`: `~/.lmstudio/models`, `~/.cache/lm-studio/models` (PUBLISHER/REPO/FILE.gguf);
  named `lmstudio:PUBLISHER/REPO/FILE`.

Only single-file language-model GGUFs are listed (no vision projectors, no split parts), and
only files that start with the GGUF magic. `resolve` turns any name a face accepts (catalogue
name, path, Hub reference, found name) into a file.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import catalogue, hub
from .errors import ModelNotFoundError

OLLAMA_MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"
_OLLAMA_LIBRARY = ("registry.ollama.ai", "library")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class FoundModel:
    """One GGUF file found on disk."""

    name: str
    path: Path
    source: str  # "models-dir" | "hf-cache" | "ollama" | "lm-studio"
    size_bytes: int
    sha256: str | None = None  # where the store names the file by its hash


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def known_sha256(path: Path) -> str | None:
    """The sha256 a content-addressed store names `path` by (HF blobs/<sha256>, Ollama
    blobs/sha256-<hex>), so that listing and registering need not hash gigabytes."""
    real = path.resolve()
    if real.parent.name != "blobs":
        return None
    name = real.name.removeprefix("sha256-")
    return name if _HEX64.match(name) else None


# ---------------------------------------------------------------------------- the sources


def models_dir_models() -> Iterator[FoundModel]:
    taken = {e.name for e in catalogue.CATALOGUE} | {a for e in catalogue.CATALOGUE
                                                     for a in e.aliases}
    for root in filter(None, os.environ.get("REALM_NB_MODELS_DIR", "").split(os.pathsep)):
        base = Path(os.path.expanduser(root))
        for path in sorted(base.rglob("*.gguf")) if base.is_dir() else ():
            if not hub.is_model_file(path.name) or not _is_gguf(path):
                continue
            name = path.relative_to(base).with_suffix("").as_posix()
            yield FoundModel(f"local:{name}" if name.lower() in taken else name, path,
                             "models-dir", path.stat().st_size)


def hf_cache_models() -> Iterator[FoundModel]:
    cache = hub.hf_cache_dir()
    for storage in sorted(cache.glob("models--*--*")) if cache.is_dir() else ():
        repo = "/".join(storage.name.split("--")[1:])
        snapshot = hub.current_snapshot(cache, repo)
        if snapshot is None:
            continue
        for path in sorted(snapshot.rglob("*.gguf")):
            if not hub.is_model_file(path.name) or not path.is_file() or not _is_gguf(path):
                continue
            rel = path.relative_to(snapshot).as_posix()
            yield FoundModel(f"hf://{repo}/{rel}", path, "hf-cache", path.stat().st_size,
                             known_sha256(path))


def ollama_roots() -> list[Path]:
    roots = [os.environ.get("OLLAMA_MODELS"), "~/.ollama/models",
             "/usr/share/ollama/.ollama/models"]
    return [Path(os.path.expanduser(r)) for r in roots if r]


def ollama_models() -> Iterator[FoundModel]:
    seen: set[Path] = set()
    for root in ollama_roots():
        manifests = root / "manifests"
        if not manifests.is_dir() or root.resolve() in seen:
            continue
        seen.add(root.resolve())
        for manifest in sorted(p for p in manifests.rglob("*") if p.is_file()):
            parts = manifest.relative_to(manifests).parts  # registry, namespace, model, tag
            if len(parts) != 4:
                continue
            try:
                layers = json.loads(manifest.read_text()).get("layers") or []
            except (OSError, ValueError, AttributeError):
                continue  # not a manifest we can read: skip it, list the others
            digest = next((str(x.get("digest", "")) for x in layers if isinstance(x, dict)
                           and x.get("mediaType") == OLLAMA_MODEL_MEDIA_TYPE), "")
            blob = root / "blobs" / digest.replace(":", "-")
            if not digest.startswith("sha256:") or not blob.is_file() or not _is_gguf(blob):
                continue
            registry, namespace, model, tag = parts
            prefix = ("" if (registry, namespace) == _OLLAMA_LIBRARY else
                      f"{namespace}/" if registry == _OLLAMA_LIBRARY[0] else
                      f"{registry}/{namespace}/")
            yield FoundModel(f"ollama:{prefix}{model}:{tag}", blob, "ollama",
                             blob.stat().st_size, known_sha256(blob))


def lm_studio_roots() -> list[Path]:
    return [Path(os.path.expanduser(r)) for r in ("~/.lmstudio/models",
                                                   "~/.cache/lm-studio/models")]


def lm_studio_models() -> Iterator[FoundModel]:
    for root in lm_studio_roots():
        for path in sorted(root.rglob("*.gguf")) if root.is_dir() else ():
            if not hub.is_model_file(path.name) or not _is_gguf(path):
                continue
            name = path.relative_to(root).with_suffix("").as_posix()
            yield FoundModel(f"lmstudio:{name}", path, "lm-studio", path.stat().st_size)


def found_models() -> list[FoundModel]:
    """Every GGUF found on disk, once each (a file two sources reach is listed by the first)."""
    out: list[FoundModel] = []
    seen_paths: set[Path] = set()
    seen_names: set[str] = set()
    for source in (models_dir_models, hf_cache_models, ollama_models, lm_studio_models):
        try:
            found = list(source())
        except OSError:  # a folder we may not read: the other sources still count
            continue
        for m in found:
            real = m.path.resolve()
            if real in seen_paths or m.name in seen_names:
                continue
            seen_paths.add(real)
            seen_names.add(m.name)
            out.append(m)
    return out


def find_by_name(name: str) -> FoundModel | None:
    """The found model called `name` exactly (what a server accepts: never a path)."""
    return next((m for m in found_models() if m.name == name.strip()), None)


def find(name: str) -> FoundModel | None:
    """The found model called `name` (case-insensitive), or the one at path `name`."""
    key = name.strip()
    models = found_models()
    hit = next((m for m in models if m.name == key), None) or next(
        (m for m in models if m.name.lower() == key.lower()), None)
    if hit is None and os.path.isfile(os.path.expanduser(key)):
        real = Path(os.path.expanduser(key)).resolve()
        hit = next((m for m in models if m.path.resolve() == real), None)
    return hit


# ---------------------------------------------------------------------------- resolving


def resolve(source: str, *, pull_missing: bool = True) -> Path:
    """Catalogue name (pulled on demand), .gguf path, Hub reference (from the HF cache, else
    pulled) or a found model's name → an existing file."""
    text = source.strip()
    if catalogue.find_entry(text) is not None or os.path.isfile(os.path.expanduser(text)):
        return catalogue.resolve_model_path(text, pull_missing=pull_missing)
    ref = hub.parse_ref(text)
    if ref is not None:
        cached = hub.cached_file(ref)
        if cached is not None:
            return cached
        if not pull_missing:
            raise ModelNotFoundError(f"{ref} is not in the Hugging Face cache yet; run "
                                     f"`realm-nb pull {ref}`", param="model")
        return hub.pull(ref)
    found = find(text)
    if found is not None:
        return found.path
    known = ", ".join(e.name for e in catalogue.CATALOGUE)
    on_disk = [m.name for m in found_models()]
    shown = ", ".join(on_disk[:12]) + (f" and {len(on_disk) - 12} more" if len(on_disk) > 12
                                       else "")
    raise ModelNotFoundError(
        f"model {source!r} is neither a catalogue name ({known}), a .gguf file, a Hub reference "
        f"(hf://OWNER/REPO/FILE.gguf, OWNER/REPO:QUANT) nor a model found on disk "
        f"({shown or 'none found'}); `realm-nb models` lists them all", param="model")
