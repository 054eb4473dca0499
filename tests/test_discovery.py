"""realm_nb.discovery: GGUFs in the Hugging Face cache, Ollama's store, LM Studio's folder and
REALM_NB_MODELS_DIR are listed under readable names, never copied, and load by those names.
Each store is built here as its tool lays it out, with tiny GGUFs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from tiny_gguf import write_tiny_llama

from realm_nb import discovery
from realm_nb.cli import main
from realm_nb.errors import ModelNotFoundError

COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


@dataclass
class Stores:
    home: Path
    models_dir: Path
    hf_cache: Path
    ollama: Path
    files: dict[str, Path]  # expected name -> the file it must point at


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_hf_cache(cache: Path, repo: str, name: str, src: Path) -> Path:
    """models--OWNER--REPO/{blobs/<sha256>, snapshots/<commit>/FILE -> blob, refs/main}."""
    storage = cache / ("models--" + repo.replace("/", "--"))
    blob = storage / "blobs" / _sha(src)
    blob.parent.mkdir(parents=True)
    shutil.copyfile(src, blob)
    link = storage / "snapshots" / COMMIT / name
    link.parent.mkdir(parents=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(COMMIT)
    return link


def build_ollama(root: Path, manifest: tuple[str, ...], src: Path | None) -> Path | None:
    """manifests/REGISTRY/NAMESPACE/MODEL/TAG naming blobs/sha256-<hex> (the model layer)."""
    layers = [{"mediaType": "application/vnd.ollama.image.template",
               "digest": "sha256:" + "1" * 64, "size": 10}]
    blob = None
    if src is not None:
        digest = _sha(src)
        blob = root / "blobs" / f"sha256-{digest}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, blob)
        layers.insert(0, {"mediaType": discovery.OLLAMA_MODEL_MEDIA_TYPE,
                          "digest": f"sha256:{digest}", "size": src.stat().st_size})
    path = root / "manifests" / Path(*manifest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"schemaVersion": 2, "layers": layers,
                                "config": {"digest": "sha256:" + "2" * 64}}))
    return blob


@pytest.fixture
def stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Stores:
    tiny = [tmp_path / f"tiny{i}.gguf" for i in range(4)]
    for i, path in enumerate(tiny):
        write_tiny_llama(path, seed=i)
    home = tmp_path / "home"
    models_dir = tmp_path / "my-models"
    hf_cache = home / ".cache" / "huggingface" / "hub"
    ollama = home / ".ollama" / "models"
    monkeypatch.setenv("HOME", str(home))
    for var in ("HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "OLLAMA_MODELS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("REALM_NB_MODELS_DIR", str(models_dir))
    monkeypatch.setenv("REALM_NB_CACHE", str(tmp_path / "realm-cache"))
    files: dict[str, Path] = {}

    (models_dir / "sub").mkdir(parents=True)
    shutil.copyfile(tiny[0], models_dir / "my-tiny.gguf")
    shutil.copyfile(tiny[1], models_dir / "sub" / "other.gguf")
    (models_dir / "notes.gguf").write_bytes(b"not a gguf at all")  # no GGUF magic: skipped
    shutil.copyfile(tiny[0], models_dir / "smollm2.gguf")  # a catalogue alias: gets local:
    files["my-tiny"] = models_dir / "my-tiny.gguf"
    files["sub/other"] = models_dir / "sub" / "other.gguf"
    files["local:smollm2"] = models_dir / "smollm2.gguf"

    files["hf://tiny-org/Tiny-GGUF/Tiny-Q8_0.gguf"] = build_hf_cache(
        hf_cache, "tiny-org/Tiny-GGUF", "Tiny-Q8_0.gguf", tiny[1])

    blob = build_ollama(ollama, ("registry.ollama.ai", "library", "tiny", "latest"), tiny[2])
    assert blob is not None
    files["ollama:tiny:latest"] = blob
    other = build_ollama(ollama, ("registry.ollama.ai", "someone", "tiny2", "q4"), tiny[3])
    assert other is not None
    files["ollama:someone/tiny2:q4"] = other
    build_ollama(ollama, ("registry.ollama.ai", "library", "broken", "latest"), None)

    lms = home / ".lmstudio" / "models" / "tiny-pub" / "Tiny-GGUF"
    lms.mkdir(parents=True)
    shutil.copyfile(tiny[3], lms / "Tiny-Q4_0.gguf")
    shutil.copyfile(tiny[3], lms / "mmproj-Tiny-F16.gguf")  # a vision projector: skipped
    files["lmstudio:tiny-pub/Tiny-GGUF/Tiny-Q4_0"] = lms / "Tiny-Q4_0.gguf"
    return Stores(home, models_dir, hf_cache, ollama, files)


def test_every_store_is_found_under_a_readable_name(stores: Stores) -> None:
    found = {m.name: m for m in discovery.found_models()}
    assert set(found) == set(stores.files)
    for name, path in stores.files.items():
        assert found[name].path == path  # the file where its tool keeps it: nothing copied
        assert found[name].size_bytes == path.stat().st_size
    assert {m.source for m in found.values()} == {"models-dir", "hf-cache", "ollama", "lm-studio"}
    # the content-addressed stores name the file by its sha256: known without hashing
    hf = found["hf://tiny-org/Tiny-GGUF/Tiny-Q8_0.gguf"]
    assert hf.sha256 == _sha(hf.path) and found["ollama:tiny:latest"].sha256 == _sha(
        stores.files["ollama:tiny:latest"])
    assert found["my-tiny"].sha256 is None


def test_nothing_is_found_where_nothing_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "OLLAMA_MODELS",
                "REALM_NB_MODELS_DIR"):
        monkeypatch.delenv(var, raising=False)
    assert [m for m in discovery.found_models() if m.source != "ollama" or
            not str(m.path).startswith("/usr/share/ollama")] == []


def test_found_names_resolve_to_their_files(stores: Stores) -> None:
    for name, path in stores.files.items():
        assert discovery.resolve(name) == path
    # a Hub reference finds the cached file without the network (by file and by quant)
    assert discovery.resolve("tiny-org/Tiny-GGUF:Q8_0") == stores.files[
        "hf://tiny-org/Tiny-GGUF/Tiny-Q8_0.gguf"]
    with pytest.raises(ModelNotFoundError) as info:
        discovery.resolve("no-such-model")
    assert "ollama:tiny:latest" in info.value.message and "my-tiny" in info.value.message


def test_the_store_lists_found_models_and_registers_them_by_name(stores: Stores) -> None:
    from realm_nb.store import LayerStore

    store = LayerStore(n_slots=1, max_context=64)
    listed = {m.name: m for m in store.list()}
    for name, path in stores.files.items():
        m = listed[name]
        assert m.path == str(path) and not m.loaded and m.resident_bytes == 0
        assert m.size_bytes == path.stat().st_size
    assert listed["ollama:tiny:latest"].source == "ollama"
    assert listed["hf://tiny-org/Tiny-GGUF/Tiny-Q8_0.gguf"].quant == "Q8_0"

    entry = store.register("ollama:tiny:latest")
    assert entry.name == "ollama:tiny:latest" and entry.source == "ollama"
    assert entry.path == stores.files["ollama:tiny:latest"].resolve()
    assert entry.id == _sha(entry.path)[:16]  # from the blob's name
    again = [m for m in store.list() if m.name == "ollama:tiny:latest"]
    assert len(again) == 1 and again[0].id == entry.id  # listed once, as registered

    by_quant = store.register("tiny-org/Tiny-GGUF:Q8_0")
    assert by_quant.name == "hf://tiny-org/Tiny-GGUF/Tiny-Q8_0.gguf"
    assert store.get("tiny-org/Tiny-GGUF:Q8_0") is by_quant  # the name it was asked by


def test_realm_nb_models_lists_them(stores: Stores, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REALM_NB_ENDPOINT", raising=False)
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(stores.home / "no-jupyter"))
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert {n: rows[n]["source"] for n in stores.files} == {
        "my-tiny": "models-dir", "sub/other": "models-dir", "local:smollm2": "models-dir",
        "hf://tiny-org/Tiny-GGUF/Tiny-Q8_0.gguf": "hf-cache", "ollama:tiny:latest": "ollama",
        "ollama:someone/tiny2:q4": "ollama", "lmstudio:tiny-pub/Tiny-GGUF/Tiny-Q4_0": "lm-studio"}
    assert main(["models"]) == 0
    table = capsys.readouterr().out
    assert "ollama:tiny:latest" in table and "lm-studio" in table


@pytest.mark.timeout(300)
def test_a_found_model_generates_by_its_name(stores: Stores) -> None:
    from realm_nb.kernel import RealmKernel
    from realm_nb.types import SamplingParams

    kernel = RealmKernel(n_slots=1, max_context=64)
    try:
        g = kernel.generate(tenant="t", model="lmstudio:tiny-pub/Tiny-GGUF/Tiny-Q4_0",
                            prompt=[5, 6, 7], params=SamplingParams(max_tokens=4,
                                                                    temperature=0)).result()
        assert g.model == "lmstudio:tiny-pub/Tiny-GGUF/Tiny-Q4_0" and len(g.token_ids) == 4
        listed = {m.name: m for m in kernel.models()}["lmstudio:tiny-pub/Tiny-GGUF/Tiny-Q4_0"]
        assert listed.loaded and listed.resident_bytes > 0 and listed.source == "lm-studio"
    finally:
        kernel.shutdown()


@pytest.mark.timeout(300)
def test_the_server_lists_found_models_and_an_admin_loads_one_by_name(stores: Stores) -> None:
    import httpx

    from realm_nb.kernel import RealmKernel
    from realm_nb.server import BackgroundServer, KeyConfig, create_app

    admin, tenant = "sk-admin-0123456789", "sk-tenant-0123456789"
    keys = {admin: KeyConfig(tenant="ops", role="admin"), tenant: KeyConfig(tenant="bob")}
    kernel = RealmKernel(n_slots=1, max_context=64)
    try:
        with BackgroundServer(create_app(kernel, api_keys=keys, default_model="my-tiny")) as srv:
            def call(method: str, path: str, key: str,
                     json: dict[str, object] | None = None) -> httpx.Response:
                return httpx.request(method, srv.url + path, timeout=120, json=json,
                                     headers={"Authorization": f"Bearer {key}"})

            rows = {r["id"]: r for r in call("GET", "/v1/models", tenant).json()["data"]}
            row = rows["ollama:tiny:latest"]
            assert row["source"] == "ollama" and row["resident_bytes"] == 0
            assert row["loaded"] is False and row["size"] == stores.files[
                "ollama:tiny:latest"].stat().st_size
            denied = call("POST", "/v1/models/load", tenant, json={"model": "ollama:tiny:latest"})
            assert denied.status_code == 403
            done = call("POST", "/v1/models/load", admin, json={"model": "ollama:tiny:latest"})
            assert done.status_code == 200, done.text
            assert done.json()["id"] == "ollama:tiny:latest" and done.json()["loaded"] is True
            rows = {r["id"]: r for r in call("GET", "/v1/models", tenant).json()["data"]}
            assert rows["ollama:tiny:latest"]["resident_bytes"] > 0
            # the tenant uses it by that name now that it is loaded
            got = call("POST", "/v1/completions", tenant,
                       json={"model": "ollama:tiny:latest", "prompt": "ab", "max_tokens": 3,
                             "temperature": 0})
            assert got.status_code == 200, got.text
            assert got.json()["usage"]["completion_tokens"] == 3
    finally:
        kernel.shutdown()
