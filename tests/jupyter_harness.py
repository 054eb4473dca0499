"""A real Jupyter server for tests: started with Popen on a free loopback port and a token, with
temporary config and runtime dirs; notebooks opened through its REST API; kernels driven over
their own ZMQ channels with jupyter_client (the connection files lie in the runtime dir)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EMPTY_NOTEBOOK = {"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class JupyterServer:
    root: Path
    runtime_dir: Path
    proc: subprocess.Popen[bytes]
    base: str
    token: str
    log_path: Path
    clients: list[Any] = field(default_factory=list)

    @classmethod
    def start(cls, workdir: Path, notebooks: tuple[str, ...] = (), app: str = "jupyter_server",
              extra: tuple[str, ...] = (), env: dict[str, str] | None = None) -> JupyterServer:
        root = workdir / "root"
        root.mkdir(parents=True, exist_ok=True)
        for name in notebooks:
            (root / name).write_text(json.dumps(EMPTY_NOTEBOOK))
        runtime_dir = workdir / "runtime"
        port, token = free_port(), secrets.token_hex(16)
        log_path = workdir / "jupyter.log"
        full_env = {**os.environ, "JUPYTER_CONFIG_DIR": str(workdir / "config"),
                    "JUPYTER_RUNTIME_DIR": str(runtime_dir), **(env or {})}
        for name in ("REALM_NB_ENDPOINT", "REALM_ENDPOINT", "REALM_NB_RUNTIME_FILE"):
            full_env.pop(name, None)
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", app, "--no-browser", "--allow-root",
                 "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
                 "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
                 f"--ServerApp.root_dir={root}", *extra],
                stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=root)
        server = cls(root, runtime_dir, proc, f"http://127.0.0.1:{port}", token, log_path)
        deadline = time.monotonic() + 90
        while True:
            try:
                server.api("GET", "/api/status")
                return server
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    server.stop()
                    raise RuntimeError("the Jupyter server did not start; log:\n"
                                       + server.log()) from None
                time.sleep(0.3)

    def log(self) -> str:
        return self.log_path.read_text()[-4000:]

    def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.base}{path}", data=data, method=method,
                                     headers={"Authorization": f"token {self.token}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            raw = r.read()
        return json.loads(raw) if raw else None

    def open_notebook(self, path: str) -> Any:
        """Open notebook `path` as JupyterLab does (a session); return a ready kernel client."""
        from jupyter_client import BlockingKernelClient

        session = self.api("POST", "/api/sessions", {"path": path, "name": path,
                                                      "type": "notebook",
                                                      "kernel": {"name": "python3"}})
        connection = self.runtime_dir / f"kernel-{session['kernel']['id']}.json"
        deadline = time.monotonic() + 30
        while not connection.is_file():
            if time.monotonic() > deadline:
                raise RuntimeError(f"no connection file {connection}; log:\n{self.log()}")
            time.sleep(0.1)
        client = BlockingKernelClient(connection_file=str(connection))
        client.load_connection_file()
        # No heartbeat channel: on a loaded machine its first beats come late, and the client
        # would call a booting kernel dead.
        client.start_channels(hb=False)
        client.wait_for_ready(timeout=120)
        # the tests interrupt a kernel through the REST API, which wants its id
        client.kernel_id = session["kernel"]["id"]  # type: ignore[attr-defined]
        self.clients.append(client)
        return client

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Stop the server by its PID with `sig`; returns its exit code."""
        for client in self.clients:
            client.stop_channels()
        self.clients.clear()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)


def run_cell(client: Any, code: str, timeout: float = 300) -> dict[str, Any]:
    """Execute `code`; return {"stdout", "stderr", "text" and "html" (last display), "displays",
    "error" (ename: evalue or None)} once the kernel is idle again."""
    msg_id = client.execute(code)
    out: dict[str, Any] = {"stdout": "", "stderr": "", "text": None, "html": None, "displays": [],
                           "error": None, "status": None}
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"cell did not finish in {timeout} s: {code[:80]!r}; got {out}")
        msg = client.get_iopub_msg(timeout=left)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            out[content["name"]] += content["text"]
        elif kind in ("display_data", "update_display_data", "execute_result"):
            text = content["data"].get("text/plain")
            out["displays"].append(text)
            out["text"] = text
            out["html"] = content["data"].get("text/html")
        elif kind == "error":
            out["error"] = f"{content['ename']}: {content['evalue']}"
        elif kind == "status" and content["execution_state"] == "idle":
            reply = client.get_shell_msg(timeout=30)
            out["status"] = reply["content"]["status"]
            return out
