"""The package keeps its layers: every module of realm_nb imports only from its own layer or what
its layer may import (below it).

The table is DESIGN.md's "Layers of the package" (../shared/DESIGN.md; the README's "How it is
built" repeats it), written here as data, with the modules DESIGN.md does not name yet placed
beside their kin. Imports are read with `ast`, so the test needs neither JAX nor wasmtime, and
counts lazy imports inside functions too: a lazy import is still a dependency.

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
    # request/result types, the cache folder). Imports nothing else of ours.
    "common": {"errors", "types", "paths"},
    # DESIGN.md "format": reading GGUF, block formats, vocab, chat templates (jinja2).
    # chat_template: the sandboxed jinja2 renderer the tokenizer uses (next to tokenizer).
    "format": {"gguf_io", "quants", "tokenizer", "chat_template"},
    # DESIGN.md "model": pure JAX. cpu_kernels: the quantized matmul (XLA FFI) that `weights`
    # calls inside the jitted step; kvcache is a DESIGN.md row too.
    "model": {"config", "weights", "cpu_kernels", "kvcache", "model", "engine"},
    # DESIGN.md "runtime": registry and residency, the host ABI, tenants, batching, the facade.
    # catalogue: the model registry's names and `pull`; runtime: finding the runtime process;
    # jupyter_ext: the Jupyter Server extension that owns it; guest_build: builds the guest
    # against the ABI (abi.py).
    "runtime": {"catalogue", "store", "abi", "host", "tenants", "scheduler", "kernel",
                "runtime", "jupyter_ext", "guest_build"},
    # DESIGN.md "faces": user-facing API. client: the SDK's server mode; server_*: the HTTP
    # server's parts; cell_output: notebook output (next to magics); the package's __init__ and
    # __main__ are entry points.
    "faces": {"sdk", "client", "server", "server_auth", "server_metrics", "server_openai", "cli",
              "magics", "cell_output", "widget", "__init__", "__main__"},
}
LAYER_OF = {mod: name for name, mods in LAYERS.items() for mod in mods}

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
    ("server_auth", "chat_template"):
        "ServerLimits holds a TemplateBudget (the chat-template step/time/size budget) to hand "
        "to RealmKernel.render_chat; the budget type belongs with the other request limits in "
        "types.py (issue 12's one table of limits), and importing it through kernel.py would "
        "make `realm-nb keys` import JAX",
    ("cli", "cpu_kernels"):
        "`realm-nb build-kernels` runs cpu_kernels.main, a build tool; it should move with the "
        "build helpers above, or be reached through the kernel facade",
}

# Faces talk to the RealmKernel facade (STYLE.md, "Absorb next"): attributes of the runtime's
# internals they must not reach through, and the reaches that are known and not yet removed
# (module -> attribute -> how many times). server.py is due to become a subpackage (issue 12),
# which is where its reaches should go.
INTERNALS = {"store", "engine", "codec"}
FACES = LAYERS["faces"]
KNOWN_REACHES: dict[str, dict[str, int]] = {
    "server": {"store": 9, "codec": 1},
}


def _modules() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PACKAGE.glob("*.py"))}


def _imports(source: str) -> set[str]:
    """The realm_nb modules that `source` imports, at module level or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .x import y
                found.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import x, y
                found.update(alias.name for alias in node.names)
            elif node.level == 0 and node.module and node.module.split(".")[0] == "realm_nb":
                parts = node.module.split(".")
                found.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "realm_nb" and len(parts) > 1:
                    found.add(parts[1])
    return found


def _reaches(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Attribute) and node.attr in INTERNALS:
            counts[node.attr] = counts.get(node.attr, 0) + 1
    return counts


def test_every_module_has_a_layer() -> None:
    unplaced = sorted(set(_modules()) - set(LAYER_OF))
    assert not unplaced, (f"modules with no layer: {unplaced}; place each in LAYERS "
                          "(and in DESIGN.md's table)")
    gone = sorted(set(LAYER_OF) - set(_modules()))
    assert not gone, f"LAYERS names modules that no longer exist: {gone}"


def test_imports_point_down_the_layer_table() -> None:
    modules = _modules()
    breaks: dict[tuple[str, str], str] = {}
    for name, path in modules.items():
        for dep in _imports(path.read_text()):
            if dep not in LAYER_OF or dep == name:
                continue
            mine, theirs = LAYER_OF[name], LAYER_OF[dep]
            if theirs != mine and theirs not in MAY_IMPORT[mine]:
                breaks[(name, dep)] = f"{name} ({mine}) imports {dep} ({theirs})"
    new = sorted(msg for key, msg in breaks.items() if key not in KNOWN_BREAKS)
    assert not new, "imports DESIGN.md's layer table does not allow:\n" + "\n".join(new)
    fixed = sorted(set(KNOWN_BREAKS) - set(breaks))
    assert not fixed, f"these known breaks are gone: remove them from KNOWN_BREAKS: {fixed}"


@pytest.mark.parametrize("face", sorted(FACES))
def test_faces_do_not_reach_into_the_runtime(face: str) -> None:
    path = _modules().get(face)
    if path is None:
        pytest.skip(f"no module {face}")
    got = _reaches(path)
    allowed = KNOWN_REACHES.get(face, {})
    more = {attr: n for attr, n in got.items() if n > allowed.get(attr, 0)}
    assert not more, (f"{face}.py reaches into the runtime through {more} (allowed {allowed}); "
                      "give RealmKernel the verb it needs instead")
    fewer = {attr: n for attr, n in allowed.items() if got.get(attr, 0) < n}
    assert not fewer, f"{face}.py reaches in less than KNOWN_REACHES says: lower it to {got}"


def test_the_reader_counts_every_kind_of_import() -> None:
    src = ("from .store import LayerStore\nimport realm_nb.kernel\nimport numpy\n"
           "def f():\n    from realm_nb import engine\n    from . import weights, quants\n"
           "    from realm_nb.tenants import Tenant\n")
    assert _imports(src) == {"store", "kernel", "engine", "weights", "quants", "tenants"}
