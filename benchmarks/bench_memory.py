"""Memory benchmark: the shared runtime, its tenants and a thin notebook kernel vs llama-cpp-python.

    python benchmarks/bench_memory.py [--model smollm2-135m] [--tenants 8] [--new 16]

All in one run, every process started here and measured from outside with psutil (RSS; USS, the
memory only that process holds, where it helps):

1. `realm-nb serve` on a free loopback port with an `--api-keys` file of `--tenants` keys (tenants
   nb1..nbN), the model loaded, after one short greedy generation (`--new` tokens) by nb1, idle.
2. The same server after every other tenant (its own key) has generated once, idle again: RSS and
   the increase per added tenant; then all of them generating at once (peak RSS sampled every
   20 ms during).
3. A thin notebook kernel: a real IPython kernel (`jupyter_client.KernelManager`) that runs
   `%load_ext realm_nb`, `%realm connect URL --api-key KEY` and a `%%realm generate -n 16 -t 0`
   cell against that server; its RSS, and whether JAX / wasmtime got imported in it.
4. llama-cpp-python in a subprocess: `Llama(path, n_ctx=2048, n_threads=2)`, one generation of the
   same length (`LLAMA_CPP_LIB_PATH` is passed through when set; "not installed" when absent).

Targets (from the issue) are printed with each row as met / missed and the margin: runtime idle
<= 2 x GGUF file + 200 MiB; each further tenant <= 2 MiB + its KV (its sequence's positions,
rounded up to whole 64-position pages, in the cache's dtype); thin kernel < 150 MiB. Figures are
single measurements on a shared machine: RSS moves by a few MiB between runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

MiB = 2**20
PROMPT = "The capital of France is"
KV_PAGE = 64  # positions per KV page (realm_nb.kvcache.PAGE); the KV allowance rounds up to it
SETTLE_S = 2.0  # idle time before an "idle" reading

LLAMA_CHILD = r"""
import json, resource, sys, time
path, prompt, new, settle = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
try:
    from llama_cpp import Llama
except Exception as e:  # not installed, or its shared library did not load
    print(json.dumps({"error": f"{type(e).__name__}: {e}"})); sys.exit(0)
import psutil
t = time.perf_counter()
llm = Llama(model_path=path, n_ctx=2048, n_threads=2, verbose=False)
load_s = time.perf_counter() - t
out = llm(prompt, max_tokens=new, temperature=0.0)
time.sleep(settle)
m = psutil.Process().memory_full_info()
print(json.dumps({"rss": m.rss, "uss": m.uss,
                  "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "load_s": load_s, "tokens": out["usage"]["completion_tokens"],
                  "text": out["choices"][0]["text"]}))
"""


# ----------------------------------------------------------------------------- measuring


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vm_hwm(pid: int) -> int:
    """Peak RSS of a process since it started (VmHWM), in bytes; 0 when unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def memory(pid: int) -> dict[str, int]:
    """RSS and USS of a process plus its children (the runtime is one process today)."""
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    rss = uss = 0
    for p in procs:
        try:
            m = p.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss += m.rss
        uss += m.uss
    return {"rss": rss, "uss": uss, "procs": len(procs), "hwm": vm_hwm(pid)}


def idle_memory(pid: int) -> dict[str, int]:
    time.sleep(SETTLE_S)
    return memory(pid)


