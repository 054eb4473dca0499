"""Engine benchmark: speed of both weight layouts, and how closely `fast` follows `exact`.

    python benchmarks/bench_engine.py [--model smollm2-135m] [--decode 128] [--repeat 3]

Prints, per layout: decode tok/s (single stream, host loop over the jitted decode_step), prefill
tok/s for a 128-token prompt, time to first token after a 5-token prompt; then each layout's
teacher-forced top-1 agreement with `exact` over a fixed text (>= 500 positions), its near-ties,
and both perplexities, scored twice: logits of one prefill over the text (prompt chunks), and
logits of decode steps fed the text a token at a time (what generation runs). The reference
speeds are llama.cpp's on this machine as recorded in ../shared/FACTS.md (llama.cpp is not
installed here, so they are quoted, not re-measured).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from realm_nb.engine import Engine
from realm_nb.store import LayerStore

# llama.cpp, 2 threads (../shared/FACTS.md): SmolLM2 Q4_1 through llama-cpp-python; Gemma 3 270M
# Q4_K_M with native llama-bench (FACTS.md gives no first-token figure for it).
REFERENCES: dict[str, dict[str, float | None]] = {
    "smollm2-135m": {"decode_tok_s": 149.0, "prefill_tok_s": 453.0, "ttft_ms": 17.0},
    "gemma3-270m": {"decode_tok_s": 95.0, "prefill_tok_s": 995.0, "ttft_ms": None},
}
NO_REFERENCE: dict[str, float | None] = {"decode_tok_s": None, "prefill_tok_s": None,
                                         "ttft_ms": None}


def ratio(ours: float, theirs: float | None, *, lower_is_better: bool = False) -> str:
    """ours/theirs (or theirs/ours for times), '-' without a reference figure."""
    if theirs is None:
        return "-"
    return f"{(theirs / ours if lower_is_better else ours / theirs):.2f}"

# A fixed text for teacher forcing: plain prose on several topics (written for this benchmark).
TEXT = """\
The river rose slowly through the night, and by morning the lower fields were under water. The
farmers had seen floods before, but this one came earlier in the year than anyone remembered.
They moved the animals to the hill behind the church and carried sacks of grain into the loft of
the old mill, where the floor was dry and the walls were thick. Children watched from the bridge
as branches and broken fences drifted past. By noon the rain had stopped, and the sun came out
over a valley that looked like a lake.

In computing, a cache is a small, fast memory that keeps copies of data that a program is likely
to need again soon. When the processor asks for a value, it first looks in the cache; if the value
is there, the request is served quickly, and if it is not, the value is fetched from the slower
main memory and stored in the cache for next time. Good programs arrange their data so that values
used together sit close together in memory, which makes the cache far more effective.

The recipe is simple. Mix two cups of flour with a spoon of sugar and a pinch of salt. Add one egg,
a cup of milk and two spoons of melted butter, and stir until the batter is smooth. Heat a pan over
medium heat, pour in a little batter, and cook until bubbles form on the top. Turn it over and cook
the other side until golden. Serve warm with fruit, honey or a little more butter.

Photosynthesis is the process by which green plants use light to turn water and carbon dioxide
into sugar and oxygen. It takes place mostly in the leaves, inside small structures called
chloroplasts, which contain the green pigment chlorophyll. The sugar feeds the plant and is stored
as starch, while the oxygen is released into the air. Almost all life on Earth depends on this
process, directly or indirectly, for food and for the oxygen we breathe.

She opened the letter carefully, as if it might break. Inside was a single sheet of paper, folded
twice, and a small photograph of a house by the sea. On the back of the photograph someone had
written a date and three words: "We were happy." She sat down by the window and read the letter
again, slowly this time, trying to hear the voice of the person who had written it so long ago.
"""


def make_store(model: str, layout: str) -> tuple[Engine, list[int]]:
    store = LayerStore(n_slots=4, max_context=1024, layout=layout)
    entry = store.register(model, layout=layout)
    engine = store.ensure_resident(entry)
    return engine, entry.codec.encode(TEXT)


def timed_decode(engine: Engine, n: int) -> float:
    """Greedy decode of n tokens after a 5-token prompt; a first pass compiles every shape."""
    rate = 0.0
    for _ in range(2):
        logits = engine.prefill(0, [504, 3575, 282, 4649, 314], 0)
        token, pos = int(np.argmax(logits)), 5
        t = time.perf_counter()
        for i in range(n):
            logits = engine.decode_step([0], [token], [pos + i])[0]
            token = int(np.argmax(logits))
        rate = n / (time.perf_counter() - t)
    return rate


def timed_prefill(engine: Engine, ids: list[int]) -> float:
    engine.prefill(1, ids, 0)  # compile
    t = time.perf_counter()
    engine.prefill(1, ids, 0)
    return len(ids) / (time.perf_counter() - t)


def timed_ttft(engine: Engine) -> float:
    prompt = [504, 3575, 282, 4649, 314]
    engine.prefill(2, prompt, 0)
    t = time.perf_counter()
    logits = engine.prefill(2, prompt, 0)
    int(np.argmax(logits))
    return (time.perf_counter() - t) * 1000


def decode_logits(engine: Engine, ids: list[int]) -> np.ndarray:
    """Teacher forcing through decode steps: position i's logits from a step fed ids[i]."""
    rows = [engine.prefill(0, ids[:1], 0)]
    for i in range(1, len(ids)):
        rows.append(engine.decode_step([0], [ids[i]], [i])[0])
    engine.release(0)
    return np.stack(rows).astype(np.float64)


