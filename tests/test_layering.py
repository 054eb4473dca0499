"""The package keeps its layers: every module of realm_nb imports only from its own layer or what
its layer may import (below it).

The table is DESIGN.md's "Layers of the package" (../shared/DESIGN.md; the README's "How it is
built" repeats it), written here as data, with the modules DESIGN.md does not name yet placed
beside their kin. Imports are read with `ast`, so the test needs neither JAX nor wasmtime, and
counts lazy imports inside functions too: a lazy import is still a dependency. A subpackage
(`server/`) is one room: its modules are named `server.app`, `server.auth`, ..., they take the
subpackage's layer, and they may import one another.

A break found when this test was written and not yet removed is listed in KNOWN_BREAKS with its
reason; anything else that points up the table fails. Remove an entry when its break is gone (the
test says so when an entry no longer matches anything).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "realm_nb"

# Lowest first.
LAYERS: dict[str, set[str]] = {
    # Not a DESIGN.md row: the shared vocabulary every layer speaks (the one error family,
    # request/result types and their limits, the cache folder). Imports nothing else of ours.
    "common": {"errors", "types", "paths", "limits"},
    # DESIGN.md "format": reading GGUF, block formats, vocab, chat templates (jinja2).
    # chat_template: the sandboxed jinja2 renderer the tokenizer uses (next to tokenizer);
    # reencode: GGUF blocks re-encoded as the types the CPU kernel reads (next to quants).
    "format": {"gguf_io", "quants", "reencode", "tokenizer", "chat_template"},
    # DESIGN.md "model": pure JAX. cpu_kernels: the quantized matmul (XLA FFI) that `weights`
    # calls inside the jitted step; kvcache is a DESIGN.md row too.
    # mesh: the rules table (logical axes -> mesh axes); placement: the weights and KV pool
    # put on a mesh by it.
    "model": {"config", "weights", "cpu_kernels", "kvcache", "model", "engine", "mesh",
              "placement"},
    # DESIGN.md "runtime": registry and residency, the host ABI, tenants, batching, the facade.
    # catalogue: the model registry's names and `pull`; runtime: finding the runtime process;
    # jupyter_ext: the Jupyter Server extension that owns it; guest_build: builds the guest
    # against the ABI (abi.py); hub: pulling from the Hugging Face Hub; discovery: GGUFs
    # already on disk (HF cache, Ollama, LM Studio, REALM_NB_MODELS_DIR), beside catalogue.
    "runtime": {"catalogue", "store", "abi", "host", "tenants", "scheduler", "kernel",
                "runtime", "jupyter_ext", "guest_build", "hub", "discovery"},
    # DESIGN.md "faces": user-facing API. client: the SDK's server mode; server: the HTTP
    # server, a subpackage (app, routes, auth, metrics); cell_output: notebook output (next to
    # magics); the package's __init__ and __main__ are entry points.
    "faces": {"sdk", "client", "server", "cli", "magics", "cell_output", "widget", "__init__",
              "__main__"},
}
LAYER_OF = {mod: name for name, mods in LAYERS.items() for mod in mods}


def layer_of(module: str) -> str | None:
    """The layer of a module, `server.app` taking its subpackage's (`server`)."""
    return LAYER_OF.get(module.split(".")[0])


# DESIGN.md's "may import" column: besides its own layer, what each layer may import. Faces get
# the runtime only ("A face never reaches into `model`"); `model` never knows wasmtime.
MAY_IMPORT: dict[str, set[str]] = {
    "common": set(),
    "format": {"common"},
    "model": {"format", "common"},
    "runtime": {"model", "format", "common"},
    "faces": {"runtime", "common"},
}

# (importer, imported): breaks that are known and not yet removed, each with why it stays.
KNOWN_BREAKS: dict[tuple[str, str], str] = {
    ("cpu_kernels", "guest_build"):
        "the CPU kernel build shares the guest build's zig pin (ZIG_VERSION) and its "
        "shipped-artifact check (check_shipped); both belong in a build-tools module below "
        "the model layer",
    ("cli", "cpu_kernels"):
        "`realm-nb build-kernels` runs cpu_kernels.main, a build tool; it should move with the "
        "build helpers above, or be reached through the kernel facade",
}

