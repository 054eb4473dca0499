"""`RealmPanel`: an anywidget panel to pick a model, set parameters, Generate and Stop.

The front end lives in real files (`static/panel.js`, `static/panel.css`). State crosses as synced
traits; actions cross as custom messages `{id, action, ...}` that always get a reply
`{id, ok, error?}`, never an exception into the comm. Generation runs in a worker thread, so the
kernel stays free to receive Stop while text streams in (trait updates from that thread reach the
page live, throttled to ~10 a second).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import anywidget
from traitlets import Bool, Dict, Float, Int, List, Unicode

from .errors import InvalidRequestError, RealmError
from .types import Generation, SamplingParams

STATIC = Path(__file__).parent / "static"
UPDATE_INTERVAL_S = 0.1


class RealmPanel(anywidget.AnyWidget):
    """Model picker, prompt, parameters, Generate/Stop and the streaming text, in one widget."""

    _esm = STATIC / "panel.js"
    _css = STATIC / "panel.css"

    models = List(Dict(), help="[{name, label, loaded}] for the picker").tag(sync=True)
    model = Unicode("", help="the model Generate uses").tag(sync=True)
    prompt = Unicode("").tag(sync=True)
    chat = Bool(False, help="apply the model's chat template to the prompt").tag(sync=True)
    temperature = Float(0.8).tag(sync=True)
    max_tokens = Int(64).tag(sync=True)
    top_p = Float(0.95).tag(sync=True)
    seed = Int(None, allow_none=True).tag(sync=True)
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
            self.model = self.realm.model

    @property
    def realm(self) -> Any:
        """The SDK client this panel talks to (a local `Realm` unless one was given)."""
        if self._realm is None:
            from .sdk import Realm

            self._realm = Realm(mode="auto")
        return self._realm

    # ----------------------------------------------------------------------- Python API

    def refresh(self) -> list[dict[str, Any]]:
        """Reread the registry into the picker: each model's name, then its aliases."""
        rows: list[dict[str, Any]] = []
        for m in self.realm.models():
            rows.append({"name": m.name, "label": m.name + ("" if m.loaded else " (not loaded)"),
                         "loaded": m.loaded})
            rows += [{"name": a, "label": f"{a} (alias of {m.name})", "loaded": m.loaded}
                     for a in m.aliases]
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
        unknown = sorted(set(params) - {"model", "chat", "temperature", "max_tokens", "top_p",
                                        "seed"})
        if unknown:
            raise InvalidRequestError(f"RealmPanel.generate got unknown {unknown}; it takes "
                                      "model, chat, temperature, max_tokens, top_p, seed",
                                      param=unknown[0])
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
                self.text, self.tokens, self.tok_s = "", 0, 0.0
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
                               "top_p": self.top_p, "seed": self.seed}
        SamplingParams(**out)  # raises InvalidRequestError naming the bad value
        return out

    def _run(self, sampling: dict[str, Any]) -> None:
        self.generation = None
        try:
            if self.chat:
                stream = self.realm.chat([{"role": "user", "content": self.prompt}],
                                         model=self.model, stream=True, **sampling)
            else:
                stream = self.realm.generate(self.prompt, model=self.model, stream=True,
                                             **sampling)
            with self._lock:
                self._stream = stream
                if self._stop_requested:
                    stream.cancel()
            text, n, t_first, last = "", 0, 0.0, 0.0
            for piece in stream:
                text += piece
                n += 1
                now = time.perf_counter()
                t_first = t_first or now
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
