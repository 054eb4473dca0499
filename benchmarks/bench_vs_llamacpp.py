"""realm-nb against native llama.cpp, same GGUF, same 2 threads, measured in one run.

    REALM_NB_LLAMACPP_BIN=/path/to/llama.cpp/build/bin python benchmarks/bench_vs_llamacpp.py \
        [--model smollm2-135m] [--repeat 5] [--rows single,tenants,server]

Builds nothing. When `REALM_NB_LLAMACPP_BIN` names a folder holding `llama-bench`,
`llama-batched-bench` and `llama-server` (README "Benchmarks" says how to build them), they run
first; realm-nb runs after them in the same process run; without it (or without `llama-server`,
for the server rows), llama.cpp's column reads "not measured". `--rows` picks the rows to run.

- single-stream decode (`single`): ours through the SDK, `Realm(mode="local")`, greedy, 128 new
  tokens after a short prompt (SDK -> guest -> host -> JAX), decode tok/s from
  `Generation.timings` (`tokens_per_s`, first token excluded); theirs `llama-bench -t 2 -n 128`
  (tg128).
- prefill of a 128-token prompt (`single`): ours prompt tokens / `timings["prompt_ms"]`; theirs
  pp128.
- aggregate decode for 1, 2, 4, 8, 16 concurrent tenants (`tenants`): ours one
  `Realm(tenant=...)` and one thread each, 16-token prompts, 64 new tokens each, greedy, all new
  tokens / wall time (prefill included); theirs `llama-batched-bench -npp 16 -ntg 64
  -npl 1,2,4,8,16`: S_TG (decode only) and, for a like-for-like figure, new tokens / (prefill +
  decode time).
- the server under load (`server`): `realm-nb serve` (16 slots, context 512, one API key and
  tenant per client) and `llama-server -t 2 -np 16 -c 8192`, each started here on 127.0.0.1 and
  stopped by its PID, take the same load: 16 threads, each the official `openai` client streaming
  one `completions.create(prompt=<16 token ids>, max_tokens=64, temperature=0, stream=True)`, all
  released at once, after one warm-up round. Aggregate tok/s = all completion tokens (the usage
  chunk) / wall time from the release to the last stream's end; first token = the median over the
  16 clients of request -> first streamed text, in ms (lower is better). Every round sends prompts
  no earlier round sent, so neither side answers from a prompt cache.

Medians of `--repeat` (>= 5; fewer only for a smoke test) runs with the spread (min-max); ratios
are ours / theirs. A plot of tok/s against tenants goes to benchmarks/out/vs_llamacpp.png (and
the figures to vs_llamacpp.json; a run of some `--rows` only adds their names to the file names).
The machine is shared: figures under load are noisy, and the two sides run one after the other,
not interleaved.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

N_SLOTS, MAX_CONTEXT = 16, 512
os.environ.setdefault("REALM_NB_SLOTS", str(N_SLOTS))  # the shared kernel local Realms use
os.environ.setdefault("REALM_NB_CONTEXT", str(MAX_CONTEXT))

from bench_tenants import TEXT, at_once, run_concurrent  # noqa: E402  (the same text and load)

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
ROWS = ("single", "tenants", "server")
TOOLS = {"single": "llama-bench", "tenants": "llama-batched-bench"}  # without them: an error
SERVER_TOOL = "llama-server"  # without it: the server rows' llama.cpp column is "not measured"
SERVER_CLIENTS, SERVER_NEW = 16, 64  # streaming openai clients, new tokens each
SERVER_START_S = 600.0  # a cold start on a busy machine: the model, the first compiles
SERVER_STOP_S = 20.0  # SIGTERM, then SIGKILL after this

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


def llama_bin(rows: set[str]) -> Path | None:
    """The folder of llama.cpp's tools, if `REALM_NB_LLAMACPP_BIN` names one holding the tools
    these rows need (llama-server is looked for by the server rows themselves)."""
    folder = os.environ.get(ENV_BIN)
    if not folder:
        return None
    p = Path(folder).expanduser()
    missing = [TOOLS[r] for r in ROWS if r in rows and r in TOOLS and not (p / TOOLS[r]).is_file()]
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


# ----------------------------------------------------------------------------- servers
# The server row: `realm-nb serve` and `llama-server`, each started here on loopback,
# take the same `openai` client load, then are stopped by their PID. Both run as child processes
# of this one, one after the other, so each has the cores to itself.


@dataclass(frozen=True)
class Stream:
    first_s: float  # request sent -> first streamed text
    tokens: int  # completion tokens: the usage chunk's count, else the chunks with text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop(proc: subprocess.Popen[bytes]) -> None:
    """End a server we started, by its PID: SIGTERM, and SIGKILL if it has not gone in time."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=SERVER_STOP_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def served_models(base_url: str, key: str) -> list[str] | None:
    """GET /v1/models through the same client the load uses; None until the server answers."""
    import openai

    try:
        with openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=5) as c:
            return [m.id for m in c.models.list().data]
    except openai.APIError:  # not listening yet (connection refused), or still loading (503)
        return None


