"""Finding the runtime: environment first, then the runtime file a Jupyter server wrote; a dead
owner's file is ignored; the file is owner-only; the notebook names the tenant."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from realm_nb import runtime
from realm_nb.runtime import RuntimeInfo, find_runtime, read_runtime_file, write_runtime_file


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in (*runtime.ENDPOINT_ENVS, *runtime.API_KEY_ENVS, runtime.RUNTIME_FILE_ENV,
                 "JPY_SESSION_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    return tmp_path


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_runtime_file_is_owner_only_and_round_trips(clean_env: Path) -> None:
    path = clean_env / "realm-nb-runtime-1.json"
    write_runtime_file(path, RuntimeInfo("http://127.0.0.1:1", "s3cret", os.getpid()))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    info = read_runtime_file(path)
    assert info is not None and (info.url, info.api_key) == ("http://127.0.0.1:1", "s3cret")
    assert "s3cret" not in repr(info)


def test_a_file_whose_owner_died_is_ignored(clean_env: Path) -> None:
    write_runtime_file(clean_env / "realm-nb-runtime-2.json",
                       RuntimeInfo("http://127.0.0.1:2", "k", dead_pid()))
    assert find_runtime() is None


def test_the_environment_wins_over_runtime_files(clean_env: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    write_runtime_file(clean_env / "realm-nb-runtime-3.json",
                       RuntimeInfo("http://127.0.0.1:3", "k", os.getpid()))
    found = find_runtime()
    assert found is not None and found.url == "http://127.0.0.1:3" and found.names_tenants
    monkeypatch.setenv("REALM_NB_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("REALM_NB_API_KEY", "sk-x")
    found = find_runtime()
    assert found is not None and (found.url, found.api_key) == ("http://127.0.0.1:9", "sk-x")
    assert not found.names_tenants


def test_the_named_runtime_file_wins_over_the_folder(clean_env: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path_factory) -> None:
    write_runtime_file(clean_env / "realm-nb-runtime-4.json",
                       RuntimeInfo("http://127.0.0.1:4", "k", os.getpid()))
    own = tmp_path_factory.mktemp("elsewhere") / "mine.json"
    write_runtime_file(own, RuntimeInfo("http://127.0.0.1:5", "k", os.getpid()))
    monkeypatch.setenv(runtime.RUNTIME_FILE_ENV, str(own))
    found = find_runtime()
    assert found is not None and found.url == "http://127.0.0.1:5"


def test_notebook_tenant(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    assert runtime.notebook_tenant() is None
    monkeypatch.setenv("JPY_SESSION_NAME", "/srv/work/alpha.ipynb")
    assert runtime.notebook_tenant() == "/srv/work/alpha.ipynb"
    monkeypatch.setenv("JPY_SESSION_NAME", os.path.expanduser("~/nb/beta.ipynb"))
    assert runtime.notebook_tenant() == "~/nb/beta.ipynb"
    monkeypatch.setenv("JPY_SESSION_NAME", "/" + "d/" * 100 + "gamma.ipynb")
    name = runtime.notebook_tenant()
    assert name is not None and len(name) == runtime.MAX_TENANT_CHARS
    assert name.endswith("gamma.ipynb")


def test_auto_mode_uses_a_found_runtime_without_importing_jax(clean_env: Path) -> None:
    """A thin client: Realm() with a runtime file around is in server mode and never loads JAX."""
    write_runtime_file(clean_env / "realm-nb-runtime-6.json",
                       RuntimeInfo("http://127.0.0.1:6", "k", os.getpid()))
    code = ("import sys; from realm_nb import Realm; r = Realm()\n"
            "print(r.mode, r.endpoint, r.tenant, 'jax' in sys.modules, "
            "'wasmtime' in sys.modules)")
    env = {**os.environ, "JPY_SESSION_NAME": "/srv/alpha.ipynb"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True)
    assert out.stdout.split() == ["server", "http://127.0.0.1:6", "/srv/alpha.ipynb", "False",
                                  "False"]
