"""The Jupyter Server extension: one realm-nb runtime per Jupyter server, shared by its kernels.

`pip install realm-nb` enables it (`jupyter-config/jupyter_server_config.d/realm_nb.json`). At
load it binds a loopback listening socket, writes the runtime file (URL and a random secret key,
owner-only) into Jupyter's runtime dir, and puts `REALM_NB_RUNTIME_FILE` into the environment the
server hands its kernels, so `Realm()`, the magics and the panel of every notebook find the
runtime with no configuration, each notebook its own tenant (see `runtime.py`).

Nothing heavy starts at load. The runtime is socket-activated: a supervisor thread waits until the
socket has a connection, then starts `realm-nb serve --fd N --lazy` on that very socket (the first
connection waits in the backlog, nothing is lost) and waits for it to exit. A runtime that died is
started again by the next connection; the request that died gets a clear error in its client.
The runtime ends with the server: terminated at exit (SIGTERM and SIGINT stop a Jupyter server
cleanly, so atexit runs), and were the server killed outright, the runtime sees its parent gone
(`serve --parent-pid`) and exits. `REALM_NB_JUPYTER_RUNTIME=0` turns the extension off.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import secrets
import select
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from .runtime import RUNTIME_FILE_ENV, RuntimeInfo, write_runtime_file

RUNTIME_TENANT = "jupyter"  # the key's own tenant; every request names its notebook instead
STOP_TIMEOUT_S = 10.0
log = logging.getLogger("realm_nb.jupyter")


class RuntimeSupervisor:
    """Owns the listening socket and the runtime process started on it."""

    def __init__(self, runtime_dir: Path, *, serve_args: tuple[str, ...] = (),
                 logger: logging.Logger | None = None) -> None:
        self.log = logger or log
        self.runtime_dir = Path(runtime_dir)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.sock.set_inheritable(True)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.secret = secrets.token_urlsafe(32)
        self.serve_args = serve_args
        pid = os.getpid()
        self.runtime_file = self.runtime_dir / f"realm-nb-runtime-{pid}.json"
        self.keys_file = self.runtime_dir / f"realm-nb-keys-{pid}.toml"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._write_files()
        self._thread = threading.Thread(target=self._supervise, name="realm-nb-runtime",
                                        daemon=True)
        self._thread.start()

    @property
    def pid(self) -> int | None:
        proc = self.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def _write_files(self) -> None:
        fd = os.open(self.keys_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f'[keys."{self.secret}"]\ntenant = "{RUNTIME_TENANT}"\nname_tenants = true\n')
        write_runtime_file(self.runtime_file, RuntimeInfo(url=self.url, api_key=self.secret,
                                                          owner_pid=os.getpid()))

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "realm_nb", "serve", "--fd", str(self.sock.fileno()),
                "--lazy", "--api-keys", str(self.keys_file), "--parent-pid", str(os.getpid()),
                *self.serve_args]

    def _supervise(self) -> None:
        """Start the runtime when a client connects; wait for it; again after it exits."""
        while not self._stopping.is_set():
            try:
                ready, _, _ = select.select([self.sock], [], [], 0.5)
            except (OSError, ValueError):  # the socket was closed: we are stopping
                return
            if not ready:
                continue
            with self._lock:
                if self._stopping.is_set():
                    return
                self.starts += 1
                self.log.info("realm-nb: starting the runtime (start %d) at %s", self.starts,
                              self.url)
                self.proc = subprocess.Popen(self._command(), pass_fds=(self.sock.fileno(),),
                                             stdin=subprocess.DEVNULL)
            code = self.proc.wait()
            if not self._stopping.is_set():
                self.log.warning("realm-nb: the runtime exited with code %s; the next request "
                                 "starts it again", code)

    def stop(self) -> None:
        """End the runtime and remove the files; safe to call twice."""
        with self._lock:
            if self._stopping.is_set():
                return
            self._stopping.set()
            proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for path in (self.runtime_file, self.keys_file):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self.sock.close()
        if os.environ.get(RUNTIME_FILE_ENV) == str(self.runtime_file):
            del os.environ[RUNTIME_FILE_ENV]

    def status(self) -> dict[str, Any]:
        """What the server's /realm-nb/runtime shows (never the secret)."""
        return {"url": self.url, "pid": self.pid, "starts": self.starts,
                "runtime_file": str(self.runtime_file)}


# ------------------------------------------------------------------------------ the extension

_supervisor: RuntimeSupervisor | None = None


def _load_jupyter_server_extension(serverapp: Any) -> None:
    global _supervisor
    if os.environ.get("REALM_NB_JUPYTER_RUNTIME", "1") == "0":
        serverapp.log.info("realm-nb: REALM_NB_JUPYTER_RUNTIME=0, no shared runtime")
        return
    if _supervisor is None:
        _supervisor = RuntimeSupervisor(Path(serverapp.runtime_dir), logger=serverapp.log)
        atexit.register(_supervisor.stop)
    os.environ[RUNTIME_FILE_ENV] = str(_supervisor.runtime_file)  # kernels inherit it
    _add_status_handler(serverapp, _supervisor)
    serverapp.log.info("realm-nb: shared runtime for this server's kernels at %s (starts on "
                       "first use)", _supervisor.url)


def _unload_jupyter_server_extension(serverapp: Any) -> None:
    global _supervisor
    if _supervisor is not None:
        _supervisor.stop()
        _supervisor = None


def _add_status_handler(serverapp: Any, supervisor: RuntimeSupervisor) -> None:
    """GET {base_url}realm-nb/runtime: the runtime's URL, pid and starts (Jupyter-authenticated)."""
    import json

    from jupyter_server.base.handlers import APIHandler
    from jupyter_server.utils import url_path_join
    from tornado import web

    class RuntimeStatusHandler(APIHandler):
        @web.authenticated
        def get(self) -> None:
            self.finish(json.dumps(supervisor.status()))

    route = url_path_join(serverapp.web_app.settings["base_url"], "realm-nb", "runtime")
    serverapp.web_app.add_handlers(".*$", [(route, RuntimeStatusHandler)])
