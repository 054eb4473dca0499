"""Tenants: one WebAssembly guest per tenant, run in wasmtime under fuel, a deadline, a memory cap.

The host side of the ABI in `realm_nb.abi`, with no model code: the runtime hands `Tenant.run` a
request and a `TenantHost` (forward / emit / load_layer / log for that one request), and the guest
drives the token loop through the ``realm_host`` imports.

Process-wide, built once: one `wasmtime.Engine` (fuel and epoch interruption on), one store-
independent `wasmtime.Linker` holding the four imports, and one compiled `GuestModule` per guest.
Per tenant: one `wasmtime.Store` (memory limit, fuel, epoch deadline) and one instance, reused
across requests and re-created after a trap.

How an import finds its request: a guest runs in the thread that called `Tenant.run` (wasmtime
calls imports back on the same thread, releasing the GIL while wasm runs), so `run` puts the
request's `_Call` into a `threading.local` and the Linker's trampolines read it from there. That
keeps the Linker store-independent (defined once) and costs one attribute lookup per crossing.

Bounding a guest, per entry: before every entry into the guest and at every host call the store
gets up to `fuel_per_call` units of fuel (about one per wasm instruction) and an epoch deadline of
up to `deadline_s` seconds, counted by a clock thread that ticks the engine's epoch while any guest
runs. Fuel (deterministic, also counted per tenant) stops an endless loop in about 50 ms; the
deadline is a wall-clock backstop in case some instruction costs far more time than fuel.

Per request, across host calls: a guest that keeps calling the host would be refilled for ever, so
each request also has a fuel budget and a guest-time budget (host callbacks not counted), both
sized by `max_tokens` and the vocabulary; each refill is cut to what is left of them. The host
checks what the guest hands it: token ids must lie in the vocabulary (else `GuestError`), at most
one forward per emitted token, never more than `max_tokens` tokens (the host answers stop at the
last one), and no forward, emit or layer request once the host has ended the request (stop,
cancel, an error code); only a few log calls may follow. A cancel is answered at the guest's next
host call whichever import it is; a guest that does not call the host meets its fuel or deadline
first. Breaking these rules traps the guest with a message that says which.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.resources
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar, cast

import numpy as np
import wasmtime

from . import abi
from .abi import ErrorCode
from .errors import (
    AbiVersionError,
    Cancelled,
    ContextLengthError,
    GuestError,
    GuestTrap,
    MemoryBudgetError,
    ModelNotFoundError,
    RealmError,
)

MiB = 1 << 20
DEFAULT_MEMORY_LIMIT = 64 * MiB
DEFAULT_FUEL_PER_CALL = 200_000_000  # ~50 ms of a tight loop; sampling 49,152 logits needs ~1M
DEFAULT_DEADLINE_S = 1.0  # wall-clock time a guest may run between two host calls
EPOCH_TICK_S = 0.005
# The per-request budgets: a fixed part plus this much per token (max_tokens + 1, the prompt's
# forward included). The shipped guest's worst case measured 717 fuel per vocabulary entry per
# token (ascending logits, top_k 0: every logit enters the candidate heap), greedy 6, top-k 40
# about 14; a token's guest time is ~0.1 ms at V = 49,152.
FUEL_PER_TOKEN_PER_VOCAB = 1024
FUEL_PER_TOKEN_BASE = 4_000_000
GUEST_S_PER_TOKEN = 0.25
MAX_SIDE_CALLS = 10_000  # log and memory64_load_layer calls in one request
MAX_LOGS_AFTER_END = 16  # log calls a guest may still make once the host ended the request
REBUILD_HINT = "rebuild the guest with `realm-nb build-guest`"


class TenantHost(Protocol):
    """What the runtime provides for one request. Raise a `RealmError` to hand the guest an error
    code (the same exception is re-raised from `Tenant.run`); any other exception traps the guest.

    A host may also carry a `cancel_event` (`threading.Event`): once it is set, every import
    answers CANCELLED (see `Tenant.run`).
    """

    def forward(self, tokens: np.ndarray) -> np.ndarray:
        """Append tokens (int32 [T]) to the sequence; return the last position's logits f32 [V]."""
        ...

    def emit(self, token: int) -> int:
        """Take one sampled token; 0 = go on, 1 = stop."""
        ...

    def load_layer(self, layer: int) -> None:
        """Make layer `layer` of the current model resident."""
        ...

    def log(self, message: str) -> None:
        """A message from the guest."""
        ...


