"""The one table of request limits: what a sampling parameter may be, wherever it is checked.

Three places check a request: `types.SamplingParams` (the faces, before anything runs),
`abi.validate` (the host, before a request is packed for the guest) and the guest itself
(wasm/guest.zig, which must not trust its host either). They all read this table: the Python
checks call `Limit.admits`, and the guest imports wasm/limits.zig, which `render_zig` writes from
this table (`realm-nb build-guest` writes it, `build-guest --check` and tests/test_limits.py fail
when it is stale). Change a bound here, rebuild the guest, and every layer agrees.

Also here: the other bounds a request meets on its way (stop strings, the candidate cap, the
vocabulary size, the chat-template budget), so that a face can state them without importing the
layer that enforces them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

U32_MAX = 0xFFFF_FFFF


@dataclass(frozen=True)
class Limit:
    """A closed range [lo, hi], open at lo when `lo_open`; `integer` for whole numbers only.

    The bounds are exact in float32 (0, 1, 10, 100, ...), so the guest, which reads the packed
    float32, admits what the host admitted."""

    name: str
    lo: float
    hi: float
    lo_open: bool = False
    integer: bool = False
    meaning: str = ""  # what a special value does, e.g. "0 = greedy", shown in errors

    def admits(self, value: Any) -> bool:
        if isinstance(value, bool):
            return False
        if self.integer:
            if not isinstance(value, int):
                return False
        elif not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        above = value > self.lo if self.lo_open else value >= self.lo
        return above and value <= self.hi

    @property
    def rule(self) -> str:
        """'an integer in [0, 4096]', 'a number in (0, 1] (1 = off)'."""
        kind = "an integer" if self.integer else "a number"
        text = f"{kind} in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}]"
        return f"{text} ({self.meaning})" if self.meaning else text


def _num(x: float) -> str:
    if x == U32_MAX:
        return "2**32-1"
    return str(int(x)) if float(x).is_integer() else repr(x)


# The sampling parameters, in the order of the guest's request header (abi.HEADER).
SAMPLING_LIMITS: dict[str, Limit] = {lim.name: lim for lim in (
    Limit("max_tokens", 0, U32_MAX, integer=True),
    Limit("top_k", 0, U32_MAX, integer=True, meaning="0 = the guest's candidate cap"),
    Limit("temperature", 0, 100, meaning="0 = greedy"),
    Limit("top_p", 0, 1, lo_open=True, meaning="1 = off"),
    Limit("min_p", 0, 1, meaning="0 = off"),
    Limit("repeat_penalty", 0, 10, lo_open=True, meaning="1 = off"),
    # the guest keeps this many recent ids in its own memory: the bound keeps that small
    Limit("repeat_window", 0, 4096, integer=True, meaning="0 = off"),
)}

MAX_CANDIDATES = 512  # top-k is always capped here (the guest's heap); 0 means this cap
MAX_VOCAB = 1 << 24  # vocab_size the ABI carries (and the guest's seen-bitmap bound)
# Stop strings are searched for after every token: their number and length bound that cost.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


@dataclass(frozen=True)
class TemplateBudget:
    """How much one chat-template render may do: wall-clock time, steps, characters."""

    time_s: float = 2.0  # wall-clock budget of one render
    max_steps: int = 1_000_000  # loop iterations + calls + lookups + operators of one render
    max_chars: int = 1 << 20  # the most characters a render outputs, or any one value holds


# ------------------------------------------------------------------------------ the guest's copy

ZIG_HEADER = ("// Generated from realm_nb/limits.py by `realm-nb build-guest`: do not edit.\n"
              "// The guest refuses a request whose values this table does not admit.\n")


def _zig_float(x: float) -> str:
    return f"{float(x):.1f}" if float(x).is_integer() else repr(float(x))


def render_zig() -> str:
    """wasm/limits.zig: the constants and one `<name>Ok` check per sampling parameter."""
    lines = [ZIG_HEADER,
             f"pub const MAX_CANDIDATES: usize = {MAX_CANDIDATES};",
             f"pub const MAX_VOCAB: u32 = {MAX_VOCAB};",
             ""]
    for lim in SAMPLING_LIMITS.values():
        camel = "".join(w.capitalize() for w in lim.name.split("_"))
        fn = camel[0].lower() + camel[1:] + "Ok"
        if lim.integer:
            lo = f"v > {int(lim.lo)}" if lim.lo_open else f"v >= {int(lim.lo)}"
            body = f"{lo} and v <= {int(lim.hi)}"
            if lim.lo == 0 and not lim.lo_open and lim.hi == U32_MAX:
                body = "true"  # every u32 is admitted
                lines.append(f"pub fn {fn}(v: u32) bool {{\n    _ = v;\n    return {body};\n}}")
                continue
            lines.append(f"pub fn {fn}(v: u32) bool {{\n    return {body};\n}}")
        else:  # NaN fails both comparisons; infinities fail one
            op = ">" if lim.lo_open else ">="
            test = f"v {op} {_zig_float(lim.lo)} and v <= {_zig_float(lim.hi)}"
            lines.append(f"pub fn {fn}(v: f32) bool {{\n    return {test};\n}}")
    return "\n".join(lines) + "\n"
