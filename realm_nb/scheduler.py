"""Continuous batching: the forwards of all tenants on one model become shared jitted steps.

Each request holds a `Sequence` (a KV-cache slot of the model's engine and its length). A guest's
`forward` blocks in `Scheduler.forward`; one worker thread per model takes the pending requests
and alternates two kinds of work:

- prompt chunks: prompts advance at most PREFILL_CHUNK tokens at a time, taken round-robin over
  tenants, for at most PREFILL_BUDGET_S per round while others decode. A 2,000-token prompt or
  an echo+logprobs request therefore delays other tenants' next token by about one chunk, not by
  the whole prompt (issue: fairness between tenants);
- one decode step: every pending single-token forward together (`Engine.decode_step`). It waits a
  moment for the other open sequences to submit (a quarter of the last step's time, within
  GATHER_MIN_S..GATHER_MAX_S: after a step, tenants sample and emit one after another under the
  GIL), so tenants that run in step share each step.

Slots are few and handed out fairly: a tenant holds at most `tenant_slots` of them, and a freed
slot goes to the waiting request whose tenant holds the fewest (then the one waiting longest), so
one tenant's burst cannot starve another. A request that finds no slot waits in a bounded queue;
a full queue is a `QueueFullError`, never a silent drop.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .engine import Engine
from .errors import QueueFullError, RealmError

GATHER_MIN_S, GATHER_MAX_S = 0.001, 0.010  # how long a step may wait for the others' forwards
SLOT_WAIT_S = 600.0  # how long a request waits for a free slot before giving up
PREFILL_CHUNK = 128  # prompt tokens one sequence advances per turn (an engine prefill bucket)
PREFILL_BUDGET_S = 0.25  # prompt work per round before waiting decodes get their step


@dataclass
class Sequence:
    """One request's place in the KV cache: slot index and number of cached tokens."""

    id: int
    tenant: str
    slot: int
    length: int = 0
    closed: bool = False


@dataclass
class _Pending:
    seq: Sequence
    tokens: np.ndarray
    all_logits: bool
    done: threading.Event = field(default_factory=threading.Event)
    logits: np.ndarray | None = None
    error: BaseException | None = None
    at: int = 0  # prompt tokens already in the cache
    # all_logits: each chunk's [m, V] logits go through `reduce` (chunk, first position) as they
    # come, so a long echo+logprobs prompt never holds [n, V] at once; the results are kept
    reduce: Callable[[np.ndarray, int], Any] | None = None
    parts: list[Any] = field(default_factory=list)


@dataclass
class _Waiter:
    tenant: str
    order: int


