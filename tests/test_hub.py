"""realm_nb.hub: the real huggingface_hub client pulls tiny GGUFs from a loopback Hub
(tests/fake_hub.py) into a Hugging Face cache: by file and by quant, resumed after an interrupted
download, refused when the sha256 differs from the Hub's, and found again without the network."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_hub import FakeHub, FakeRepo
from huggingface_hub import constants as hf_constants
from tiny_gguf import write_tiny_llama

from realm_nb import hub
from realm_nb.errors import PullError, RealmError

REPO = "tiny-org/Tiny-GGUF"


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Two tiny GGUFs (different weights) as a quantizer's repository names them."""
    d = tmp_path_factory.mktemp("ggufs")
    out = {}
    for seed, name in enumerate(("Tiny-Q4_0.gguf", "Tiny-Q8_0.gguf")):
        write_tiny_llama(d / name, seed=seed)
        out[name] = (d / name).read_bytes()
    return out


@pytest.fixture
def fake_hub(ggufs: dict[str, bytes], tmp_path: Path,
             monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    files = {**ggufs, "README.md": b"# tiny\n", "mmproj-Tiny-F16.gguf": b"GGUF-not-a-model"}
    with FakeHub({REPO: FakeRepo(files)}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        # huggingface_hub writes what it received in chunks of DOWNLOAD_CHUNK_SIZE (10 MB); a
        # tiny file needs small chunks for a cut part-way to leave bytes behind
        monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", 4096)
        yield server


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_refs_parse_both_forms() -> None:
    assert hub.parse_ref("hf://a/b-GGUF/sub/x-Q4_K_M.gguf") == hub.HubRef("a/b-GGUF",
                                                                           "sub/x-Q4_K_M.gguf")
    assert hub.parse_ref("a/b-GGUF:q4_k_m") == hub.HubRef("a/b-GGUF", quant="Q4_K_M")
    assert hub.parse_ref("hf://a/b:Q8_0") == hub.HubRef("a/b", quant="Q8_0")
    assert hub.parse_ref("smollm2-135m") is None
    assert hub.parse_ref("./models/x.gguf") is None
    with pytest.raises(PullError, match=r"hf://OWNER/REPO/FILE\.gguf"):
        hub.parse_ref("hf://only-a-repo")


def test_quant_tags_of_file_names() -> None:
    assert hub.quant_of("Qwen2.5-0.5B-Instruct-Q4_K_M.gguf") == "Q4_K_M"
    assert hub.quant_of("gemma-3-270m-it-IQ4_XS.gguf") == "IQ4_XS"
    assert hub.quant_of("model.bf16.gguf") == "BF16"
    assert hub.quant_of("Qwen3-0.6B.gguf") is None  # "Qwen3" is not a tag
    assert not hub.is_model_file("big-Q4_K_M-00001-of-00003.gguf")
    assert not hub.is_model_file("mmproj-model-f16.gguf")


def test_a_full_pull_lands_in_the_hf_cache_checked(fake_hub: FakeHub, ggufs: dict[str, bytes],
                                                   tmp_path: Path) -> None:
    path = hub.pull(f"hf://{REPO}/Tiny-Q8_0.gguf", progress=False)
    assert path.read_bytes() == ggufs["Tiny-Q8_0.gguf"]
    # the Hugging Face cache layout: a snapshot link to a blob named by the sha256
    storage = tmp_path / "hf" / "models--tiny-org--Tiny-GGUF"
    assert path.parent == storage / "snapshots" / FakeRepo({}).commit
    assert path.resolve() == storage / "blobs" / _sha(ggufs["Tiny-Q8_0.gguf"])
    assert not list(storage.glob("blobs/*" + hub.PARTIAL_SUFFIX))
    assert len(fake_hub.downloads()) == 1

    again = hub.pull(f"hf://{REPO}/Tiny-Q8_0.gguf", progress=False)  # cached: no download
    assert again == path and len(fake_hub.downloads()) == 1


def test_a_quant_name_picks_the_file(fake_hub: FakeHub, ggufs: dict[str, bytes]) -> None:
    path = hub.pull(f"{REPO}:q4_0", progress=False)
    assert path.name == "Tiny-Q4_0.gguf" and path.read_bytes() == ggufs["Tiny-Q4_0.gguf"]
    assert hub.cached_file(hub.HubRef(REPO, quant="Q4_0")) == path  # offline lookup


def test_an_unknown_quant_names_what_exists(fake_hub: FakeHub) -> None:
    with pytest.raises(PullError) as info:
        hub.pull(f"{REPO}:Q4_K_M", progress=False)
    assert isinstance(info.value, RealmError)
    assert "no Q4_K_M GGUF" in info.value.message and "Q4_0, Q8_0" in info.value.message
    assert "F16" not in info.value.message  # the vision projector is not a model
    assert not fake_hub.downloads()


def test_an_unknown_file_names_the_ggufs_there(fake_hub: FakeHub) -> None:
    with pytest.raises(PullError, match=r"no file 'Tiny-Q5_K_M.gguf'.*Tiny-Q4_0.gguf"):
        hub.pull(f"hf://{REPO}/Tiny-Q5_K_M.gguf", progress=False)


def test_an_interrupted_pull_resumes_where_it_stopped(fake_hub: FakeHub, ggufs: dict[str, bytes],
                                                      tmp_path: Path) -> None:
    data = ggufs["Tiny-Q8_0.gguf"]
    cut = 4096 * 7  # a whole number of chunks
    fake_hub.cut_after = cut  # the connection drops after a third of the file, and the Hub
    fake_hub.refuse_after_cut = True  # stops answering: the library's own retry fails too
    first = len(fake_hub.log)
    with pytest.raises(PullError, match=r"503.*run the pull again later to resume"):
        hub.pull(f"hf://{REPO}/Tiny-Q8_0.gguf", progress=False)
    partial = (tmp_path / "hf" / "models--tiny-org--Tiny-GGUF" / "blobs" /
               (_sha(data) + hub.PARTIAL_SUFFIX))
    assert partial.stat().st_size == cut and partial.read_bytes() == data[:cut]
    assert hub.cached_file(hub.HubRef(REPO, "Tiny-Q8_0.gguf")) is None

    fake_hub.refuse_downloads = False
    path = hub.pull(f"hf://{REPO}/Tiny-Q8_0.gguf", progress=False)
    assert path.read_bytes() == data and not partial.exists()
    resumed = [r for r in fake_hub.log[first:] if r.method == "GET" and "/resolve/" in r.path]
    assert resumed[0].range is None and resumed[-1].range == f"bytes={cut}-"


def test_a_dropped_connection_is_resumed_within_one_pull(fake_hub: FakeHub,
                                                         ggufs: dict[str, bytes]) -> None:
    data = ggufs["Tiny-Q4_0.gguf"]
    fake_hub.cut_after = 4096 * 3
    path = hub.pull(f"hf://{REPO}/Tiny-Q4_0.gguf", progress=False)
    assert path.read_bytes() == data
    assert [r.range for r in fake_hub.downloads()] == [None, f"bytes={4096 * 3}-"]


def test_a_sha256_mismatch_is_refused_and_nothing_is_cached(
        ggufs: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = "f" * 64
    repo = FakeRepo(dict(ggufs), advertise_sha256={"Tiny-Q8_0.gguf": wrong})
    with FakeHub({REPO: repo}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
        with pytest.raises(PullError) as info:
            hub.pull(f"{REPO}:Q8_0", progress=False)
    msg = info.value.message
    assert wrong in msg and _sha(ggufs["Tiny-Q8_0.gguf"]) in msg and "nothing was put" in msg
    storage = tmp_path / "hf" / "models--tiny-org--Tiny-GGUF"
    assert not [p for p in storage.rglob("*") if p.is_file() and p.suffix != ".lock"
                and "refs" not in p.parts]
    assert hub.cached_file(hub.HubRef(REPO, quant="Q8_0")) is None


def test_an_unknown_repository_is_a_pull_error(fake_hub: FakeHub) -> None:
    with pytest.raises(PullError,
                       match=r"could not pull hf://nobody/nothing/x\.gguf.*check the repository"):
        hub.pull("hf://nobody/nothing/x.gguf", progress=False)


def test_a_hub_that_cannot_be_reached_is_a_pull_error(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(PullError, match="could not pull"):
        hub.pull(f"{REPO}:Q8_0", progress=False)
