"""realm-nb: GGUF language models in Jupyter, each tenant in its own WebAssembly sandbox.

Imports are lazy: `import realm_nb` and `%load_ext realm_nb` stay cheap; JAX and wasmtime load
on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import RealmError
from .types import Generation, ModelInfo, SamplingParams, TokenLogprob

__version__ = "0.1.0"

__all__ = ["Generation", "ModelInfo", "Realm", "RealmError", "RealmKernel", "RealmPanel",
           "SamplingParams", "TokenLogprob", "__version__", "load_ipython_extension",
           "unload_ipython_extension"]

if TYPE_CHECKING:
    from .kernel import RealmKernel
    from .sdk import Realm
    from .widget import RealmPanel

_LAZY = {"Realm": ".sdk", "RealmKernel": ".kernel", "RealmPanel": ".widget"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'realm_nb' has no attribute {name!r}")


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    """The Jupyter Server extension that owns the shared runtime (`realm_nb.jupyter_ext`)."""
    return [{"module": "realm_nb.jupyter_ext"}]


def load_ipython_extension(ipython: Any) -> None:
    from .magics import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    from .magics import unload_ipython_extension as unload

    unload(ipython)
