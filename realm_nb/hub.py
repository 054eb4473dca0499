"""Pulling GGUF files from the Hugging Face Hub into the Hugging Face cache.

Two ways to name a file: `hf://OWNER/REPO/FILE.gguf`, or `OWNER/REPO:QUANT` (`hf://` optional),
which picks the one GGUF of the repository whose quant tag is QUANT (Q4_K_M, Q8_0, ...).

Everything that speaks to the Hub is `huggingface_hub`'s own code: the repository's file list
with each file's sha256 (`HfApi.model_info(files_metadata=True)`), the file's metadata (HEAD on
its resolve URL), the transfer (`http_get`, with its progress bar and its retries from where a
broken connection stopped), and the cache layout (`hf_hub_download` links our finished blob into
`snapshots/<commit>/`). What we add, because `huggingface_hub` 1.x+ starts every download afresh
in a file of its own and checks no hash:

- the partial download is kept as `blobs/<etag>.realm-partial`, so a pull that was interrupted
  (Ctrl-C, a dead connection after the library's own retries) goes on from where it stopped;
- the finished file's sha256 is compared with the Hub's (its LFS metadata) before it enters the
  cache; a mismatch deletes the partial file and raises `PullError`.

The endpoint is `HF_ENDPOINT` and the cache `HF_HUB_CACHE` / `HF_HOME`, read at each call (so a
test or a notebook may set them after import). Downloads go over plain HTTP even where the Hub
offers Xet storage: one path, resumable, and the one the tests here run.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .errors import PullError

PARTIAL_SUFFIX = ".realm-partial"

# A quant tag in a GGUF file name: Q4_K_M, Q8_0, IQ4_XS, Q4_0_4_4, F16, BF16, ...
_QUANT = re.compile(r"(?<![A-Za-z0-9])(I?Q\d+(?:_[A-Z0-9]+)*|BF16|F16|F32|MXFP4)(?![A-Za-z0-9])",
                    re.IGNORECASE)
_SPLIT = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.IGNORECASE)
_REPO_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_FILE_REF = re.compile(rf"^hf://({_REPO_PART})/({_REPO_PART})/(.+\.gguf)$", re.IGNORECASE)
_QUANT_REF = re.compile(rf"^(?:hf://)?({_REPO_PART})/({_REPO_PART}):([A-Za-z0-9_]+)$")


@dataclass(frozen=True)
class HubRef:
    """A GGUF file on the Hub: a repository and either a file path in it or a quant tag."""

    repo: str  # OWNER/REPO
    filename: str | None = None
    quant: str | None = None

    def __str__(self) -> str:
        return f"hf://{self.repo}/{self.filename}" if self.filename else f"{self.repo}:{self.quant}"


def parse_ref(source: str) -> HubRef | None:
    """`hf://OWNER/REPO/FILE.gguf` or `[hf://]OWNER/REPO:QUANT` → HubRef; anything else → None.
    A string that starts with hf:// but fits neither form is an error that shows both."""
    text = source.strip()
    if m := _FILE_REF.match(text):
        return HubRef(repo=f"{m[1]}/{m[2]}", filename=m[3])
    if m := _QUANT_REF.match(text):
        return HubRef(repo=f"{m[1]}/{m[2]}", quant=m[3].upper())
    if text.lower().startswith("hf://"):
        raise PullError(f"{source!r} is not a Hub reference realm-nb reads; write "
                        "hf://OWNER/REPO/FILE.gguf or OWNER/REPO:QUANT (e.g. "
                        "bartowski/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M)", param="model")
    return None


def quant_of(filename: str) -> str | None:
    """The quant tag a GGUF file name carries (the last one), upper-case; None if none."""
    found = _QUANT.findall(Path(filename).name)
    return found[-1].upper() if found else None


def is_model_file(filename: str) -> bool:
    """A GGUF that holds a language model in one file: not a vision projector, not a split part
    (realm-nb reads single-file GGUFs)."""
    name = Path(filename).name.lower()
    return name.endswith(".gguf") and not name.startswith("mmproj") and not _SPLIT.search(name)


def hub_endpoint() -> str:
    """HF_ENDPOINT as it is now (tests point it at a loopback Hub), else huggingface_hub's own
    default (read from the library, so that no address is spelled here)."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, as huggingface_hub finds it (HF_HUB_CACHE, HF_HOME/hub,
    $XDG_CACHE_HOME/huggingface/hub), read now rather than at import."""
    if explicit := os.environ.get("HF_HUB_CACHE"):
        return Path(os.path.expanduser(explicit))
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return Path(os.path.expanduser(home)) / "hub"


# ---------------------------------------------------------------------------- picking a file


def pick_file(ref: HubRef, files: list[str]) -> str:
    """The file `ref` names among the repository's `files`, or a PullError naming what exists."""
    ggufs = [f for f in files if f.lower().endswith(".gguf")]
    if ref.filename is not None:
        if ref.filename in files:
            return ref.filename
        raise PullError(f"{ref.repo} has no file {ref.filename!r}; its GGUF files: "
                        f"{', '.join(ggufs) or 'none'}", param="model")
    matches = [f for f in ggufs if quant_of(f) == ref.quant and not Path(f).name.lower()
               .startswith("mmproj")]
    whole = [f for f in matches if is_model_file(f)]
    if len(whole) == 1:
        return whole[0]
    if len(whole) > 1:
        raise PullError(f"{ref.repo} has {len(whole)} {ref.quant} files ({', '.join(whole)}); "
                        f"name one as hf://{ref.repo}/FILE", param="model")
    if matches:
        raise PullError(f"{ref.repo}'s {ref.quant} model is split into parts ({matches[0]}, ...); "
                        "realm-nb reads single-file GGUFs: pick another quant or merge the parts "
                        "with llama.cpp's gguf-split --merge", param="model")
    quants = sorted({q for f in ggufs if is_model_file(f) and (q := quant_of(f))})
    raise PullError(f"{ref.repo} has no {ref.quant} GGUF; quants there: "
                    f"{', '.join(quants) or 'none (no single-file GGUF at all)'}", param="model")


