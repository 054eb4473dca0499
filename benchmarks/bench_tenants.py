"""Tenants benchmark: aggregate speed of concurrent guests, and what the guest path costs per token.

    python benchmarks/bench_tenants.py [--model smollm2-135m] [--new 64] [--repeat 3]

1. Continuous batching: 1, 4 and 16 tenants (one `Realm` each, one thread each) generate greedily
   at once, 16-token prompts, `--new` tokens each, on a kernel with 16 slots and a 512-token
   context; aggregate tok/s = all new tokens / wall time (best of `--repeat`).
2. The guest path against the host loop, single stream, same model and lengths: `Realm.generate`
   (WebAssembly guest, host imports, scheduler) vs `Engine.greedy` (a Python loop over the same
   jitted steps). Their ratio is measured in this run.

llama.cpp is not installed here: its figures are quoted from ../shared/FACTS.md (SmolLM2 Q4_1,
2 threads), not measured in this run.
"""

from __future__ import annotations

import argparse
import functools
import os
import threading
import time
from collections.abc import Callable
from typing import TypeVar, cast

N_SLOTS, MAX_CONTEXT = 16, 512
os.environ["REALM_NB_SLOTS"] = str(N_SLOTS)  # the shared kernel local Realms use
os.environ["REALM_NB_CONTEXT"] = str(MAX_CONTEXT)

from realm_nb.kernel import RealmKernel  # noqa: E402
from realm_nb.sdk import Realm  # noqa: E402
from realm_nb.types import Generation  # noqa: E402

T = TypeVar("T")

PROMPT_LEN = 16
CONCURRENCY = (1, 4, 16)
# reference figures from FACTS.md, not measured in this run
LLAMA_BATCHED = {1: 173.0, 4: 231.0, 16: 364.0}  # llama-batched-bench, 16-token prompts, 64 new
LLAMA_CPP_PYTHON = 149.0  # single-stream decode through llama-cpp-python

TEXT = """\
The river rose slowly through the night, and by morning the lower fields were under water. The
farmers had seen floods before, but this one came earlier in the year than anyone remembered. In
computing, a cache is a small, fast memory that keeps copies of data that a program is likely to
need again soon. Mix two cups of flour with a spoon of sugar and a pinch of salt, add one egg and a
cup of milk, and stir until the batter is smooth. Photosynthesis is the process by which green
plants use light to turn water and carbon dioxide into sugar and oxygen. She opened the letter
carefully, as if it might break. Inside was a single sheet of paper, folded twice, and a small
photograph of a house by the sea. The old lighthouse keeper climbed the stairs every evening to
light the lamp, counting the steps as his father had taught him.
"""


def prompts(kernel: RealmKernel, model: str, n: int) -> list[list[int]]:
    """n different 16-token prompts: windows of a fixed text."""
    ids = kernel.tokenize(model, TEXT)
    step = max(1, (len(ids) - PROMPT_LEN) // n)
    out = [ids[i * step : i * step + PROMPT_LEN] for i in range(n)]
    assert all(len(p) == PROMPT_LEN for p in out) and len({tuple(p) for p in out}) == n
    return out


def at_once(jobs: list[Callable[[], T]]) -> tuple[float, list[T]]:
    """Run every job on its own thread, released together; returns (wall seconds from the release
    to the last finish, each job's result). A job's exception is raised here, after all joined."""
    results: list[T | None] = [None] * len(jobs)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(jobs) + 1)

    def one(i: int) -> None:
        barrier.wait()
        try:
            results[i] = jobs[i]()
        except BaseException as e:  # re-raised below, on the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return wall, cast("list[T]", results)


