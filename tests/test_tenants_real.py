"""Tenants on the real model: the guest's token loop against the host loop, isolation, memory,
cancellation, bad input and the bounded queue (SmolLM2-135M Q4_1, the shared kernel)."""

from __future__ import annotations

import _thread
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from realm_nb.errors import ContextLengthError, InvalidRequestError, QueueFullError, RealmError
from realm_nb.kernel import GenerationStream, RealmKernel
from realm_nb.sdk import Realm
from realm_nb.types import Generation, SamplingParams

pytestmark = pytest.mark.slow  # the real SmolLM2 (the shared kernel)

MODEL = "smollm2-135m"
N_NEW = 24
# "Once upon a time, in a small village,"
STORY = [6403, 1980, 253, 655, 28, 281, 253, 1165, 6560, 28]


def realm(tenant: str = "default") -> Realm:
    return Realm(mode="local", default_model=MODEL, tenant=tenant)


def gen(r: Realm, prompt: str | list[int], **kwargs: Any) -> Generation:
    """A finished (non-streamed) generation."""
    g = r.generate(prompt=prompt, **kwargs)
    assert isinstance(g, Generation)
    return g


def assert_idle(kernel: RealmKernel) -> None:
    """Nothing left hanging: no running request, no open KV slot."""
    deadline = time.monotonic() + 5
    while kernel.running() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert kernel.running() == []
    for sched in kernel.stats()["schedulers"].values():
        assert sched["open_sequences"] == 0


def host_greedy(kernel: RealmKernel, prompt_ids: list[int], n: int) -> list[int]:
    """The engine's host-loop greedy ids, on the last slot (no request may hold it now)."""
    assert_idle(kernel)
    entry = kernel.store.get(MODEL)
    assert entry.engine is not None
    return entry.engine.greedy(prompt_ids, n, slot=entry.engine.n_slots - 1)


def vm_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


# ------------------------------------------------------------------ the guest equals the host loop


def test_guest_greedy_equals_host_loop(kernel: RealmKernel, llamacpp_refs: dict) -> None:
    r = realm()
    for case in llamacpp_refs["cases"]:
        g = gen(r, case["prompt_ids"], max_tokens=N_NEW, temperature=0)
        expected = host_greedy(kernel, case["prompt_ids"], N_NEW)
        assert g.token_ids == expected[: len(g.token_ids)], case["prompt"]
        # the host loop stops only at max tokens, the guest also at end-of-generation
        assert len(g.token_ids) == N_NEW or g.finish_reason == "stop", case["prompt"]


def test_same_seed_same_text_other_seed_other_text(kernel: RealmKernel) -> None:
    r = realm()
    a = gen(r, STORY, max_tokens=N_NEW, temperature=1.0, seed=11)
    b = gen(r, STORY, max_tokens=N_NEW, temperature=1.0, seed=11)
    c = gen(r, STORY, max_tokens=N_NEW, temperature=1.0, seed=12)
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.text != c.text
    assert a.params is not None and a.params.seed == 11


def test_stop_string_cuts_text(kernel: RealmKernel) -> None:
    r = realm()
    prompt = [504, 3575, 282, 4649, 314]  # "The capital of France is" -> " Paris.\n\nThe ..."
    full = gen(r, prompt, max_tokens=N_NEW, temperature=0)
    assert "\n" in full.text
    s = r.generate(prompt=prompt, max_tokens=N_NEW, temperature=0, stop="\n", stream=True)
    assert isinstance(s, GenerationStream)
    pieces = list(s)
    g = s.result()
    assert g.finish_reason == "stop"
    assert g.text == full.text[: full.text.index("\n")]
    assert "".join(pieces) == g.text  # no part of the stop string was streamed
    assert len(g.token_ids) < N_NEW


def test_max_tokens_finishes_with_length(kernel: RealmKernel) -> None:
    g = gen(realm(), STORY, max_tokens=7, temperature=0)
    assert g.finish_reason == "length"
    assert len(g.token_ids) == 7
    assert g.usage["completion_tokens"] == 7


