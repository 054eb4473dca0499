"""`RealmKernel`: the runtime facade every face talks to (SDK local mode, server, magics, panel).

It owns the Memory64 store, one scheduler per resident model, and the tenants' guest sandboxes.
`generate` starts a request at once in its own thread, where the tenant's WebAssembly guest runs
the token loop, and returns a `GenerationStream` of text pieces that ends with a `Generation`.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from . import abi
from .chat_template import TemplateBudget
from .errors import (
    ContextLengthError,
    InvalidRequestError,
    ModelNotFoundError,
)
from .host import RequestHost
from .mesh import build_mesh, describe
from .scheduler import Scheduler
from .store import LayerStore, ModelEntry
from .tenants import Cancelled, Tenant
from .tokenizer import validate_messages
from .types import FinishReason, Generation, ModelInfo, OneReader, SamplingParams

MAX_GUESTS_PER_TENANT = 32  # concurrent requests of one tenant, each in its own guest instance
_POLL_S = 0.05  # consumers wait in slices of this, so Ctrl-C is seen while they wait


def _check_model_name(name: object) -> None:
    if not isinstance(name, str) or not name.strip():
        raise InvalidRequestError(
            f"model={name!r} must be a model name, alias, id or .gguf path (a non-empty "
            "string); see models()", param="model")


def _stop_and_join(sched: Scheduler, timeout_s: float = 60.0) -> None:
    """Stop a scheduler and wait for its step thread to end. It holds the engine's device
    arrays: a daemon thread that drops the last of them while the interpreter shuts down aborts
    the process (jaxlib's array destructor re-takes the GIL, which ends the thread inside a
    noexcept destructor: "terminate called after throwing an instance of ''", rc 134). Joined,
    the arrays go while the process is alive."""
    sched.stop(join_s=timeout_s)


def _budget_from_env() -> int | None:
    """REALM_NB_MEMORY_BUDGET: what the store may hold resident, in bytes or with a MiB/GiB
    suffix ("6GiB"); unset or empty: no budget."""
    text = os.environ.get("REALM_NB_MEMORY_BUDGET", "").strip()
    if not text:
        return None
    units = {"gib": 2**30, "mib": 2**20, "": 1}
    number = text.rstrip("GgMmIiBb")
    unit = text[len(number):].lower()
    try:
        if unit not in units:
            raise ValueError(unit)
        return int(float(number) * units[unit])
    except ValueError:
        raise InvalidRequestError(f"REALM_NB_MEMORY_BUDGET={text!r} is not a size; write bytes "
                                  "or a number with MiB or GiB (e.g. 6GiB)") from None


class _Done:
    def __init__(self, generation: Generation | None, error: BaseException | None) -> None:
        self.generation = generation
        self.error = error


class _Progress:
    def __init__(self, event: dict[str, Any]) -> None:
        self.event = event


ProgressFn = Callable[[dict[str, Any]], None]


class GenerationStream:
    """Text pieces of a running generation; iterate it, or call `result()`.

    Closing it, `cancel()`, or Ctrl-C while waiting stops the generation; the partial text is
    kept in `.generation` with finish_reason "cancelled". Before the first piece, a cold start
    reports what it is doing (`{"stage": "loading", "done": i, "total": n}`, then
    `{"stage": "compiling"}`) to `on_progress`, called in the consumer's thread while it iterates.
    """

    on_progress: ProgressFn | None = None

    def __init__(self, request_id: str, tenant: str, model: str) -> None:
        self.request_id = request_id
        self.tenant = tenant
        self.model = model
        self.generation: Generation | None = None
        self.error: BaseException | None = None
        self.cancel_event = threading.Event()
        self._queue: queue.Queue[str | _Done | _Progress] = queue.Queue()
        self._finished = threading.Event()
        self._one_reader = OneReader()  # the thread iterating, one at a time

    # producer side
    def _put(self, piece: str) -> None:
        self._queue.put(piece)

    def _progress(self, event: dict[str, Any]) -> None:
        self._queue.put(_Progress(event))

    def _finish(self, generation: Generation | None, error: BaseException | None) -> None:
        self.generation, self.error = generation, error
        self._finished.set()
        self._queue.put(_Done(generation, error))

    # consumer side
    @property
    def done(self) -> bool:
        return self._finished.is_set()

    def cancel(self) -> None:
        self.cancel_event.set()

    def __iter__(self) -> Iterator[str]:
        self._one_reader.claim(self.request_id)
        try:
            while True:
                try:
                    # Wait in slices: a blocking get() never sees Ctrl-C that is not a real
                    # signal (`_thread.interrupt_main`, Windows) until the next piece comes.
                    item = self._queue.get(timeout=_POLL_S)
                except queue.Empty:
                    if self._finished.is_set() and self._queue.empty():  # read to the end before
                        if self.error is not None:
                            raise self.error from None
                        return
                    continue
                if isinstance(item, _Done):
                    if item.error is not None:
                        raise item.error
                    return
                if isinstance(item, _Progress):
                    if self.on_progress is not None:
                        self.on_progress(item.event)
                    continue
                yield item
        except (KeyboardInterrupt, GeneratorExit):
            self.cancel()
            self._finished.wait()
            if not isinstance(self.error, Cancelled) and self.error is not None:
                raise self.error from None
        finally:
            self._one_reader.release()

    def close(self) -> None:
        self.cancel()
        self._finished.wait()

    def result(self, timeout: float | None = None) -> Generation:
        """Wait for the end (Ctrl-C cancels and returns the partial generation)."""
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            while not self._finished.wait(_POLL_S if deadline is None else
                                          max(0.0, min(_POLL_S, deadline - time.monotonic()))):
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"request {self.request_id} still running after {timeout} s")
        except KeyboardInterrupt:
            self.cancel()
            self._finished.wait()
        if self.error is not None:
            raise self.error
        assert self.generation is not None
        return self.generation

    @property
    def text(self) -> str:
        return self.generation.text if self.generation else ""


class _TenantRecord:
    """A tenant: its idle guest instances, and totals across its requests."""

    def __init__(self, tenant_id: str) -> None:
        self.id = tenant_id
        self.idle: list[Tenant] = []
        self.busy: list[Tenant] = []
        self.retired_fuel = 0
        self.retired_tokens = 0
        self.requests = 0
        self.traps = 0
        self.lock = threading.Lock()

    def acquire(self) -> Tenant:
        with self.lock:
            if self.idle:
                guest = self.idle.pop()
            elif len(self.busy) >= MAX_GUESTS_PER_TENANT:
                raise InvalidRequestError(
                    f"tenant {self.id!r} already runs {len(self.busy)} requests, the most one "
                    "tenant may run at once; wait for one to finish", param="tenant")
            else:
                guest = None
            if guest is None:
                guest = Tenant(self.id)
            self.busy.append(guest)
            self.requests += 1
            return guest

    def release(self, guest: Tenant) -> None:
        with self.lock:
            self.busy.remove(guest)
            self.idle.append(guest)

    def stats(self) -> dict[str, Any]:
        with self.lock:
            guests = [g.stats() for g in (*self.busy, *self.idle)]
        return {
            "id": self.id,
            "state": "running" if self.busy else "idle",
            "running": len(self.busy),
            "guests": len(guests),
            "requests": self.requests,
            "fuel_used": sum(int(g.get("fuel_used", 0)) for g in guests),
            "memory_bytes": sum(int(g.get("memory_bytes", 0)) for g in guests),
            "tokens": sum(int(g.get("tokens", 0)) for g in guests),
            "traps": self.traps,
        }


class RealmKernel:
    """Process-wide runtime: store, schedulers, tenants, running requests."""

    _shared: RealmKernel | None = None
    _shared_lock = threading.Lock()

    def __init__(self, *, n_slots: int = 8, max_context: int = 2048,
                 budget_bytes: int | None = None, layout: str | None = None,
                 max_queue: int = 64, tenant_slots: int | None = None, mesh: Any = None
                 ) -> None:
        self.store = LayerStore(budget_bytes=budget_bytes, n_slots=n_slots,
                                max_context=max_context, layout=layout, mesh=mesh)
        self.max_queue = max_queue
        self.tenant_slots = tenant_slots  # None: the scheduler's default (all slots but one)
        self._schedulers: dict[str, Scheduler] = {}
        self._tenants: dict[str, _TenantRecord] = {}
        self._requests: dict[str, GenerationStream] = {}
        self._lock = threading.RLock()
        self.counters = {"requests": 0, "tokens": 0, "prompt_tokens": 0, "cancelled": 0,
                         "errors": 0}
        self.store.on_evict.append(self._drop_scheduler)

    @classmethod
    def shared(cls, mesh: Any = None) -> RealmKernel:
        """The process's kernel (what local-mode `Realm`s and the magics share).

        mesh: the devices its models spread over ('model=2,data=1', a dict, a jax Mesh; default
        REALM_NB_MESH, else all local devices). One mesh per process: asking an existing kernel
        for another raises InvalidRequestError.
        """
        with cls._shared_lock:
            if cls._shared is not None and mesh is not None:
                wanted, running = describe(build_mesh(mesh)), describe(cls._shared.store.mesh)
                if wanted != running:
                    raise InvalidRequestError(
                        f"mesh={mesh!r}: this process's runtime already runs on the mesh "
                        f"{running}; one mesh per process: start a new process (or "
                        f"`realm-nb serve --mesh {wanted}`) for another", param="mesh")
            if cls._shared is None:
                cls._shared = cls(
                    n_slots=int(os.environ.get("REALM_NB_SLOTS", "8")),
                    max_context=int(os.environ.get("REALM_NB_CONTEXT", "2048")),
                    budget_bytes=_budget_from_env(),
                    layout=os.environ.get("REALM_NB_WEIGHTS") or None,  # None: the default
                    tenant_slots=int(os.environ["REALM_NB_TENANT_SLOTS"])
                    if os.environ.get("REALM_NB_TENANT_SLOTS") else None,
                    mesh=mesh if mesh is not None else os.environ.get("REALM_NB_MESH") or None,
                )
                atexit.register(cls._shared.shutdown)
            return cls._shared

    # ------------------------------------------------------------------ models

    def models(self) -> list[ModelInfo]:
        return self.store.list()

    def load_model(self, source: str, name: str | None = None,
                   weights: str | None = None) -> ModelInfo:
        _check_model_name(source)
        entry = self.store.register(source, name=name, layout=weights)
        self.store.ensure_resident(entry)
        return entry.info()

    def model(self, name: str, weights: str | None = None) -> ModelEntry:
        """A loaded model by name/alias/id; catalogue names and paths register on first use."""
        _check_model_name(name)
        try:
            return self.store.get(name, weights)
        except ModelNotFoundError:
            pass
        try:  # loaded in the other layout: the same file, registered again in this one
            return self.store.register(str(self.store.get(name).path), layout=weights)
        except ModelNotFoundError:
            return self.store.register(name, layout=weights)

    def make_resident(self, entry: ModelEntry,
                      progress: Callable[[int, int], None] | None = None) -> None:
        """Every layer of `entry` (from `model`) resident now; `progress(done, total)` per layer
        loaded. For a face that shows its own progress bar before the first prompt."""
        self.store.ensure_resident(entry, progress=progress)

    @staticmethod
    def keep_compiled_steps() -> None:
        """Keep jit-compiled steps in XLA's persistent cache under the realm-nb cache
        (`engine.enable_compilation_cache`; every engine also does this when it starts)."""
        from .engine import enable_compilation_cache

        enable_compilation_cache()

    def unload_model(self, name: str) -> ModelInfo:
        entries = self.store.unload(name)
        for entry in entries:
            with self._lock:
                sched = self._schedulers.pop(entry.id, None)
            if sched is not None:
                _stop_and_join(sched)
        return entries[0].info()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Cancel the running requests and stop every scheduler, waiting (up to `timeout_s`)
        for their threads. Runs at interpreter exit (atexit), while threads can still finish:
        a daemon thread cut off later, inside an XLA call or while dropping device arrays,
        aborts the process (rc 134), and a stream closed at teardown would wait for ever."""
        with self._lock:
            streams = list(self._requests.values())
            schedulers = list(self._schedulers.values())
        for stream in streams:
            stream.cancel()
        end = time.monotonic() + timeout_s
        for stream in streams:
            stream._finished.wait(max(0.0, end - time.monotonic()))
        for sched in schedulers:
            _stop_and_join(sched, max(0.0, end - time.monotonic()))

    def scheduler(self, entry: ModelEntry) -> Scheduler:
        with self._lock:
            sched = self._schedulers.get(entry.id)
            if sched is None:
                sched = Scheduler(lambda: self.store.ensure_resident(entry), self.store.n_slots,
                                  max_queue=self.max_queue, name=entry.name,
                                  tenant_slots=self.tenant_slots)
                self._schedulers[entry.id] = sched
            return sched

    def _drop_scheduler(self, entry: ModelEntry) -> None:
        """An idle model was evicted: stop its scheduler, whose step thread still holds the old
        engine (weights and KV cache) and would keep it in memory. A request that comes later
        makes a new scheduler, which loads the model again."""
        with self._lock:
            if entry.in_use:  # a request began since the store chose it: it reloads the model
                return
            sched = self._schedulers.pop(entry.id, None)
        if sched is not None:
            _stop_and_join(sched)

    def tenant(self, tenant_id: str) -> _TenantRecord:
        if not isinstance(tenant_id, str) or not tenant_id or len(tenant_id) > 128:
            raise InvalidRequestError(f"tenant={tenant_id!r} must be a non-empty string of at "
                                      "most 128 characters", param="tenant")
        with self._lock:
            rec = self._tenants.get(tenant_id)
            if rec is None:
                rec = self._tenants[tenant_id] = _TenantRecord(tenant_id)
            return rec

    # ------------------------------------------------------------------ text helpers

    def render_chat(self, model: str, messages: list[dict[str, Any]], *,
                    weights: str | None = None, budget: TemplateBudget | None = None,
                    check: Callable[[], None] | None = None) -> str:
        """The model's chat template over `messages`, within `budget` (see chat_template);
        `check` is called while it renders and may raise to stop it (a cancelled request)."""
        return self.model(model, weights).codec.render_chat(validate_messages(messages),
                                                            budget=budget, check=check)

    def tokenize(self, model: str, text: str) -> list[int]:
        return self.model(model).codec.encode(text)

    # ------------------------------------------------------------------ generation

    def generate(self, *, tenant: str, model: str, prompt: str | list[int],
                 params: SamplingParams, echo: bool = False, logprobs: int | None = None,
                 weights: str | None = None) -> GenerationStream:
        """Start a generation in the tenant's guest; return its stream at once."""
        if logprobs is not None and (not isinstance(logprobs, int) or isinstance(logprobs, bool)
                                     or not 0 <= logprobs <= 20):
            raise InvalidRequestError(f"logprobs={logprobs!r} must be an integer in 0..20",
                                      param="logprobs")
        if not isinstance(echo, bool):
            raise InvalidRequestError(f"echo={echo!r} must be true or false", param="echo")
        entry = self.model(model, weights)
        prompt_ids = self._prompt_ids(entry, prompt)
        rec = self.tenant(tenant)
        rid = f"req-{secrets.token_hex(8)}"  # not a sequence: ids tell nothing of others' requests
        stream = GenerationStream(rid, tenant, entry.name)
        with self._lock:
            self._requests[rid] = stream
            self.counters["requests"] += 1
            # Counted from now, not from inside the thread: an unload or an eviction that comes
            # before the thread runs must see the model as busy. Changed only under the lock
            # (`+=` on an attribute is not atomic across threads).
            entry.in_use += 1
        thread = threading.Thread(target=self._run, name=f"realm-{tenant}-{rid}", daemon=True,
                                  args=(stream, rec, entry, prompt, prompt_ids, params, echo,
                                        logprobs))
        try:
            thread.start()
        except BaseException:
            with self._lock:
                self._requests.pop(rid, None)
                entry.in_use -= 1
            raise
        return stream

    def _prompt_ids(self, entry: ModelEntry, prompt: str | list[int]) -> list[int]:
        vocab = entry.cfg.vocab_size
        context = min(self.store.max_context, entry.cfg.context_length)
        if isinstance(prompt, str):
            # Characters before tokens: no token holds more than max_token_chars characters, so
            # a longer prompt cannot fit and is refused without tokenizing it.
            most = context * entry.codec.max_token_chars() + 1
            if len(prompt) > most:
                raise ContextLengthError(
                    f"the prompt has {len(prompt)} characters; this model's context holds "
                    f"{context} tokens (prompt plus output), at most {most} characters of text "
                    "(its longest token has "
                    f"{entry.codec.max_token_chars()} characters); shorten the prompt",
                    param="prompt")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate: the tokenizer raises TypeError
                raise InvalidRequestError(
                    f"the prompt is not valid Unicode text: {e.object[e.start:e.end]!r} at "
                    f"character {e.start} is a lone surrogate; send UTF-8 text",
                    param="prompt") from None
            ids = entry.codec.encode(prompt)
        elif isinstance(prompt, (list, tuple)) and len(prompt) >= context:
            raise ContextLengthError(
                f"the prompt has {len(prompt)} tokens; this model's context holds {context} "
                "(prompt plus output); shorten it", param="prompt")
        elif isinstance(prompt, (list, tuple)) and all(
                isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt):
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise InvalidRequestError(
                    f"prompt token id {bad[0]} is outside the vocabulary 0..{vocab - 1}",
                    param="prompt")
        else:
            raise InvalidRequestError(
                f"prompt must be a string or a list of token ids, got {type(prompt).__name__}",
                param="prompt")
        if not ids:
            raise InvalidRequestError("the prompt is empty: give at least one token of text",
                                      param="prompt")
        limit = self.store.max_context
        if len(ids) >= min(limit, entry.cfg.context_length):
            raise ContextLengthError(
                f"the prompt has {len(ids)} tokens; this model's context holds "
                f"{min(limit, entry.cfg.context_length)} (prompt plus output); shorten it",
                param="prompt")
        return ids

    def _run(self, stream: GenerationStream, rec: _TenantRecord, entry: ModelEntry,
             prompt: str | list[int], prompt_ids: list[int], params: SamplingParams,
             echo: bool, logprobs: int | None) -> None:
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little")
        t0 = time.perf_counter()
        sched = self.scheduler(entry)
        seq = None
        guest = None
        host = None
        error: BaseException | None = None
        finish: FinishReason = "stop"
        try:
            self._warm(entry, stream)
            seq = sched.open(stream.tenant, stream.cancel_event.is_set)
            host = RequestHost(store=self.store, entry=entry, scheduler=sched, seq=seq,
                               prompt_ids=prompt_ids, params=params, logprobs=logprobs,
                               echo=echo, on_text=stream._put, cancel_event=stream.cancel_event)
            request = abi.pack_request(
                vocab_size=entry.cfg.vocab_size, prompt=prompt_ids, max_tokens=params.max_tokens,
                seed=seed, temperature=params.temperature, top_k=params.top_k,
                top_p=params.top_p, min_p=params.min_p, repeat_penalty=params.repeat_penalty,
                repeat_window=params.repeat_window, eos_ids=entry.codec.eos_ids)
            guest = rec.acquire()
            guest.run(request, host)
            finish = host.finish_reason or ("length" if params.max_tokens == 0 else "stop")
        except Cancelled:
            finish = "cancelled"
        except ContextLengthError as e:
            if host is None or (host.forwards <= 1 and not host.tokens):
                error = e
            finish = "length"
        except BaseException as e:  # surfaced to the consumer, never lost in this thread
            error = e
            if "trap" in type(e).__name__.lower():
                rec.traps += 1
        finally:
            if guest is not None:
                rec.release(guest)
            if seq is not None:
                sched.close(seq)
            with self._lock:
                entry.in_use -= 1
            entry.last_used = time.monotonic()
        generation = None
        if error is None:  # host is None: cancelled while it waited for a KV-cache slot
            if host is not None and host.finish_reason is None:
                host.finish_text()
            generation = self._generation(stream, entry, prompt, prompt_ids, params, seed, host,
                                          finish, logprobs, t0)
        with self._lock:
            self._requests.pop(stream.request_id, None)
            if error is not None:
                self.counters["errors"] += 1
            if generation is not None:
                self.counters["tokens"] += len(generation.token_ids)
                self.counters["prompt_tokens"] += len(prompt_ids)
                if finish == "cancelled":
                    self.counters["cancelled"] += 1
        stream._finish(generation, error)

    def _warm(self, entry: ModelEntry, stream: GenerationStream) -> None:
        """Make the model resident, reporting layers to the stream; say when jit compiles next."""
        if not entry.loaded:
            def loading(done: int, total: int) -> None:
                if stream.cancel_event.is_set():
                    raise Cancelled("the request was cancelled while its model was loading")
                stream._progress({"stage": "loading", "model": entry.name, "done": done,
                                  "total": total})

            stream._progress({"stage": "loading", "model": entry.name, "done": 0,
                              "total": entry.n_layers})
            self.store.ensure_resident(entry, progress=loading)
        engine = entry.engine
        if engine is not None and engine.steps == 0:
            stream._progress({"stage": "compiling", "model": entry.name})

    def _generation(self, stream: GenerationStream, entry: ModelEntry, prompt: str | list[int],
                    prompt_ids: list[int], params: SamplingParams, seed: int,
                    host: RequestHost | None, finish: FinishReason, logprobs: int | None,
                    t0: float) -> Generation:
        """The result of a request; without a host (never started), an empty cancelled one."""
        t_end = time.perf_counter()
        tokens = list(host.tokens) if host is not None else []
        n = len(tokens)
        started = t_end if host is not None else t0  # stand-in for events that never came
        prompt_done = (host.t_prompt_done if host is not None else None) or started
        first = (host.t_first_token if host is not None else None) or started
        decode_s = t_end - first
        timings = {
            "prompt_ms": (prompt_done - t0) * 1000,
            "ttft_ms": (first - t0) * 1000,
            "decode_ms": decode_s * 1000 if host is not None else 0.0,
            "total_ms": (t_end - t0) * 1000,
            "tokens_per_s": (n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
        }
        scored = (host.scored if host is not None else []) if logprobs is not None else None
        return Generation(
            text=host.text if host is not None else "", token_ids=tokens, prompt=prompt,
            prompt_ids=list(prompt_ids), finish_reason=finish, model=entry.name,
            usage={"prompt_tokens": len(prompt_ids), "completion_tokens": n,
                   "total_tokens": len(prompt_ids) + n},
            timings=timings, logprobs=scored, params=dataclasses.replace(params, seed=seed),
            tenant=stream.tenant)

    # ------------------------------------------------------------------ control and stats

    def cancel(self, tenant: str, request_id: str | None = None) -> int:
        """Cancel this tenant's running requests (or one of them); returns how many."""
        with self._lock:
            mine = [s for s in self._requests.values() if s.tenant == tenant and (
                request_id is None or s.request_id == request_id)]
        for s in mine:
            s.cancel()
        return len(mine)

    def running(self, tenant: str | None = None) -> list[dict[str, str]]:
        with self._lock:
            return [{"id": s.request_id, "tenant": s.tenant, "model": s.model}
                    for s in self._requests.values() if tenant is None or s.tenant == tenant]

    def stats(self) -> dict[str, Any]:
        with self._lock:
            tenants = [r.stats() for r in self._tenants.values()]
            scheds = {sid: {"steps": s.steps, "decode_rows": s.decode_rows,
                            "prefill_tokens": s.prefill_tokens, "queue_depth": s.queue_depth,
                            "open_sequences": s.open_sequences}
                      for sid, s in self._schedulers.items()}
        return {"tenants": tenants, "store": self.store.stats(), "schedulers": scheds,
                "requests": dict(self.counters), "running": len(self._requests)}