def run_concurrent(model: str, batch: list[list[int]], new: int, tag: str) -> tuple[float, int]:
    """All prompts at once, one tenant and thread each; returns (wall seconds, new tokens)."""
    realms = [Realm(mode="local", default_model=model, tenant=f"{tag}-{i}")
              for i in range(len(batch))]

    def job(realm: Realm, prompt: list[int]) -> Generation:
        g = realm.generate(prompt=prompt, max_tokens=new, temperature=0)
        assert isinstance(g, Generation)
        return g

    wall, results = at_once([functools.partial(job, r, p) for r, p in zip(realms, batch,
                                                                          strict=True)])
    return wall, sum(len(g.token_ids) for g in results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--new", type=int, default=64, help="new tokens per tenant")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    kernel = RealmKernel.shared()
    t = time.perf_counter()
    kernel.load_model(args.model)
    entry = kernel.model(args.model)
    engine = entry.engine
    assert engine is not None and engine.n_slots == N_SLOTS
    print(f"{args.model} ({entry.layout} layout) loaded in {time.perf_counter() - t:.1f} s; "
          f"kernel: {N_SLOTS} slots, context {MAX_CONTEXT}; {args.new} new tokens per tenant, "
          f"{PROMPT_LEN}-token prompts, greedy; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs (a busy machine makes these figures noisy)\n")
    all_prompts = prompts(kernel, args.model, max(CONCURRENCY))

    # ---- 1. concurrent tenants
    rows = []
    for n in CONCURRENCY:
        batch = all_prompts[:n]
        run_concurrent(args.model, batch, 8, f"warm{n}")  # compile this batch's shapes
        best = None
        for _ in range(args.repeat):
            wall, toks = run_concurrent(args.model, batch, args.new, f"b{n}")
            if best is None or toks / wall > best[1] / best[0]:
                best = (wall, toks)
        assert best is not None
        rows.append((n, best[1], best[0], best[1] / best[0]))

    print(f"Concurrent tenants (aggregate, best of {args.repeat})")
    print(f"{'tenants':>7}  {'tokens':>6}  {'wall s':>6}  {'tok/s':>7}  "
          f"{'llama.cpp*':>10}  {'ratio':>5}")
    for n, toks, wall, tps in rows:
        ref = LLAMA_BATCHED[n]
        print(f"{n:>7}  {toks:>6}  {wall:>6.2f}  {tps:>7.1f}  {ref:>10.0f}  {tps / ref:>5.2f}")
    print("* llama-batched-bench: reference figures from FACTS.md, not measured in this run\n")

    # ---- 2. guest path vs host loop, single stream
    prompt = all_prompts[0]
    realm = Realm(mode="local", default_model=args.model, tenant="single")
    slot = N_SLOTS - 1  # the guest takes slot 0; the host loop gets a slot nobody uses
    engine.greedy(prompt, 4, slot=slot)  # warm
    host_s, guest_s, decode_tps = [], [], []
    host_ids: list[int] = []
    guest_ids: list[int] = []
    for _ in range(max(args.repeat, 5)):  # interleaved, so both see the same load
        t = time.perf_counter()
        host_ids = engine.greedy(prompt, args.new, slot=slot)
        host_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        g = realm.generate(prompt=prompt, max_tokens=args.new, temperature=0)
        guest_s.append(time.perf_counter() - t)
        assert isinstance(g, Generation)
        guest_ids = g.token_ids
        decode_tps.append(g.timings["tokens_per_s"])
    same = guest_ids == host_ids[: len(guest_ids)]
    h, gs = min(host_s), min(guest_s)
    n_host, n_guest = len(host_ids), len(guest_ids)
    print(f"Single stream, {PROMPT_LEN}-token prompt + {args.new} new tokens, prefill included "
          f"(best of {len(host_s)})")
    print(f"{'path':<34}  {'tokens':>6}  {'wall s':>6}  {'tok/s':>7}  {'ms/token':>8}")
    print(f"{'host loop (Engine.greedy)':<34}  {n_host:>6}  {h:>6.3f}  {n_host / h:>7.1f}  "
          f"{1000 * h / n_host:>8.2f}")
    print(f"{'guest path (Realm.generate)':<34}  {n_guest:>6}  {gs:>6.3f}  {n_guest / gs:>7.1f}  "
          f"{1000 * gs / n_guest:>8.2f}")
    print(f"guest path decode only (timings): {max(decode_tps):.1f} tok/s")
    print(f"guest / host-loop time per token: {(gs / n_guest) / (h / n_host):.3f}  "
          f"(guest cost {1000 * (gs / n_guest - h / n_host):+.2f} ms per token; "
          f"same ids: {same})")
    print(f"guest path vs llama-cpp-python {LLAMA_CPP_PYTHON:.0f} tok/s*: "
          f"{(n_guest / gs) / LLAMA_CPP_PYTHON:.2f}x")
    print("* reference figures from FACTS.md, not measured in this run")


if __name__ == "__main__":
    main()