class PeakSampler:
    """Samples a process's RSS every `interval` seconds on a thread; `.peak` is the largest."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.proc, self.interval, self.peak = psutil.Process(pid), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.NoSuchProcess:
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def end_process(pid: int, timeout: float = 15.0) -> None:
    """End a process this script started, and its children, by PID: TERM, then KILL."""
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = [*root.children(recursive=True), root]
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=5)


# ----------------------------------------------------------------------------- the server


def start_server(model: str, keys_file: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "realm_nb", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--api-keys", str(keys_file), "--model", model]
    with log.open("wb") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def wait_healthy(proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"realm-nb serve exited with {proc.returncode}:\n"
                               + log.read_text(errors="replace")[-3000:])
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"realm-nb serve not healthy after {timeout:.0f} s:\n"
                       + log.read_text(errors="replace")[-3000:])


def complete(url: str, key: str, model: str, new: int) -> dict[str, Any]:
    r = httpx.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {key}"},
                   json={"model": model, "prompt": PROMPT, "max_tokens": new, "temperature": 0},
                   timeout=600)
    if r.status_code != 200:
        raise RuntimeError(f"POST /v1/completions ({key}): {r.status_code} {r.text[:500]}")
    out: dict[str, Any] = r.json()
    return out


def kv_info(url: str, key: str) -> dict[str, Any]:
    """What the server says about its KV cache (`/v1/stats` store.models[].kv), if anything."""
    try:
        stats = httpx.get(f"{url}/v1/stats", headers={"Authorization": f"Bearer {key}"},
                          timeout=10).json()
        for m in stats.get("store", {}).get("models", []):
            if m.get("kv"):
                return dict(m["kv"])
    except (httpx.HTTPError, ValueError, AttributeError):
        pass
    return {}


def kv_bytes_per_position(gguf_path: Path, dtype_name: str) -> tuple[int, str]:
    """K and V of every layer for one position, from the GGUF's own metadata."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(gguf_path))

    def field(name: str) -> int:
        f = reader.fields[name]
        return int(f.parts[f.data[0]][0])

    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    layers = field(f"{arch}.block_count")
    heads = field(f"{arch}.attention.head_count")
    kv_heads = field(f"{arch}.attention.head_count_kv")
    key = f"{arch}.attention.key_length"
    head_dim = field(key) if key in reader.fields else field(f"{arch}.embedding_length") // heads
    itemsize = np.dtype(dtype_name).itemsize
    return (layers * 2 * kv_heads * head_dim * itemsize,
            f"{layers} layers x K,V x {kv_heads} kv heads x {head_dim} x {dtype_name}")


# ----------------------------------------------------------------------------- the thin kernel


def thin_kernel(url: str, key: str, new: int) -> dict[str, Any]:
    """A real IPython kernel that talks to the server through the magics; its RSS and imports."""
    from jupyter_client import KernelManager

    env = {**os.environ, "REALM_NB_ENDPOINT": url, "REALM_NB_API_KEY": key,
           "REALM_ENDPOINT": url, "REALM_API_KEY": key}
    km = KernelManager(kernel_name="python3")
    km.start_kernel(env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid = None
    try:
        prov = km.provisioner
        proc = getattr(prov, "process", None)
        pid = getattr(proc, "pid", None) or getattr(prov, "pid", None)
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=120)

        def run(code: str) -> tuple[str, str]:
            out: list[str] = []

            def hook(msg: dict[str, Any]) -> None:
                c = msg.get("content", {})
                if msg["msg_type"] == "stream":
                    out.append(c.get("text", ""))
                elif msg["msg_type"] in ("display_data", "update_display_data", "execute_result"):
                    out.append(c.get("data", {}).get("text/plain", "") + "\n")
                elif msg["msg_type"] == "error":
                    out.append(f"{c.get('ename')}: {c.get('evalue')}")

            reply = kc.execute_interactive(code, timeout=600, output_hook=hook)
            return reply["content"]["status"], "".join(out)

        run("import sys")
        base = idle_memory(pid) if pid else {}
        steps = [("%load_ext realm_nb", "load_ext"),
                 (f"%realm connect {url} --api-key {key}", "connect"),
                 (f"%%realm generate -n {new} -t 0\n{PROMPT}", "generate")]
        errors = []
        text = ""
        for code, name in steps:
            status, out = run(code)
            if status != "ok":
                errors.append(f"{name}: {out.strip()[-300:]}")
            if name == "generate":
                text = out.strip().splitlines()[-1] if out.strip() else ""
        status, out = run("import json, sys; print(json.dumps({m: m in sys.modules "
                          "for m in ('jax', 'wasmtime', 'jaxlib', 'numpy', 'httpx')}))")
        mods = json.loads(out.strip().splitlines()[-1]) if status == "ok" else {}
        after = idle_memory(pid) if pid else {}
        kc.stop_channels()
        return {"pid": pid, "base": base, "after": after, "modules": mods, "errors": errors,
                "text": text}
    finally:
        try:
            km.shutdown_kernel(now=True)
        finally:
            if pid and psutil.pid_exists(pid):
                end_process(pid)


# ----------------------------------------------------------------------------- llama-cpp-python


