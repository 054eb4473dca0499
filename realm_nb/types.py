"""The values that cross the faces: sampling parameters, generations, model listings.

Plain dataclasses with no model logic, shared by the SDK (local and server mode), the server,
the CLI and the notebook faces, so that both modes return the very same types.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .errors import InvalidRequestError, StreamBusyError
from .limits import MAX_STOP_CHARS, MAX_STOP_STRINGS, SAMPLING_LIMITS

FinishReason = Literal["stop", "length", "cancelled"]
_STOP_RULE = (f"a string or a list of up to {MAX_STOP_STRINGS} non-empty strings of at most "
              f"{MAX_STOP_CHARS} characters each")
WeightLayout = Literal["exact", "fast", "packed"]
WEIGHT_LAYOUTS: tuple[str, ...] = ("exact", "fast", "packed")


def check_layout(layout: str) -> str:
    """`layout` if it names a weight layout (here, not in `weights`, so faces can check one
    without importing the model layer)."""
    if layout not in WEIGHT_LAYOUTS:
        raise InvalidRequestError(
            f"weights={layout!r} is not a weight layout; choose one of {WEIGHT_LAYOUTS}",
            param="weights")
    return layout


def _check(ok: bool, param: str, value: Any, rule: str) -> None:
    if not ok:
        raise InvalidRequestError(
            f"{param}={value!r} is not allowed: {param} must be {rule}", param=param
        )


@dataclass(frozen=True)
class SamplingParams:
    """How the guest picks each token. temperature 0 means greedy (argmax).

    Order inside the guest: repetition penalty over the last `repeat_window` tokens, then
    temperature, top-k (always capped, see limits.MAX_CANDIDATES), top-p, min-p, then a seeded draw.
    """

    max_tokens: int = 128
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_window: int = 64
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is None:
            object.__setattr__(self, "stop", ())
        elif isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        elif not isinstance(self.stop, tuple):  # a dict or set would pass as its keys, unordered
            _check(False, "stop", _shown(self.stop), _STOP_RULE)
        self.validate()

    def validate(self) -> None:
        """Raise InvalidRequestError naming the first bad parameter."""
        for name, limit in SAMPLING_LIMITS.items():  # limits.py: the table the guest shares
            value = getattr(self, name)
            _check(limit.admits(value), name, value, limit.rule)
        _check(self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**64), "seed",
               self.seed, "null or an integer in [0, 2**64)")
        _check(len(self.stop) <= MAX_STOP_STRINGS and all(
            isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in self.stop), "stop",
            _shown(self.stop), _STOP_RULE)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d


def _shown(value: Any, limit: int = 80) -> Any:
    """A value as an error message shows it: short (a 20k-character stop is not echoed)."""
    text = repr(value)
    return value if len(text) <= limit else _Shown(text[:limit - 3] + "...")


class _Shown(str):
    def __repr__(self) -> str:
        return str(self)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    logprob: float
    token: str = ""


@dataclass(frozen=True)
class TokenLogprob:
    """One scored position: the token there, its logprob, and the k likeliest alternatives."""

    token_id: int
    logprob: float
    top: tuple[TopLogprob, ...]
    token: str = ""


@dataclass
class Generation:
    """The result of one generate/chat call, the same in local and server mode."""

    text: str
    token_ids: list[int]
    prompt: str | list[int]
    prompt_ids: list[int]
    finish_reason: FinishReason
    model: str
    usage: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    logprobs: list[TokenLogprob] | None = None
    params: SamplingParams | None = None
    tenant: str = "default"

    def __str__(self) -> str:
        return self.text

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.params is not None:
            d["params"] = self.params.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Generation:
        params = d.get("params")
        logprobs = d.get("logprobs")
        return cls(
            text=d["text"],
            token_ids=list(d["token_ids"]),
            prompt=d["prompt"],
            prompt_ids=list(d["prompt_ids"]),
            finish_reason=d["finish_reason"],
            model=d["model"],
            usage=dict(d.get("usage") or {}),
            timings=dict(d.get("timings") or {}),
            logprobs=None if logprobs is None else [
                TokenLogprob(
                    token_id=e["token_id"], logprob=e["logprob"], token=e.get("token", ""),
                    top=tuple(TopLogprob(**t) for t in e["top"]),
                )
                for e in logprobs
            ],
            params=None if params is None else SamplingParams(
                **{**params, "stop": tuple(params.get("stop") or ())}
            ),
            tenant=d.get("tenant", "default"),
        )


@dataclass(frozen=True)
class ModelInfo:
    """One model the registry knows: a catalogue name, a loaded file, a file found on disk.

    size_bytes is the file's size; resident_bytes what the store holds of it now (weights and
    KV cache; 0 when not resident). source says where it came from: "catalogue", "loaded" (a
    path given to load), or where discovery found it ("models-dir", "hf-cache", "ollama",
    "lm-studio")."""

    id: str
    name: str
    path: str | None
    arch: str | None
    quant: str | None
    size_bytes: int | None
    loaded: bool
    weights: str | None = None
    aliases: tuple[str, ...] = ()
    resident_bytes: int = 0
    source: str | None = None
    on_disk: bool | None = None  # a file is there; None: as `path` says (a server hides paths)

    def __post_init__(self) -> None:
        if self.on_disk is None:
            object.__setattr__(self, "on_disk", bool(self.path))

    @property
    def state(self) -> str:
        """"resident" (in the store now), "on disk" (a file, not resident) or "not pulled"."""
        return "resident" if self.loaded else "on disk" if self.on_disk else "not pulled"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["aliases"] = list(self.aliases)
        return d


def size_text(n: int | None) -> str:
    """Bytes as listings show them: "91.2 MiB", "1.21 GiB", or "-" for none."""
    if not n:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


class OneReader:
    """The thread iterating a stream, one at a time: two threads taking pieces from one stream
    would split its text between them, and one would wait for ever for the end. Used by the
    local stream (kernel.py) and the server-mode stream (client.py)."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def claim(self, request_id: str | None) -> None:
        """Make this thread the reader; StreamBusyError while another live thread is."""
        me = threading.current_thread()
        with self._lock:
            other = self._thread
            if other is not None and other is not me and other.is_alive():
                raise StreamBusyError(
                    f"request {request_id}: thread {me.name!r} iterates this stream while "
                    f"thread {other.name!r} reads it; read a stream from one thread (other "
                    "threads can wait with result())", request_id=request_id)
            self._thread = me

    def release(self) -> None:
        with self._lock:
            if self._thread is threading.current_thread():
                self._thread = None
