"""The host ABI: the one written, versioned contract between realm-nb and its WebAssembly guests.

Everything a guest and the host must agree on lives here: the import module and names, the wasm
signatures, the error codes, the request layout, the memory conventions, and the sampler's order
and RNG. The guest (`wasm/guest.zig`) mirrors the constants; `realm_nb.tenants` is the host side.

Versioning
    The guest exports ``realm_abi_version() -> i32`` returning ``(major << 16) | minor``. The host
    refuses a guest of another major version (`AbiVersionError`); a minor bump only adds.

Imports (module ``realm_host``; every parameter and result is an i32)
    ``forward(tokens_ptr, n_tokens, logits_ptr) -> i32``
        Append ``n_tokens`` i32 ids at ``tokens_ptr`` to this tenant's sequence (KV cache host-side)
        and write the last position's logits, f32[V], at ``logits_ptr``. Returns V, or an error
        code.
        The guest sends the whole prompt in one call; the host chunks prefill itself.
    ``emit(token) -> i32``
        Hand one sampled token to the host. 0 = go on, 1 = stop (stop string, cancel, client gone,
        max tokens), negative = error code.
    ``memory64_load_layer(layer) -> i32``
        Ask that layer ``layer`` of the current model be resident. 0, or an error code.
    ``log(ptr, len) -> i32``
        A UTF-8 message for the host's log (at most `MAX_LOG_BYTES`). 0, or an error code.

    The host checks what a guest hands it: token ids outside 0..V-1 get `BAD_REQUEST`; a guest
    may forward the prompt and then once per emitted token, emit at most ``max_tokens`` tokens,
    and after a stop or an error code make no call but a few ``log``s (else it is trapped). Each
    request has a fuel and a guest-time budget across host calls (`realm_nb.tenants`), and a
    cancel is answered with `CANCELLED` at whichever import the guest calls next.

Exports
    ``memory``; ``realm_abi_version() -> i32``; ``realm_alloc(len) -> i32`` (a 16-byte aligned
    pointer, 0 when memory cannot grow); ``realm_generate(req_ptr, req_len) -> i32`` (the number of
    tokens emitted, or an error code).

Memory conventions
    Pointers are byte offsets into the guest's exported ``memory`` (wasm32: read them as u32). The
    host checks every (ptr, len) against the memory's current size and answers `BAD_POINTER`
    instead of faulting. Memory from ``realm_alloc`` lives until the end of the next
    ``realm_generate`` call (the host copies a request in, then runs it); the guest's allocator is
    a bump pointer over ``memory.grow`` that ``realm_generate`` resets when it returns.

The token loop (``realm_generate``)
    Validate the request (bad magic, major version, lengths, values → `BAD_REQUEST`); allocate the
    logits buffer f32[V] and the recent-token ring; ``forward(prompt, n_prompt, logits)`` once;
    then for each of ``max_tokens`` steps: sample, ``r = emit(token)``; ``r < 0`` → return r;
    stop on ``r == 1``, on an end-of-generation id, or after the last allowed token (no forward
    after the last token); otherwise ``forward(&token, 1, logits)``. ``max_tokens == 0`` runs the
    prompt forward only and returns 0.

The sampler, in this order
    1. Repetition penalty over the last ``repeat_window`` tokens of prompt + generated, each
       distinct token once (llama.cpp's rule: logit > 0 → logit / penalty, else logit * penalty).
    2. ``temperature <= 0``: greedy argmax, lowest id wins ties. Otherwise:
    3. Top-K: K = top_k if 0 < top_k <= `limits.MAX_CANDIDATES` else that cap (found with a heap,
       never a sort of the vocabulary); candidates sorted by descending logit, then ascending id.
    4. Softmax of (logit - best) / temperature over the candidates: a quotient, never logit
       times 1 / temperature, which overflows for a subnormal temperature; as temperature -> 0
       the draw becomes greedy (candidates tied with the best share it).
    5. Top-p: keep the shortest prefix whose cumulative probability is >= top_p (at least one).
    6. Min-p: drop candidates with p < min_p * p_max.
    7. Renormalise and draw ``u * total`` against the cumulative sum, with ``u`` uniform in [0, 1)
       from the top 24 bits of PCG32 (pcg-c-basic), seeded as
       ``pcg32_srandom(seed, PCG32_SEQUENCE)``. Same seed, parameters and logits → same tokens.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

from .errors import InvalidRequestError
from .limits import MAX_VOCAB, SAMPLING_LIMITS

# --- version and names ---------------------------------------------------------------------------

ABI_VERSION_MAJOR = 1
ABI_VERSION_MINOR = 0
ABI_VERSION = (ABI_VERSION_MAJOR << 16) | ABI_VERSION_MINOR

IMPORT_MODULE = "realm_host"

#: wasm signatures as (params, results); every value is an i32.
IMPORTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "forward": (("tokens_ptr", "n_tokens", "logits_ptr"), ("vocab_or_error",)),
    "emit": (("token",), ("go_stop_or_error",)),
    "memory64_load_layer": (("layer",), ("ok_or_error",)),
    "log": (("ptr", "len"), ("ok_or_error",)),
}
EXPORTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "realm_abi_version": ((), ("version",)),
    "realm_alloc": (("len",), ("ptr",)),
    "realm_generate": (("req_ptr", "req_len"), ("n_emitted_or_error",)),
}
MEMORY_EXPORT = "memory"

EMIT_CONTINUE = 0
EMIT_STOP = 1

PCG32_SEQUENCE = 0xDA3E39CB94B95BDB
MAX_LOG_BYTES = 64 * 1024


def version_string(packed: int) -> str:
    """`(major << 16) | minor` as "major.minor"."""
    return f"{(packed >> 16) & 0xFFFF}.{packed & 0xFFFF}"


# --- error codes ---------------------------------------------------------------------------------


class ErrorCode(IntEnum):
    """Negative i32 results of imports and of ``realm_generate``."""

    BAD_POINTER = -1  # a (ptr, len) pair falls outside the guest's memory
    CONTEXT_FULL = -2  # the tenant's sequence would exceed the model's context length
    CANCELLED = -3  # the request was cancelled (client gone, Stop pressed)
    UNKNOWN_MODEL = -4  # the request names a model the host does not have
    BAD_REQUEST = -5  # the request struct is malformed (magic, version, lengths, values), or
    #                   a value the guest handed the host is (a token id outside the vocabulary)
    HOST_ERROR = -6  # the host failed for another reason; the host re-raises the original error
    LAYER_ERROR = -7  # a layer could not be made resident
    OUT_OF_MEMORY = -8  # the guest could not grow its memory (tenant memory limit)


ERROR_MEANINGS: dict[int, str] = {
    ErrorCode.BAD_POINTER: "a (ptr, len) pair falls outside the guest's memory",
    ErrorCode.CONTEXT_FULL: "the sequence would exceed the model's context length",
    ErrorCode.CANCELLED: "the request was cancelled",
    ErrorCode.UNKNOWN_MODEL: "the request names a model the host does not have",
    ErrorCode.BAD_REQUEST: "the request struct, or a value the guest handed the host, is malformed",
    ErrorCode.HOST_ERROR: "the host failed for another reason",
    ErrorCode.LAYER_ERROR: "a layer could not be made resident",
    ErrorCode.OUT_OF_MEMORY: "the guest could not grow its memory",
}


def describe_code(code: int) -> str:
    """"-1 (BAD_POINTER: a (ptr, len) pair ...)" for a known code, the number otherwise."""
    try:
        name = ErrorCode(code).name
    except ValueError:
        return f"{code} (not an ABI error code)"
    return f"{code} ({name}: {ERROR_MEANINGS[code]})"


# --- the request struct --------------------------------------------------------------------------

REQUEST_MAGIC = b"RLMQ"
HEADER = struct.Struct("<4sIIIIIQffffII8x")  # 64 bytes; the last 8 are reserved, zero
assert HEADER.size == 64
# off  0 magic b"RLMQ"      off 24 u64 seed           off 48 u32 repeat_window
# off  4 u32 abi_version    off 32 f32 temperature    off 52 u32 n_eos
# off  8 u32 vocab_size     off 36 f32 top_p          off 56 8 bytes reserved, zero
# off 12 u32 n_prompt       off 40 f32 min_p          then i32[n_prompt] prompt ids,
# off 16 u32 max_tokens     off 44 f32 repeat_penalty      i32[n_eos] end-of-generation ids
# off 20 u32 top_k

@dataclass(frozen=True)
class Request:
    """One generation request as the guest reads it. Token ids are ids of the model's vocabulary."""

    vocab_size: int
    prompt: tuple[int, ...]
    max_tokens: int
    seed: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    repeat_window: int = 64
    eos_ids: tuple[int, ...] = ()
    abi_version: int = ABI_VERSION


