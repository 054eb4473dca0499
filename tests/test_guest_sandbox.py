"""Hostile guests (inline WAT) are stopped, refused or answered with error codes, while a
well-behaved tenant on the real guest keeps generating in another thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from realm_nb import abi
from realm_nb.errors import AbiVersionError, ContextLengthError, GuestTrap
from realm_nb.tenants import Cancelled, GuestError, GuestModule, Tenant

V = 1000
LOGITS = np.linspace(-1.0, 1.0, V, dtype=np.float32)[::-1].copy()  # argmax: token 0
LOGITS[321] = 5.0


class RecordingHost:
    """A TenantHost with fixed logits; optionally fails in one callback."""

    def __init__(self, fail_in: str | None = None, error: Exception | None = None) -> None:
        self.fail_in = fail_in
        self.error = error
        self.forwards = 0
        self.tokens: list[int] = []
        self.logs: list[str] = []

    def _maybe_fail(self, where: str) -> None:
        if self.fail_in == where and self.error is not None:
            raise self.error

    def forward(self, tokens: np.ndarray) -> np.ndarray:
        self._maybe_fail("forward")
        self.forwards += 1
        return LOGITS

    def emit(self, token: int) -> int:
        self._maybe_fail("emit")
        self.tokens.append(token)
        return 0

    def load_layer(self, layer: int) -> None:
        self._maybe_fail("load_layer")

    def log(self, message: str) -> None:
        self.logs.append(message)


def request(max_tokens: int = 8, **params: object) -> bytes:
    return abi.pack_request(vocab_size=V, prompt=[1, 2, 3], max_tokens=max_tokens,
                            temperature=0, **params)  # type: ignore[arg-type]


def wat_guest(generate_body: str, *, version: int = abi.ABI_VERSION, extra: str = "") -> str:
    """A guest with the ABI's exports; `generate_body` is realm_generate's (i32 result) body."""
    return f"""
    (module
      (import "realm_host" "forward" (func $forward (param i32 i32 i32) (result i32)))
      (import "realm_host" "emit" (func $emit (param i32) (result i32)))
      (import "realm_host" "memory64_load_layer" (func $load (param i32) (result i32)))
      (import "realm_host" "log" (func $log (param i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 16) "hello from wat")
      (func (export "realm_abi_version") (result i32) (i32.const {version}))
      (func (export "realm_alloc") (param i32) (result i32) (i32.const 1024))
      (func (export "realm_generate") (param $req i32) (param $len i32) (result i32) (local $n i32)
        {generate_body})
      {extra})
    """


def tenant_for(body: str, tenant_id: str, **kwargs: object) -> Tenant:
    return Tenant(tenant_id, GuestModule.from_wat(wat_guest(body)), **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def neighbour() -> Iterator[None]:
    """A well-behaved tenant generating on the real guest in another thread throughout a test."""
    done = threading.Event()
    results: list[list[int]] = []
    errors: list[BaseException] = []

    def work() -> None:
        tenant = Tenant("neighbour")
        try:
            while not done.is_set() or not results:
                host = RecordingHost()
                tenant.run(request(max_tokens=20), host)
                results.append(host.tokens)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    yield
    done.set()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert errors == []
    assert results and all(tokens == [321] * 20 for tokens in results)


INFINITE_UNLESS_NO_TOKENS = """
  ;; max_tokens (offset 16) == 0: behave; otherwise spin forever
  (if (i32.eqz (i32.load offset=16 (local.get $req))) (then (return (i32.const 0))))
  (loop $spin (br $spin))
  (i32.const 0)
"""


def test_infinite_loop_traps_quickly_and_the_tenant_recovers(neighbour: None) -> None:
    tenant = tenant_for(INFINITE_UNLESS_NO_TOKENS, "spinner")
    start = time.perf_counter()
    with pytest.raises(GuestTrap, match=r"tenant 'spinner'.*without a host call") as info:
        tenant.run(request(), RecordingHost())
    # The mechanism is the per-call fuel allowance (the match above: "without a host call");
    # ~50 ms when quiet, 1.4 s seen under load on 2 cores, so the wall bound only guards a hang.
    assert time.perf_counter() - start < 10.0
    assert info.value.details["tenant"] == "spinner"
    assert tenant.stats()["state"] == "trapped"
    assert tenant.run(request(max_tokens=0), RecordingHost()) == 0  # a fresh instance
    assert tenant.stats()["state"] == "idle"


def test_wall_clock_deadline_stops_a_guest_that_fuel_would_not(neighbour: None) -> None:
    tenant = tenant_for(INFINITE_UNLESS_NO_TOKENS, "slow", fuel_per_call=10**15, deadline_s=0.2)
    start = time.perf_counter()
    with pytest.raises(GuestTrap, match=r"tenant 'slow'.*0\.20 s without a host call"):
        tenant.run(request(), RecordingHost())
    assert 0.15 < time.perf_counter() - start < 10.0  # the deadline, not fuel; above: a hang guard


def test_memory_grow_bomb_is_refused_at_the_limit(neighbour: None) -> None:
    body = """
      ;; grow one page at a time until refused; return the pages gained
      (block $refused
        (loop $grow
          (br_if $refused (i32.eq (memory.grow (i32.const 1)) (i32.const -1)))
          (local.set $n (i32.add (local.get $n) (i32.const 1)))
          (br $grow)))
      (local.get $n)
    """
    limit = 4 << 20
    tenant = tenant_for(body, "grower", memory_limit_bytes=limit)
    pages = tenant.run(request(), RecordingHost())
    assert pages == limit // 65536 - 1  # the module starts with one page
    assert tenant.stats()["memory_bytes"] == limit
    assert tenant.run(request(), RecordingHost()) == 0  # still at the limit, nothing more


@pytest.mark.parametrize(
    ("tokens_ptr", "n_tokens", "logits_ptr"),
    [
        (0x7FFF_FF00, 1, 2048),  # tokens past the end of memory
        (-16, 1, 2048),  # a "negative" pointer is a huge u32
        (1024, 1, 65536 - 100),  # logits (4 * V bytes) run past the end
        (65532, 2, 2048),  # tokens straddle the end
    ],
)
def test_out_of_range_pointer_gets_bad_pointer(
    tokens_ptr: int, n_tokens: int, logits_ptr: int, neighbour: None
) -> None:
    args = f"(i32.const {tokens_ptr}) (i32.const {n_tokens}) (i32.const {logits_ptr})"
    body = f"(call $forward {args})"
    tenant = tenant_for(body, "pointer")
    host = RecordingHost()
    with pytest.raises(GuestError) as info:
        tenant.run(request(), host)
    assert info.value.abi_code == abi.ErrorCode.BAD_POINTER == -1
    assert host.forwards == 0  # the host never ran with a bad pointer
    assert tenant.stats()["state"] == "idle"


def test_in_range_forward_writes_logits_into_guest_memory() -> None:
    # forward into 2048, then emit the f32 at logits[321] truncated to an integer (5.0 -> 5)
    body = """
      (i32.store (i32.const 1500) (i32.const 42))
      (drop (call $forward (i32.const 1500) (i32.const 1) (i32.const 2048)))
      (drop (call $emit (i32.trunc_f32_s (f32.load (i32.const 3332)))))  ;; 2048 + 4 * 321
      (drop (call $log (i32.const 16) (i32.const 14)))
      (i32.const 1)
    """
    host = RecordingHost()
    assert tenant_for(body, "reader").run(request(), host) == 1
    assert host.tokens == [5]
    assert host.logs == ["hello from wat"]


def test_wrong_abi_version_is_refused() -> None:
    with pytest.raises(AbiVersionError, match=r"2\.0.*1\.0.*realm-nb build-guest"):
        Tenant("old", GuestModule.from_wat(wat_guest("(i32.const 0)", version=2 << 16)))


def test_guest_without_the_exports_is_refused() -> None:
    renamed = wat_guest("(i32.const 0)").replace('"realm_generate"', '"generate"')
    with pytest.raises(AbiVersionError, match=r"not export realm_generate\(req_ptr, req_len\)"):
        GuestModule.from_wat(renamed)


def test_host_exception_traps_and_names_the_tenant(neighbour: None) -> None:
    tenant = Tenant("crashy")
    with pytest.raises(GuestTrap, match=r"tenant 'crashy'.*'emit' raised ValueError") as info:
        tenant.run(request(), RecordingHost("emit", ValueError("boom")))
    assert isinstance(info.value.__cause__, ValueError)
    assert tenant.stats()["state"] == "trapped"
    host = RecordingHost()
    assert tenant.run(request(max_tokens=3), host) == 3  # re-created, works again
    assert host.tokens == [321] * 3


@pytest.mark.parametrize(
    ("where", "error", "code"),
    [
        ("forward", ContextLengthError("context of 8 tokens is full"), abi.ErrorCode.CONTEXT_FULL),
        ("emit", Cancelled("stopped by the user"), abi.ErrorCode.CANCELLED),
        ("load_layer", RuntimeError("not a RealmError"), None),
    ],
)
def test_realm_errors_become_codes_and_are_reraised(
    where: str, error: Exception, code: int | None
) -> None:
    # The WAT guest passes the code it got on to the host through log, then returns it.
    body = """
      ;; forward the prompt's first id: the request sits at 1024, its ids after the 64-byte header
      (local.set $n
        (call $forward (i32.const 1088) (i32.const 1) (i32.const 2048)))
      (if (i32.ge_s (local.get $n) (i32.const 0))
        (then (local.set $n (call $emit (i32.const 1)))))
      (if (i32.ge_s (local.get $n) (i32.const 0))
        (then (local.set $n (call $load (i32.const 3)))))
      (i32.store8 (i32.const 100) (i32.sub (i32.const 48) (local.get $n)))  ;; "1" for -1, ...
      (drop (call $log (i32.const 100) (i32.const 1)))
      (local.get $n)
    """
    tenant = tenant_for(body, "mapper")
    host = RecordingHost(where, error)
    if code is None:
        with pytest.raises(GuestTrap, match="'memory64_load_layer' raised RuntimeError"):
            tenant.run(request(), host)
        return
    with pytest.raises(type(error)) as info:
        tenant.run(request(), host)
    assert info.value is error  # the original exception, not a copy
    assert host.logs == [str(-code)]  # what the guest saw


def test_real_guest_returns_after_a_mapped_error() -> None:
    tenant = Tenant("context")
    error = ContextLengthError("full")
    with pytest.raises(ContextLengthError):
        tenant.run(request(), RecordingHost("forward", error))
    assert tenant.stats()["state"] == "idle"  # no trap: the guest returned the code


def test_guests_run_in_parallel_threads() -> None:
    tenants = [Tenant(f"parallel-{i}") for i in range(4)]
    hosts = [RecordingHost() for _ in tenants]
    threads = [
        threading.Thread(target=t.run, args=(request(max_tokens=50), h))
        for t, h in zip(tenants, hosts, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(h.tokens == [321] * 50 for h in hosts)
