"""Running the app: `realm-nb serve` (kernel, models, keys, uvicorn, tied to its owner) and
`BackgroundServer` (uvicorn on a daemon thread, for tests and notebooks)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from .. import catalogue
from ..errors import InvalidRequestError
from .app import create_app
from .auth import KeyConfig, ServerLimits, load_keys


def serve_from_args(args: argparse.Namespace) -> int:
    """Build the kernel, load the --model list with progress bars, read the keys, run uvicorn
    (or, with --ray, deploy the same app as a Ray Serve application: `ray_app`)."""
    if getattr(args, "ray", False):
        from .ray_app import serve_on_ray

        return serve_on_ray(args)
    for flag in ("replicas", "min_replicas", "max_replicas", "ray_address"):
        if getattr(args, flag, None) is not None:
            raise InvalidRequestError(f"--{flag.replace('_', '-')} is a Ray Serve flag: add "
                                      "--ray", param=flag)
    import uvicorn

    keys = load_keys(args.api_keys) if args.api_keys else None  # a bad file fails before loading
    app, names = app_from_args(args, keys)
    if args.fd is not None:  # a listening socket handed down by the Jupyter server extension
        sock = socket.socket(fileno=args.fd)
        host, port = sock.getsockname()[:2]
    else:
        sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET,
                             socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
        host, port = args.host, sock.getsockname()[1]
    who = (f"{len(keys)} API key(s), tenants {sorted({k.tenant for k in keys.values()})}"
           if keys else "no API keys: one user, an admin; loopback names only")
    print(f"realm-nb: serving {', '.join(names)} at http://{host}:{port}/v1 "
          f"({who}); docs at http://{host}:{port}/docs", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    if args.parent_pid is not None:
        _exit_with_parent(args.parent_pid, server)
    server.run(sockets=[sock])
    return 0


def limits_from_args(args: argparse.Namespace) -> ServerLimits:
    """The HTTP face's limits the `serve` flags set (checked: a bad value fails at once)."""
    limits = ServerLimits()
    if getattr(args, "max_body_bytes", None) is not None:
        if args.max_body_bytes < 1024:
            raise InvalidRequestError(f"--max-body-bytes {args.max_body_bytes}: give at least "
                                      "1024", param="max_body_bytes")
        limits = dataclasses.replace(limits, max_body_bytes=args.max_body_bytes)
    if getattr(args, "allowed_host", None):
        limits = dataclasses.replace(limits, allowed_hosts=tuple(args.allowed_host))
    return limits


def app_from_args(args: argparse.Namespace, keys: dict[str, KeyConfig] | None, *,
                  progress: bool = True) -> tuple[FastAPI, list[str]]:
    """The process's kernel with the --model list registered (and resident unless --lazy), and
    the app over it; also what each Ray Serve replica runs (`ray_app.Runtime`)."""
    from tqdm import tqdm

    from ..kernel import RealmKernel

    weights = getattr(args, "weights", None)
    kernel = RealmKernel.shared(mesh=getattr(args, "mesh", None))
    names = []
    for source in args.models or [catalogue.DEFAULT_MODEL]:
        entry = kernel.store.register(source, layout=weights)
        if not args.lazy:
            with tqdm(total=entry.n_layers, desc=f"load {entry.name}", unit="layer",
                      file=sys.stderr, disable=not progress) as bar:
                kernel.store.ensure_resident(entry, progress=lambda i, n: bar.update(i - bar.n))
        names.append(entry.name)
    dirs = [Path(d) for d in (args.models_dir or [])]
    app = create_app(kernel, api_keys=keys, models_dirs=dirs, default_model=names[0],
                     limits=limits_from_args(args))
    return app, names


def _exit_with_parent(parent_pid: int, server: Any) -> None:
    """Stop serving when the owner process is gone, so a runtime never outlives its Jupyter
    server (a SIGKILLed owner runs no cleanup; on Linux PR_SET_PDEATHSIG covers that too)."""

    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        with contextlib.suppress(OSError, AttributeError):  # PR_SET_PDEATHSIG = 1
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        server.should_exit = True
        time.sleep(10)  # a graceful stop that hangs still ends
        os._exit(0)

    threading.Thread(target=watch, name="realm-parent-watch", daemon=True).start()


class BackgroundServer:
    """A uvicorn server on a daemon thread (tests, notebooks): `.url`, `.stop()`, a context.

    Binds the socket itself, so `port=0` picks a free port that `.url` then names.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        self.url = f"http://{host}:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       name="realm-uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server at {self.url} did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