# Faces talk to the RealmKernel facade (STYLE.md, "Absorb next"): attributes of the runtime's
# internals they must not reach through, and the reaches that are known and not yet removed
# (face -> attribute -> how many times, over all the modules of a subpackage).
INTERNALS = {"store", "engine", "codec"}
FACES = LAYERS["faces"]
KNOWN_REACHES: dict[str, dict[str, int]] = {
    "server": {"store": 9, "codec": 1},
}


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name below realm_nb: `kernel`, `server` (the
    subpackage's __init__), `server.app`; the package's own __init__ stays `__init__`."""
    found = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        parts = list(p.relative_to(PACKAGE).with_suffix("").parts)
        if len(parts) > 1 and parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = p
    return found


def _imports(source: str, module: str = "") -> set[str]:
    """The realm_nb modules that `source` (the module `module`, dotted as in `_modules`)
    imports, at module level or inside functions: `x` or `sub.x`, relative imports resolved."""
    package = module.split(".")[:-1]  # where `from .` starts (for server.app: server)
    if module in _SUBPACKAGES:
        package = [module]
    found: set[str] = set()

    def add(base: list[str], names: list[str]) -> None:
        if base and base[0] in _SUBPACKAGES and len(base) == 1:  # from .server import x
            found.update(f"{base[0]}.{n}" if f"{base[0]}.{n}" in _MODULE_NAMES else base[0]
                         for n in names)
        elif base:
            found.add(".".join(base[:2]) if base[0] in _SUBPACKAGES else base[0])
        else:  # from . import x, y (at the package's top)
            found.update(names)

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            names = [alias.name for alias in node.names]
            if node.level >= 1:
                start = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                add(start + (node.module.split(".") if node.module else []), names)
            elif node.module and node.module.split(".")[0] == "realm_nb":
                add(node.module.split(".")[1:], names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "realm_nb" and len(parts) > 1:
                    add(parts[1:], [])
    return found


_MODULE_NAMES = set(_modules())
_SUBPACKAGES = {name.split(".")[0] for name in _MODULE_NAMES if "." in name}


def _reaches(paths: list[Path]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Attribute) and node.attr in INTERNALS:
                counts[node.attr] = counts.get(node.attr, 0) + 1
    return counts


def test_every_module_has_a_layer() -> None:
    tops = {name.split(".")[0] for name in _modules()}
    unplaced = sorted(tops - set(LAYER_OF))
    assert not unplaced, (f"modules with no layer: {unplaced}; place each in LAYERS "
                          "(and in DESIGN.md's table)")
    gone = sorted(set(LAYER_OF) - tops)
    assert not gone, f"LAYERS names modules that no longer exist: {gone}"


def test_imports_point_down_the_layer_table() -> None:
    modules = _modules()
    breaks: dict[tuple[str, str], str] = {}
    for name, path in modules.items():
        for dep in _imports(path.read_text(), name):
            mine, theirs = layer_of(name), layer_of(dep)
            if mine is None or theirs is None or dep == name:
                continue
            if theirs != mine and theirs not in MAY_IMPORT[mine]:
                breaks[(name, dep)] = f"{name} ({mine}) imports {dep} ({theirs})"
    new = sorted(msg for key, msg in breaks.items() if key not in KNOWN_BREAKS)
    assert not new, "imports DESIGN.md's layer table does not allow:\n" + "\n".join(new)
    fixed = sorted(set(KNOWN_BREAKS) - set(breaks))
    assert not fixed, f"these known breaks are gone: remove them from KNOWN_BREAKS: {fixed}"


@pytest.mark.parametrize("face", sorted(FACES))
def test_faces_do_not_reach_into_the_runtime(face: str) -> None:
    paths = [p for name, p in _modules().items() if name.split(".")[0] == face]
    if not paths:
        pytest.skip(f"no module {face}")
    got = _reaches(paths)
    allowed = KNOWN_REACHES.get(face, {})
    more = {attr: n for attr, n in got.items() if n > allowed.get(attr, 0)}
    assert not more, (f"{face} reaches into the runtime through {more} (allowed {allowed}); "
                      "give RealmKernel the verb it needs instead")
    fewer = {attr: n for attr, n in allowed.items() if got.get(attr, 0) < n}
    assert not fewer, f"{face} reaches in less than KNOWN_REACHES says: lower it to {got}"


def test_the_reader_counts_every_kind_of_import() -> None:
    src = ("from .store import LayerStore\nimport realm_nb.kernel\nimport numpy\n"
           "def f():\n    from realm_nb import engine\n    from . import weights, quants\n"
           "    from realm_nb.tenants import Tenant\n")
    assert _imports(src) == {"store", "kernel", "engine", "weights", "quants", "tenants"}


def test_the_reader_resolves_imports_inside_a_subpackage() -> None:
    src = ("from ..errors import RealmError\nfrom .auth import KeyConfig\nfrom . import metrics\n"
           "from .. import catalogue\nfrom realm_nb.server import create_app\n"
           "from realm_nb.server.bodies import model_entry\n")
    assert _imports(src, "server.app") == {"errors", "server.auth", "server.metrics",
                                           "catalogue", "server", "server.bodies"}
    assert _imports("from .app import create_app\n", "server") == {"server.app"}
    assert _imports("from .server import create_app\n", "cli") == {"server"}
