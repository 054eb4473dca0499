"""What a `%%realm generate` / `%%realm chat` cell shows while it streams and once it is done.

`LiveCell` streams pieces into one display handle (at most every UPDATE_INTERVAL_S; plain stdout
in a terminal); `RealmOutput` renders text, Markdown or code with a footer, and carries the
generation's metadata (`output_metadata`) with the output, the seed as an exact string.
"""

from __future__ import annotations

import html
import re
import sys
import time
from typing import Any

from IPython.core.displaypub import DisplayPublisher
from IPython.display import display

from .types import Generation

UPDATE_INTERVAL_S = 0.1  # streamed cell output: at most ~10 display updates a second


def code_of(text: str) -> str:
    """The first fenced code block of a reply, or the whole reply when it has none."""
    m = re.search(r"```[\w+-]*\n(.*?)(?:```|\Z)", text, re.S)
    return (m.group(1) if m else text).strip("\n")


def code_cell(g: Generation, continuation: bool) -> str:
    """The code `-f code` inserts: a chat reply's code, or, for a plain completion (which goes
    on from the prompt's last character), the prompt's code followed by its continuation.

    A completion of plain code often ends its (unopened) block with a fence: the code stops
    there. One that starts with a fence opens a block of its own: that block is the code.
    """
    if not continuation or not isinstance(g.prompt, str):
        return code_of(g.text)
    if "```" in g.prompt:
        return code_of(g.prompt + g.text)
    before, fence, _ = g.text.partition("```")
    if fence and not before.strip():
        return code_of(g.text)
    return (g.prompt + before).strip("\n")


# Model text reads as text: wrapped at word boundaries (JupyterLab gives output <pre> elements
# `word-break: break-all`, and a <pre> directly in an HTML output a 2em margin), its own line
# breaks kept, colours from the theme. Inline, so that it holds wherever the output is shown.
_TEXT_STYLE = ("white-space:pre-wrap;word-break:normal;overflow-wrap:break-word;margin:0;"
               "padding:0;font-family:var(--jp-content-font-family,sans-serif);"
               "font-size:var(--jp-content-font-size1,14px);line-height:1.5;"
               "color:var(--jp-content-font-color1,inherit)")
_FOOTER_STYLE = ("opacity:.65;font-size:85%;margin-top:.4em;"
                 "font-family:var(--jp-ui-font-family,sans-serif)")


def _text_html(text: str, cls: str, tail: str = "") -> str:
    """Text as a wrapped block; the model's leading blank lines and spaces are not shown."""
    return f'<div class="{cls}" style="{_TEXT_STYLE}">{html.escape(text.lstrip())}{tail}</div>'


class RealmOutput:
    """What a `%%realm generate` / `chat` cell shows: the text so far, then the result in its
    format, with a footer and the generation's metadata."""

    def __init__(self, text: str = "", fmt: str = "text", meta: dict[str, Any] | None = None,
                 live: bool = True, status: bool = False, code: str | None = None) -> None:
        self.text, self.fmt, self.meta, self.live = text, fmt, meta or {}, live
        self.status = status  # a progress line, not generated text
        self.code = code  # -f code: what is shown and inserted (None: the reply's code)

    def footer(self) -> str:
        m = self.meta
        if not m:
            return ""
        parts = [m["model"], f"{m['tokens']} tokens", f"{m['tok_s']:.1f} tok/s",
                 f"seed {m['seed']}", f"temperature {m['params'].get('temperature')}"]
        finish = m["finish_reason"]
        if finish == "length":
            what = "code" if self.fmt == "code" else "text"
            parts.append(f"finish: length (the {what} was cut at the token limit, "
                         f"-n {m['params'].get('max_tokens')})")
        else:
            parts.append(f"finish: {finish}")
        if finish == "cancelled":
            parts.append("interrupted, partial text kept")
        if m.get("chat_turn"):
            parts.append(f"chat turn {m['chat_turn']}")
        if self.fmt == "code" and m.get("continuation"):
            parts.append("code: the prompt and its continuation")
        return " · ".join(str(p) for p in parts)

    def _repr_mimebundle_(self, include: Any = None,
                          exclude: Any = None) -> tuple[dict[str, str], dict[str, Any]]:
        if self.status:
            line = html.escape(self.text)
            return ({"text/plain": self.text,
                     "text/html": f'<div class="realm-progress" style="opacity:.7">{line}</div>'},
                    {})
        data = {"text/plain": self.text}
        foot = f'<div class="realm-footer" style="{_FOOTER_STYLE}">' \
               f"{html.escape(self.footer())}</div>" if self.meta else ""
        if self.live:
            data["text/html"] = _text_html(self.text, "realm-live", "▌")
        elif self.fmt == "markdown":
            data["text/markdown"] = self.text.lstrip("\n") + (
                f"\n\n<sub>{html.escape(self.footer())}</sub>" if self.meta else "")
        elif self.fmt == "code":
            from IPython.display import Code

            code = Code(code_of(self.text) if self.code is None else self.code,
                        language="python")
            data["text/html"] = code._repr_html_() + foot
        else:
            data["text/html"] = _text_html(self.text, "realm-text") + foot
        return data, ({"realm_nb": self.meta} if self.meta else {})


