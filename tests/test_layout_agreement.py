"""How closely the shipped layouts follow `exact` on the real model (the default layout's
criterion: teacher-forced top-1 >= 98 %, every disagreement a near-tie, perplexity within 1 %).

`packed` computes a prompt chunk of >= 32 tokens with f32 dots and each decoded token with the
CPU kernel's int8 dots, so both paths are scored: prompt logits from one prefill, decode logits by
feeding the text one token at a time. `exact` (weights dequantized bit-exactly to gguf.quants) is
the reference; it is itself checked against llama.cpp in test_llamacpp_refs.py.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from realm_nb import cpu_kernels
from realm_nb.engine import Engine
from realm_nb.store import LayerStore

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
# A fixed text written for this test: plain prose on a few topics.
TEXT = """\
The old lighthouse stood at the end of a narrow path, and every evening the keeper climbed its
ninety steps to light the lamp. Ships passing in the dark could see the beam from far away, and
the sailors knew that the rocks were near. In winter the wind was so strong that the keeper had
to hold the rail with both hands.

A spreadsheet is a grid of cells arranged in rows and columns. Each cell can hold a number, a
piece of text or a formula that computes a value from other cells. When one value changes, every
formula that depends on it is updated at once, which makes spreadsheets useful for budgets,
schedules and simple models of how one quantity affects another.

To plant a tree, dig a hole twice as wide as its roots and just as deep. Set the tree in the
middle, fill the hole with the soil you removed, and press it down gently. Water it well, and keep
the ground moist for the first few weeks while the roots grow into the new earth.
"""
POSITIONS = 240  # at most this many scored per path (the text is 216 tokens)


def log_softmax(x: np.ndarray) -> np.ndarray:
    z = x.astype(np.float64) - x.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


@pytest.fixture(scope="module")
def engines() -> dict[str, tuple[Engine, list[int]]]:
    out = {}
    for layout in ("exact", "packed"):
        store = LayerStore(n_slots=2, max_context=512, layout=layout)
        entry = store.register(MODEL, layout=layout)
        out[layout] = (store.ensure_resident(entry), entry.codec.encode(TEXT)[:POSITIONS])
    return out


def prompt_logits(engine: Engine, ids: list[int]) -> np.ndarray:
    out = engine.prefill(0, ids, 0, all_logits=True)
    engine.release(0)
    return out


def decode_logits(engine: Engine, ids: list[int]) -> np.ndarray:
    """Position i's logits from a decode step fed ids[i] (the first from a 1-token prefill)."""
    rows = [engine.prefill(1, ids[:1], 0)]
    for i in range(1, len(ids)):
        rows.append(engine.decode_step([1], [ids[i]], [i])[0])
    engine.release(1)
    return np.stack(rows)


def agreement(exact: np.ndarray, other: np.ndarray, ids: list[int]
              ) -> tuple[float, float, float]:
    """(top-1 agreement, largest logprob gap under exact where they differ, perplexity ratio)."""
    le, lo = log_softmax(exact), log_softmax(other)
    top_e, top_o = le.argmax(-1), lo.argmax(-1)
    differ = np.nonzero(top_e != top_o)[0]
    gap = max((float(le[i, top_e[i]] - le[i, top_o[i]]) for i in differ), default=0.0)
    nxt = np.asarray(ids[1:])
    rows = np.arange(len(nxt))
    ppl_ratio = float(np.exp(-lo[rows, nxt].mean()) / np.exp(-le[rows, nxt].mean()))
    return 1 - len(differ) / len(ids), gap, ppl_ratio


@pytest.mark.parametrize("path", [prompt_logits, decode_logits], ids=["prompt", "decode"])
def test_packed_follows_exact(engines: dict[str, tuple[Engine, list[int]]],
                              path: Callable[[Engine, list[int]], np.ndarray]) -> None:
    if path is decode_logits and not cpu_kernels.available():
        pytest.skip(f"no CPU kernel here: {cpu_kernels.unavailable_reason()}")
    exact_engine, ids = engines["exact"]
    packed_engine, _ = engines["packed"]
    agree, gap, ppl_ratio = agreement(prompt_logits(exact_engine, ids),
                                      path(packed_engine, ids), ids)
    print(f"\npacked ({path.__name__}) vs exact over {len(ids)} positions: top-1 "
          f"{agree:.1%}, largest gap {gap:.3f}, perplexity ratio {ppl_ratio:.4f}")
    assert agree >= 0.98
    assert gap <= 0.3  # disagreements are near-ties under exact
    assert abs(ppl_ratio - 1) <= 0.01
