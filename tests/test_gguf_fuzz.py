"""Fuzz the loader: thousands of mutated tiny GGUF files end in success or a `RealmError`, never
another exception, each fast and in bounded memory (issue 10, item 4, "must show").

A seeded mutator (reproducible: a failure names its case number) changes two small valid files,
one with a gpt2 vocabulary and one with a SentencePiece one. It knows where the header's integer
fields are (lengths, counts, value types, scalar values, tensor dims, types and offsets) and sets
them to boundary values, flips bits, truncates, inserts, deletes and splices. Each case runs what
`LayerStore.register` runs before any weight is read: open, config, tensor checks, tokenizer.

The cases run in a fresh interpreter (this file run as a script), so that its peak RSS measures
the cases and nothing else: the growth of `ru_maxrss` over all cases bounds what any one case
took. Each case is timed on its own.
"""

from __future__ import annotations

import json
import random
import resource
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

N_CASES = 2400
CASE_LIMIT_S = 2.0
RSS_LIMIT_MB = 200.0
# Values a mutation writes, by the kind of field: counts and lengths get sizes that do not fit,
# metadata values get zeros and limits, value types get every type, dims and offsets get both.
BIG = (2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**63 - 1, 2**63, 2**64 - 1)
VALUES: dict[str, tuple[int, ...]] = {
    "count": (0, 1, 2, 3, 255, 4096, 65536, *BIG),
    "length": (0, 1, 2, 7, 64, 256, 65536, *BIG),
    "value": (0, 0, 1, 2, 3, 5, 2**15, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1),
    "type": (*range(14), 2**31, 2**32 - 1),
    "dim": (0, 1, 2, 3, 31, 32, 33, 2**31, 2**32, 2**40, 2**63, 2**64 - 1),
    "offset": (0, 1, 31, 32, 4096, 2**31, 2**40, 2**63, 2**64 - 1),
}
FIELD_KINDS = {"count": 30, "length": 10, "value": 30, "type": 15, "dim": 10, "offset": 5}
_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
Field = tuple[int, int, str]  # offset, width, kind


# --- where the header's integer fields are (walked on the valid seed files only) ----------------


def int_fields(data: bytes) -> list[Field]:
    """(offset, width, kind) of every integer field of a valid GGUF header."""
    fields: list[Field] = [(4, 4, "value"), (8, 8, "count"), (16, 8, "count")]
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24

    def string() -> None:
        nonlocal pos
        fields.append((pos, 8, "length"))
        pos += 8 + struct.unpack_from("<Q", data, pos)[0]

    def value(vtype: int) -> None:
        nonlocal pos
        if vtype in _SCALAR_SIZE:
            fields.append((pos, _SCALAR_SIZE[vtype], "value"))
            pos += _SCALAR_SIZE[vtype]
        elif vtype == 8:
            string()
        else:  # array
            itype, count = struct.unpack_from("<IQ", data, pos)
            fields.extend([(pos, 4, "type"), (pos + 4, 8, "count")])
            pos += 12
            for i in range(count):
                if i < 4 or itype not in _SCALAR_SIZE:
                    value(itype)
                else:
                    pos += _SCALAR_SIZE[itype]

    for _ in range(n_kv):
        string()
        fields.append((pos, 4, "type"))
        pos += 4
        value(struct.unpack_from("<I", data, pos - 4)[0])
    for _ in range(n_tensors):
        string()
        n_dims = struct.unpack_from("<I", data, pos)[0]
        fields.append((pos, 4, "count"))
        pos += 4
        fields.extend((pos + 8 * d, 8, "dim") for d in range(n_dims))
        pos += 8 * n_dims
        fields.extend([(pos, 4, "type"), (pos + 4, 8, "offset")])
        pos += 12
    return fields


# --- the mutator ------------------------------------------------------------------------------