# ------------------------------------------------------------------ many tenants, one weight copy


PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at a temperature of",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "My favourite fruit is",
    "import numpy as np\n",
    "The largest planet in the solar system",
]


def test_eight_tenants_at_once_get_what_they_get_alone(kernel: RealmKernel) -> None:
    n = 16
    tenants = [realm(f"t{i}") for i in range(8)]
    alone = [gen(t, p, max_tokens=n, temperature=0).token_ids
             for t, p in zip(tenants, PROMPTS, strict=True)]
    assert len({tuple(a) for a in alone}) == 8  # different prompts, different outputs

    together: list[list[int] | None] = [None] * 8
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def run(i: int) -> None:
        try:
            barrier.wait()
            together[i] = gen(tenants[i], PROMPTS[i], max_tokens=n, temperature=0).token_ids
        except BaseException as e:
            errors.append(e)

    rows_before = kernel.stats()["schedulers"]
    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert together == alone
    # they really shared steps: fewer decode steps than decode rows (on this model's scheduler;
    # an earlier test may have made one for the exact layout too)
    sid = kernel.model("smollm2-135m").id
    sched = kernel.stats()["schedulers"][sid]
    before = rows_before.get(sid, {"decode_rows": 0, "steps": 0})
    assert sched["decode_rows"] - before["decode_rows"] > sched["steps"] - before["steps"]

    by_id = {t["id"]: t for t in tenants[0].stats()["tenants"]}
    for i in range(8):
        st = by_id[f"t{i}"]
        assert st["tokens"] > 0 and st["fuel_used"] > 0, st
    assert_idle(kernel)


def test_weights_held_once_and_tenants_are_cheap(kernel: RealmKernel) -> None:
    realm("rss-warm").generate(prompt=STORY, max_tokens=2, temperature=0)
    realm("rss-0").generate(prompt=STORY, max_tokens=2, temperature=0)
    rss_1 = vm_rss_bytes()
    for i in range(1, 8):
        realm(f"rss-{i}").generate(prompt=STORY, max_tokens=2, temperature=0)
    rss_8 = vm_rss_bytes()
    per_tenant_mib = (rss_8 - rss_1) / 7 / 2**20
    print(f"\nRSS growth per extra tenant (8 vs 1): {per_tenant_mib:.2f} MiB")
    assert per_tenant_mib < 20

    smol = [m for m in kernel.store.stats()["models"]
            if m["name"] == MODEL and m["layout"] == kernel.store.default_layout]
    assert len(smol) == 1  # one copy in the layout every tenant uses (tests may add `exact`)
    assert smol[0]["resident_layers"] == smol[0]["layers"]
    ids = {t["id"] for t in kernel.stats()["tenants"]}
    assert {f"rss-{i}" for i in range(8)} <= ids


# ------------------------------------------------------------------ cancellation


def _start_and_read(r: Realm, n_pieces: int = 3
                    ) -> tuple[GenerationStream, Iterator[str], list[str]]:
    """Start a long stream and read a few pieces; the caller keeps the iterator alive (a
    dropped, half-read iterator is closed, and closing it cancels the generation)."""
    s = r.generate(prompt=STORY, max_tokens=400, temperature=0, stream=True)
    assert isinstance(s, GenerationStream)
    it = iter(s)
    pieces = [next(it) for _ in range(n_pieces)]
    assert not s.done
    return s, it, pieces


def _check_cancelled(kernel: RealmKernel, g: Generation, pieces: list[str]) -> None:
    assert g.finish_reason == "cancelled"
    assert g.text and g.text.startswith("".join(pieces))
    assert 0 < len(g.token_ids) < 400
    assert_idle(kernel)
    nxt = gen(realm(), STORY, max_tokens=3, temperature=0)
    assert len(nxt.token_ids) == 3


def test_realm_cancel_keeps_partial_text(kernel: RealmKernel) -> None:
    r = realm("cancel-a")
    s, _it, pieces = _start_and_read(r)
    assert r.cancel() >= 1
    _check_cancelled(kernel, s.result(timeout=30), pieces)