def llama_cpp_python(path: Path, new: int) -> dict[str, Any]:
    proc = subprocess.Popen([sys.executable, "-c", LLAMA_CHILD, str(path), PROMPT, str(new),
                             str(SETTLE_S)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            end_process(proc.pid)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if not lines:
        return {"error": f"exit {proc.returncode}: {err.strip()[-500:]}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


# ----------------------------------------------------------------------------- report


def mib(x: float) -> str:
    return f"{x / MiB:,.1f}"


def verdict(value: float, limit: float, strict: bool = False) -> str:
    ok = value < limit if strict else value <= limit
    return f"{'met' if ok else 'missed'} by {abs(limit - value) / MiB:,.1f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tenants", type=int, default=8)
    ap.add_argument("--new", type=int, default=16, help="new tokens per generation")
    ap.add_argument("--timeout", type=float, default=900, help="seconds for the server to start")
    args = ap.parse_args()

    from realm_nb.catalogue import resolve_model_path

    path = resolve_model_path(args.model)
    file_size = path.stat().st_size
    n = args.tenants
    keys = {f"sk-bench-{i}": f"nb{i}" for i in range(1, n + 1)}
    key_of = {t: k for k, t in keys.items()}
    print(f"{args.model}: {path} ({mib(file_size)} MiB); {n} tenants, {args.new} new tokens per "
          f"generation, greedy; REALM_NB_SLOTS={os.environ.get('REALM_NB_SLOTS', '(default)')}, "
          f"REALM_NB_CONTEXT={os.environ.get('REALM_NB_CONTEXT', '(default)')}; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (a busy machine makes these figures "
          f"noisy)\n")

    rows: list[tuple[str, str, str, str, str]] = []  # what, RSS, USS, target, verdict
    notes: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix="realm-bench-memory-"))
    keys_file = tmp / "keys.toml"
    keys_file.write_text("".join(f'[keys."{k}"]\ntenant = "{t}"\n\n' for k, t in keys.items()))
    log = tmp / "serve.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(args.model, keys_file, port, log)
    server_pid = server.pid
    runtime_idle = per_tenant = kernel_rss = None
    kv_allow = 0
    try:
        # ---- 1. the runtime, loaded, after one generation
        up = wait_healthy(server, url, log, args.timeout)
        loaded = idle_memory(server_pid)
        t = time.perf_counter()
        g = complete(url, key_of["nb1"], args.model, args.new)
        first_s = time.perf_counter() - t
        one = idle_memory(server_pid)
        runtime_idle = one["rss"]
        prompt_tokens = int(g["usage"]["prompt_tokens"])
        notes.append(f"server healthy after {up:.1f} s; first generation {first_s:.1f} s "
                     f"(compiles included): {g['choices'][0]['text']!r}")
        limit_idle = 2 * file_size + 200 * MiB
        rows.append(("runtime: model loaded, before any generation", mib(loaded["rss"]),
                     mib(loaded["uss"]), "", ""))
        rows.append(("runtime: after 1 generation (nb1), idle", mib(one["rss"]), mib(one["uss"]),
                     f"<= {mib(limit_idle)}", verdict(one["rss"], limit_idle)))

        # ---- 2. every other tenant once, then all at once
        kv = kv_info(url, key_of["nb1"])
        dtype = str(kv.get("dtype") or "float16")
        per_pos, kv_desc = kv_bytes_per_position(path, dtype)
        positions = prompt_tokens + args.new
        kv_allow = -(-positions // KV_PAGE) * KV_PAGE * per_pos
        for i in range(2, n + 1):
            complete(url, key_of[f"nb{i}"], args.model, args.new)
        all_seq = idle_memory(server_pid)
        per_tenant = (all_seq["rss"] - one["rss"]) / max(1, n - 1)
        limit_tenant = 2 * MiB + kv_allow
        rows.append((f"runtime: after {n} tenants generated once each, idle", mib(all_seq["rss"]),
                     mib(all_seq["uss"]), "", ""))
        rows.append((f"  increase per further tenant ({n - 1} added)", mib(per_tenant),
                     mib((all_seq["uss"] - one["uss"]) / max(1, n - 1)),
                     f"<= {mib(limit_tenant)}", verdict(per_tenant, limit_tenant)))

        errors: queue.Queue[str] = queue.Queue()
        barrier = threading.Barrier(n + 1)

        def worker(i: int) -> None:
            barrier.wait()
            try:
                complete(url, key_of[f"nb{i}"], args.model, args.new)
            except Exception as e:
                errors.put(f"nb{i}: {e}")

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(1, n + 1)]
        for th in threads:
            th.start()
        with PeakSampler(server_pid) as sampler:
            barrier.wait()
            t = time.perf_counter()
            for th in threads:
                th.join()
            conc_s = time.perf_counter() - t
        after_conc = idle_memory(server_pid)
        if not errors.empty():
            notes.append("concurrent generation errors: " + "; ".join(list(errors.queue)))
        rows.append((f"runtime: {n} tenants generating at once, peak (sampled 20 ms)",
                     mib(sampler.peak), "", "", ""))
        rows.append((f"runtime: after the {n} at once, idle", mib(after_conc["rss"]),
                     mib(after_conc["uss"]), "", ""))
        notes.append(f"{n} concurrent generations took {conc_s:.1f} s (first time at this batch "
                     f"size: compiles included); server peak RSS since start (VmHWM) "
                     f"{mib(after_conc['hwm'])} MiB; KV cache as reported by /v1/stats: "
                     f"{kv or 'nothing reported'}")
        notes.append(f"per-tenant KV allowance: {positions} positions -> "
                     f"{-(-positions // KV_PAGE)} page(s) of {KV_PAGE} x {per_pos:,} B "
                     f"({kv_desc}) = {mib(kv_allow)} MiB")

        # ---- 3. the thin kernel
        try:
            k = thin_kernel(url, key_of["nb1"], args.new)
            kernel_rss = k["after"].get("rss")
            mods = k["modules"]
            mod_s = ", ".join(f"{m} in sys.modules: {v}" for m, v in mods.items()
                              if m in ("jax", "wasmtime")) or "modules unknown"
            rows.append(("notebook kernel, bare (ipykernel, before %load_ext)",
                         mib(k["base"].get("rss", 0)), mib(k["base"].get("uss", 0)), "", ""))
            limit_kernel = 150 * MiB
            rows.append((f"notebook kernel, thin, after connect + generate ({mod_s})",
                         mib(kernel_rss or 0), mib(k["after"].get("uss", 0)),
                         f"< {mib(limit_kernel)}",
                         verdict(kernel_rss or 0, limit_kernel, strict=True)))
            if k["errors"]:
                notes.append("kernel cell errors: " + " | ".join(k["errors"]))
            notes.append(f"kernel modules: {mods}; generated: {k['text'].strip()[:120]!r}")
        except Exception as e:
            rows.append(("notebook kernel, thin", "failed", "", "< 150.0", f"{type(e).__name__}"))
            notes.append(f"kernel failed: {type(e).__name__}: {e}")
    finally:
        end_process(server_pid)

    # ---- 4. llama-cpp-python, after the server has gone (the two do not share the 2 cores)
    lc = llama_cpp_python(path, args.new)
    lib = os.environ.get("LLAMA_CPP_LIB_PATH")
    if "error" in lc:
        rows.append(("llama-cpp-python: not installed", "-", "-", "", ""))
        notes.append(f"llama-cpp-python: {lc['error'][:300]}; get it with `pip install "
                     "llama-cpp-python==0.3.36` (compiles ~14 min) or build it as in README "
                     "'Benchmarks' and set LLAMA_CPP_LIB_PATH")
    else:
        rows.append(("llama-cpp-python: n_ctx 2048, after 1 generation, idle", mib(lc["rss"]),
                     mib(lc["uss"]), "", ""))
        notes.append(f"llama-cpp-python{' (LLAMA_CPP_LIB_PATH=' + lib + ')' if lib else ''}: "
                     f"peak RSS {mib(lc['peak'])} MiB, load {lc['load_s']:.2f} s, "
                     f"{lc['tokens']} tokens: {lc['text']!r}")

    # ---- table
    w = max(len(r[0]) for r in rows)
    print(f"{'process / state':<{w}}  {'RSS MiB':>8}  {'USS MiB':>8}  {'target MiB':>11}  verdict")
    for what, rss, uss, target, v in rows:
        print(f"{what:<{w}}  {rss:>8}  {uss:>8}  {target:>11}  {v}")
    print(f"\nGGUF file {mib(file_size)} MiB; targets: runtime idle <= 2 x file + 200 MiB = "
          f"{mib(2 * file_size + 200 * MiB)} MiB; each further tenant <= 2 MiB + its KV "
          f"({mib(kv_allow)} MiB) = {mib(2 * MiB + kv_allow)} MiB; thin kernel < 150 MiB")
    if runtime_idle is not None:
        print(f"runtime idle / GGUF file: {runtime_idle / file_size:.2f}x")
        if "error" not in lc:
            print(f"runtime idle / llama-cpp-python: {runtime_idle / lc['rss']:.2f}x "
                  f"(RSS {mib(runtime_idle)} vs {mib(lc['rss'])} MiB)")
    for note in notes:
        print(f"- {note}")


if __name__ == "__main__":
    main()
