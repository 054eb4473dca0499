"""Soak: 32 streaming clients of two tenants, one polite and one rude, against `realm-nb serve`.

    python benchmarks/bench_soak.py [--duration 300] [--warmup 20] [--idle 15] [--seed 0]
                                    [--polite 8] [--rude 24] [--without ACTION,...]
                                    [--model smollm2-135m]

Not run in CI (it takes minutes). It starts `python -m realm_nb serve` on 127.0.0.1 (a free port,
REALM_NB_SLOTS=8, REALM_NB_CONTEXT=2048, a keys file with the tenants "polite" and "rude" and an
admin key for /metrics and /v1/stats), waits until /v1/models answers, loads it for `--duration`
seconds and stops it by its PID (SIGTERM, then SIGKILL) whatever happens. Its output goes to
benchmarks/out/soak-server.log; the figures to benchmarks/out/soak.json.

The load: one thread per client, each with its own official `openai` client (`max_retries=0`),
looping until the duration ends (a request under way then finishes; none starts after it).

- polite (`--polite`, 8): streaming chat completions of a short question, `max_tokens` 32,
  a short random pause between requests.
- rude (`--rude`, 24), no pause, each request one of: a stream the client closes after a random
  number of chunks (a disconnect); a stream read to its end; a slow reader; a 1,024-token prompt
  that fits (prefill-heavy); a prompt of ~2,300 tokens (over the context: a 400 after
  tokenizing); a ~3.5 MB prompt (over context x longest token in characters: a 400 before
  tokenizing); a ~4.5 MB body (past `--max-body-bytes`: a 413 before the body is read); a prompt
  that fits with a `max_tokens` past the context (accepted; the client leaves after up to 64
  chunks). `--without` leaves some of these out (their names are in RUDE_ACTIONS), to find which
  one a figure comes from.

What each figure means (per tenant):

- requests: requests sent. completed: the stream ended with a `finish_reason`.
- refused: answered 4xx before any stream started, by status and error code (expected for the
  rude tenant's oversized requests; a polite refusal is a bug). The 413 is sent from the
  Content-Length, before the body is read, and the connection then closes: when that reset
  reaches the client while it still sends, it sees a broken connection or an error status whose
  body was cut off; for an oversized body these count here, as "413 (closed while sending)" and
  "413? (error body cut off)" (the server's own count of 413s is in the last line).
- disconnects: streams the client closed on purpose after some chunks (not failures).
- failures: 5xx, connection errors, timeouts, an error event inside a stream, or a truncated
  stream; truncated: a stream that ended (or broke) without a `finish_reason` while the client
  was still reading.
- warm-up: the first `--warmup` seconds (20) of the run itself: the same clients and the same
  mix as the rest of it, nothing added, nothing sent before. It is what a server's first
  minute of use is: connections open and the server compiles the step shapes the first
  requests need (each a batch shape: rows, prompt-chunk bucket, attention window); the server
  compiles nothing ahead at start.
- polite TTFT p50/p99: request sent -> first chunk with text, in ms, over the polite streams
  started after the warm-up.
- RSS (the server process, psutil, every `--sample-every` s): before the load (idle, model
  loaded), after the warm-up (the first sample at or after `--warmup` s, under load), the
  largest seen, and after the run (load stopped, `--idle` s later); after/warm-up is the
  issue's target (within 5 %).
- KV pool: the served model's KV-cache pool (/v1/stats; the admin key names tenants, so it
  sees the whole store) after the warm-up, at most, and after the run: bytes resident (a
  `reserved` pool, the default on CPU, has all its pages' address space from the start and
  holds memory only for pages in use; a `grow` pool doubles and shrinks back when idle), and
  the step shapes the engine has run: each is a compiled program that XLA:CPU keeps (~5 MiB)
  for the life of the process, so shapes first met after the warm-up are RSS growth that is a
  high-water mark rather than a leak. With a `grow` pool every pool size multiplied them: 30
  programs for 13 batch shapes in a 150 s run, RSS after the run 1.10x the warm-up figure.
- server side: /metrics (admin key) requests by status (5xx must be 0) and cancelled
  generations; tracebacks in the server's log; whether the server was still up at the end; the
  clients whose request had not ended `JOIN_GRACE_S` after the duration (a hang).

The machine is shared: TTFT under load is noisy; treat it as one run's measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
from bench_tenants import TEXT
from bench_vs_llamacpp import OUT, free_port, server_process

N_SLOTS, CONTEXT = 8, 2048
KEYS = {"polite": "sk-soak-polite", "rude": "sk-soak-rude", "admin": "sk-soak-admin"}
REQUEST_TIMEOUT_S = 180.0  # a stream silent for this long is a failure ("timeout")
JOIN_GRACE_S = 240.0  # after the duration: how long requests under way may take to end
POLITE_MAX_TOKENS = 32
POLITE_QUESTIONS = ("What is the capital of France?", "Name three colours.",
                    "What is two plus two?", "Say hello in Spanish.",
                    "What do bees make?", "Which planet is the largest?")
LONG_FIT_TOKENS = 1024  # a prompt that fits, prefill-heavy
OVER_CONTEXT_TEXT = TEXT * 12  # ~2,300 tokens (188 a copy): tokenized, then a 400
OVER_CHARS = 3_500_000  # under the 4 MiB body limit, over context x the longest token: a 400
OVER_BODY = 4_500_000  # past the 4 MiB body limit: a 413
# the rude tenant's requests, with their weights
RUDE_ACTIONS = {"disconnect": 0.34, "stream": 0.16, "slow_reader": 0.06, "long_fit": 0.04,
                "over_context": 0.10, "over_chars": 0.10, "over_body": 0.10,
                "max_tokens_past_context": 0.10}


# ----------------------------------------------------------------------------- tallies


@dataclass
class Tally:
    """One tenant's counts; every change under `lock` (32 threads write here)."""

    requests: int = 0
    completed: int = 0
    disconnects: int = 0
    truncated: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    actions: Counter[str] = field(default_factory=Counter)
    ttft_s: list[tuple[float, float]] = field(default_factory=list)  # (monotonic start, TTFT)
    completion_chunks: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, action: str, outcome: str, detail: str = "", chunks: int = 0,
            started: float = 0.0, ttft: float | None = None) -> None:
        with self.lock:
            self.requests += 1
            self.actions[action] += 1
            self.completion_chunks += chunks
            if ttft is not None:
                self.ttft_s.append((started, ttft))
            if outcome == "completed":
                self.completed += 1
            elif outcome == "disconnect":
                self.disconnects += 1
            elif outcome == "refused":
                self.refused[detail] += 1
            else:
                self.failures[f"{detail} [{action}]"] += 1
                if detail.startswith("truncated"):
                    self.truncated += 1

    def summary(self, after: float) -> dict[str, Any]:
        ttfts = [t for s, t in self.ttft_s if s >= after]
        return {"requests": self.requests, "completed": self.completed,
                "refused": dict(self.refused), "refused_total": sum(self.refused.values()),
                "failures": dict(self.failures), "failures_total": sum(self.failures.values()),
                "truncated": self.truncated, "disconnects": self.disconnects,
                "actions": dict(self.actions), "completion_chunks": self.completion_chunks,
                "ttft_ms": ttft_summary(ttfts)}


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