def test_stream_close_cancels(kernel: RealmKernel) -> None:
    s, _it, pieces = _start_and_read(realm("cancel-b"))
    s.close()
    assert s.done and s.generation is not None
    _check_cancelled(kernel, s.generation, pieces)


def test_cancel_from_another_thread(kernel: RealmKernel) -> None:
    s, _it, pieces = _start_and_read(realm("cancel-c"))
    threading.Timer(0.1, s.cancel).start()
    _check_cancelled(kernel, s.result(timeout=30), pieces)


def test_ctrl_c_while_waiting_returns_partial(kernel: RealmKernel) -> None:
    s, _it, pieces = _start_and_read(realm("cancel-d"))
    timer = threading.Timer(0.2, _thread.interrupt_main)
    timer.start()
    t0 = time.monotonic()
    g = s.result()  # waits with no timeout, as a user would
    timer.join()
    assert time.monotonic() - t0 < 5  # the interrupt was seen while waiting, not at the end
    _check_cancelled(kernel, g, pieces)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("prompt, err, param", [
    ([1, 2, 49152], InvalidRequestError, "prompt"),
    ([], InvalidRequestError, "prompt"),
    ("", InvalidRequestError, "prompt"),
    ([504] * 4096, ContextLengthError, "prompt"),
])
def test_bad_prompt(kernel: RealmKernel, prompt: Any, err: type[RealmError], param: str) -> None:
    with pytest.raises(err) as info:
        realm("bad").generate(prompt=prompt, max_tokens=2, temperature=0)
    assert info.value.details.get("param") == param
    assert param in str(info.value)
    assert_idle(kernel)
    assert len(gen(realm("bad"), STORY, max_tokens=2, temperature=0).token_ids) == 2


@pytest.mark.parametrize("kwargs, param", [
    ({"max_tokens": -1}, "max_tokens"),
    ({"top_p": 3}, "top_p"),
    ({"temperature": -1}, "temperature"),
    ({"top_q": 0.5}, "top_q"),
])
def test_bad_sampling_params(kernel: RealmKernel, kwargs: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        realm("bad").generate(prompt=STORY, **kwargs)
    assert info.value.details.get("param") == param
    assert param in str(info.value)
    assert_idle(kernel)
    assert len(gen(realm("bad"), STORY, max_tokens=2, temperature=0).token_ids) == 2


# ------------------------------------------------------------------ bounded queue


def test_queue_waits_then_refuses(smollm2_path: Path) -> None:
    k = RealmKernel(n_slots=1, max_queue=1, max_context=512)
    k.load_model(MODEL)
    greedy = SamplingParams(max_tokens=40, temperature=0)
    first = k.generate(tenant="q1", model=MODEL, prompt=STORY, params=greedy)
    it = iter(first)
    next(it)  # the first request holds the only slot and is decoding
    t_second = time.monotonic()
    second = k.generate(tenant="q2", model=MODEL, prompt=STORY, params=greedy)
    sched = k.scheduler(k.model(MODEL))
    deadline = time.monotonic() + 10
    while sched.waiting < 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert sched.waiting == 1 and not second.done

    third = k.generate(tenant="q3", model=MODEL, prompt=STORY, params=greedy)
    t0 = time.monotonic()
    with pytest.raises(QueueFullError, match="queue limit 1"):
        third.result(timeout=10)
    assert time.monotonic() - t0 < 5.0  # refused, not queued (a queued request waits minutes)
    assert not first.done  # refusing the third cut nobody; the second still has no slot
    waited_s = time.monotonic() - t_second

    g1 = first.result(timeout=60)
    g2 = second.result(timeout=60)
    assert g1.finish_reason == g2.finish_reason == "length"
    assert g1.token_ids == g2.token_ids and len(g1.token_ids) == 40
    assert g2.timings["ttft_ms"] >= waited_s * 1000  # its first token came after the wait
    assert k.running() == [] and sched.open_sequences == 0
    sched.stop()