def error_code_for(exc: RealmError, default: ErrorCode = ErrorCode.HOST_ERROR) -> int:
    """The ABI error code the guest sees for a host-side `RealmError`."""
    if isinstance(exc, ContextLengthError):
        return ErrorCode.CONTEXT_FULL
    if isinstance(exc, Cancelled):
        return ErrorCode.CANCELLED
    if isinstance(exc, ModelNotFoundError):
        return ErrorCode.UNKNOWN_MODEL
    if isinstance(exc, MemoryBudgetError):
        return ErrorCode.OUT_OF_MEMORY
    if isinstance(exc, GuestError) and exc.abi_code is not None:
        return exc.abi_code
    return default


# --- the engine, its epoch clock and the linker (process-wide) -----------------------------------

T = TypeVar("T")
_init_lock = threading.RLock()


def _once(fn: Callable[..., T]) -> Callable[..., T]:
    """`functools.cache` with the first call serialised: two threads starting their first tenants
    at the same moment must not build two Engines (one's Linker cannot link the other's Module).
    """
    cached = functools.cache(fn)

    @functools.wraps(fn)
    def once(*args: Any) -> T:
        with _init_lock:
            return cached(*args)

    return once



@_once
def shared_engine() -> wasmtime.Engine:
    """The one Engine of the process: fuel metering and epoch interruption on."""
    config = wasmtime.Config()
    config.consume_fuel = True
    config.epoch_interruption = True
    return wasmtime.Engine(config)


class _EpochClock:
    """Ticks the engine's epoch every `EPOCH_TICK_S` while at least one guest runs."""

    def __init__(self, engine: wasmtime.Engine) -> None:
        self._engine = engine
        self._running = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def enter(self) -> None:
        with self._cond:
            self._running += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="realm-epoch", daemon=True)
                self._thread.start()
            self._cond.notify()

    def leave(self) -> None:
        with self._cond:
            self._running -= 1

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._running == 0:
                    self._cond.wait()
            time.sleep(EPOCH_TICK_S)
            self._engine.increment_epoch()


@_once
def _epoch_clock() -> _EpochClock:
    return _EpochClock(shared_engine())


class _Violation(Exception):
    """The guest broke a rule of the ABI; the trampoline traps it with this message."""