class Scheduler:
    """Slots and batched steps over one model's engine."""

    def __init__(self, engine_fn: Callable[[], Engine], n_slots: int, *, max_queue: int = 64,
                 name: str = "model", tenant_slots: int | None = None) -> None:
        self._engine_fn = engine_fn  # makes the model resident on first use
        self.name = name
        self.max_queue = max_queue
        # default: every slot but one, so another tenant always finds one soon
        self.tenant_slots = max(1, tenant_slots if tenant_slots is not None else n_slots - 1)
        self._free = list(range(n_slots))
        self._open: dict[int, Sequence] = {}
        self._held: dict[str, int] = {}  # tenant → slots it holds
        self._waiters: list[_Waiter] = []
        self._slots_cv = threading.Condition()
        self._pending: list[_Pending] = []
        self._prefilling: list[_Pending] = []  # prompts part-way through, worker-owned
        self._turn = 0  # round-robin position over tenants with prompts in progress
        self._cv = threading.Condition()
        self._ids = itertools.count(1)
        self._worker: threading.Thread | None = None
        self._stopped = False
        self._last_step_s = 0.0
        self._engine: Engine | None = None  # the engine the last steps ran on
        # counters for stats/metrics
        self.steps = 0
        self.decode_rows = 0
        self.prefill_tokens = 0

    # ------------------------------------------------------------------ slots

    def open(self, tenant: str, cancelled: Callable[[], bool] = lambda: False) -> Sequence:
        """Take a free slot, waiting in the bounded queue if none is free for this tenant."""
        with self._slots_cv:
            if not self._waiters and self._may_take(tenant):
                return self._take_slot(tenant)
            if len(self._waiters) >= self.max_queue:
                raise QueueFullError(
                    f"{self.name}: all {len(self._open)} slots are busy and "
                    f"{len(self._waiters)} requests already wait (queue limit {self.max_queue}); "
                    "retry later")
            me = _Waiter(tenant, next(self._ids))
            self._waiters.append(me)
            try:
                deadline = time.monotonic() + SLOT_WAIT_S
                while not (self._may_take(tenant) and self._next_waiter() is me):
                    if cancelled():
                        from .tenants import Cancelled

                        raise Cancelled("the request was cancelled while waiting for a slot")
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise QueueFullError(
                            f"{self.name}: no slot came free within {SLOT_WAIT_S:.0f} s")
                    self._slots_cv.wait(min(left, 0.1))
                return self._take_slot(tenant)
            finally:
                self._waiters.remove(me)
                self._slots_cv.notify_all()

    def _may_take(self, tenant: str) -> bool:
        return bool(self._free) and self._held.get(tenant, 0) < self.tenant_slots

    def _next_waiter(self) -> _Waiter | None:
        """Who gets the next slot: among waiters whose tenant is under its share, the one whose
        tenant holds the fewest slots, then the longest waiting."""
        eligible = [w for w in self._waiters if self._held.get(w.tenant, 0) < self.tenant_slots]
        if not eligible:
            return None
        return min(eligible, key=lambda w: (self._held.get(w.tenant, 0), w.order))

    def _take_slot(self, tenant: str) -> Sequence:
        slot = self._free.pop(0)
        seq = Sequence(next(self._ids), tenant, slot)
        self._open[seq.id] = seq
        self._held[tenant] = self._held.get(tenant, 0) + 1
        return seq

    def close(self, seq: Sequence) -> None:
        """The sequence ended: its KV pages go back to the engine, then its slot is free."""
        with self._slots_cv:
            if seq.closed:
                return
            seq.closed = True
            self._open.pop(seq.id, None)
        if self._engine is not None:  # None: no step ran yet, so the slot holds no pages
            self._engine.release(seq.slot)
        with self._slots_cv:
            self._free.append(seq.slot)
            self._free.sort()
            held = self._held.get(seq.tenant, 0) - 1
            if held > 0:
                self._held[seq.tenant] = held
            else:
                self._held.pop(seq.tenant, None)
            self._slots_cv.notify_all()

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot."""
        return len(self._waiters)

    @property
    def queue_depth(self) -> int:
        return len(self._waiters) + len(self._pending) + len(self._prefilling)

    @property
    def open_sequences(self) -> int:
        return len(self._open)

    # ------------------------------------------------------------------ forwards

    def forward(self, seq: Sequence, tokens: np.ndarray, all_logits: bool = False) -> np.ndarray:
        """Append tokens to the sequence; block until the step ran; return logits.

        Returns f32 [V] (last position), or [n, V] when all_logits.
        """
        req = self._run(_Pending(seq, np.asarray(tokens, np.int32).reshape(-1), all_logits))
        assert req.logits is not None
        return req.logits

    def forward_reduced(self, seq: Sequence, tokens: np.ndarray,
                        reduce: Callable[[np.ndarray, int], Any]) -> tuple[np.ndarray, list[Any]]:
        """`forward` with every position's logits, each prompt chunk's [m, V] handed to
        reduce(chunk, first_position) on the step thread as it comes and then dropped, so a long
        echo+logprobs prompt never holds [n, V] (2,000 tokens x 49k vocabulary: 400 MB).
        Returns the last position's logits [V] and reduce's results in order."""
        req = self._run(_Pending(seq, np.asarray(tokens, np.int32).reshape(-1), True,
                                 reduce=reduce))
        assert req.logits is not None
        return req.logits, req.parts

    def _run(self, req: _Pending) -> _Pending:
        if req.seq.closed:
            raise RealmError(f"sequence {req.seq.id} of tenant {req.seq.tenant} is closed")
        with self._cv:
            self._ensure_worker()
            self._pending.append(req)
            self._cv.notify()
        req.done.wait()
        if req.error is not None:
            raise req.error
        return req

    def _ensure_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._loop, name=f"realm-step-{self.name}",
                                            daemon=True)
            self._worker.start()

    def stop(self, join_s: float | None = None) -> None:
        """Stop the step thread; with join_s, wait up to that long for it to end (it holds the
        engine's device arrays, which must go while the interpreter is alive: see
        kernel._stop_and_join)."""
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
        worker = self._worker
        if join_s is not None and worker is not None and worker is not threading.current_thread():
            worker.join(join_s)

    def _take(self) -> list[_Pending]:
        """Wait for work, then a moment more for the other open sequences' forwards."""
        with self._cv:
            while not self._pending and not self._prefilling and not self._stopped:
                self._cv.wait(1.0)
            window = min(GATHER_MAX_S, max(GATHER_MIN_S, 0.25 * self._last_step_s))
            deadline = time.monotonic() + window
            while (len(self._pending) + len(self._prefilling) < len(self._open)
                   and not self._stopped):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            batch, self._pending = self._pending, []
            return batch

    def _loop(self) -> None:
        decodes: list[_Pending] = []
        while not self._stopped:
            batch = self._take()
            if not batch and not self._prefilling and not decodes:
                continue
            try:
                engine = self._engine_fn()
                self._engine = engine
            except BaseException as e:  # the model could not be made resident
                for r in [*batch, *self._prefilling, *decodes]:
                    self._fail(r, e)
                self._prefilling, decodes = [], []
                continue
            for r in batch:
                if len(r.tokens) == 1 and not r.all_logits:
                    decodes.append(r)
                else:
                    self._prefilling.append(r)
            self._prefill_round(engine, others_waiting=bool(decodes))
            self._decode(engine, decodes)
            decodes = []

    def _prefill_round(self, engine: Engine, others_waiting: bool) -> None:
        """Advance prompts a chunk at a time, round-robin over tenants; while decodes wait,
        stop after PREFILL_BUDGET_S so they get their step."""
        t0 = time.perf_counter()
        while self._prefilling:
            r = self._next_prompt()
            try:
                if r.at == 0:
                    engine.check_room(r.seq.length, len(r.tokens))
                chunk = r.tokens[r.at : r.at + PREFILL_CHUNK]
                logits = engine.prefill(r.seq.slot, chunk, r.seq.length, r.all_logits)
                r.seq.length += len(chunk)
                r.at += len(chunk)
                self.prefill_tokens += len(chunk)
                self.steps += 1
                if r.reduce is not None:
                    r.parts.append(r.reduce(logits, r.at - len(chunk)))
                    logits = logits[-1]
                elif r.all_logits:
                    r.parts.append(logits)
                if r.at >= len(r.tokens):
                    self._prefilling.remove(r)
                    if r.reduce is not None:
                        r.logits = logits
                    else:
                        r.logits = np.concatenate(r.parts, axis=0) if r.all_logits else logits
                        r.parts = []
                    r.done.set()
            except BaseException as e:
                self._prefilling.remove(r)
                self._fail(r, e)
            if ((others_waiting or self._pending)
                    and time.perf_counter() - t0 >= PREFILL_BUDGET_S):
                return

    def _next_prompt(self) -> _Pending:
        """The next tenant in turn that has a prompt in progress, and its oldest prompt."""
        tenants = sorted({r.seq.tenant for r in self._prefilling})
        tenant = tenants[self._turn % len(tenants)]
        self._turn += 1
        return next(r for r in self._prefilling if r.seq.tenant == tenant)

    @staticmethod
    def _fail(r: _Pending, e: BaseException) -> None:
        r.parts = []
        r.error = e
        r.done.set()

    def _decode(self, engine: Engine, reqs: list[_Pending]) -> None:
        ok: list[_Pending] = []
        for r in reqs:
            try:
                engine.check_room(r.seq.length, 1)
                ok.append(r)
            except BaseException as e:
                r.error = e
                r.done.set()
        if not ok:
            return
        t0 = time.perf_counter()
        try:
            logits = engine.decode_step([r.seq.slot for r in ok], [int(r.tokens[0]) for r in ok],
                                        [r.seq.length for r in ok])
        except BaseException as e:
            for r in ok:
                r.error = e
                r.done.set()
            return
        self._last_step_s = time.perf_counter() - t0
        self.steps += 1
        self.decode_rows += len(ok)
        for i, r in enumerate(ok):
            r.seq.length += 1
            r.logits = logits[i]
            r.done.set()
