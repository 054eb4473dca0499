"""Continuous batching: the forwards of all tenants on one model become shared jitted steps.

Each request holds a `Sequence` (a KV-cache slot of the model's engine and its length). A guest's
`forward` blocks in `Scheduler.forward`; one worker thread per model takes the pending requests,
runs prompt chunks one sequence at a time (`Engine.prefill`) and all pending single-token forwards
together as one `Engine.decode_step`. It waits a moment for the other open sequences to submit
(a quarter of the last step's time, within GATHER_MIN_S..GATHER_MAX_S: after a step, tenants
sample and emit one after another under the GIL), so tenants that run in step share each step.
Slots are few; a request that finds none waits in a bounded queue, and a full queue is a
`QueueFullError`, never a silent drop.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .engine import Engine
from .errors import QueueFullError, RealmError

GATHER_MIN_S, GATHER_MAX_S = 0.001, 0.010  # how long a step may wait for the others' forwards
SLOT_WAIT_S = 600.0  # how long a request waits for a free slot before giving up


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


class Scheduler:
    """Slots and batched steps over one model's engine."""

    def __init__(self, engine_fn: Callable[[], Engine], n_slots: int, *, max_queue: int = 64,
                 name: str = "model") -> None:
        self._engine_fn = engine_fn  # makes the model resident on first use
        self.name = name
        self.max_queue = max_queue
        self._free = list(range(n_slots))
        self._open: dict[int, Sequence] = {}
        self._waiting = 0
        self._slots_cv = threading.Condition()
        self._pending: list[_Pending] = []
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
        """Take a free slot, waiting in the bounded queue if none is free."""
        with self._slots_cv:
            if not self._free:
                if self._waiting >= self.max_queue:
                    raise QueueFullError(
                        f"{self.name}: all {len(self._open)} slots are busy and {self._waiting} "
                        f"requests already wait (queue limit {self.max_queue}); retry later")
                self._waiting += 1
                try:
                    deadline = time.monotonic() + SLOT_WAIT_S
                    while not self._free:
                        if cancelled():
                            from .tenants import Cancelled

                            raise Cancelled("the request was cancelled while waiting for a slot")
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise QueueFullError(
                                f"{self.name}: no slot came free within {SLOT_WAIT_S:.0f} s")
                        self._slots_cv.wait(min(left, 0.1))
                finally:
                    self._waiting -= 1
            slot = self._free.pop(0)
            seq = Sequence(next(self._ids), tenant, slot)
            self._open[seq.id] = seq
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
            self._slots_cv.notify()

    @property
    def queue_depth(self) -> int:
        return self._waiting + len(self._pending)

    @property
    def open_sequences(self) -> int:
        return len(self._open)

    # ------------------------------------------------------------------ forwards

    def forward(self, seq: Sequence, tokens: np.ndarray, all_logits: bool = False) -> np.ndarray:
        """Append tokens to the sequence; block until the step ran; return logits.

        Returns f32 [V] (last position), or [n, V] when all_logits.
        """
        if seq.closed:
            raise RealmError(f"sequence {seq.id} of tenant {seq.tenant} is closed")
        req = _Pending(seq, np.asarray(tokens, np.int32).reshape(-1), all_logits)
        with self._cv:
            self._ensure_worker()
            self._pending.append(req)
            self._cv.notify()
        req.done.wait()
        if req.error is not None:
            raise req.error
        assert req.logits is not None
        return req.logits

    def _ensure_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._loop, name=f"realm-step-{self.name}",
                                            daemon=True)
            self._worker.start()

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify_all()

    def _take(self) -> list[_Pending]:
        """Wait for work, then a moment more for the other open sequences' forwards."""
        with self._cv:
            while not self._pending and not self._stopped:
                self._cv.wait(1.0)
            window = min(GATHER_MAX_S, max(GATHER_MIN_S, 0.25 * self._last_step_s))
            deadline = time.monotonic() + window
            while len(self._pending) < len(self._open) and not self._stopped:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            batch, self._pending = self._pending, []
            return batch

    def _loop(self) -> None:
        while not self._stopped:
            batch = self._take()
            if not batch:
                continue
            try:
                engine = self._engine_fn()
                self._engine = engine
            except BaseException as e:  # the model could not be made resident
                for r in batch:
                    r.error = e
                    r.done.set()
                continue
            decodes = [r for r in batch if len(r.tokens) == 1 and not r.all_logits]
            for r in batch:
                if r in decodes:
                    continue
                try:
                    engine.check_room(r.seq.length, len(r.tokens))
                    r.logits = engine.prefill(r.seq.slot, r.tokens, r.seq.length, r.all_logits)
                    r.seq.length += len(r.tokens)
                    self.prefill_tokens += len(r.tokens)
                    self.steps += 1
                except BaseException as e:
                    r.error = e
                r.done.set()
            self._decode(engine, decodes)

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