@dataclass
class _Call:
    """The request a thread is running: what the import trampolines need, and its budgets."""

    tenant: Tenant
    host: TenantHost
    memory: wasmtime.Memory
    vocab: int
    max_tokens: int
    fuel_budget: int  # fuel for the whole request, across host calls
    time_budget_s: float  # guest time for the whole request (host callbacks not counted)
    cancel: threading.Event | None = None
    host_error: RealmError | None = None  # first RealmError a callback raised
    crash: tuple[str, BaseException] | None = None  # (import, exception) that trapped the guest
    violation: str | None = None  # the ABI rule the guest broke (it was trapped)
    ended: str | None = None  # why the host ended the request (stop, cancelled, an error code)
    fuel_used: int = 0
    guest_s: float = 0.0
    armed: int = 0  # the store's fuel when it was last armed or charged
    entered_at: float = 0.0  # when control last went to the guest
    limited_by: str | None = None  # "fuel" / "time" when the last refill was cut by a budget
    emitted: int = 0
    forwards: int = 0
    side_calls: int = 0
    logs_after_end: int = 0

    def check(self, name: str) -> None:
        """The rules every host call obeys, before its import runs (see the module docstring)."""
        if self.fuel_used >= self.fuel_budget:
            raise _Violation(f"the guest used its request's fuel budget ({self.fuel_budget} for "
                             f"max_tokens {self.max_tokens})")
        if self.guest_s >= self.time_budget_s:
            raise _Violation(f"the guest ran {self.guest_s:.2f} s in this request, its budget "
                             f"for max_tokens {self.max_tokens}")
        if name in ("log", "memory64_load_layer"):
            self.side_calls += 1
            if self.side_calls > MAX_SIDE_CALLS:
                raise _Violation(f"the guest made more than {MAX_SIDE_CALLS} log and "
                                 "memory64_load_layer calls in one request")
        if self.ended is not None:
            if name != "log":
                raise _Violation(f"the guest called {name} after the host had ended the request "
                                 f"({self.ended}); it must return from realm_generate then")
            self.logs_after_end += 1
            if self.logs_after_end > MAX_LOGS_AFTER_END:
                raise _Violation(f"the guest kept calling log after the host had ended the "
                                 f"request ({self.ended})")
        elif self.cancel is not None and self.cancel.is_set():
            raise Cancelled("the request was cancelled")


_current = threading.local()


def _i32(*names: str) -> wasmtime.FuncType:
    return wasmtime.FuncType([wasmtime.ValType.i32() for _ in names], [wasmtime.ValType.i32()])


def _u32(x: int) -> int:
    return x & 0xFFFF_FFFF


def _memory_bytes(call: _Call, caller: wasmtime.Caller) -> np.ndarray:
    """A writable uint8 view of the guest's whole memory, valid until the guest runs again."""
    size = call.memory.data_len(caller)
    base = ctypes.addressof(call.memory.data_ptr(caller).contents)
    return np.frombuffer(memoryview((ctypes.c_ubyte * size).from_address(base)), np.uint8)


def _in_bounds(mem: np.ndarray, ptr: int, nbytes: int) -> bool:
    return nbytes >= 0 and ptr + nbytes <= mem.size


def _bad_token(call: _Call, where: str, token: int) -> GuestError:
    return GuestError(
        f"tenant {call.tenant.tenant_id!r}: the guest handed {where} token id {token}, outside "
        f"the vocabulary 0..{call.vocab - 1}; the guest is faulty ({REBUILD_HINT})",
        abi_code=ErrorCode.BAD_REQUEST, tenant=call.tenant.tenant_id, token=token)


def _forward(call: _Call, caller: wasmtime.Caller, tokens_ptr: int, n: int, logits_ptr: int) -> int:
    if call.forwards > call.emitted:
        raise _Violation(f"the guest called forward {call.forwards + 1} times after emitting "
                         f"{call.emitted} tokens; the ABI allows the prompt's forward and one "
                         "per emitted token")
    if n <= 0:
        return ErrorCode.BAD_REQUEST
    mem = _memory_bytes(call, caller)
    tokens_ptr, logits_ptr = _u32(tokens_ptr), _u32(logits_ptr)
    if not (_in_bounds(mem, tokens_ptr, 4 * n) and _in_bounds(mem, logits_ptr, 4 * call.vocab)):
        return ErrorCode.BAD_POINTER
    tokens = np.frombuffer(mem, "<i4", n, tokens_ptr).copy()
    bad = tokens[(tokens < 0) | (tokens >= call.vocab)]
    if bad.size:
        raise _bad_token(call, "forward", int(bad[0]))
    call.forwards += 1
    logits = call.host.forward(tokens)  # may block on the scheduler; the guest waits, fuel full
    if logits.shape != (call.vocab,):
        raise ValueError(f"forward gave logits of shape {logits.shape}; expected ({call.vocab},)")
    mem = _memory_bytes(call, caller)
    np.frombuffer(mem, "<f4", call.vocab, logits_ptr)[...] = logits
    return call.vocab


