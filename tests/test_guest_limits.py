"""The host bounds a guest across host calls and checks what it hands back (issue 10, item 6):
a guest that keeps calling the host is stopped by its request's budgets, cancel reaches it at
any import, token ids outside the vocabulary are refused, max_tokens and STOP are enforced by
the host, exports of the wrong types are refused at load, and fuel burnt before a trap counts.

Hostile guests are inline WAT. Each host here raises after a bounded number of calls, so that a
host without these limits fails the test instead of running for ever.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from realm_nb import abi
from realm_nb.errors import AbiVersionError, GuestTrap
from realm_nb.tenants import Cancelled, GuestError, GuestModule, Tenant

V = 1000
LOGITS = np.zeros(V, np.float32)
LOGITS[7] = 1.0


class BoundedHost:
    """A TenantHost with fixed logits; emit answers `answer` (or stop after `stop_after`
    tokens); raises once the guest made `limit` calls, the safety net of these tests."""

    def __init__(self, *, stop_after: int | None = None, limit: int = 100_000,
                 cancel_event: threading.Event | None = None) -> None:
        self.stop_after = stop_after
        self.limit = limit
        self.cancel_event = cancel_event
        self.calls = 0
        self.forwards: list[list[int]] = []
        self.tokens: list[int] = []
        self.logs = 0

    def _count(self) -> None:
        self.calls += 1
        if self.calls > self.limit:
            raise RuntimeError(f"safety net: {self.limit} host calls")

    def forward(self, tokens: np.ndarray) -> np.ndarray:
        self._count()
        self.forwards.append(tokens.tolist())
        return LOGITS

    def emit(self, token: int) -> int:
        self._count()
        self.tokens.append(token)
        return int(self.stop_after is not None and len(self.tokens) >= self.stop_after)

    def load_layer(self, layer: int) -> None:
        self._count()

    def log(self, message: str) -> None:
        self._count()
        self.logs += 1


def request(max_tokens: int = 8, vocab: int = V) -> bytes:
    return abi.pack_request(vocab_size=vocab, prompt=[1, 2, 3], max_tokens=max_tokens,
                            temperature=0)


def guest(body: str, *, exports: str | None = None, pages: int = 1) -> GuestModule:
    """A guest whose realm_generate(req, len) runs `body` (locals $n, $i: i32)."""
    generate = exports or f"""
      (func (export "realm_generate") (param $req i32) (param $len i32) (result i32)
        (local $n i32) (local $i i32)
        {body})"""
    return GuestModule.from_wat(f"""
    (module
      (import "realm_host" "forward" (func $forward (param i32 i32 i32) (result i32)))
      (import "realm_host" "emit" (func $emit (param i32) (result i32)))
      (import "realm_host" "memory64_load_layer" (func $load (param i32) (result i32)))
      (import "realm_host" "log" (func $log (param i32 i32) (result i32)))
      (memory (export "memory") {pages})
      (data (i32.const 16) "busy")
      (func (export "realm_abi_version") (result i32) (i32.const {abi.ABI_VERSION}))
      (func (export "realm_alloc") (param i32) (result i32) (i32.const 1024))
      {generate})
    """)


SPIN_1M = """
  (local.set $i (i32.const 0))
  (loop $spin
    (local.set $i (i32.add (local.get $i) (i32.const 1)))
    (br_if $spin (i32.lt_u (local.get $i) (i32.const 250000))))