def output_metadata(g: Generation, mode: str, **extra: Any) -> dict[str, Any]:
    """Model, parameters, seed, tokens and speed of one generation (stored with the output).

    The seed is a string: it is a u64, and front ends read JSON numbers as doubles, exact only
    up to 2**53, so a number would come back from a saved notebook as another seed.
    """
    params = g.params.to_dict() if g.params is not None else {}
    if params.get("seed") is not None:
        params["seed"] = str(params["seed"])
    return {"model": g.model, "mode": mode, "tenant": g.tenant, "params": params,
            "seed": params.get("seed"), "tokens": g.usage.get("completion_tokens", 0),
            "prompt_tokens": g.usage.get("prompt_tokens", 0),
            "tok_s": round(float(g.timings.get("tokens_per_s", 0.0)), 2),
            "finish_reason": g.finish_reason, **extra}


class LiveCell:
    """A display handle updated at most every UPDATE_INTERVAL_S, or plain stdout in a terminal."""

    def __init__(self, shell: Any, fmt: str) -> None:
        self.fmt = fmt
        self.text = ""
        self.terminal = type(shell.display_pub) is DisplayPublisher
        self.handle: Any = None
        self.last = 0.0

    def progress(self, line: str, terminal: bool = True) -> None:
        """Show a status line (cold start: loading layers, compiling) until text comes."""
        if self.terminal:
            if line and terminal:
                sys.stderr.write(line + "\n")
            return
        self._show(RealmOutput(line, "text", live=False, status=True))

    def on_progress(self, event: dict[str, Any]) -> None:
        """A cold-start event of the stream → the status line."""
        if self.text:
            return
        stage, model = event.get("stage"), event.get("model", "")
        if stage == "loading":
            line = f"realm-nb: loading {model}: layer {event.get('done')}/{event.get('total')}"
        elif stage == "compiling":
            line = f"realm-nb: compiling {model} for this machine (first use)…"
        else:
            line = f"realm-nb: {stage}…"
        now = time.monotonic()
        if now - self.last >= UPDATE_INTERVAL_S or stage != "loading":
            self.last = now
            self.progress(line)

    def append(self, piece: str) -> None:
        self.text += piece
        if self.terminal:
            sys.stdout.write(piece)
            sys.stdout.flush()
            return
        now = time.monotonic()
        if now - self.last >= UPDATE_INTERVAL_S:
            self.last = now
            self._show(RealmOutput(self.text, self.fmt, live=True))

    def finish(self, text: str, meta: dict[str, Any], code: str | None = None) -> None:
        out = RealmOutput(text, self.fmt, meta, live=False, code=code)
        if self.terminal:
            sys.stdout.write(("\n" if self.text else text + "\n") + out.footer() + "\n")
            return
        self._show(out)

    def _show(self, obj: RealmOutput) -> None:
        if self.handle is None:
            self.handle = display(obj, display_id=True)
        else:
            self.handle.update(obj)