def ttft_summary(xs: list[float]) -> dict[str, float] | None:
    if not xs:
        return None
    return {"n": len(xs), "p50": 1000 * percentile(xs, 50), "p99": 1000 * percentile(xs, 99),
            "max": 1000 * max(xs)}


# ----------------------------------------------------------------------------- one request


@dataclass(frozen=True)
class Ask:
    """One request: the call, and how the client reads a stream."""

    action: str
    call: Callable[[Any], Any]  # openai client -> response (a Stream when streaming)
    stream: bool = True
    close_after: int | None = None  # chunks, then the client closes the stream
    read_pause_s: float = 0.0  # a slow reader's pause after each chunk


def chunk_text(chunk: Any) -> str:
    if not chunk.choices:
        return ""
    c = chunk.choices[0]
    delta = getattr(c, "delta", None)
    return (delta.content or "") if delta is not None else (getattr(c, "text", "") or "")


def read_stream(stream: Any, ask: Ask, t0: float) -> tuple[str, str, int, float | None]:
    """Read a stream as `ask` says: (outcome, detail, chunks with text, TTFT seconds)."""
    chunks, first, finish = 0, None, None
    try:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if chunk_text(chunk):
                chunks += 1
                if first is None:
                    first = time.perf_counter() - t0
            if finish is None and ask.close_after is not None and chunks >= ask.close_after:
                stream.close()
                return "disconnect", "", chunks, first
            if ask.read_pause_s:
                time.sleep(ask.read_pause_s)
    except openai.APITimeoutError:
        return "failure", "truncated: timeout mid-stream", chunks, first
    except (openai.APIConnectionError, httpx.HTTPError, OSError) as e:  # it broke mid-stream
        cause = e.__cause__ if isinstance(e, openai.APIConnectionError) and e.__cause__ else e
        return "failure", f"truncated: {type(cause).__name__}", chunks, first
    except openai.APIError as e:  # an error event inside the stream
        code = getattr(e, "code", None) or type(e).__name__
        return "failure", f"error in stream: {code}", chunks, first
    if finish is None:
        return "failure", "truncated: ended without finish_reason", chunks, first
    return "completed", finish, chunks, first