def _bad(field: str, value: object, rule: str) -> InvalidRequestError:
    return InvalidRequestError(f"request field {field!r} is {value!r}; {rule}", param=field)


def validate(req: Request) -> None:
    """Raise `InvalidRequestError` naming the first field with a bad value."""
    if req.abi_version >> 16 != ABI_VERSION_MAJOR:
        raise _bad(
            "abi_version",
            version_string(req.abi_version),
            f"this host speaks ABI {ABI_VERSION_MAJOR}.x",
        )
    if not 0 < req.vocab_size <= MAX_VOCAB:
        raise _bad("vocab_size", req.vocab_size, f"it must be in 1..{MAX_VOCAB}")
    if not req.prompt:
        raise _bad("prompt", req.prompt, "it must hold at least one token id")
    for tok in req.prompt:
        if not 0 <= tok < req.vocab_size:
            raise _bad("prompt", tok, f"token ids must be in 0..{req.vocab_size - 1}")
    for tok in req.eos_ids:
        if not 0 <= tok < req.vocab_size:
            raise _bad("eos_ids", tok, f"token ids must be in 0..{req.vocab_size - 1}")
    if not 0 <= req.seed < 1 << 64:
        raise _bad("seed", req.seed, "it must be an integer in 0..2**64-1")
    for name, limit in SAMPLING_LIMITS.items():  # the table the guest's limits.zig is made from
        value = getattr(req, name)
        if not limit.admits(value):
            raise _bad(name, value, f"it must be {limit.rule}")