def mutate(data: bytes, fields: list[Field], rng: random.Random) -> tuple[bytes, str]:
    """One mutated copy of `data` and a description of what changed."""
    header_end = max(off + width for off, width, _ in fields)
    by_kind: dict[str, list[Field]] = {}
    for f in fields:
        by_kind.setdefault(f[2], []).append(f)
    b = bytearray(data)
    kind = rng.choices(["field", "bits", "truncate", "insert", "delete", "splice"],
                       weights=[60, 16, 6, 6, 6, 6])[0]
    if kind == "field":
        what = []
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            field_kind = rng.choices(list(FIELD_KINDS), weights=list(FIELD_KINDS.values()))[0]
            off, width, _ = rng.choice(by_kind[field_kind])
            old = int.from_bytes(b[off : off + width], "little")
            r = rng.random()
            if r < 0.7:
                value = rng.choice(VALUES[field_kind])
            elif r < 0.9:  # near the old value: off by a little, or -1 read as unsigned
                value = old + rng.choice((-2, -1, 1, 2, 16, -old - 1))
            else:
                value = rng.getrandbits(8 * width)
            value %= 1 << (8 * width)
            b[off : off + width] = value.to_bytes(width, "little")
            what.append(f"{field_kind}@{off}={value}")
        return bytes(b), "field " + ",".join(what)
    if kind == "bits":
        flips = [rng.randrange(header_end * 8) for _ in range(rng.randint(1, 8))]
        for bit in flips:
            b[bit // 8] ^= 1 << (bit % 8)
        return bytes(b), f"bits {flips}"
    if kind == "truncate":
        cut = rng.randrange(header_end + 64) if rng.random() < 0.8 else rng.randrange(len(b))
        return bytes(b[:cut]), f"truncate {cut}"
    at = rng.randrange(24, header_end)
    n = rng.choice((1, 2, 4, 8, 12, 17))
    if kind == "insert":
        return bytes(b[:at] + rng.randbytes(n) + b[at:]), f"insert {n} at {at}"
    if kind == "delete":
        return bytes(b[:at] + b[at + n :]), f"delete {n} at {at}"
    src = rng.randrange(24, header_end)
    chunk = b[src : src + rng.randint(4, 64)]
    return bytes(b[:at] + chunk + b[at:]), f"splice {len(chunk)} from {src} to {at}"


# --- the driver (a fresh interpreter) -----------------------------------------------------------


def load_metadata_path(path: Path) -> None:
    """What the store does with a file before reading weights: open, config, tensors, tokenizer."""
    from realm_nb.config import ModelConfig
    from realm_nb.gguf_io import open_gguf
    from realm_nb.tokenizer import load_codec
    from realm_nb.weights import check_tensors

    f = open_gguf(path)
    check_tensors(f, ModelConfig.from_gguf(f))
    load_codec(f)


def run_cases(seeds: list[Path], n_cases: int, work: Path,
              load: Callable[[Path], None] = load_metadata_path) -> dict[str, object]:
    from realm_nb.errors import RealmError

    originals = [(p.read_bytes(), int_fields(p.read_bytes())) for p in seeds]
    case_path = work / "case.gguf"
    for data, _ in originals:  # warm up: imports, first-call caches; then measure
        case_path.write_bytes(data)
        load(case_path)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    outcomes: dict[str, int] = {}
    failures: list[str] = []
    slowest = (0.0, "")
    for i in range(n_cases):
        rng = random.Random(i)
        data, fields = originals[i % len(originals)]
        mutated, how = mutate(data, fields, rng)
        case_path.write_bytes(mutated)
        t0 = time.perf_counter()
        try:
            load(case_path)
            outcome = "ok"
        except RealmError as e:
            outcome = type(e).__name__
        except BaseException as e:  # exactly what the fuzz looks for
            outcome = "BUG"
            failures.append(f"case {i} ({how}): {type(e).__name__}: {str(e)[:300]}")
        elapsed = time.perf_counter() - t0
        slowest = max(slowest, (elapsed, f"case {i} ({how})"))
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"cases": n_cases, "outcomes": outcomes, "failures": failures[:20],
            "slowest_s": slowest[0], "slowest": slowest[1],
            "rss_growth_mb": (rss_after - rss_before) / 1024}


def main(argv: list[str]) -> None:
    # A safety net: a regression that allocates without bound fails here, not on the machine.
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
    seeds, n_cases, work = [Path(p) for p in argv[0].split(",")], int(argv[1]), Path(argv[2])
    print(json.dumps(run_cases(seeds, n_cases, work)))


# --- the test ----------------------------------------------------------------------------------


def seed_files(folder: Path) -> Iterator[Path]:
    import tiny_gguf as tg

    yield tg.write_tiny_llama(folder / "gpt2.gguf", vocab=tg.mini_vocab("gpt2")).path
    yield tg.write_tiny_llama(folder / "spm.gguf", vocab=tg.mini_vocab("llama"),
                              chat_template=None).path


def test_mutated_gguf_files_only_raise_realm_errors(tmp_path: Path) -> None:
    seeds = list(seed_files(tmp_path))
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, ",".join(map(str, seeds)), str(N_CASES), str(tmp_path)],
        capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    print(f"{N_CASES} cases in {time.perf_counter() - t0:.1f} s: {report}")
    assert report["failures"] == []
    outcomes = report["outcomes"]
    assert sum(outcomes.values()) == N_CASES >= 2000
    # the mutations reach every stage: some files still load, several checks fire
    assert outcomes.get("ok", 0) > N_CASES // 50
    assert len(outcomes) >= 5, outcomes
    assert report["slowest_s"] < CASE_LIMIT_S, report["slowest"]
    assert report["rss_growth_mb"] < RSS_LIMIT_MB


if __name__ == "__main__":
    main(sys.argv[1:])
