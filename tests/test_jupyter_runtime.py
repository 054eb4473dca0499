"""One runtime per Jupyter server: two notebooks of a real Jupyter server are two tenants of the
runtime that the realm-nb server extension owns, over one copy of the weights, and the kernels
stay thin (no JAX, no wasmtime). Stopping the server leaves no runtime behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from jupyter_harness import JupyterServer, run_cell

from realm_nb.runtime import pid_alive

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
N_TOKENS = 12
GENERATE_CELL = f"%%realm generate -n {N_TOKENS} -t 0 -o g\n{PROMPT}"
NOTEBOOKS = ("alpha.ipynb", "beta.ipynb")
LONG_PROMPT = "Count from one to one thousand: one, two, three,"  # goes on past any test's patience


@pytest.fixture(scope="module")
def expected_text(smollm2_path: Path) -> str:
    """The greedy text the SDK gives in this process (the reference the kernels must equal)."""
    from realm_nb import Realm

    return Realm(mode="local").generate(PROMPT, max_tokens=N_TOKENS, temperature=0).text


def _wait_gone(pid: int, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.2)
    return False


def test_two_notebooks_share_one_runtime(tmp_path: Path, expected_text: str) -> None:
    server = JupyterServer.start(tmp_path, notebooks=NOTEBOOKS)
    runtime_pid = None
    try:
        status = server.api("GET", "/realm-nb/runtime")
        assert status["pid"] is None, "the runtime starts on first use, not with the server"
        runtime_file = Path(status["runtime_file"])
        assert runtime_file.stat().st_mode & 0o077 == 0, "the runtime file is owner-only"
        secret = json.loads(runtime_file.read_text())["api_key"]

        kernels = [server.open_notebook(name) for name in NOTEBOOKS]
        for k in kernels:
            assert run_cell(k, "%load_ext realm_nb")["error"] is None

        # Both notebooks generate at the same time (the first of them starts the runtime).
        results: dict[int, dict] = {}

        def generate(i: int) -> None:
            results[i] = run_cell(kernels[i], GENERATE_CELL)

        threads = [threading.Thread(target=generate, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        for i, name in enumerate(NOTEBOOKS):
            r = results[i]
            assert r["error"] is None, f"{name}: {r['error']}\n{server.log()}"
            checked = run_cell(kernels[i], "print(repr(g.text), g.tenant, g.finish_reason)\n"
                                           "import sys\n"
                                           "print('jax' in sys.modules, "
                                           "'wasmtime' in sys.modules)")
            lines = checked["stdout"].splitlines()
            assert lines[0] == f"{expected_text!r} {server.root / name} length", lines
            assert lines[1] == "False False", "a notebook kernel must not import JAX/wasmtime"
            # The secret never shows in what the notebook displays.
            assert secret not in json.dumps(r) + checked["stdout"]

        stats = run_cell(kernels[0], "from realm_nb import Realm\n"
                                     "r = Realm()\n"
                                     "print(r.mode, r.tenant)\n"
                                     "print(sorted(t['id'] for t in r.stats()['tenants']))")
        mode, tenant = stats["stdout"].splitlines()[0].split(" ", 1)
        assert (mode, tenant) == ("server", str(server.root / NOTEBOOKS[0]))
        tenants = eval(stats["stdout"].splitlines()[1])  # a printed list of str
        assert tenants == sorted(str(server.root / n) for n in NOTEBOOKS)

        status = run_cell(kernels[1], "%realm status")
        assert "shared runtime of this Jupyter server" in status["stdout"]
        assert status["stdout"].count(".ipynb:") == 2, status["stdout"]

        runtime_pid = server.api("GET", "/realm-nb/runtime")["pid"]
        assert runtime_pid is not None and pid_alive(runtime_pid)
    finally:
        code = server.stop(signal.SIGTERM)
    assert runtime_pid is not None
    assert _wait_gone(runtime_pid), f"runtime {runtime_pid} outlived its Jupyter server ({code})"
    assert not list(server.runtime_dir.glob("realm-nb-*")), "runtime and key files removed"


def test_crashed_runtime_restarts_with_a_clear_error(tmp_path: Path, smollm2_path: Path) -> None:
    """The request that dies with the runtime ends in one clear line; the next one works."""
    server = JupyterServer.start(tmp_path, notebooks=NOTEBOOKS[:1])
    try:
        k = server.open_notebook(NOTEBOOKS[0])
        assert run_cell(k, "%load_ext realm_nb")["error"] is None
        assert run_cell(k, f"%%realm generate -n 2 -t 0\n{PROMPT}")["error"] is None
        first = server.api("GET", "/realm-nb/runtime")
        assert first["starts"] == 1

        # Kill the runtime while a long generation streams into the cell.
        run = {}
        t = threading.Thread(target=lambda: run.update(
            run_cell(k, f"%%realm generate -n 2000 -t 0\n{LONG_PROMPT}")))
        t.start()
        # Kill it once the request runs there (the runtime's own view, with the runtime's key).
        info = json.loads(Path(first["runtime_file"]).read_text())
        headers = {"Authorization": f"Bearer {info['api_key']}",
                   "X-Realm-Tenant": str(server.root / NOTEBOOKS[0])}
        deadline = time.monotonic() + 120
        while not httpx.get(info["url"] + "/v1/requests", headers=headers).json()["data"]:
            assert time.monotonic() < deadline, "the long generation never started"
            time.sleep(0.2)
        time.sleep(1.0)
        os.kill(first["pid"], signal.SIGKILL)
        t.join(120)
        assert not t.is_alive(), "the cell must not hang when its runtime dies"
        # IPython shows a UsageError as one line on stderr, no traceback.
        assert run["error"] is None and "Traceback" not in run["stderr"], run
        lines = [ln for ln in run["stderr"].splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("UsageError: ServerConnectionError: "), \
            run["stderr"]
        assert "dropped request" in lines[0] and "run the cell again" in lines[0]

        # The next request starts a new runtime, cold: interrupt it while it loads. The cell
        # ends without a traceback, the request is cancelled there, and the next cell works.
        cold: dict = {}
        t = threading.Thread(target=lambda: cold.update(
            run_cell(k, f"%%realm generate -n 64 -t 0 -o g\n{PROMPT}")))
        t.start()
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(info["url"] + "/v1/requests", headers=headers).json()["data"]:
                    break
            assert time.monotonic() < deadline, "the request never reached the new runtime"
            time.sleep(0.1)
        server.api("POST", f"/api/kernels/{k.kernel_id}/interrupt")
        t.join(120)
        assert not t.is_alive() and cold["error"] is None, cold
        assert "Traceback" not in cold["stderr"] + cold["stdout"], cold
        assert "interrupted" in (cold["text"] or "") + (cold["html"] or ""), cold["displays"]
        deadline = time.monotonic() + 30
        while httpx.get(info["url"] + "/v1/requests", headers=headers).json()["data"]:
            assert time.monotonic() < deadline, "the interrupted request runs on"
            time.sleep(0.2)

        again = run_cell(k, f"%%realm generate -n 4 -t 0 -o g\n{PROMPT}")
        assert again["error"] is None, again
        assert server.api("GET", "/realm-nb/runtime")["starts"] == 2
    finally:
        server.stop(signal.SIGINT)
    assert not list(server.runtime_dir.glob("realm-nb-*"))