def _emit(call: _Call, caller: wasmtime.Caller, token: int) -> int:
    if call.emitted >= call.max_tokens:
        raise _Violation(f"the guest emitted more than max_tokens={call.max_tokens} tokens")
    if not 0 <= token < call.vocab:
        raise _bad_token(call, "emit", token)
    answer = call.host.emit(token)
    if answer not in (abi.EMIT_CONTINUE, abi.EMIT_STOP):
        raise ValueError(f"emit returned {answer!r}; expected 0 (go on) or 1 (stop)")
    call.emitted += 1
    if call.emitted >= call.max_tokens:
        answer = abi.EMIT_STOP  # the host enforces max_tokens, whatever its emit said
    if answer == abi.EMIT_STOP:
        call.ended = "stop"
    return int(answer)


def _load_layer(call: _Call, caller: wasmtime.Caller, layer: int) -> int:
    if layer < 0:
        return ErrorCode.LAYER_ERROR
    call.host.load_layer(layer)
    return 0


def _log(call: _Call, caller: wasmtime.Caller, ptr: int, length: int) -> int:
    mem = _memory_bytes(call, caller)
    ptr = _u32(ptr)
    if not _in_bounds(mem, ptr, length):
        return ErrorCode.BAD_POINTER
    text = mem[ptr : ptr + min(length, abi.MAX_LOG_BYTES)].tobytes().decode("utf-8", "replace")
    call.host.log(text)
    return 0


def _trampoline(
    name: str, impl: Callable[..., int], default: ErrorCode
) -> Callable[..., int]:
    """Wrap an import: charge the fuel and time the guest spent, check the request's rules,
    map RealmErrors to codes, let the rest trap; re-arm before the guest runs again."""

    def trampoline(caller: wasmtime.Caller, *args: int) -> int:
        call: _Call = _current.call  # AttributeError (a trap) if no request runs on this thread
        store = cast(wasmtime.Store, caller)  # a Caller works as a store for fuel and deadline
        tenant = call.tenant
        try:
            tenant._charge(store, call)
            call.check(name)
            result = impl(call, caller, *args)
            if result < 0 and call.ended is None:
                call.ended = f"it answered {name} with {abi.describe_code(result)}"
            return result
        except RealmError as exc:
            if call.host_error is None:
                call.host_error = exc
            code = error_code_for(exc, default)
            if call.ended is None:
                call.ended = f"it answered {name} with {abi.describe_code(code)}"
            return code
        except _Violation as exc:
            call.violation = str(exc)
            raise  # wasmtime turns it into a trap; Tenant.run reports it as GuestTrap
        except Exception as exc:
            call.crash = (name, exc)
            raise
        finally:
            # Re-armed after the call: a forward may block for seconds (model load, jit
            # compile, a long prompt); that time is the host's, not the guest's.
            tenant._arm(store, call)

    return trampoline


@_once
def shared_linker() -> wasmtime.Linker:
    """The store-independent Linker with the four ``realm_host`` imports, defined once."""
    linker = wasmtime.Linker(shared_engine())
    imports: dict[str, tuple[Callable[..., int], ErrorCode]] = {
        "forward": (_forward, ErrorCode.HOST_ERROR),
        "emit": (_emit, ErrorCode.HOST_ERROR),
        "memory64_load_layer": (_load_layer, ErrorCode.LAYER_ERROR),
        "log": (_log, ErrorCode.HOST_ERROR),
    }
    for name, (impl, default) in imports.items():
        params, _ = abi.IMPORTS[name]
        linker.define_func(
            abi.IMPORT_MODULE, name, _i32(*params), _trampoline(name, impl, default),
            access_caller=True,
        )
    return linker


# --- guest modules -------------------------------------------------------------------------------