def pack_request(
    *,
    vocab_size: int,
    prompt: Sequence[int],
    max_tokens: int,
    seed: int = 0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repeat_penalty: float = 1.0,
    repeat_window: int = 64,
    eos_ids: Sequence[int] = (),
) -> bytes:
    """Validate and lay out a request for ``realm_generate``."""
    req = Request(
        vocab_size=int(vocab_size),
        prompt=tuple(int(t) for t in prompt),
        max_tokens=int(max_tokens),
        seed=int(seed),
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
        min_p=float(min_p),
        repeat_penalty=float(repeat_penalty),
        repeat_window=int(repeat_window),
        eos_ids=tuple(int(t) for t in eos_ids),
    )
    return encode_request(req)


def encode_request(req: Request) -> bytes:
    """The bytes of a `Request` (validated first)."""
    validate(req)
    header = HEADER.pack(
        REQUEST_MAGIC,
        req.abi_version,
        req.vocab_size,
        len(req.prompt),
        req.max_tokens,
        req.top_k,
        req.seed,
        req.temperature,
        req.top_p,
        req.min_p,
        req.repeat_penalty,
        req.repeat_window,
        len(req.eos_ids),
    )
    ids = struct.pack(f"<{len(req.prompt) + len(req.eos_ids)}i", *req.prompt, *req.eos_ids)
    return header + ids


def unpack_request(data: bytes) -> Request:
    """Parse and validate request bytes; `InvalidRequestError` names the bad field."""
    if len(data) < HEADER.size:
        raise _bad("length", len(data), f"a request is at least {HEADER.size} bytes")
    (magic, version, vocab, n_prompt, max_tokens, top_k, seed, temperature, top_p, min_p,
     repeat_penalty, repeat_window, n_eos) = HEADER.unpack_from(data)
    if magic != REQUEST_MAGIC:
        raise _bad("magic", magic, f"a request starts with {REQUEST_MAGIC!r}")
    if data[56:64] != bytes(8):
        raise _bad("reserved", data[56:64], "bytes 56..64 must be zero")
    expected = HEADER.size + 4 * (n_prompt + n_eos)
    if len(data) != expected:
        raise _bad(
            "length",
            len(data),
            f"n_prompt={n_prompt} and n_eos={n_eos} make the request {expected} bytes",
        )
    ids = struct.unpack_from(f"<{n_prompt + n_eos}i", data, HEADER.size)
    req = Request(
        vocab_size=vocab,
        prompt=tuple(ids[:n_prompt]),
        max_tokens=max_tokens,
        seed=seed,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repeat_penalty=repeat_penalty,
        repeat_window=repeat_window,
        eos_ids=tuple(ids[n_prompt:]),
        abi_version=version,
    )
    validate(req)
    return req
