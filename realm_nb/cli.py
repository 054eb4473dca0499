"""The `realm-nb` command line (also `python -m realm_nb`).

One argparse parser, one `cmd_<verb>` function per sub-command. Commands that generate talk to a
server when `--endpoint` (or REALM_NB_ENDPOINT) is given or a Jupyter server's runtime is found,
else run locally.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from .catalogue import DEFAULT_MODEL
from .errors import RealmError
from .types import WEIGHT_LAYOUTS


def _realm(args: argparse.Namespace) -> Any:
    from .sdk import Realm

    # auto: --endpoint, REALM_NB_ENDPOINT, a Jupyter server's runtime on this machine, else local
    return Realm(mode="auto", default_model=args.model,
                 endpoint=getattr(args, "endpoint", None), api_key=getattr(args, "api_key", None),
                 weights=getattr(args, "weights", None), mesh=getattr(args, "mesh", None))


def _preload(realm: Any, args: argparse.Namespace) -> None:
    """Local mode: make the model resident now, with a progress bar, before any prompt."""
    if realm.mode != "local":
        return
    from tqdm import tqdm

    from .kernel import RealmKernel

    kernel = RealmKernel.shared()
    entry = kernel.model(args.model, getattr(args, "weights", None))
    if entry.loaded:
        return
    with tqdm(total=entry.n_layers, desc=f"load {entry.name}", unit="layer", leave=False,
              file=sys.stderr) as bar:
        kernel.make_resident(entry, progress=lambda i, n: bar.update(i - bar.n))


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling flags, checked now: a bad value fails before a model loads for it."""
    from .types import SamplingParams

    out: dict[str, Any] = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    for key in ("top_k", "top_p", "min_p", "repeat_penalty", "seed"):
        value = getattr(args, key, None)
        if value is not None:
            out[key] = value
    if getattr(args, "stop", None):
        out["stop"] = args.stop
    SamplingParams(**out)
    return out


