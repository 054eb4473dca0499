"""realm-nb against native llama.cpp, same GGUF, same 2 threads, measured in one run.

    REALM_NB_LLAMACPP_BIN=/path/to/llama.cpp/build/bin python benchmarks/bench_vs_llamacpp.py \
        [--model smollm2-135m] [--repeat 5]

Builds nothing. When `REALM_NB_LLAMACPP_BIN` names a folder holding `llama-bench` and
`llama-batched-bench` (README "Benchmarks" says how to build them), they run first; realm-nb runs
after them in the same process run; without it, llama.cpp's column reads "not measured".

- single-stream decode: ours through the SDK, `Realm(mode="local")`, greedy, 128 new tokens after a
  short prompt (SDK -> guest -> host -> JAX), decode tok/s from `Generation.timings`
  (`tokens_per_s`, first token excluded); theirs `llama-bench -t 2 -n 128` (tg128).
- prefill of a 128-token prompt: ours prompt tokens / `timings["prompt_ms"]`; theirs pp128.
- aggregate decode for 1, 2, 4, 8, 16 concurrent tenants: ours one `Realm(tenant=...)` and one
  thread each, 16-token prompts, 64 new tokens each, greedy, all new tokens / wall time (prefill
  included); theirs `llama-batched-bench -npp 16 -ntg 64 -npl 1,2,4,8,16`: S_TG (decode only) and,
  for a like-for-like figure, new tokens / (prefill + decode time).

Medians of `--repeat` (>= 5) runs with the spread (min-max); ratios are ours / theirs. A plot of
tok/s against tenants goes to benchmarks/out/vs_llamacpp.png (and the figures to
vs_llamacpp.json). The machine is shared: figures under load are noisy, and the two sides run one
after the other, not interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

N_SLOTS, MAX_CONTEXT = 16, 512
os.environ.setdefault("REALM_NB_SLOTS", str(N_SLOTS))  # the shared kernel local Realms use
os.environ.setdefault("REALM_NB_CONTEXT", str(MAX_CONTEXT))

from bench_tenants import TEXT, run_concurrent  # noqa: E402  (the same text and load)

from realm_nb.catalogue import resolve_model_path  # noqa: E402
from realm_nb.kernel import RealmKernel  # noqa: E402
from realm_nb.sdk import Realm  # noqa: E402
from realm_nb.types import Generation  # noqa: E402

THREADS = 2
DECODE_NEW = 128  # single stream: new tokens (llama-bench tg128)
PREFILL_LEN = 128  # prompt tokens (llama-bench pp128)
PROMPT_LEN, TENANT_NEW = 16, 64  # concurrent tenants: prompt and new tokens each
CONCURRENCY = (1, 2, 4, 8, 16)
OUT = Path(__file__).resolve().parent / "out"
ENV_BIN = "REALM_NB_LLAMACPP_BIN"

SHORT_PROMPT = "Once upon a time, in a small village by the sea, there lived"


# ----------------------------------------------------------------------------- statistics


def spread(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def fmt(s: dict[str, float] | None) -> str:
    if not s:
        return "-"
    return f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})"


def ratio(ours: dict[str, float] | None, theirs: dict[str, float] | None) -> str:
    if not ours or not theirs or not theirs["median"]:
        return "-"
    return f"{ours['median'] / theirs['median']:.2f}x"


# ----------------------------------------------------------------------------- llama.cpp


def llama_bin() -> Path | None:
    folder = os.environ.get(ENV_BIN)
    if not folder:
        return None
    p = Path(folder).expanduser()
    missing = [t for t in ("llama-bench", "llama-batched-bench") if not (p / t).is_file()]
    if missing:
        raise SystemExit(f"{ENV_BIN}={folder}: no {', '.join(missing)} there")
    return p


def run_tool(cmd: list[str], timeout: float = 1200) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stderr[-2000:]}")
    return r.stdout


def theirs_single(binp: Path, model: Path, repeat: int) -> dict[str, Any]:
    """llama-bench pp128 and tg128, `repeat` repetitions each: per-repetition tok/s."""
    out = run_tool([str(binp / "llama-bench"), "-m", str(model), "-t", str(THREADS),
                    "-p", str(PREFILL_LEN), "-n", str(DECODE_NEW), "-r", str(repeat),
                    "-o", "json"])
    rows = json.loads(out)
    res: dict[str, Any] = {}
    for row in rows:
        samples = [float(x) for x in row.get("samples_ts") or [row["avg_ts"]]]
        key = "prefill" if row["n_gen"] == 0 else "decode"
        res[key] = spread(samples)
        res["build"] = f"{row.get('build_commit', '?')} ({row.get('cpu_info', '')})".strip()
    return res


def theirs_batched(binp: Path, model: Path, repeat: int) -> dict[int, dict[str, Any]]:
    """llama-batched-bench over CONCURRENCY, run `repeat` times: S_TG and end-to-end tok/s."""
    tg: dict[int, list[float]] = {n: [] for n in CONCURRENCY}
    e2e: dict[int, list[float]] = {n: [] for n in CONCURRENCY}
    ctx = max(CONCURRENCY) * (PROMPT_LEN + TENANT_NEW)
    for _ in range(repeat):
        out = run_tool([str(binp / "llama-batched-bench"), "-m", str(model), "-t", str(THREADS),
                        "-tb", str(THREADS), "-c", str(ctx), "-npp", str(PROMPT_LEN),
                        "-ntg", str(TENANT_NEW), "-npl", ",".join(map(str, CONCURRENCY)),
                        "--output-format", "jsonl"])
        for line in out.splitlines():
            line = line.strip()
            if not line.startswith("{"):
                continue
            row = json.loads(line)
            n = int(row["pl"])
            if n in tg:
                tg[n].append(float(row["speed_tg"]))
                e2e[n].append(n * int(row["tg"]) / float(row["t"]))
    return {n: {"tg": spread(tg[n]), "e2e": spread(e2e[n])} for n in CONCURRENCY if tg[n]}


# ----------------------------------------------------------------------------- realm-nb


def windows(ids: list[int], n: int, length: int) -> list[list[int]]:
    step = max(1, (len(ids) - length) // n)
    out = [ids[i * step : i * step + length] for i in range(n)]
    assert all(len(p) == length for p in out) and len({tuple(p) for p in out}) == n
    return out


def ours_single(model: str, prefill_prompt: list[int], repeat: int) -> dict[str, Any]:
    realm = Realm(mode="local", default_model=model, tenant="single")
    realm.generate(prompt=SHORT_PROMPT, max_tokens=8, temperature=0)  # compile
    realm.generate(prompt=prefill_prompt, max_tokens=1, temperature=0)
    decode, prefill, tokens = [], [], []
    for _ in range(repeat):
        g = realm.generate(prompt=SHORT_PROMPT, max_tokens=DECODE_NEW, temperature=0)
        assert isinstance(g, Generation)
        decode.append(g.timings["tokens_per_s"])
        tokens.append(len(g.token_ids))
        g = realm.generate(prompt=prefill_prompt, max_tokens=1, temperature=0)
        assert isinstance(g, Generation)
        prefill.append(g.usage["prompt_tokens"] / (g.timings["prompt_ms"] / 1000))
    return {"decode": spread(decode), "prefill": spread(prefill), "decode_tokens": min(tokens)}


def ours_batched(model: str, prompts: list[list[int]], repeat: int) -> dict[int, dict[str, Any]]:
    res: dict[int, dict[str, Any]] = {}
    for n in CONCURRENCY:
        batch = prompts[:n]
        run_concurrent(model, batch, 8, f"warm{n}")  # compile this batch's shapes
        tps, toks = [], []
        for r in range(repeat):
            wall, k = run_concurrent(model, batch, TENANT_NEW, f"b{n}-{r}")
            tps.append(k / wall)
            toks.append(k)
        res[n] = {"agg": spread(tps), "tokens": min(toks)}
    return res


# ----------------------------------------------------------------------------- report


def plot(ours: dict[int, dict[str, Any]], theirs: dict[int, dict[str, Any]] | None,
         path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))

    def line(xs: list[int], ss: list[dict[str, float]], label: str, style: str) -> None:
        med = [s["median"] for s in ss]
        err = [[m - s["min"] for m, s in zip(med, ss, strict=True)],
               [s["max"] - m for m, s in zip(med, ss, strict=True)]]
        ax.errorbar(xs, med, yerr=err, fmt=style, capsize=3, label=label)

    xs = sorted(ours)
    line(xs, [ours[n]["agg"] for n in xs], "realm-nb (SDK, guests; prefill incl.)", "o-")
    if theirs:
        xt = sorted(theirs)
        line(xt, [theirs[n]["tg"] for n in xt], "llama.cpp batched-bench S_TG", "s-")
        line(xt, [theirs[n]["e2e"] for n in xt], "llama.cpp batched-bench, prefill incl.", "s--")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(CONCURRENCY), [str(n) for n in CONCURRENCY])
    ax.set_xlabel("concurrent tenants / sequences")
    ax.set_ylabel("aggregate tok/s (median, min-max)")
    ax.set_title(f"{PROMPT_LEN}-token prompts, {TENANT_NEW} new tokens each, {THREADS} threads")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--repeat", type=int, default=5, help="runs per figure (at least 5)")
    args = ap.parse_args()
    repeat = max(5, args.repeat)
    binp = llama_bin()
    path = resolve_model_path(args.model)

    print(f"{args.model}: {path}; {THREADS} threads; medians of {repeat} runs (min-max); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (a busy machine "
          f"makes these figures noisy)")

    # ---- theirs first (they need the cores to themselves, as ours do after them)
    t_single: dict[str, Any] | None = None
    t_batched: dict[int, dict[str, Any]] | None = None
    if binp is not None:
        t = time.perf_counter()
        t_single = theirs_single(binp, path, repeat)
        t_batched = theirs_batched(binp, path, repeat)
        print(f"llama.cpp from {binp} (build {t_single.get('build', '?')}): "
              f"{time.perf_counter() - t:.0f} s; tg{DECODE_NEW} {fmt(t_single.get('decode'))}, "
              f"pp{PREFILL_LEN} {fmt(t_single.get('prefill'))}; batched S_TG "
              + ", ".join(f"{n}: {fmt(t_batched[n]['tg'])}" for n in sorted(t_batched)),
              flush=True)
    else:
        print(f"llama.cpp: not measured (set {ENV_BIN} to a folder with llama-bench and "
              "llama-batched-bench)")

    # ---- ours
    kernel = RealmKernel.shared()
    t = time.perf_counter()
    kernel.load_model(args.model)
    entry = kernel.model(args.model)
    engine = entry.engine
    slots = getattr(engine, "n_slots", "?")
    print(f"realm-nb: {entry.name} ({entry.layout} layout) loaded in "
          f"{time.perf_counter() - t:.1f} s; kernel slots {slots}, context "
          f"{os.environ['REALM_NB_CONTEXT']}\n")
    ids = kernel.tokenize(args.model, TEXT)
    assert len(ids) >= PREFILL_LEN, f"the text is only {len(ids)} tokens"
    prefill_prompt = ids[:PREFILL_LEN]
    o_single = ours_single(args.model, prefill_prompt, repeat)
    o_batched = ours_batched(args.model, windows(ids, max(CONCURRENCY), PROMPT_LEN), repeat)

    # ---- table
    theirs_na = "not measured*"
    print(f"{'figure':<34}  {'realm-nb tok/s':>22}  {'llama.cpp tok/s':>22}  {'ours/theirs':>11}")

    def row(name: str, ours: dict[str, float] | None, theirs: dict[str, float] | None) -> None:
        th = fmt(theirs) if binp is not None else theirs_na
        print(f"{name:<34}  {fmt(ours):>22}  {th:>22}  {ratio(ours, theirs):>11}")

    row(f"single-stream decode ({DECODE_NEW} new)", o_single["decode"],
        t_single.get("decode") if t_single else None)
    row(f"prefill, {PREFILL_LEN}-token prompt", o_single["prefill"],
        t_single.get("prefill") if t_single else None)
    for n in CONCURRENCY:
        row(f"{n:>2} tenant(s), aggregate decode", o_batched[n]["agg"],
            t_batched[n]["tg"] if t_batched and n in t_batched else None)
    if t_batched:
        print("\nlike for like (prefill included on both sides: new tokens / wall time)")
        print(f"{'tenants':<34}  {'realm-nb tok/s':>22}  {'llama.cpp tok/s':>22}  "
              f"{'ours/theirs':>11}")
        for n in CONCURRENCY:
            if n in t_batched:
                print(f"{n:<34}  {fmt(o_batched[n]['agg']):>22}  "
                      f"{fmt(t_batched[n]['e2e']):>22}  "
                      f"{ratio(o_batched[n]['agg'], t_batched[n]['e2e']):>11}")
    if binp is None:
        print(f"* not measured (set {ENV_BIN} to a folder with llama-bench and "
              "llama-batched-bench)")
    print(f"\nours: SDK Realm(mode='local'), greedy; single stream {o_single['decode_tokens']} "
          f"tokens generated (of {DECODE_NEW} asked; the decode figure excludes the first token); "
          f"tenants: all new tokens / wall time, prefill included, "
          f"{min(o_batched[n]['tokens'] for n in CONCURRENCY)}+ tokens per run. "
          f"theirs: llama-bench pp{PREFILL_LEN}/tg{DECODE_NEW}, llama-batched-bench S_TG "
          f"(decode only).")

    OUT.mkdir(parents=True, exist_ok=True)
    png = OUT / "vs_llamacpp.png"
    plot(o_batched, t_batched, png)
    (OUT / "vs_llamacpp.json").write_text(json.dumps(
        {"model": str(path), "threads": THREADS, "repeat": repeat,
         "ours": {"single": o_single, "batched": o_batched},
         "theirs": {"single": t_single, "batched": t_batched} if binp else None},
        indent=2, default=str))
    print(f"plot: {png}")


if __name__ == "__main__":
    main()