def run_ask(client: Any, ask: Ask, tally: Tally) -> None:
    """Send one request, read it, and count what happened."""
    started, t0 = time.monotonic(), time.perf_counter()
    try:
        resp = ask.call(client)
    except openai.APITimeoutError:
        tally.add(ask.action, "failure", "timeout before the stream")
        return
    except openai.APIConnectionError as e:
        cause = type(e.__cause__).__name__ if e.__cause__ else "?"
        if ask.action == "over_body":  # refused from its Content-Length while we still sent
            tally.add(ask.action, "refused", f"413 (closed while sending: {cause})")
        else:
            tally.add(ask.action, "failure", f"connection error: {cause}")
        return
    except openai.APIStatusError as e:
        code = (e.body or {}).get("code") if isinstance(e.body, dict) else None
        kind = "refused" if 400 <= e.status_code < 500 else "failure"
        tally.add(ask.action, kind, f"{e.status_code} {code or '?'}")
        return
    except httpx.HTTPError as e:  # openai lets through an error reading an error's body
        if ask.action == "over_body":
            tally.add(ask.action, "refused", f"413? (error body cut off: {type(e).__name__})")
        else:
            tally.add(ask.action, "failure", f"connection error: {type(e).__name__}")
        return
    if not ask.stream:
        tally.add(ask.action, "completed", resp.choices[0].finish_reason or "?")
        return
    outcome, detail, chunks, first = read_stream(resp, ask, t0)
    if outcome != "disconnect":
        resp.close()
    tally.add(ask.action, outcome, detail, chunks, started, first)


# ----------------------------------------------------------------------------- the tenants


@dataclass(frozen=True)
class Prompts:
    """Prompts built once and shared by the threads (the huge ones cost the client too)."""

    model: str
    long_fit: list[int]  # token ids
    over_chars: str
    over_body: str


def polite_ask(p: Prompts, rng: random.Random) -> Ask:
    q = rng.choice(POLITE_QUESTIONS)
    return Ask("chat", lambda c: c.chat.completions.create(
        model=p.model, messages=[{"role": "user", "content": q}],
        max_tokens=POLITE_MAX_TOKENS, temperature=0.7, stream=True,
        stream_options={"include_usage": True}))


