"""`RealmPanel`: an anywidget panel to pick a model, set parameters, Generate and Stop.

The front end lives in real files (`static/panel.js`, `static/panel.css`). State crosses as synced
traits; actions cross as custom messages `{id, action, ...}` that always get a reply
`{id, ok, error?}`, never an exception into the comm. Generation runs in a worker thread, so the
kernel stays free to receive Stop while text streams in (trait updates from that thread reach the
page live, throttled to ~10 a second). Each generation asks for the top alternatives of every
token, so the panel can colour the text by probability (`probs`).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from pathlib import Path
from typing import Any

import anywidget
from traitlets import Bool, Dict, Float, Int, List, Unicode, observe

from .cell_output import UPDATE_INTERVAL_S
from .errors import InvalidRequestError, RealmError
from .types import Generation, SamplingParams, size_text

STATIC = Path(__file__).parent / "static"
PROB_ALTERNATIVES = 5  # top alternatives kept per token for the probability view
PARAMS = ("model", "chat", "temperature", "max_tokens", "top_k", "top_p", "min_p",
          "repeat_penalty", "seed", "stop")


class RealmPanel(anywidget.AnyWidget):
    """Model picker, prompt, parameters, Generate/Stop and the streaming text, in one widget.

    Sampling defaults are `SamplingParams`' own, as for `%%realm generate`.
    """

    _esm = STATIC / "panel.js"
    _css = STATIC / "panel.css"

    models = List(Dict(), help="[{name, label, loaded}] for the picker").tag(sync=True)
    model = Unicode("", help="the model Generate uses").tag(sync=True)
    prompt = Unicode("").tag(sync=True)
    chat = Bool(False, help="apply the model's chat template to the prompt").tag(sync=True)
    temperature = Float(SamplingParams.temperature).tag(sync=True)
    max_tokens = Int(SamplingParams.max_tokens).tag(sync=True)
    top_k = Int(SamplingParams.top_k).tag(sync=True)
    top_p = Float(SamplingParams.top_p).tag(sync=True)
    min_p = Float(SamplingParams.min_p).tag(sync=True)
    repeat_penalty = Float(SamplingParams.repeat_penalty).tag(sync=True)
    stop_strings = List(Unicode(), help="stop strings (generate(stop=...))").tag(sync=True)
    # A seed is a u64 and the page reads JSON numbers as doubles (exact to 2**53 only), so the
    # page edits it as text; `seed` is the same value for Python (None = a random one).
    seed = Int(None, allow_none=True)
    seed_text = Unicode("", help="the seed as the page shows it ('' = random)").tag(sync=True)
    last_seed = Unicode("", help="seed of the last generation (reproduces it)").tag(sync=True)
    show_probs = Bool(False, help="colour the text by each token's probability").tag(sync=True)
    probs = List(Dict(), help="[{t, p, top: [{t, p}]}] per generated token").tag(sync=True)
    text = Unicode("", help="the generated text so far").tag(sync=True)
    status = Unicode("idle", help="idle | loading | running | done | stopped | error").tag(
        sync=True)
    tokens = Int(0).tag(sync=True)
    tok_s = Float(0.0).tag(sync=True)
    error = Unicode("").tag(sync=True)
    running = Bool(False).tag(sync=True)

    def __init__(self, realm: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._realm = realm
        self._lock = threading.Lock()
        self._stream: Any = None
        self._stop_requested = False
        self._worker: threading.Thread | None = None
        self.generation: Generation | None = None
        self.on_msg(self._on_msg)
        try:
            self.refresh()
        except RealmError as e:
            self.error = e.message
        if not self.model:
            self.model = self.realm.default_model

    @property
    def realm(self) -> Any:
        """The SDK client this panel talks to (a local `Realm` unless one was given)."""
        if self._realm is None:
            from .sdk import Realm

            self._realm = Realm(mode="auto")
        return self._realm

    @observe("seed")
    def _seed_to_text(self, change: dict[str, Any]) -> None:
        text = "" if change["new"] is None else str(change["new"])
        if self.seed_text != text:
            self.seed_text = text

    @observe("seed_text")
    def _text_to_seed(self, change: dict[str, Any]) -> None:
        text = change["new"].strip()
        if not text:
            self.seed = None
        elif text.isdigit():
            self.seed = int(text)
        else:
            self.error = f"seed {text!r}: a whole number, or empty for a random one"

    # ----------------------------------------------------------------------- Python API

    def refresh(self) -> list[dict[str, Any]]:
        """Reread the registry into the picker: each model's name, then its aliases, each
        marked loaded or not, with what it holds resident (loaded) or its file's size and
        where it was found (not loaded)."""
        rows: list[dict[str, Any]] = []
        for m in self.realm.models():
            state = "loaded" if m.loaded else "not loaded"
            facts = (f"{size_text(m.resident_bytes)} resident" if m.loaded else
                     ", ".join(x for x in (m.source, size_text(m.size_bytes)) if x and x != "-"))
            detail = f"{facts}, {state}" if facts else state
            row = {"name": m.name, "loaded": m.loaded, "resident_bytes": m.resident_bytes,
                   "size_bytes": m.size_bytes, "source": m.source}
            rows.append({**row, "label": f"{m.name} ({detail})"})
            rows += [{**row, "name": a, "label": f"{a} (alias of {m.name}, {state})"}
                     for a in m.aliases if a != m.path]
        if rows != self.models:
            self.models = rows
        return rows

    def load(self, path: str, name: str | None = None) -> str:
        """Load a catalogue name or .gguf path, pick it, and return its id."""
        self.status, self.error = "loading", ""
        try:
            model_id = self.realm.load_model(path, name=name or None)
        except RealmError as e:
            self.status, self.error = "error", e.message
            raise
        self.refresh()
        self.model = name or next((m.name for m in self.realm.models() if m.id == model_id),
                                  path)
        self.status = "idle"
        return str(model_id)

    def generate(self, prompt: str | None = None, **params: Any) -> threading.Thread:
        """Start generating in a worker thread (the text streams into `text`); see `wait`."""
        unknown = sorted(set(params) - set(PARAMS))
        if unknown:
            raise InvalidRequestError(f"RealmPanel.generate got unknown {unknown}; it takes "
                                      f"{', '.join(PARAMS)}", param=unknown[0])
        if "stop" in params:  # the SDK's name; `stop()` is the method
            stop = params.pop("stop")
            params["stop_strings"] = [stop] if isinstance(stop, str) else list(stop or ())
        with self._lock:
            if self.running:
                raise InvalidRequestError("a generation is already running; Stop it first",
                                          param="running")
            with self.hold_sync():
                if prompt is not None:
                    self.prompt = prompt
                for key, value in params.items():
                    setattr(self, key, value)
            if not self.prompt.strip():
                raise InvalidRequestError("the prompt is empty: type something to complete",
                                          param="prompt")
            sampling = self._sampling()
            with self.hold_sync():
                self.running, self.status, self.error = True, "running", ""
                self.text, self.tokens, self.tok_s, self.probs = "", 0, 0.0, []
            self._stop_requested = False
            self._worker = threading.Thread(target=self._run, args=(sampling,),
                                            name="realm-panel", daemon=True)
            self._worker.start()
            return self._worker

    def stop(self) -> bool:
        """Stop the running generation (its partial text stays); False if none runs."""
        with self._lock:
            if not self.running:
                return False
            self._stop_requested = True
            if self._stream is not None:
                self._stream.cancel()
            return True

    def wait(self, timeout: float | None = None) -> Generation | None:
        """Block until the running generation ends; return it (None after an error)."""
        worker = self._worker
        if worker is not None:
            worker.join(timeout)
        return self.generation

    # ----------------------------------------------------------------------- worker

    def _sampling(self) -> dict[str, Any]:
        out: dict[str, Any] = {"temperature": self.temperature, "max_tokens": self.max_tokens,
                               "top_k": self.top_k, "top_p": self.top_p, "min_p": self.min_p,
                               "repeat_penalty": self.repeat_penalty, "seed": self.seed,
                               "stop": tuple(self.stop_strings)}
        SamplingParams(**out)  # raises InvalidRequestError naming the bad value
        return out

    def _run(self, sampling: dict[str, Any]) -> None:
        self.generation = None
        try:
            if self.chat:
                stream = self.realm.chat([{"role": "user", "content": self.prompt}],
                                         model=self.model, stream=True,
                                         logprobs=PROB_ALTERNATIVES, **sampling)
            else:
                stream = self.realm.generate(self.prompt, model=self.model, stream=True,
                                             logprobs=PROB_ALTERNATIVES, **sampling)
            with self._lock:
                self._stream = stream
                if self._stop_requested:
                    stream.cancel()
            text, n, t_first, last = "", 0, 0.0, 0.0
            for piece in stream:
                text += piece
                n += 1
                now = time.perf_counter()
                if not t_first:
                    t_first = now
                    self._quiet_refresh()  # the model is resident now: the picker says so
                if now - last >= UPDATE_INTERVAL_S:
                    last = now
                    with self.hold_sync():
                        self.text, self.tokens = text, n
                        self.tok_s = (n - 1) / (now - t_first) if n > 1 else 0.0
            g = stream.result()
            self.generation = g
            with self.hold_sync():
                self.text = g.text
                self.tokens = g.usage.get("completion_tokens", n)
                self.tok_s = round(float(g.timings.get("tokens_per_s", 0.0)), 2)
                self.probs = token_probs(g)
                self.last_seed = "" if g.params is None else str(g.params.seed)
                self.status = "stopped" if g.finish_reason == "cancelled" else "done"
        except RealmError as e:
            with self.hold_sync():
                self.status, self.error = "error", e.message
        except Exception as e:  # shown in the panel, never lost in this thread
            with self.hold_sync():
                self.status, self.error = "error", f"{type(e).__name__}: {e}"
        finally:
            with self._lock:
                self._stream = None
                self.running = False
            self._quiet_refresh()

    def _quiet_refresh(self) -> None:
        """Refresh the picker if the registry answers; a failure here is not the user's."""
        with contextlib.suppress(RealmError):
            self.refresh()

    # ----------------------------------------------------------------------- front-end requests

    def _on_msg(self, _widget: Any, content: Any, _buffers: Any) -> None:
        """Answer `{id, action, ...}` with `{id, ok, error?}`; load replies when it is done."""
        if not isinstance(content, dict) or "action" not in content:
            return
        rid, action = content.get("id"), content.get("action")
        try:
            if action == "generate":
                self.generate(**{k: content[k] for k in ("prompt", "model") if k in content})
            elif action == "stop":
                self.stop()
            elif action == "refresh":
                self.refresh()
            elif action == "load":
                path = str(content.get("path") or "").strip()
                if not path:
                    raise InvalidRequestError("give a catalogue name or a .gguf path to load",
                                              param="path")
                threading.Thread(target=self._load_and_reply, name="realm-panel-load",
                                 args=(rid, path, content.get("name") or None),
                                 daemon=True).start()
                return
            else:
                raise InvalidRequestError(f"unknown action {action!r}; actions: generate, "
                                          "stop, load, refresh", param="action")
            self._reply(rid, None)
        except RealmError as e:
            self._reply(rid, e.message)
        except Exception as e:
            self._reply(rid, f"{type(e).__name__}: {e}")

    def _load_and_reply(self, rid: Any, path: str, name: str | None) -> None:
        try:
            self.load(path, name)
            self._reply(rid, None)
        except RealmError as e:
            self._reply(rid, e.message)
        except Exception as e:
            self.status, self.error = "error", f"{type(e).__name__}: {e}"
            self._reply(rid, self.error)

    def _reply(self, rid: Any, error: str | None) -> None:
        if error is not None:
            self.error = error
        self.send({"id": rid, "ok": error is None, **({"error": error} if error else {})})


def token_probs(g: Generation) -> list[dict[str, Any]]:
    """Each generated token's text and probability, with its top alternatives (from logprobs)."""
    return [{"t": lp.token, "p": round(math.exp(lp.logprob), 4),
             "top": [{"t": t.token, "p": round(math.exp(t.logprob), 4)} for t in lp.top]}
            for lp in g.logprobs or []]
