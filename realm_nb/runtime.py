"""Finding the runtime to talk to: one runtime per machine (or per Jupyter server), many clients.

A runtime is a `realm-nb serve` process that holds the store, the schedulers and every tenant's
guest. Clients (notebook kernels, scripts, the CLI) find it without configuration, in order:

1. `REALM_NB_ENDPOINT` (or the older `REALM_ENDPOINT`), with `REALM_NB_API_KEY` / `REALM_API_KEY`;
2. the runtime file named by `REALM_NB_RUNTIME_FILE`, which the Jupyter server extension sets in
   the environment it hands its kernels (see `jupyter_ext`);
3. a runtime file of a live Jupyter server in Jupyter's runtime dir (`realm-nb-runtime-*.json`).

A runtime file is JSON `{url, api_key, owner_pid}` readable by its owner only (0600); the key in
it may name tenants (`X-Realm-Tenant`), so each notebook is its own tenant. This module imports
neither JAX nor wasmtime: a thin kernel must stay thin.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

RUNTIME_FILE_ENV = "REALM_NB_RUNTIME_FILE"
ENDPOINT_ENVS = ("REALM_NB_ENDPOINT", "REALM_ENDPOINT")
API_KEY_ENVS = ("REALM_NB_API_KEY", "REALM_API_KEY")
RUNTIME_FILE_GLOB = "realm-nb-runtime-*.json"
MAX_TENANT_CHARS = 128
DEFAULT_TENANT = "default"  # a client that names no tenant, on a server without keys


@dataclass(frozen=True)
class RuntimeInfo:
    """Where a runtime listens and the key to use; `source` says how it was found."""

    url: str
    api_key: str | None = field(default=None, repr=False)  # never in reprs, outputs or logs
    owner_pid: int | None = None
    source: str = "environment"

    @property
    def names_tenants(self) -> bool:
        """A runtime file's key speaks for many tenants (one per notebook)."""
        return self.source != "environment"


def env_value(names: tuple[str, ...]) -> str | None:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def write_runtime_file(path: Path, info: RuntimeInfo) -> None:
    """Write the file owner-only from the first byte (never world-readable, not even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"url": info.url, "api_key": info.api_key, "owner_pid": info.owner_pid}, f)
    os.replace(tmp, path)


def read_runtime_file(path: Path) -> RuntimeInfo | None:
    """The runtime a file describes, or None when it is missing, unreadable or its owner died."""
    try:
        data = json.loads(path.read_text())
        url, key, owner = data["url"], data.get("api_key"), data.get("owner_pid")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(url, str) or (owner is not None and not isinstance(owner, int)):
        return None
    if isinstance(owner, int) and not pid_alive(owner):
        return None
    return RuntimeInfo(url=url, api_key=key if isinstance(key, str) else None, owner_pid=owner,
                       source=str(path))


def jupyter_runtime_dir() -> Path | None:
    try:
        from jupyter_core.paths import jupyter_runtime_dir as runtime_dir
    except ImportError:
        return None
    return Path(runtime_dir())


def find_runtime() -> RuntimeInfo | None:
    """The runtime this process should use, or None (then `Realm` runs in-process)."""
    url = env_value(ENDPOINT_ENVS)
    if url:
        return RuntimeInfo(url=url, api_key=env_value(API_KEY_ENVS))
    named = os.environ.get(RUNTIME_FILE_ENV)
    if named:
        info = read_runtime_file(Path(named))
        if info is not None:
            return info
    folder = jupyter_runtime_dir()
    if folder is None or not folder.is_dir():
        return None
    files = sorted(folder.glob(RUNTIME_FILE_GLOB), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in files:
        info = read_runtime_file(path)
        if info is not None:
            return info
    return None


def notebook_tenant() -> str | None:
    """The tenant name of this kernel's notebook (Jupyter sets JPY_SESSION_NAME), or None.

    The home folder is shortened to ~; a path too long for a tenant name keeps its end.
    """
    path = os.environ.get("JPY_SESSION_NAME", "").strip()
    if not path:
        return None
    home = os.path.expanduser("~")
    if home not in ("", "/") and path.startswith(home + os.sep):
        path = "~" + path[len(home):]
    return path[-MAX_TENANT_CHARS:]