def rude_ask(p: Prompts, rng: random.Random, mix: dict[str, float]) -> Ask:
    action = rng.choices(list(mix), weights=list(mix.values()))[0]
    start = rng.randrange(0, len(TEXT) - 200)
    short = TEXT[start:start + rng.randint(40, 200)]

    def completion(prompt: Any, max_tokens: int) -> Callable[[Any], Any]:
        return lambda c: c.completions.create(model=p.model, prompt=prompt, max_tokens=max_tokens,
                                              temperature=1.0, stream=True)

    if action == "disconnect":
        if rng.random() < 0.5:
            return Ask(action, lambda c: c.chat.completions.create(
                model=p.model, messages=[{"role": "user", "content": short}], max_tokens=256,
                stream=True), close_after=rng.randint(1, 24))
        return Ask(action, completion(short, 256), close_after=rng.randint(1, 24))
    if action == "stream":
        return Ask(action, completion(short, rng.randint(16, 96)))
    if action == "slow_reader":
        return Ask(action, completion(short, 32), read_pause_s=0.2)
    if action == "long_fit":
        return Ask(action, completion(p.long_fit, 8))
    if action == "over_context":
        return Ask(action, completion(OVER_CONTEXT_TEXT, 16))
    if action == "over_chars":
        return Ask(action, completion(p.over_chars, 16))
    if action == "over_body":
        return Ask(action, completion(p.over_body, 16))
    assert action == "max_tokens_past_context"  # accepted (capped by the context): leave early
    return Ask(action, completion(short, CONTEXT * 4), close_after=rng.randint(1, 64))


INFLIGHT: dict[str, tuple[str, float]] = {}  # client thread -> (action, monotonic start)


def client_loop(base_url: str, key: str, tally: Tally, make: Callable[[random.Random], Ask],
                seed: int, until: float, pause_s: float) -> None:
    """One client: requests one after another until `until` (monotonic)."""
    rng = random.Random(seed)
    me = threading.current_thread().name
    with openai.OpenAI(base_url=base_url, api_key=key, max_retries=0,
                       timeout=REQUEST_TIMEOUT_S) as client:
        while time.monotonic() < until:
            ask = make(rng)
            INFLIGHT[me] = (ask.action, time.monotonic())
            try:
                run_ask(client, ask, tally)
            except Exception as e:  # a bug of this script's, or an answer it did not expect
                tally.add(ask.action, "failure",
                          f"client exception: {type(e).__name__}: {e}"[:120])
            INFLIGHT.pop(me, None)
            if pause_s:
                time.sleep(rng.uniform(0, pause_s))


# ----------------------------------------------------------------------------- the server


class RssSampler(threading.Thread):
    """The server's RSS every `every` seconds, as (seconds since `t0`, bytes), and its KV pool
    (/v1/stats with the admin key), as (seconds, {pages_total, pages_used, bytes}; {} if the
    server did not answer within 5 s)."""

    def __init__(self, pid: int, every: float, t0: float, base_url: str) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.proc = psutil.Process(pid)
        self.every, self.t0, self.base_url = every, t0, base_url
        self.samples: list[tuple[float, int]] = []
        self.kv: list[tuple[float, dict[str, int]]] = []
        self.done = threading.Event()

    def sample(self) -> int:
        rss = int(self.proc.memory_info().rss)
        t = time.monotonic() - self.t0
        self.samples.append((t, rss))
        self.kv.append((t, kv_pool(self.base_url)))
        return rss

    def run(self) -> None:
        while not self.done.is_set():
            try:
                self.sample()
            except psutil.Error:
                return  # the server is gone: the report says so
            self.done.wait(self.every)

    def at(self, t: float) -> int | None:
        """The first sample at or after t seconds."""
        return next((rss for s, rss in self.samples if s >= t), None)


def write_keys(folder: Path) -> Path:
    path = folder / "keys.toml"
    path.write_text("".join(f'[keys."{key}"]\ntenant = "{tenant}"\n'
                            + ("name_tenants = true\n" if tenant == "admin" else "") + "\n"
                            for tenant, key in KEYS.items()))
    return path


