"""binder/ is a configuration repo2docker accepts: it plans the image without Docker.

`repo2docker --no-build --no-run --debug .` reads binder/ and prints the Dockerfile it would build;
the test checks that the plan installs the package, uses Python 3.11 and pulls the default model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BINDER = REPO / "binder"


def test_binder_files_say_what_to_build():
    reqs = (BINDER / "requirements.txt").read_text().split()
    assert "-e" in reqs or "." in reqs, "binder/requirements.txt must install this package"
    assert (BINDER / "runtime.txt").read_text().strip() == "python-3.11"
    post = BINDER / "postBuild"
    assert os.access(post, os.X_OK), "postBuild must be executable"
    text = post.read_text()
    assert "realm-nb pull smollm2-135m" in text
    assert "jupyter server extension enable --sys-prefix realm_nb" in text  # one shared runtime
    assert "realm-nb warmup" in text  # XLA's cache warm: the first notebook skips the compiles


def test_the_server_extension_is_enabled_by_pip_install():
    """The package's jupyter-config file enables the extension in any environment pip installs
    it into (Binder's image included): the same file is what this environment was given."""
    import sysconfig

    shipped = json.loads((REPO / "jupyter-config" / "jupyter_server_config.d" /
                          "realm_nb.json").read_text())
    assert shipped["ServerApp"]["jpserver_extensions"] == {"realm_nb": True}
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"etc/jupyter/jupyter_server_config.d/realm_nb.json"' in pyproject
    installed = Path(sysconfig.get_paths()["data"]) / "etc" / "jupyter" / \
        "jupyter_server_config.d" / "realm_nb.json"
    assert json.loads(installed.read_text()) == shipped
    from jupyter_server.extension.utils import get_loader

    import realm_nb

    points = realm_nb._jupyter_server_extension_points()
    module = __import__(points[0]["module"], fromlist=["_"])
    assert callable(get_loader(module))


def _repo2docker() -> list[str]:
    exe = shutil.which("repo2docker")
    if exe:
        return [exe]
    try:
        import repo2docker  # noqa: F401
    except ImportError:
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                               "jupyter-repo2docker"], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip("repo2docker is not installed and `pip install jupyter-repo2docker` "
                        f"failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    exe = shutil.which("repo2docker")
    return [exe] if exe else [sys.executable, "-m", "repo2docker"]


def test_repo2docker_accepts_binder():
    cmd = [*_repo2docker(), "--no-build", "--no-run", "--debug", "."]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    plan = proc.stdout + proc.stderr
    assert proc.returncode == 0, plan[-3000:]
    assert "python=3.11" in plan or "python3.11" in plan, "runtime.txt was not honoured"
    assert 'pip install --no-cache-dir -r "binder/requirements.txt"' in plan
    assert "./binder/postBuild" in plan