@contextlib.contextmanager
def server_process(cmd: list[str], env: dict[str, str], log: Path, base_url: str,
                   key: str) -> Iterator[tuple[subprocess.Popen[bytes], list[str]]]:
    """Start `cmd`, wait until its /v1/models answers, yield the process and the model ids it
    lists; stop it by its PID on the way out, whatever happened in between (its output goes to
    `log`)."""
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f,
                                stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while (ids := served_models(base_url, key)) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{' '.join(cmd)}: no answer from {base_url}/models "
                                   f"(exit status {proc.poll()}); its output ends:\n{tail}")
            time.sleep(0.5)
        yield proc, ids
    finally:
        stop(proc)


@contextlib.contextmanager
def running_server(cmd: list[str], env: dict[str, str], log: Path, base_url: str,
                   key: str) -> Iterator[list[str]]:
    """`server_process`, yielding only the model ids the server lists."""
    with server_process(cmd, env, log, base_url, key) as (_, ids):
        yield ids


def stream_once(client: Any, model: str, prompt: list[int], new: int) -> Stream:
    """One streaming completion, timed from the request to the first text."""
    t0 = time.perf_counter()
    first: float | None = None
    chunks, usage = 0, None
    for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=new,
                                           temperature=0, stream=True,
                                           stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].text:
            chunks += 1
            if first is None:
                first = time.perf_counter() - t0
    if first is None:
        raise RuntimeError(f"{client.base_url}: a stream ended without text")
    return Stream(first, usage if usage is not None else chunks)


def server_round(clients: list[Any], model: str, prompts: list[list[int]]) -> dict[str, float]:
    """Every client streams one completion, all released at once."""
    wall, streams = at_once([functools.partial(stream_once, c, model, p, SERVER_NEW)
                             for c, p in zip(clients, prompts, strict=True)])
    tokens = sum(s.tokens for s in streams)
    return {"agg": tokens / wall, "ttft_ms": 1000 * statistics.median(s.first_s for s in streams),
            "tokens": tokens}


def server_row(cmd: Callable[[int], list[str]], env: dict[str, str], keys: list[str],
               model: str | None, rounds: list[list[list[int]]], log: Path) -> dict[str, Any]:
    """Start a server (`cmd(port)`), run one warm-up round then the others, stop it. `model`:
    the name to ask for (None: the first the server lists)."""
    import openai

    port = free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    t = time.perf_counter()
    with running_server(cmd(port), env, log, base_url, keys[0]) as ids, \
            contextlib.ExitStack() as closing:
        ready_s = time.perf_counter() - t
        name = model or ids[0]
        clients = [closing.enter_context(openai.OpenAI(base_url=base_url, api_key=k,
                                                       max_retries=0, timeout=SERVER_START_S))
                   for k in keys]
        server_round(clients, name, rounds[0])  # warm-up: compiles, connections
        runs = [server_round(clients, name, prompts) for prompts in rounds[1:]]
    return {"agg": spread([r["agg"] for r in runs]),
            "ttft_ms": spread([r["ttft_ms"] for r in runs]),
            "tokens": min(r["tokens"] for r in runs), "ready_s": ready_s, "model": name}