def cmd_pull(args: argparse.Namespace) -> int:
    from . import catalogue, hub

    ref = hub.parse_ref(args.name)
    path = (hub.pull(ref, force=args.force) if ref is not None
            else catalogue.pull(args.name, force=args.force))
    print(path)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .types import size_text

    realm = _realm(args)
    models = realm.models()
    if args.json:
        print(json.dumps([m.to_dict() for m in models], indent=2))
        return 0
    width = max([24, *(len(m.name) for m in models)])
    print(f"{'name':{width}} {'state':10} {'resident':>10} {'file':>10} {'quant':8} "
          f"{'source':10}  path")
    for m in models:
        print(f"{m.name:{width}} {m.state:10} {size_text(m.resident_bytes):>10} "
              f"{size_text(m.size_bytes):>10} {m.quant or '-':8} {m.source or '-':10}  "
              f"{m.path or '(realm-nb pull ' + m.name + ')'}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    sampling = _sampling(args)
    realm = _realm(args)
    _preload(realm, args)
    # stdin's trailing newline is not part of the prompt (`echo text | realm-nb generate -`)
    prompt = args.prompt if args.prompt != "-" else sys.stdin.read().removesuffix("\n")
    stream = realm.generate(prompt=prompt, stream=True, **sampling)
    t0 = time.perf_counter()
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    g = stream.result()
    sys.stdout.write("\n")
    print(f"[{g.model}] {g.usage['completion_tokens']} tokens, "
          f"{g.timings.get('tokens_per_s', 0):.1f} tok/s, first token "
          f"{g.timings.get('ttft_ms', 0):.0f} ms, finish: {g.finish_reason} "
          f"({time.perf_counter() - t0:.2f} s)", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    sampling = _sampling(args)
    realm = _realm(args)
    _preload(realm, args)
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    if interactive:
        print("realm-nb chat: empty line or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        if interactive:
            sys.stdout.write("model> ")
        stream = realm.chat(messages, stream=True, **sampling)
        try:
            for piece in stream:
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            stream.cancel()
        g = stream.result()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": g.text})
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    realm = _realm(args)
    _preload(realm, args)
    realm.generate(prompt="warm up", max_tokens=4, temperature=0)
    rows = []
    for _ in tqdm(range(args.repeat), desc="bench", unit="run", leave=False, file=sys.stderr):
        g = realm.generate(prompt=args.prompt, max_tokens=args.max_tokens, temperature=0)
        rows.append(g.timings)
    med = sorted(r["tokens_per_s"] for r in rows)[len(rows) // 2]
    ttft = sorted(r["ttft_ms"] for r in rows)[len(rows) // 2]
    print(f"decode {med:.1f} tok/s (median of {len(rows)}), first token {ttft:.0f} ms")
    return 0


WARMUP_PROMPTS = ("Hello", "Once upon a time, in a small village at the edge of a great forest, "
                  "there lived an old clockmaker who had never once left his workshop.")


def cmd_warmup(args: argparse.Namespace) -> int:
    """Compile the steps a notebook meets first (short and medium prompts; 1, 2 and 4 sequences
    decoding together) into XLA's persistent cache, so a new runtime skips those compiles."""
    import threading

    from .kernel import RealmKernel
    from .sdk import Realm

    RealmKernel.keep_compiled_steps()
    realm = Realm(mode="local", default_model=args.model)
    t0 = time.perf_counter()
    for n in (1, 2, 4):
        threads = [threading.Thread(target=realm.generate, args=(WARMUP_PROMPTS[i % 2],),
                                    kwargs={"max_tokens": 8, "temperature": 0})
                   for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    print(f"realm-nb: warmed {realm.model} in {time.perf_counter() - t0:.1f} s "
          "(compiled steps kept in the realm-nb cache)", file=sys.stderr)
    return 0


def cmd_build_guest(args: argparse.Namespace) -> int:
    from .guest_build import main as build_main

    return build_main(["--check"] if args.check else [])


def cmd_build_kernels(args: argparse.Namespace) -> int:
    from .cpu_kernels import main as build_main

    return build_main(["--check"] if args.check else [])


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import serve_from_args

    return serve_from_args(args)


def cmd_keys(args: argparse.Namespace) -> int:
    """API keys for `realm-nb serve --api-keys FILE`: add (stored hashed), list, hash."""
    from .server.auth import HASH_PREFIX, add_key, hash_key, load_keys

    if args.keys_command == "hash":
        print(hash_key(args.key))
        return 0
    if args.keys_command == "list":
        for key, c in load_keys(args.file).items():
            shown = key[:len(HASH_PREFIX) + 12] if key.startswith(HASH_PREFIX) else \
                key[:6] + "... (plain: replace it with `realm-nb keys add`)"
            rate = f"{c.rate:g}/s burst {c.burst}" if c.rate is not None else "no rate limit"
            names = ", names tenants" if c.name_tenants else ""
            print(f"{c.tenant}\t{c.role}\t{rate}{names}\t{shown}")
        return 0
    key = add_key(args.file, tenant=args.tenant, role=args.role, rate=args.rate,
                  burst=args.burst, name_tenants=args.name_tenants)
    print(key)
    print(f"realm-nb: added a key for tenant {args.tenant!r} ({args.role}) to {args.file}, "
          "stored hashed: this is the only time the key is shown", file=sys.stderr)
    return 0


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--max-tokens", type=int, default=128)
    p.add_argument("-t", "--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--min-p", type=float)
    p.add_argument("--repeat-penalty", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")


def _add_target(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=os.environ.get("REALM_MODEL", DEFAULT_MODEL),
                   help="catalogue name, loaded model name, or .gguf path")
    p.add_argument("--endpoint", help="talk to a realm-nb server at this URL")
    p.add_argument("--api-key", default=None, help="(default: REALM_NB_API_KEY)")
    p.add_argument("--weights", choices=WEIGHT_LAYOUTS, help="weight layout (local mode)")
    p.add_argument("--mesh", default=None, help="devices to spread the model over (local mode), "
                                                "e.g. model=2,data=1")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="realm-nb", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pull", help="fetch a catalogue model, or a GGUF from the Hugging Face "
                                    "Hub (hf://OWNER/REPO/FILE.gguf, OWNER/REPO:QUANT)")
    p.add_argument("name", nargs="?", default=DEFAULT_MODEL,
                   help="catalogue name, hf://OWNER/REPO/FILE.gguf, or OWNER/REPO:QUANT")
    p.add_argument("--force", action="store_true", help="fetch again even if cached")
    p.set_defaults(fn=cmd_pull)

    p = sub.add_parser("models", help="list catalogue, loaded and on-disk models (HF cache, "
                                      "Ollama, LM Studio, REALM_NB_MODELS_DIR)")
    _add_target(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_models)

    p = sub.add_parser("generate", help="complete a prompt, streaming the text")
    p.add_argument("prompt", help="the prompt text, or - to read stdin")
    _add_target(p)
    _add_sampling(p)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with the model's chat template")
    _add_target(p)
    _add_sampling(p)
    p.add_argument("--system", help="system message")
    p.set_defaults(fn=cmd_chat)

    p = sub.add_parser("bench", help="quick single-stream decode speed")
    _add_target(p)
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("-n", "--max-tokens", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("warmup", help="compile the first steps into the persistent XLA cache")
    p.add_argument("-m", "--model", default=DEFAULT_MODEL)
    p.set_defaults(fn=cmd_warmup)

    p = sub.add_parser("build-guest", help="rebuild the WebAssembly guest (needs the build extra)")
    p.add_argument("--check", action="store_true", help="fail if it differs from the shipped one")
    p.set_defaults(fn=cmd_build_guest)

    p = sub.add_parser("build-kernels", help="rebuild the CPU kernels (needs the build extra)")
    p.add_argument("--check", action="store_true", help="fail if it differs from the shipped one")
    p.set_defaults(fn=cmd_build_kernels)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--model", action="append", dest="models", default=None,
                   help="model to load at start (repeatable); default smollm2-135m")
    p.add_argument("--api-keys", help="TOML file mapping API keys to tenants")
    p.add_argument("--models-dir", action="append", default=None,
                   help="folder whose .gguf files may be loaded over HTTP (repeatable)")
    p.add_argument("--weights", choices=WEIGHT_LAYOUTS, default=None)
    p.add_argument("--mesh", default=None,
                   help="devices to spread each model over, e.g. model=2,data=1 (model: tensor "
                        "parallel; data: KV cache pages); default REALM_NB_MESH, else all local "
                        "devices")
    p.add_argument("--lazy", action="store_true",
                   help="serve at once; load models on first use (with progress in the stream)")
    p.add_argument("--fd", type=int, default=None,
                   help="serve on this inherited listening socket instead of --host/--port "
                        "(how a Jupyter server starts its runtime)")
    p.add_argument("--parent-pid", type=int, default=None,
                   help="exit when this process is gone (no orphan runtime)")
    p.add_argument("--max-body-bytes", type=int, default=None,
                   help="largest request body accepted (413 past it); default 4 MiB")
    p.add_argument("--allowed-host", action="append", default=None,
                   help="Host name a server without keys on loopback also answers (repeatable)")
    ray = p.add_argument_group("Ray Serve (pip install \"realm-nb[ray]\")")
    ray.add_argument("--ray", action="store_true",
                     help="serve as a Ray Serve application: runtime replicas, each tenant "
                          "sticky to one")
    ray.add_argument("--replicas", type=int, default=None,
                     help="runtime replicas (default 1)")
    ray.add_argument("--min-replicas", type=int, default=None,
                     help="autoscale between --min-replicas and --max-replicas on the "
                          "ongoing requests per replica")
    ray.add_argument("--max-replicas", type=int, default=None)
    ray.add_argument("--target-ongoing-requests", type=float, default=16.0,
                     help="autoscaling target of ongoing requests per replica (default 16)")
    ray.add_argument("--replica-cpus", type=float, default=1.0,
                     help="CPUs Ray reserves for each replica (default 1)")
    ray.add_argument("--ray-address", default=None,
                     help="join this Ray cluster (default RAY_ADDRESS, else start one on this "
                          "machine for as long as the command runs)")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("keys", help="API keys for `serve --api-keys`: add (hashed), list, hash")
    verbs = p.add_subparsers(dest="keys_command", required=True)
    k = verbs.add_parser("add", help="make a key, append it hashed to the file, print it once")
    k.add_argument("--file", default="keys.toml", help="the keys file (default keys.toml)")
    k.add_argument("--tenant", required=True, help="the tenant the key acts as")
    k.add_argument("--role", choices=("tenant", "admin"), default="tenant",
                   help="admin: may load, unload and name models, and read /metrics")
    k.add_argument("--rate", type=float, default=None, help="requests per second (none: no limit)")
    k.add_argument("--burst", type=int, default=None, help="token-bucket size (default 10)")
    k.add_argument("--name-tenants", action="store_true",
                   help="the key may act as any tenant named in X-Realm-Tenant")
    k = verbs.add_parser("list", help="tenants and roles of a keys file (never the keys)")
    k.add_argument("--file", default="keys.toml")
    k = verbs.add_parser("hash", help="print the sha256: form of a key, for the keys file")
    k.add_argument("key")
    p.set_defaults(fn=cmd_keys)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fn: Callable[[argparse.Namespace], int] = args.fn
    try:
        return fn(args)
    except RealmError as e:
        print(f"realm-nb: error: {e.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