def admin_get(base_url: str, path: str, timeout: float = 30.0) -> httpx.Response:
    root = base_url.removesuffix("/v1")
    return httpx.get(f"{root}{path}", headers={"Authorization": f"Bearer {KEYS['admin']}"},
                     timeout=timeout)


def kv_pool(base_url: str) -> dict[str, int]:
    """The KV pool of the served model(s), summed: pages in the pool, pages held, bytes (the
    admin key names tenants, so /v1/stats shows the whole store); {} without an answer in 5 s."""
    try:
        models = admin_get(base_url, "/v1/stats", 5.0).json()["store"]["models"]
    except (httpx.HTTPError, ValueError, KeyError):
        return {}
    kvs = [m["kv"] for m in models if m.get("kv")]
    return {k: sum(int(kv.get(name, 0)) for kv in kvs)
            for k, name in (("pages_total", "pages_total"), ("pages_used", "pages_used"),
                            ("bytes", "bytes"), ("step_shapes", "step_shapes"))}


def server_metrics(base_url: str) -> dict[str, Any]:
    """Requests by status and cancelled generations from /metrics (admin key)."""
    text = admin_get(base_url, "/metrics").text
    by_status: Counter[str] = Counter()
    for m in re.finditer(r'^realm_requests_total\{([^}]*)\} ([0-9.e+]+)$', text, re.M):
        status = re.search(r'status="([^"]*)"', m.group(1))
        by_status[status.group(1) if status else "?"] += int(float(m.group(2)))
    cancelled = re.search(r"^realm_cancelled_total ([0-9.e+]+)$", text, re.M)
    return {"requests_by_status": dict(sorted(by_status.items())),
            "server_5xx": sum(n for s, n in by_status.items() if s.startswith("5")),
            "cancelled": int(float(cancelled.group(1))) if cancelled else None}