class GuestModule:
    """A compiled guest: checked exports, imports resolved against the shared Linker."""

    def __init__(self, wasm: bytes | str, *, name: str = "guest") -> None:
        self.name = name
        self.engine = shared_engine()
        self.linker = shared_linker()
        try:
            self.module = wasmtime.Module(self.engine, wasm)
            self.pre = self.linker.instantiate_pre(self.module)
        except wasmtime.WasmtimeError as exc:
            raise AbiVersionError(
                f"{name} is not a realm-nb guest: {str(exc).splitlines()[0]}; {REBUILD_HINT}"
            ) from exc
        exports = {e.name: e.type for e in self.module.exports}
        for export, (params, results) in abi.EXPORTS.items():
            ty = exports.get(export)
            wanted = f"{export}({', '.join(params)}) -> i32"
            if not isinstance(ty, wasmtime.FuncType):
                raise AbiVersionError(f"{name} does not export {wanted}; {REBUILD_HINT}")
            # Checked here, not at the first call: a wrong signature would trap mid-request.
            found = ([str(t) for t in ty.params], [str(t) for t in ty.results])
            if found != (["i32"] * len(params), ["i32"] * len(results)):
                raise AbiVersionError(
                    f"{name} exports {export} as ({', '.join(found[0])}) -> "
                    f"({', '.join(found[1])}); the ABI needs {wanted} (all i32); {REBUILD_HINT}",
                    export=export)
        memory = exports.get(abi.MEMORY_EXPORT)
        if not isinstance(memory, wasmtime.MemoryType):
            raise AbiVersionError(f"{name} does not export its memory; {REBUILD_HINT}")
        if memory.is_64 or memory.is_shared:
            raise AbiVersionError(f"{name} exports a {'64-bit' if memory.is_64 else 'shared'} "
                                  f"memory; the ABI needs a plain 32-bit one; {REBUILD_HINT}")

    @classmethod
    def from_wat(cls, text: str, *, name: str = "wat guest") -> GuestModule:
        return cls(text, name=name)

    @classmethod
    @_once
    def default(cls) -> GuestModule:
        """The guest shipped with the package (realm_nb/realm_guest.wasm), compiled once."""
        wasm = importlib.resources.files("realm_nb").joinpath("realm_guest.wasm").read_bytes()
        return cls(wasm, name="realm_guest.wasm")

    def check_version(self, found: int) -> None:
        if found >> 16 != abi.ABI_VERSION_MAJOR:
            raise AbiVersionError(
                f"{self.name} speaks ABI {abi.version_string(found)}, this host speaks "
                f"{abi.ABI_VERSION_MAJOR}.{abi.ABI_VERSION_MINOR}; {REBUILD_HINT}",
                found=abi.version_string(found),
                expected=f"{abi.ABI_VERSION_MAJOR}.{abi.ABI_VERSION_MINOR}",
            )


# --- tenants -------------------------------------------------------------------------------------

State = Literal["idle", "running", "trapped"]