def server_rounds(ids: list[int], repeat: int) -> list[list[list[int]]]:
    """`repeat` + 1 rounds of SERVER_CLIENTS prompts, no prompt sent twice: round r takes every
    (repeat + 1)-th window from r, so its prompts spread over the text and each round's start one
    token after the last round's (no shared prefix for a prompt cache to reuse)."""
    n = repeat + 1
    if SERVER_CLIENTS * n > len(ids) - PROMPT_LEN + 1:
        raise SystemExit(f"--repeat {repeat}: the text has distinct prompts for at most "
                         f"{(len(ids) - PROMPT_LEN + 1) // SERVER_CLIENTS - 1} server rounds")
    every = windows(ids, SERVER_CLIENTS * n, PROMPT_LEN)
    return [every[r::n] for r in range(n)]


def ours_server(model: str, rounds: list[list[list[int]]], log: Path) -> dict[str, Any]:
    """`realm-nb serve` with one API key and tenant per client: 16 users, as the multi-tenant
    server is meant to serve (keyless, all 16 would be one tenant, held to all slots but one)."""
    keys = [f"sk-bench-{i:02d}" for i in range(SERVER_CLIENTS)]
    env = {**os.environ, "REALM_NB_SLOTS": str(N_SLOTS), "REALM_NB_CONTEXT": str(MAX_CONTEXT)}
    with tempfile.TemporaryDirectory() as tmp:
        keys_file = Path(tmp) / "keys.toml"
        keys_file.write_text("".join(f'[keys."{k}"]\ntenant = "client-{i:02d}"\n'
                                     for i, k in enumerate(keys)))
        # `python -m realm_nb` is `realm-nb` run by this interpreter: no launcher in between,
        # so the PID we stop is the server's own
        return server_row(lambda port: [sys.executable, "-m", "realm_nb", "serve", "--host",
                                        "127.0.0.1", "--port", str(port), "--model", model,
                                        "--api-keys", str(keys_file)],
                          env, keys, model, rounds, log)


def theirs_server(binp: Path, model: Path, rounds: list[list[list[int]]],
                  log: Path) -> dict[str, Any]:
    """`llama-server` with 16 slots of 512 positions each (its context is shared by the slots);
    it checks no key, and names its model itself."""
    keys = ["no-key"] * SERVER_CLIENTS
    return server_row(lambda port: [str(binp / SERVER_TOOL), "-m", str(model), "-t", str(THREADS),
                                    "-np", str(N_SLOTS), "-c", str(N_SLOTS * MAX_CONTEXT),
                                    "--host", "127.0.0.1", "--port", str(port)],
                      dict(os.environ), keys, None, rounds, log)


# ----------------------------------------------------------------------------- report


