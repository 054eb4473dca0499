"""The host side of one request: what the guest's `realm_host` imports do, in Python and JAX.

`RequestHost` implements `tenants.TenantHost` for one generation: `forward` goes through the
model's scheduler (batched jitted steps over the shared store), `emit` detokenizes incrementally,
applies stop strings, scores logprobs when asked, and streams text pieces out; it answers 1
(stop) on a stop string, end-of-generation, max tokens or cancellation.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from .abi import ErrorCode
from .scheduler import Scheduler, Sequence
from .store import LayerStore, ModelEntry
from .tenants import Cancelled, GuestError
from .types import FinishReason, SamplingParams, TokenLogprob, TopLogprob

log = logging.getLogger("realm_nb.guest")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - np.max(logits, axis=-1, keepdims=True)
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def score(logits: np.ndarray, token: int, k: int, token_text: Callable[[int], str]) -> TokenLogprob:
    """Logprob of `token` under `logits` [V], and the k likeliest tokens."""
    lp = log_softmax(logits.astype(np.float64))
    top: tuple[TopLogprob, ...] = ()
    if k > 0:
        idx = np.argpartition(-lp, k - 1)[:k]
        idx = idx[np.argsort(-lp[idx], kind="stable")]
        top = tuple(TopLogprob(int(i), float(lp[i]), token_text(int(i))) for i in idx)
    return TokenLogprob(int(token), float(lp[token]), top, token_text(int(token)))


def score_rows(logits: np.ndarray, tokens: np.ndarray, k: int,
               token_text: Callable[[int], str]) -> list[TokenLogprob]:
    """`score` for many positions at once: row i of logits [m, V] scores tokens[i] (len m).
    Vectorized, in f32 with the log-sum-exp in f64: a 128-token chunk of a 49k vocabulary is a
    few tens of ms, where a position at a time in f64 took 2 ms each."""
    if len(tokens) == 0:
        return []
    x = logits[: len(tokens)]
    peak = x.max(axis=-1, keepdims=True)
    lse = np.log(np.exp((x - peak).astype(np.float64)).sum(axis=-1, keepdims=True)) + peak
    rows = np.arange(len(tokens))
    chosen = x[rows, tokens].astype(np.float64) - lse[:, 0]
    tops: list[tuple[TopLogprob, ...]] = [()] * len(tokens)
    if k > 0:
        idx = np.argpartition(-x, k - 1, axis=-1)[:, :k]
        vals = np.take_along_axis(x, idx, axis=-1).astype(np.float64) - lse
        order = np.argsort(-vals, axis=-1, kind="stable")
        idx, vals = np.take_along_axis(idx, order, -1), np.take_along_axis(vals, order, -1)
        tops = [tuple(TopLogprob(int(i), float(v), token_text(int(i)))
                      for i, v in zip(ri, rv, strict=True))
                for ri, rv in zip(idx, vals, strict=True)]
    return [TokenLogprob(int(t), float(c), top, token_text(int(t)))
            for t, c, top in zip(tokens, chosen, tops, strict=True)]


class RequestHost:
    """One generation's host state; the guest thread calls into it."""

    def __init__(self, *, store: LayerStore, entry: ModelEntry, scheduler: Scheduler,
                 seq: Sequence, prompt_ids: list[int], params: SamplingParams,
                 logprobs: int | None, echo: bool, on_text: Callable[[str], None],
                 cancel_event: threading.Event) -> None:
        self.store = store
        self.entry = entry
        self.scheduler = scheduler
        self.seq = seq
        self.prompt_ids = prompt_ids
        self.params = params
        self.logprobs = logprobs
        self.echo = echo
        self.on_text = on_text
        self.cancel_event = cancel_event
        self.codec = entry.codec
        self.eos_ids = set(entry.codec.eos_ids)
        self.tokens: list[int] = []
        self.text = ""  # decoded text, cut at a stop string when one matched
        self._raw = ""  # decoded text of the settled tokens, before any stop cut
        self._prefix_at = 0  # tokens[_prefix_at:_read_at] is the context decoded before new ones
        self._read_at = 0
        self.sent = 0  # characters of `text` already streamed
        self.finish_reason: FinishReason | None = None
        self.scored: list[TokenLogprob] = []
        self._last_logits: np.ndarray | None = None
        self.t_start = time.perf_counter()
        self.t_first_token: float | None = None
        self.t_prompt_done: float | None = None
        self.forwards = 0

    # ------------------------------------------------------------------ realm_host imports

    def forward(self, tokens: np.ndarray) -> np.ndarray:
        if self.cancel_event.is_set():
            raise Cancelled("the request was cancelled")
        first = self.forwards == 0
        self.forwards += 1
        if first and list(tokens) != self.prompt_ids:
            raise GuestError(  # the guest's fault, not the request's
                f"tenant {self.seq.tenant!r}: the guest's first forward was {len(tokens)} "
                f"tokens other than the request's {len(self.prompt_ids)}-token prompt; the ABI "
                "starts with the prompt", abi_code=ErrorCode.BAD_REQUEST)
        if first and self.echo and self.logprobs is not None:
            ids = np.asarray(tokens, np.int64)
            k = self.logprobs or 0

            def score_chunk(chunk: np.ndarray, at: int) -> list[TokenLogprob]:
                # position p's logits score the prompt's token p + 1 (the last scores none)
                return score_rows(chunk, ids[at + 1 : at + 1 + len(chunk)], k,
                                  self.codec.token_text)

            logits, parts = self.scheduler.forward_reduced(self.seq, tokens, score_chunk)
            for part in parts:
                self.scored.extend(part)
        else:
            logits = self.scheduler.forward(self.seq, tokens)
        if first:
            self.t_prompt_done = time.perf_counter()
        self._last_logits = logits if self.logprobs is not None else None
        return logits

    def emit(self, token: int) -> int:
        if self.t_first_token is None:
            self.t_first_token = time.perf_counter()
        if token in self.eos_ids:
            return self._finish("stop")
        if self._last_logits is not None:
            self.scored.append(score(self._last_logits, token, self.logprobs or 0,
                                     self.codec.token_text))
        self.tokens.append(token)
        if self._update_text():
            return self._finish("stop", stopped=True)
        if self.cancel_event.is_set():
            return self._finish("cancelled")
        if len(self.tokens) >= self.params.max_tokens:
            return self._finish("length")
        self._flush(final=False)
        return 0

    def load_layer(self, layer: int) -> None:
        self.store.load_layer(self.entry, layer)

    def log(self, message: str) -> None:
        log.info("tenant %s: %s", self.seq.tenant, message)

    # ------------------------------------------------------------------ text

    def _update_text(self, final: bool = False) -> bool:
        """Add the new tokens' text; True when a stop string appeared (text is cut before it).

        Incremental: only the tokens since the last settled point are decoded, against a short
        prefix so that merges across the boundary decode right. Text that ends inside a UTF-8
        character waits for the next token (unless final), so the stream never shows U+FFFD.
        """
        prefix = self.codec.decode(self.tokens[self._prefix_at : self._read_at])
        full = self.codec.decode(self.tokens[self._prefix_at :])
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            # a generation cut inside a character (max tokens, cancel) drops the partial one
            self._raw += full[len(prefix) :].rstrip("\ufffd") if final else full[len(prefix) :]
            self._prefix_at, self._read_at = self._read_at, len(self.tokens)
        for stop in self.params.stop:
            at = self._raw.find(stop, max(0, self.sent - len(stop) + 1))
            if at >= 0:
                self.text = self._raw[:at]
                return True
        self.text = self._raw
        return False

    def _finish(self, reason: FinishReason, stopped: bool = False) -> int:
        if not stopped and self._update_text(final=True):
            reason = "stop"  # the held-back tail completed a stop string
        self.finish_reason = reason
        self._flush(final=True)
        return 1

    def finish_text(self) -> None:
        """Settle and stream the last text when the guest ended without a finish of ours."""
        self._update_text(final=True)
        self._flush(final=True)

    def _flush(self, final: bool) -> None:
        """Stream what is safe to show: never half a UTF-8 character nor a possible stop prefix."""
        end = len(self.text)
        if not final:
            for stop in self.params.stop:
                for n in range(min(len(stop) - 1, end), 0, -1):
                    if self.text[:end].endswith(stop[:n]):
                        end = min(end, len(self.text[:end]) - n)
                        break
        if end > self.sent:
            piece = self.text[self.sent : end]
            self.sent = end
            self.on_text(piece)