# ---------------------------------------------------------------------------- the cache


def cached_file(ref: HubRef) -> Path | None:
    """The file `ref` names if it is in the HF cache already (no network), else None."""
    from huggingface_hub import try_to_load_from_cache

    cache = hf_cache_dir()
    if ref.filename is not None:
        hit = try_to_load_from_cache(ref.repo, ref.filename, cache_dir=cache)
        return Path(hit) if isinstance(hit, str) else None
    snapshot = current_snapshot(cache, ref.repo)
    if snapshot is None:
        return None
    files = [str(p.relative_to(snapshot)) for p in snapshot.rglob("*.gguf")]
    try:
        return snapshot / pick_file(ref, files)
    except PullError:
        return None


def current_snapshot(cache: Path, repo: str) -> Path | None:
    from huggingface_hub.file_download import repo_folder_name

    storage = cache / repo_folder_name(repo_id=repo, repo_type="model")
    ref = storage / "refs" / "main"
    if ref.is_file():
        snap = storage / "snapshots" / ref.read_text().strip()
        return snap if snap.is_dir() else None
    snaps = sorted((storage / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime)
    return snaps[-1] if snaps else None


# ---------------------------------------------------------------------------- pulling


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def pull(source: str | HubRef, *, progress: bool = True, force: bool = False) -> Path:
    """Fetch a Hub GGUF into the HF cache (resuming a partial download), check its sha256
    against the Hub's, and return its path in the cache's snapshot folder."""
    import httpx2
    from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.file_download import http_get, repo_folder_name
    from huggingface_hub.utils import build_hf_headers

    ref = parse_ref(source) if isinstance(source, str) else source
    if ref is None:
        raise PullError(f"{source!r} is not a Hub reference; write hf://OWNER/REPO/FILE.gguf or "
                        "OWNER/REPO:QUANT", param="model")
    endpoint, cache = hub_endpoint(), hf_cache_dir()
    try:
        info = HfApi(endpoint=endpoint).model_info(ref.repo, files_metadata=True)
        siblings = {s.rfilename: s for s in info.siblings or []}
        filename = pick_file(ref, list(siblings))
        commit = info.sha
        if not force:
            hit = cached_file(HubRef(ref.repo, filename))
            if hit is not None and (commit is None or commit in hit.parts):
                return hit
        lfs = siblings[filename].lfs
        url = hf_hub_url(ref.repo, filename, revision=commit, endpoint=endpoint)
        meta = get_hf_file_metadata(url, endpoint=endpoint)
        expected = lfs.sha256 if lfs is not None else None
        if expected is None:
            raise PullError(f"the Hub gives no sha256 for {ref.repo}/{filename} (not an LFS "
                            "file); realm-nb checks every file it pulls, so it does not take "
                            "this one", param="model")
        if meta.etag is None or meta.size is None:
            raise PullError(f"{endpoint} answered the metadata of {ref.repo}/{filename} without "
                            f"an ETag or a size (etag={meta.etag!r}, size={meta.size!r}); check "
                            "HF_ENDPOINT", param="model")
        blob = cache / repo_folder_name(repo_id=ref.repo, repo_type="model") / "blobs" / meta.etag
        if force or not blob.is_file():
            _download(blob, meta.location, meta.size, expected, filename, progress,
                      http_get, build_hf_headers())
        path = hf_hub_download(ref.repo, filename, revision=commit, cache_dir=cache,
                               endpoint=endpoint)  # links the blob into snapshots/<commit>/
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else 0
        advice = ("run the pull again later to resume where it stopped" if status >= 500 or
                  status == 429 else "check the repository and file names (and HF_TOKEN for a "
                  "gated repository)")
        raise PullError(f"could not pull {ref} from {endpoint}: {_first_line(e)}; {advice}",
                        param="model") from None
    except (httpx2.HTTPError, OSError) as e:
        raise PullError(f"could not pull {ref} from {endpoint}: {type(e).__name__}: "
                        f"{_first_line(e)}; run the pull again to resume where it stopped",
                        param="model") from None
    return Path(path)


def _download(blob: Path, url: str, size: int, sha256: str, filename: str, progress: bool,
              http_get: Any, headers: dict[str, str]) -> None:
    """Bytes of `url` into `blob`, through `<blob>.realm-partial`, resuming what is there."""
    partial = blob.with_name(blob.name + PARTIAL_SUFFIX)
    partial.parent.mkdir(parents=True, exist_ok=True)
    have = partial.stat().st_size if partial.is_file() else 0
    if have > size:  # not a prefix of this file: start again
        partial.unlink()
        have = 0
    if have and progress:
        print(f"realm-nb: resuming {filename} at {have} of {size} bytes", file=sys.stderr)
    with open(partial, "ab") as f:
        http_get(url, f, resume_size=have, headers=headers, expected_size=size,
                 displayed_filename=filename, tqdm_class=None if progress else _SilentBar)
    digest = sha256_of(partial)
    if digest != sha256:
        partial.unlink()
        raise PullError(f"{filename}: the downloaded file's sha256 is {digest}, the Hub says "
                        f"{sha256}; nothing was put in the cache. Pull again; if it repeats, "
                        "the mirror at HF_ENDPOINT serves other bytes than it describes",
                        param="model")
    os.replace(partial, blob)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class _SilentBar(tqdm):
    """The progress bar of a quiet pull (progress=False)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)