"""


def run_bounded(tenant: Tenant, host: BoundedHost, max_tokens: int = 8,
                timeout: float = 20.0) -> BaseException | int:
    """tenant.run in a thread, so that a guest that is never stopped fails the test."""
    out: list[BaseException | int] = []

    def work() -> None:
        try:
            out.append(tenant.run(request(max_tokens), host))
        except BaseException as exc:  # handed to the test
            out.append(exc)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "the guest was never stopped"
    return out[0]


# --- budgets across host calls ----------------------------------------------------------------


def test_fuel_is_charged_across_host_calls() -> None:
    # spin ~1M instructions, call log, again: each call used to refill the fuel for ever
    tenant = Tenant("burner", guest(f"(loop $again {SPIN_1M} (drop (call $log (i32.const 16) "
                                    "(i32.const 4))) (br $again)) (i32.const 0)"),
                    fuel_per_call=10_000_000, fuel_per_token=1_000_000)
    host = BoundedHost(limit=10_000)
    t0 = time.perf_counter()
    err = run_bounded(tenant, host)
    assert isinstance(err, GuestTrap), err
    assert "used its request's fuel budget (19000000 for max_tokens 8)" in err.message
    assert host.logs < 25  # 19M fuel at ~1M per round
    assert time.perf_counter() - t0 < 10.0  # a hang guard: the budget's message is the check
    assert tenant.stats()["fuel_used"] >= 19_000_000


def test_a_guest_that_only_calls_log_meets_the_call_budget() -> None:
    tenant = Tenant("logger", guest("(loop $again (drop (call $log (i32.const 16) "
                                    "(i32.const 4))) (br $again)) (i32.const 0)"))
    host = BoundedHost(limit=50_000)
    err = run_bounded(tenant, host)
    assert isinstance(err, GuestTrap), err
    assert "more than 10000 log and memory64_load_layer calls" in err.message
    assert host.logs == 10_000


def test_guest_time_is_charged_across_host_calls() -> None:
    # with fuel out of the way, the wall-clock budget (host callbacks not counted) stops it
    body = f"(loop $again {SPIN_1M} (drop (call $log (i32.const 16) (i32.const 4))) (br $again))"
    tenant = Tenant("slowpoke", guest(body + " (i32.const 0)"), fuel_per_call=10**15,
                    fuel_per_token=10**15, deadline_s=0.2, guest_s_per_token=0.01)
    host = BoundedHost(limit=5_000)
    t0 = time.perf_counter()
    err = run_bounded(tenant, host)
    assert isinstance(err, GuestTrap), err
    assert "s in this request, its budget for max_tokens 8" in err.message
    assert 0.25 < time.perf_counter() - t0 < 10.0  # at least 0.2 + 9 * 0.01 s; above: a hang guard


def test_the_budgets_leave_the_shipped_guest_its_worst_case() -> None:
    # ascending logits, top_k 0: every logit enters the candidate heap (~717 fuel per entry)
    vocab = 49_152
    tenant = Tenant("worst")
    host = BoundedHost()
    logits = np.arange(vocab, dtype=np.float32)
    host.forward = lambda tokens: logits  # type: ignore[method-assign]
    req = abi.pack_request(vocab_size=vocab, prompt=[1, 2, 3], max_tokens=4, temperature=1.0,
                           top_k=0, seed=1)
    assert tenant.run(req, host) == 4


# --- cancel -----------------------------------------------------------------------------------


def test_cancel_reaches_a_guest_at_any_import() -> None:
    # the guest never forwards nor emits; it returns the first error code log answers
    body = f"""(loop $again {SPIN_1M}
                 (local.set $n (call $log (i32.const 16) (i32.const 4)))
                 (br_if $again (i32.ge_s (local.get $n) (i32.const 0))))
               (local.get $n)"""
    tenant = Tenant("cancelled", guest(body), fuel_per_token=10**12)
    cancel = threading.Event()
    host = BoundedHost(limit=5_000, cancel_event=cancel)
    threading.Timer(0.1, cancel.set).start()
    t0 = time.perf_counter()
    err = run_bounded(tenant, host)
    assert isinstance(err, Cancelled), err
    assert time.perf_counter() - t0 < 10.0  # a hang guard: Cancelled is the check
    assert tenant.stats()["state"] == "idle"


def test_a_guest_that_ignores_cancel_is_trapped() -> None:
    tenant = Tenant("deaf", guest("(loop $again (drop (call $log (i32.const 16) (i32.const 4))) "
                                  "(br $again)) (i32.const 0)"))
    cancel = threading.Event()
    cancel.set()
    err = run_bounded(tenant, BoundedHost(cancel_event=cancel))
    assert isinstance(err, GuestTrap), err
    assert "kept calling log after the host had ended the request" in err.message
    assert "CANCELLED" in err.message


# --- what the guest hands the host ------------------------------------------------------------


@pytest.mark.parametrize("token", [V, -1, 2**31 - 1])
def test_emitted_ids_outside_the_vocabulary_are_refused(token: int) -> None:
    body = f"(call $emit (i32.const {token}))"  # returns the code it gets
    host = BoundedHost()
    err = run_bounded(Tenant("emitter", guest(body)), host)
    assert isinstance(err, GuestError), err
    assert err.abi_code == abi.ErrorCode.BAD_REQUEST
    assert f"handed emit token id {token}, outside the vocabulary 0..{V - 1}" in err.message
    assert host.tokens == []  # never reached the host


def test_forwarded_ids_outside_the_vocabulary_are_refused() -> None:
    body = """(i32.store (i32.const 1500) (i32.const 5000))
              (call $forward (i32.const 1500) (i32.const 1) (i32.const 2048))"""
    host = BoundedHost()
    err = run_bounded(Tenant("forwarder", guest(body)), host)
    assert isinstance(err, GuestError), err
    assert "handed forward token id 5000, outside the vocabulary 0..999" in err.message
    assert host.forwards == []


def test_a_guest_that_ignores_stop_is_trapped() -> None:
    body = "(loop $again (drop (call $emit (i32.const 7))) (br $again)) (i32.const 0)"
    host = BoundedHost(stop_after=3)
    err = run_bounded(Tenant("ignorer", guest(body)), host)
    assert isinstance(err, GuestTrap), err
    assert "called emit after the host had ended the request (stop)" in err.message
    assert host.tokens == [7, 7, 7]


def test_max_tokens_is_enforced_by_the_host() -> None:
    # the host's emit always says go on; the host itself answers stop at max_tokens
    body = """(loop $again
                (local.set $n (i32.add (local.get $n) (i32.const 1)))
                (br_if $again (i32.eqz (call $emit (i32.const 7)))))
              (drop (call $emit (i32.const 7)))
              (local.get $n)"""
    host = BoundedHost()
    err = run_bounded(Tenant("greedy", guest(body)), host, max_tokens=5)
    assert isinstance(err, GuestTrap), err
    assert host.tokens == [7] * 5  # the sixth never reached the host
    assert "called emit after the host had ended the request (stop)" in err.message


def test_one_forward_per_emitted_token() -> None:
    body = """(i32.store (i32.const 1500) (i32.const 7))
              (loop $again
                (drop (call $forward (i32.const 1500) (i32.const 1) (i32.const 2048)))
                (br $again))
              (i32.const 0)"""
    host = BoundedHost(limit=1000)
    err = run_bounded(Tenant("forwards", guest(body)), host)
    assert isinstance(err, GuestTrap), err
    assert "called forward 2 times after emitting 0 tokens" in err.message
    assert host.forwards == [[7]]


# --- load-time and accounting checks (should-fix items) ---------------------------------------


@pytest.mark.parametrize(("export", "says"), [
    ('(func (export "realm_generate") (param i64 i32) (result i32) (i32.const 0))',
     r"exports realm_generate as \(i64, i32\) -> \(i32\); the ABI needs "
     r"realm_generate\(req_ptr, req_len\) -> i32"),
    ('(func (export "realm_generate") (param i32 i32) (result f32) (f32.const 0))',
     r"exports realm_generate as \(i32, i32\) -> \(f32\)"),
    ('(func (export "realm_generate") (param i32 i32))',
     r"exports realm_generate as \(i32, i32\) -> \(\)"),
])
def test_exports_of_the_wrong_types_are_refused_at_load(export: str, says: str) -> None:
    with pytest.raises(AbiVersionError, match=says):
        guest("", exports=export)


def test_fuel_burnt_before_a_trap_is_counted() -> None:
    tenant = Tenant("spinner", guest("(loop $spin (br $spin)) (i32.const 0)"),
                    fuel_per_call=5_000_000)
    err = run_bounded(tenant, BoundedHost())
    assert isinstance(err, GuestTrap), err
    assert "without a host call" in err.message
    assert tenant.stats()["fuel_used"] >= 5_000_000  # was 2: only realm_alloc's
