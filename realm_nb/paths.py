"""Where realm-nb keeps its files: one cache folder for pulled models, compiled XLA steps,
built CPU kernels and tokenizer memos. Below every layer, so each can find it."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Folder where pulled models live; `REALM_NB_CACHE` overrides it."""
    root = os.environ.get("REALM_NB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "realm-nb"
    )
    return Path(root)