def plot(ours: dict[int, dict[str, Any]] | None, theirs: dict[int, dict[str, Any]] | None,
         servers: dict[str, dict[str, Any] | None], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))

    def line(xs: list[int], ss: list[dict[str, float]], label: str, style: str) -> None:
        med = [s["median"] for s in ss]
        err = [[m - s["min"] for m, s in zip(med, ss, strict=True)],
               [s["max"] - m for m, s in zip(med, ss, strict=True)]]
        ax.errorbar(xs, med, yerr=err, fmt=style, capsize=3, label=label)

    if ours:
        xs = sorted(ours)
        line(xs, [ours[n]["agg"] for n in xs], "realm-nb (SDK, guests; prefill incl.)", "o-")
    if theirs:
        xt = sorted(theirs)
        line(xt, [theirs[n]["tg"] for n in xt], "llama.cpp batched-bench S_TG", "s-")
        line(xt, [theirs[n]["e2e"] for n in xt], "llama.cpp batched-bench, prefill incl.", "s--")
    for (label, style), res in zip((("realm-nb serve, openai streams", "D"),
                                    ("llama-server, openai streams", "^")), servers.values(),
                                   strict=True):
        if res:
            line([SERVER_CLIENTS], [res["agg"]], label, style)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(CONCURRENCY), [str(n) for n in CONCURRENCY])
    ax.set_xlabel("concurrent tenants / sequences / clients")
    ax.set_ylabel("aggregate tok/s (median, min-max)")
    ax.set_title(f"{PROMPT_LEN}-token prompts, {TENANT_NEW} new tokens each, {THREADS} threads")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_rows(text: str) -> set[str]:
    rows = {r.strip() for r in text.split(",") if r.strip()}
    if not rows or rows - set(ROWS):
        raise argparse.ArgumentTypeError(f"{text!r}: give some of {','.join(ROWS)}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--repeat", type=int, default=5,
                    help="runs per figure (at least 5 for figures to quote)")
    ap.add_argument("--rows", type=parse_rows, default=set(ROWS),
                    help=f"which rows to run, comma-separated (default {','.join(ROWS)})")
    args = ap.parse_args()
    repeat, rows = max(1, args.repeat), args.rows
    binp = llama_bin(rows)
    server_bin = binp if binp is not None and (binp / SERVER_TOOL).is_file() else None
    path = resolve_model_path(args.model)

    print(f"{args.model}: {path}; {THREADS} threads; medians of {repeat} runs (min-max); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (a busy machine "
          f"makes these figures noisy)")
    if repeat < 5:
        print(f"--repeat {repeat}: a smoke test, not figures to quote (they need at least 5)")
    kernel = RealmKernel.shared()
    ids = kernel.tokenize(args.model, TEXT)  # registers the model; loads no weights
    rounds = server_rounds(ids, repeat) if "server" in rows else []  # checked before anything runs
    OUT.mkdir(parents=True, exist_ok=True)

    # ---- theirs first (they need the cores to themselves, as ours do after them)
    t_single: dict[str, Any] | None = None
    t_batched: dict[int, dict[str, Any]] | None = None
    if binp is not None and rows & {"single", "tenants"}:
        t = time.perf_counter()
        t_single = theirs_single(binp, path, repeat) if "single" in rows else None
        t_batched = theirs_batched(binp, path, repeat) if "tenants" in rows else None
        print(f"llama.cpp from {binp}: {time.perf_counter() - t:.0f} s"
              + (f" (build {t_single.get('build', '?')}); tg{DECODE_NEW} "
                 f"{fmt(t_single.get('decode'))}, pp{PREFILL_LEN} {fmt(t_single.get('prefill'))}"
                 if t_single else "")
              + ("; batched S_TG " + ", ".join(f"{n}: {fmt(t_batched[n]['tg'])}"
                                               for n in sorted(t_batched))
                 if t_batched else ""), flush=True)
    elif binp is None:
        print(f"llama.cpp: not measured (set {ENV_BIN} to a folder with llama-bench, "
              "llama-batched-bench and llama-server)")

    # ---- the servers, theirs then ours, before this process loads a model of its own
    t_server: dict[str, Any] | None = None
    o_server: dict[str, Any] | None = None
    if "server" in rows:
        if server_bin is not None:
            t_server = theirs_server(server_bin, path, rounds, OUT / "server-llama.log")
            print(f"llama-server: ready in {t_server['ready_s']:.1f} s; "
                  f"{fmt(t_server['agg'])} tok/s, first token {fmt(t_server['ttft_ms'])} ms",
                  flush=True)
        elif binp is not None:
            print(f"llama-server: not measured (no {SERVER_TOOL} in {binp})")
        o_server = ours_server(args.model, rounds, OUT / "server-realm-nb.log")
        print(f"realm-nb serve: ready in {o_server['ready_s']:.1f} s; "
              f"{fmt(o_server['agg'])} tok/s, first token {fmt(o_server['ttft_ms'])} ms",
              flush=True)

    # ---- ours, in this process
    o_single: dict[str, Any] | None = None
    o_batched: dict[int, dict[str, Any]] | None = None
    if rows & {"single", "tenants"}:
        t = time.perf_counter()
        kernel.load_model(args.model)
        entry = kernel.model(args.model)
        slots = getattr(entry.engine, "n_slots", "?")
        print(f"realm-nb: {entry.name} ({entry.layout} layout) loaded in "
              f"{time.perf_counter() - t:.1f} s; kernel slots {slots}, context "
              f"{os.environ['REALM_NB_CONTEXT']}")
        if "single" in rows:
            assert len(ids) >= PREFILL_LEN, f"the text is only {len(ids)} tokens"
            o_single = ours_single(args.model, ids[:PREFILL_LEN], repeat)
        if "tenants" in rows:
            o_batched = ours_batched(args.model, windows(ids, max(CONCURRENCY), PROMPT_LEN),
                                     repeat)

    # ---- table
    print("\ntok/s (higher is better) unless a row says ms (lower is better)")
    print(f"{'figure':<36}  {'realm-nb':>22}  {'llama.cpp':>22}  {'ours/theirs':>11}")

    def row(name: str, ours: dict[str, float] | None, theirs: dict[str, float] | None,
            measured: bool) -> None:
        th = fmt(theirs) if measured else "not measured*"
        print(f"{name:<36}  {fmt(ours):>22}  {th:>22}  {ratio(ours, theirs):>11}")

    if o_single:
        row(f"single-stream decode ({DECODE_NEW} new)", o_single["decode"],
            t_single.get("decode") if t_single else None, binp is not None)
        row(f"prefill, {PREFILL_LEN}-token prompt", o_single["prefill"],
            t_single.get("prefill") if t_single else None, binp is not None)
    if o_batched:
        for n in CONCURRENCY:
            row(f"{n:>2} tenant(s), aggregate decode", o_batched[n]["agg"],
                t_batched[n]["tg"] if t_batched and n in t_batched else None, binp is not None)
    if o_server:
        row(f"server, {SERVER_CLIENTS} streams x {SERVER_NEW}, aggregate", o_server["agg"],
            t_server["agg"] if t_server else None, server_bin is not None)
        row(f"server, {SERVER_CLIENTS} streams, first token ms", o_server["ttft_ms"],
            t_server["ttft_ms"] if t_server else None, server_bin is not None)
    if o_batched and t_batched:
        print("\nlike for like (prefill included on both sides: new tokens / wall time)")
        print(f"{'tenants':<36}  {'realm-nb tok/s':>22}  {'llama.cpp tok/s':>22}  "
              f"{'ours/theirs':>11}")
        for n in CONCURRENCY:
            if n in t_batched:
                print(f"{n:<36}  {fmt(o_batched[n]['agg']):>22}  "
                      f"{fmt(t_batched[n]['e2e']):>22}  "
                      f"{ratio(o_batched[n]['agg'], t_batched[n]['e2e']):>11}")
    if binp is None or (o_server and server_bin is None):
        print(f"* not measured (set {ENV_BIN} to a folder with llama-bench, llama-batched-bench "
              "and llama-server)")
    notes = []
    if o_single:
        notes.append(f"single stream {o_single['decode_tokens']} tokens generated (of "
                     f"{DECODE_NEW} asked; the decode figure excludes the first token)")
    if o_batched:
        notes.append(f"tenants: SDK Realm(mode='local'), all new tokens / wall time, prefill "
                     f"included, {min(o_batched[n]['tokens'] for n in CONCURRENCY)}+ tokens "
                     "per run; theirs llama-batched-bench S_TG (decode only)")
    if o_server:
        notes.append(f"server: {SERVER_CLIENTS} openai clients streaming {PROMPT_LEN}-token "
                     f"prompts, {SERVER_NEW} new tokens each, greedy; all completion tokens / "
                     f"wall time ({o_server['tokens']}+ tokens per round, ours"
                     + (f"; {t_server['tokens']}+ theirs" if t_server else "")
                     + "); first token: median over the clients, a ratio below 1 is ours faster")
    print("\n" + ".\n".join(notes) + ".")

    # a run of some rows only writes files of its own, and keeps a full run's
    suffix = "" if rows == set(ROWS) else "-" + "-".join(r for r in ROWS if r in rows)
    (OUT / f"vs_llamacpp{suffix}.json").write_text(json.dumps(
        {"model": str(path), "threads": THREADS, "repeat": repeat,
         "ours": {"single": o_single, "batched": o_batched, "server": o_server},
         "theirs": {"single": t_single, "batched": t_batched, "server": t_server}
         if binp else None},
        indent=2, default=str))
    if o_batched or o_server:
        png = OUT / f"vs_llamacpp{suffix}.png"
        plot(o_batched, t_batched, {"ours": o_server, "theirs": t_server}, png)
        print(f"plot: {png}")


if __name__ == "__main__":
    main()