def build_prompts(model: str) -> Prompts:
    from realm_nb.kernel import RealmKernel

    ids = RealmKernel.shared().tokenize(model, TEXT)  # the tokenizer only, no weights
    long_fit = (ids * (LONG_FIT_TOKENS // len(ids) + 1))[:LONG_FIT_TOKENS]
    return Prompts(model, long_fit, (TEXT * (OVER_CHARS // len(TEXT) + 1))[:OVER_CHARS],
                   (TEXT * (OVER_BODY // len(TEXT) + 1))[:OVER_BODY])


def start_clients(args: argparse.Namespace, base_url: str, prompts: Prompts,
                  tallies: dict[str, Tally], until: float) -> list[threading.Thread]:
    makers: dict[str, Callable[[random.Random], Ask]] = {
        "polite": lambda rng: polite_ask(prompts, rng),
        "rude": lambda rng: rude_ask(prompts, rng, args.mix)}
    threads = []
    for tenant, n, pause in (("polite", args.polite, 0.5), ("rude", args.rude, 0.0)):
        for i in range(n):
            seed = args.seed * 1000 + (0 if tenant == "polite" else 500) + i
            threads.append(threading.Thread(
                target=client_loop, name=f"{tenant}-{i}", daemon=True,
                args=(base_url, KEYS[tenant], tallies[tenant], makers[tenant], seed, until,
                      pause)))
    for t in threads:
        t.start()
    return threads


def soak(args: argparse.Namespace, prompts: Prompts) -> dict[str, Any]:
    """Start the server, load it, watch its RSS, stop it; everything the report needs."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    env = {**os.environ, "REALM_NB_SLOTS": str(N_SLOTS), "REALM_NB_CONTEXT": str(CONTEXT)}
    log = OUT / "soak-server.log"
    tallies = {"polite": Tally(), "rude": Tally()}
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "realm_nb", "serve", "--host", "127.0.0.1", "--port",
               str(port), "--model", args.model, "--api-keys", str(write_keys(Path(tmp)))]
        t = time.monotonic()
        with server_process(cmd, env, log, base_url, KEYS["polite"]) as (proc, _):
            ready_s = time.monotonic() - t
            t0 = time.monotonic()
            sampler = RssSampler(proc.pid, args.sample_every, t0, base_url)
            rss_idle = sampler.sample()
            sampler.start()
            print(f"server pid {proc.pid} ready in {ready_s:.1f} s on {base_url}; "
                  f"{args.polite} polite + {args.rude} rude clients for {args.duration:.0f} s",
                  flush=True)
            threads = start_clients(args, base_url, prompts, tallies, t0 + args.duration)
            progress(tallies, t0, args.duration, threads)
            for th in threads:
                th.join(timeout=max(0.0, t0 + args.duration + JOIN_GRACE_S - time.monotonic()))
            hung = {th.name: describe(INFLIGHT.get(th.name), t0)
                    for th in threads if th.is_alive()}
            load_s = time.monotonic() - t0
            time.sleep(args.idle)
            sampler.done.set()
            sampler.join()
            alive = proc.poll() is None
            rss_end = sampler.sample() if alive else None
            metrics = server_metrics(base_url) if alive else None
            pid = proc.pid
    log_text = log.read_text(errors="replace")
    return {"tallies": {k: v.summary(t0 + args.warmup) for k, v in tallies.items()},
            "pid": pid, "ready_s": ready_s, "load_s": load_s, "hung_clients": hung,
            "server_alive_at_end": alive, "server_exit": proc.returncode,
            "server_tracebacks": log_text.count("Traceback"), "metrics": metrics,
            "rss": {"idle_before": rss_idle, "after_warmup": sampler.at(args.warmup),
                    "max": max(r for _, r in sampler.samples), "after_run": rss_end,
                    "samples": sampler.samples},
            "kv_pool": {"after_warmup": next((kv for s, kv in sampler.kv if s >= args.warmup),
                                             {}),
                        "max_bytes": max((kv.get("bytes", 0) for _, kv in sampler.kv),
                                         default=0),
                        "after_run": sampler.kv[-1][1] if alive else {},
                        "samples": sampler.kv}}


def describe(inflight: tuple[str, float] | None, t0: float) -> str:
    return f"{inflight[0]}, sent {inflight[1] - t0:.0f} s in" if inflight else "?"


def progress(tallies: dict[str, Tally], t0: float, duration: float,
             threads: list[threading.Thread]) -> None:
    """A line every 30 s while the load runs."""
    while time.monotonic() < t0 + duration and any(t.is_alive() for t in threads):
        time.sleep(min(30.0, max(0.1, t0 + duration - time.monotonic())))
        p, r = tallies["polite"], tallies["rude"]
        print(f"  {time.monotonic() - t0:5.0f} s: polite {p.requests} requests "
              f"({sum(p.failures.values())} failed), rude {r.requests} "
              f"({sum(r.failures.values())} failed)", flush=True)


# ----------------------------------------------------------------------------- report


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def counts(c: dict[str, int]) -> str:
    return ", ".join(f"{k}: {n}" for k, n in sorted(c.items(), key=lambda kv: -kv[1])) or "-"


def report(res: dict[str, Any], args: argparse.Namespace) -> None:
    p, r = res["tallies"]["polite"], res["tallies"]["rude"]
    rss = res["rss"]

    def row(name: str, a: Any, b: Any) -> None:
        print(f"{name:<34}  {a!s:>12}  {b!s:>12}")

    print(f"\nsoak: {args.duration:.0f} s of load ({res['load_s']:.0f} s until the last request "
          f"ended), warm-up {args.warmup:.0f} s, {N_SLOTS} slots, context {CONTEXT}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    row("figure", "polite", "rude")
    row("clients", args.polite, args.rude)
    row("requests", p["requests"], r["requests"])
    row("completed (finish_reason)", p["completed"], r["completed"])
    row("refused (4xx)", p["refused_total"], r["refused_total"])
    row("disconnects (by the client)", p["disconnects"], r["disconnects"])
    row("failures", p["failures_total"], r["failures_total"])
    row("  of which truncated streams", p["truncated"], r["truncated"])
    ttft = p["ttft_ms"]
    row("TTFT p50 / p99 ms (after warm-up)",
        f"{ttft['p50']:.0f} / {ttft['p99']:.0f}" if ttft else "-", "")
    row("TTFT max ms, streams measured", f"{ttft['max']:.0f}, n={ttft['n']}" if ttft else "-", "")
    print(f"refused, rude:   {counts(r['refused'])}")
    if p["refused"]:
        print(f"refused, polite: {counts(p['refused'])}")
    print(f"failures, rude:   {counts(r['failures'])}")
    print(f"failures, polite: {counts(p['failures'])}")
    print(f"rude requests by kind: {counts(r['actions'])}")
    ratio = (rss["after_run"] / rss["after_warmup"]
             if rss["after_run"] and rss["after_warmup"] else None)
    print(f"server RSS: idle before {mib(rss['idle_before'])}, after warm-up "
          f"{mib(rss['after_warmup'])}, max {mib(rss['max'])}, after the run "
          f"{mib(rss['after_run'])} ({args.idle:.0f} s idle); after/warm-up "
          + (f"{ratio:.3f} ({'within' if abs(ratio - 1) <= 0.05 else 'OUTSIDE'} 5 %)"
             if ratio else "-"))
    kv = res["kv_pool"]

    def pool(k: dict[str, int]) -> str:
        return f"{mib(k.get('bytes'))} ({k.get('pages_total', '?')} pages)" if k else "-"

    print(f"KV pool (/v1/stats): after warm-up {pool(kv['after_warmup'])}, max "
          f"{mib(kv['max_bytes'])}, after the run {pool(kv['after_run'])}")
    print(f"step shapes run (each a compiled program, ~5 MiB kept): after warm-up "
          f"{kv['after_warmup'].get('step_shapes', '-')}, after the run "
          f"{kv['after_run'].get('step_shapes', '-')}")
    step = max(1, round(30 / args.sample_every))
    print("RSS over time: " + ", ".join(f"{s:.0f} s {b / 2**20:.0f}"
                                        for s, b in rss["samples"][::step]) + " (MiB)")
    m = res["metrics"]
    print(f"server side: alive at the end {res['server_alive_at_end']}, tracebacks in its log "
          f"{res['server_tracebacks']}"
          + (f", /metrics requests by status {m['requests_by_status']}, 5xx {m['server_5xx']}, "
             f"cancelled generations {m['cancelled']}" if m else "")
          + (f"; clients still waiting at the cut-off: {res['hung_clients']}"
             if res["hung_clients"] else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=300.0, help="seconds of load")
    ap.add_argument("--warmup", type=float, default=20.0,
                    help="seconds after which RSS is taken as the baseline and TTFT counts")
    ap.add_argument("--idle", type=float, default=15.0,
                    help="seconds of quiet after the load before the last RSS sample")
    ap.add_argument("--sample-every", type=float, default=2.0, help="RSS sampling period, s")
    ap.add_argument("--polite", type=int, default=8)
    ap.add_argument("--rude", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--without", default="",
                    help=f"rude requests to leave out, comma-separated: {','.join(RUDE_ACTIONS)}")
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()
    if args.warmup >= args.duration:
        raise SystemExit("--warmup must be shorter than --duration")
    left_out = {a.strip() for a in args.without.split(",") if a.strip()}
    if left_out - set(RUDE_ACTIONS) or left_out == set(RUDE_ACTIONS):
        raise SystemExit(f"--without {args.without}: name some (not all) of "
                         f"{', '.join(RUDE_ACTIONS)}")
    args.mix = {a: w for a, w in RUDE_ACTIONS.items() if a not in left_out}
    OUT.mkdir(parents=True, exist_ok=True)
    res = soak(args, build_prompts(args.model))
    report(res, args)
    out = OUT / "soak.json"
    out.write_text(json.dumps({"args": vars(args), "slots": N_SLOTS, "context": CONTEXT,
                               **res}, indent=2, default=str))
    print(f"figures: {out}; server log: {OUT / 'soak-server.log'}")


if __name__ == "__main__":
    main()