def log_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    rows = {}
    logprobs = {}
    ids: list[int] = []
    for layout in ("exact", "fast", "packed"):
        engine, ids = make_store(args.model, layout)
        prompt128 = (ids * 2)[:128]
        dec = statistics.median(timed_decode(engine, args.decode) for _ in range(args.repeat))
        pre = statistics.median(timed_prefill(engine, prompt128) for _ in range(args.repeat))
        ttft = statistics.median(timed_ttft(engine) for _ in range(args.repeat))
        rows[layout] = {"decode_tok_s": dec, "prefill_tok_s": pre, "ttft_ms": ttft}
        logits = engine.prefill(3, ids, 0, all_logits=True)
        logprobs[layout] = log_softmax(logits.astype(np.float64))
        if layout != "exact":  # decode runs another path (packed: the kernel, not f32 dots)
            logprobs[f"{layout} decode"] = log_softmax(decode_logits(engine, ids))
        del engine

    print(f"\nmodel {args.model}; single stream; medians of {args.repeat} runs")
    print(f"{'layout':8} {'decode tok/s':>13} {'x llama.cpp':>12} {'prefill128 tok/s':>17} "
          f"{'x llama.cpp':>12} {'TTFT ms':>8} {'x llama.cpp':>12}")
    ref = REFERENCES.get(args.model, NO_REFERENCE)
    for layout, r in rows.items():
        dec, pre, ttft = r["decode_tok_s"], r["prefill_tok_s"], r["ttft_ms"]
        print(f"{layout:8} {dec:13.1f} {ratio(dec, ref['decode_tok_s']):>12} "
              f"{pre:17.1f} {ratio(pre, ref['prefill_tok_s']):>12} "
              f"{ttft:8.1f} {ratio(ttft, ref['ttft_ms'], lower_is_better=True):>12}")
    cells = [("-" if v is None else f"{v:.1f}") for v in ref.values()]
    print(f"{'llama.cpp':8} {cells[0]:>13} {'':12} {cells[1]:>17} {'':12} {cells[2]:>8}"
          "   (FACTS.md, not re-measured here)")

    for name in ("fast", "fast decode", "packed", "packed decode"):
        exact, fast = logprobs["exact"], logprobs[name]
        top_e, top_f = exact.argmax(-1), fast.argmax(-1)
        n = len(top_e)
        differ = np.nonzero(top_e != top_f)[0]
        gaps = [float(exact[i, top_e[i]] - exact[i, top_f[i]]) for i in differ]
        nxt = np.asarray(ids[1:])
        ppl_e = float(np.exp(-exact[np.arange(n - 1), nxt].mean()))
        ppl_f = float(np.exp(-fast[np.arange(n - 1), nxt].mean()))
        agree = 1 - len(differ) / n
        print(f"\n{name} vs exact, teacher-forced over {n} positions of a fixed text:")
        print(f"  top-1 agreement {agree * 100:.2f} % ({n - len(differ)}/{n}); disagreements "
              f"{len(differ)}, largest gap under exact {max(gaps, default=0.0):.3f} logprob")
        print(f"  perplexity exact {ppl_e:.3f}, {name} {ppl_f:.3f} "
              f"({(ppl_f / ppl_e - 1) * 100:+.2f} %)")
        ok = agree >= 0.98 and max(gaps, default=0.0) <= 0.3 and abs(ppl_f / ppl_e - 1) <= 0.01
        print(f"  criterion for {name} as default (>= 98 %, every gap <= 0.3, ppl within 1 %): "
              f"{'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