class Tenant:
    """One tenant's sandbox: a Store and a guest instance, reused across requests."""

    def __init__(
        self,
        tenant_id: str,
        module: GuestModule | None = None,
        *,
        memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT,
        fuel_per_call: int = DEFAULT_FUEL_PER_CALL,
        deadline_s: float = DEFAULT_DEADLINE_S,
        fuel_per_token: int | None = None,
        guest_s_per_token: float = GUEST_S_PER_TOKEN,
    ) -> None:
        """fuel_per_token: the per-request fuel budget's share per token (None: sized by the
        vocabulary, see FUEL_PER_TOKEN_PER_VOCAB); guest_s_per_token: the same for guest time.
        A request's budgets are fuel_per_call + (max_tokens + 1) * fuel_per_token, and
        deadline_s + (max_tokens + 1) * guest_s_per_token."""
        self.tenant_id = tenant_id
        self.module = module if module is not None else GuestModule.default()
        self.memory_limit_bytes = memory_limit_bytes
        self.fuel_per_call = fuel_per_call
        self.deadline_s = deadline_s
        self.fuel_per_token = fuel_per_token
        self.guest_s_per_token = guest_s_per_token
        self._deadline_ticks = max(1, round(deadline_s / EPOCH_TICK_S))
        self._lock = threading.Lock()
        self._state: State = "idle"
        self._fuel_used = 0
        self._tokens = 0
        self._requests = 0
        self._memory_bytes = 0
        self._instantiate()

    # -- lifecycle --------------------------------------------------------------------------------

    def _instantiate(self) -> None:
        """A fresh Store and instance (first use, or after a trap); checks the ABI version."""
        store = wasmtime.Store(self.module.engine)
        store.set_limits(memory_size=self.memory_limit_bytes)
        self._store = store
        self._arm(store)
        try:
            instance = self.module.pre.instantiate(store)
            exports = instance.exports(store)
            self._memory = cast(wasmtime.Memory, exports[abi.MEMORY_EXPORT])
            self._alloc = cast(wasmtime.Func, exports["realm_alloc"])
            self._generate = cast(wasmtime.Func, exports["realm_generate"])
            self._arm(store)
            version = cast(wasmtime.Func, exports["realm_abi_version"])(store)
        except Exception as exc:
            self._state = "trapped"
            raise GuestTrap(
                f"tenant {self.tenant_id!r}: the guest {self.module.name} failed to start: "
                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                tenant=self.tenant_id,
            ) from exc
        self.module.check_version(version)
        self._memory_bytes = self._memory.data_len(store)
        self._state = "idle"

    def _arm(self, store: wasmtime.Store, call: _Call | None = None) -> None:
        """Fuel and epoch deadline for the next stretch of guest code: a full per-call refill,
        cut to what is left of the request's budgets when a request runs."""
        fuel, ticks = self.fuel_per_call, self._deadline_ticks
        if call is not None:
            fuel_left = call.fuel_budget - call.fuel_used
            ticks_left = math.ceil((call.time_budget_s - call.guest_s) / EPOCH_TICK_S)
            call.limited_by = ("fuel" if fuel_left < fuel else
                               "time" if ticks_left < ticks else None)
            fuel, ticks = max(0, min(fuel, fuel_left)), max(1, min(ticks, ticks_left))
            call.armed = fuel
            call.entered_at = time.monotonic()
        wasmtime.Store.set_fuel(store, fuel)
        wasmtime.Store.set_epoch_deadline(store, ticks)

    def _charge(self, store: wasmtime.Store, call: _Call) -> None:
        """Count the fuel and time the guest spent since it was last armed or charged (also
        after a trap: the fuel a trapped call burnt is counted, not lost)."""
        left = wasmtime.Store.get_fuel(store)
        call.fuel_used += call.armed - left
        call.armed = left
        now = time.monotonic()
        call.guest_s += now - call.entered_at
        call.entered_at = now

    def _budgets(self, req: abi.Request) -> tuple[int, float]:
        """(fuel, guest seconds) one request may use in all, across host calls."""
        steps = req.max_tokens + 1  # the prompt's forward, then one per token
        per_token = (self.fuel_per_token if self.fuel_per_token is not None else
                     FUEL_PER_TOKEN_BASE + FUEL_PER_TOKEN_PER_VOCAB * req.vocab_size)
        return (self.fuel_per_call + steps * per_token,
                self.deadline_s + steps * self.guest_s_per_token)

    # -- one request ------------------------------------------------------------------------------

    def run(self, request: bytes, host: TenantHost,
            cancel: threading.Event | None = None) -> int:
        """Run one request (see `realm_nb.abi`) in this thread; return the guest's result (the
        tokens it emitted).

        cancel: once set, every import answers CANCELLED (default: the host's `cancel_event`).
        Raises the host's own `RealmError` if a callback raised one, `GuestError` if the guest
        returned an error code on its own or handed the host a bad value, `GuestTrap` (naming
        this tenant) if it trapped or broke the ABI's rules.
        """
        req = abi.unpack_request(request)
        fuel_budget, time_budget = self._budgets(req)
        with self._lock:
            if self._state == "trapped":
                self._instantiate()
            store = self._store
            call = _Call(tenant=self, host=host, memory=self._memory, vocab=req.vocab_size,
                         max_tokens=req.max_tokens, fuel_budget=fuel_budget,
                         time_budget_s=time_budget,
                         cancel=cancel if cancel is not None else getattr(host, "cancel_event",
                                                                          None))
            self._state = "running"
            self._requests += 1
            clock = _epoch_clock()
            clock.enter()
            _current.call = call
            try:
                self._arm(store, call)
                ptr = self._alloc(store, len(request))
                self._charge(store, call)
                if ptr == 0:
                    raise MemoryBudgetError(
                        f"tenant {self.tenant_id!r}: the guest cannot hold a request of "
                        f"{len(request)} bytes within its memory limit of "
                        f"{self.memory_limit_bytes} bytes; raise memory_limit_bytes",
                        tenant=self.tenant_id,
                    )
                if _u32(ptr) + len(request) > self._memory.data_len(store):
                    raise GuestError(
                        f"tenant {self.tenant_id!r}: realm_alloc({len(request)}) returned "
                        f"{_u32(ptr)}, outside the guest's memory; {REBUILD_HINT}",
                        abi_code=ErrorCode.BAD_POINTER, tenant=self.tenant_id)
                self._memory.write(store, request, _u32(ptr))
                self._arm(store, call)
                result = self._generate(store, ptr, len(request))
            except RealmError:
                self._state = "idle"
                raise
            except Exception as exc:
                self._state = "trapped"
                raise GuestTrap(self._trap_message(call, exc), tenant=self.tenant_id) from (
                    call.crash[1] if call.crash else exc
                )
            finally:
                self._charge(store, call)  # also what a trapped call burnt
                del _current.call
                clock.leave()
                self._fuel_used += call.fuel_used
                self._tokens += call.emitted
                self._memory_bytes = self._memory.data_len(store)
            self._state = "idle"
        if call.host_error is not None:
            raise call.host_error
        if result < 0:
            raise GuestError(
                f"tenant {self.tenant_id!r}: the guest returned {abi.describe_code(result)}",
                abi_code=result,
                tenant=self.tenant_id,
            )
        return int(result)

    def _trap_message(self, call: _Call, exc: BaseException) -> str:
        who = f"tenant {self.tenant_id!r}"
        again = "the guest was stopped and is re-created for the next request"
        if call.violation is not None:
            return f"{who}: {call.violation}; {again}"
        if call.crash is not None:
            name, err = call.crash
            return f"{who}: host callback {name!r} raised {type(err).__name__}: {err}; {again}"
        code = exc.trap_code if isinstance(exc, wasmtime.Trap) else None
        if code == wasmtime.TrapCode.OUT_OF_FUEL:
            if call.limited_by == "fuel":
                return (f"{who}: the guest used its request's fuel budget ({call.fuel_budget} "
                        f"for max_tokens {call.max_tokens}) and was stopped")
            return (
                f"{who}: the guest ran {self.fuel_per_call} instructions without a host call "
                "(endless loop?) and was stopped"
            )
        if code == wasmtime.TrapCode.INTERRUPT:
            if call.limited_by == "time":
                return (f"{who}: the guest ran {call.time_budget_s:.2f} s in this request, its "
                        f"budget for max_tokens {call.max_tokens}, and was stopped")
            return (
                f"{who}: the guest ran {self._deadline_ticks * EPOCH_TICK_S:.2f} s without a "
                "host call and was stopped"
            )
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"{who}: the guest trapped: {first}"

    # -- accounting -------------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    def stats(self) -> dict[str, Any]:
        return {
            "id": self.tenant_id,
            "state": self._state,
            "fuel_used": self._fuel_used,
            "memory_bytes": self._memory_bytes,
            "tokens": self._tokens,
            "requests": self._requests,
        }
