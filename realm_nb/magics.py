"""The IPython face: `%load_ext realm_nb`, the `%realm` line verbs and `%%realm generate`.

Grammar apart from actions (after jupyter-ai's magics): `build_parser` is the one argument
grammar, built on IPython's `MagicArgumentParser` so that a bad flag is a one-line `UsageError`;
each verb has one `handle_<verb>` method. Settings are traitlets with `config=True`:

    %config RealmMagics.default_model = "smollm2-135m"

Loading the extension imports neither JAX nor wasmtime: the `Realm` is made on first use.
"""

from __future__ import annotations

import argparse
import html
import re
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import Any, NoReturn

from IPython.core.displaypub import DisplayPublisher
from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import MagicArgumentParser
from IPython.display import display
from IPython.utils.process import arg_split
from traitlets import Float, Int, Unicode

from .catalogue import DEFAULT_MODEL
from .errors import PullError, RealmError, ServerConnectionError
from .types import Generation

UPDATE_INTERVAL_S = 0.1  # streamed cell output: at most ~10 display updates a second
FORMATS = ("text", "markdown", "code")

# ----------------------------------------------------------------------------- grammar


class _Parser(MagicArgumentParser):
    """A MagicArgumentParser whose errors name the verb and fit on one line."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.HelpFormatter)  # no reST "::" in help
        super().__init__(*args, **kwargs)

    def parse_argstring(self, argstring: str) -> argparse.Namespace:
        return self.parse_args(arg_split(argstring, posix=True))  # quotes group, then go

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {' '.join(message.split())} (see %realm help)")


def build_parser() -> _Parser:
    """The whole `%realm` / `%%realm` grammar: one sub-parser per verb."""
    p = _Parser(prog="%realm", description="Run GGUF models in this kernel (realm-nb).")
    sub = p.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    sub.required = True

    v = sub.add_parser("help", help="show this help, or one verb's", prog="%realm help")
    v.add_argument("topic", nargs="?", help="a verb")
    sub.add_parser("list", help="models in the registry (catalogue and loaded)",
                   prog="%realm list")
    v = sub.add_parser("use", help="make NAME the default model", prog="%realm use")
    v.add_argument("name")
    v = sub.add_parser("load", help="load a catalogue name or a .gguf path", prog="%realm load")
    v.add_argument("path")
    v.add_argument("--name", help="name to register the model under")
    v = sub.add_parser("unload", help="drop a model's weights", prog="%realm unload")
    v.add_argument("name")
    v = sub.add_parser("pull", help="fetch a catalogue model into the cache", prog="%realm pull")
    v.add_argument("name", nargs="?", default=DEFAULT_MODEL)
    v = sub.add_parser("connect", help="talk to a realm-nb server at URL", prog="%realm connect")
    v.add_argument("url")
    v.add_argument("--api-key", help="API key (maps to a tenant on the server)")
    sub.add_parser("disconnect", help="back to the in-process kernel", prog="%realm disconnect")
    sub.add_parser("status", help="mode, default model, tenants, counters", prog="%realm status")
    sub.add_parser("panel", help="the interactive panel (RealmPanel)", prog="%realm panel")

    v = sub.add_parser("generate", help="(cell magic) complete the cell's text",
                       prog="%%realm generate")
    v.add_argument("-m", "--model", help="model name (default: RealmMagics.default_model)")
    v.add_argument("-n", "--max-tokens", type=int, help="most tokens to generate")
    v.add_argument("-t", "--temperature", type=float, help="0 = greedy")
    v.add_argument("--top-k", type=int)
    v.add_argument("--top-p", type=float)
    v.add_argument("--seed", type=int, help="seed of the sampler (reproducible output)")
    v.add_argument("--stop", action="append", help="stop string, \\n escapes allowed (repeatable)")
    v.add_argument("-o", "--output", metavar="VAR", help="store the Generation in VAR")
    v.add_argument("-f", "--format", choices=FORMATS, default="text",
                   help="render the result as text, markdown, or code (inserted as a new cell)")
    v.add_argument("--no-stream", action="store_true", help="show the result only at the end")
    v.add_argument("--chat", action="store_true", help="apply the model's chat template")
    v.add_argument("--no-interpolate", action="store_true",
                   help="send the cell as written, without filling {name} / {In[n]} / {Out[n]}")
    return p


PARSER = build_parser()


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


# ----------------------------------------------------------------------------- interpolation

# {name} or {In[n]} / {Out[n]}, never inside doubled braces ({{name}} stays as written).
_FIELD = re.compile(r"(?<!\{)\{(?:(?P<hist>In|Out)\[(?P<n>\d+)\]|(?P<name>[A-Za-z_]\w*))\}(?!\})")


def interpolate(text: str, namespace: Mapping[str, Any]) -> str:
    """Fill {identifier} and {In[n]}/{Out[n]} that exist in `namespace`; leave every other brace.

    Dict and set comprehensions, JSON, LaTeX and f-string bodies pass through untouched, because
    only a bare identifier or a history reference between single braces is a field, and only
    when it names something that exists.
    """

    def fill(m: re.Match[str]) -> str:
        if m.group("name") is not None:
            name = m.group("name")
            return str(namespace[name]) if name in namespace else m.group(0)
        n = int(m.group("n"))
        hist = namespace.get(m.group("hist"))
        if isinstance(hist, Mapping):
            return str(hist[n]) if n in hist else m.group(0)
        if isinstance(hist, (list, tuple)) and n < len(hist) and (n > 0 or hist[0]):
            return str(hist[n])
        return m.group(0)

    return _FIELD.sub(fill, text)


def unescape_stop(text: str) -> str:
    """A --stop value with its backslash escapes (\\n, \\t, \\u2026) decoded; other characters
    (é, emoji) stay as typed. `unicode_escape` alone reads its input as latin-1 bytes, which
    turns "é" into "Ã©"; the non-latin-1 ones go in as escapes of their own here."""
    try:
        return text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as e:
        raise UsageError(f"%%realm generate: --stop {text!r} has a broken escape ({e.reason}); "
                         "write a backslash as \\\\") from None


# ----------------------------------------------------------------------------- cell output


def code_of(text: str) -> str:
    """The first fenced code block of a reply, or the whole reply when it has none."""
    m = re.search(r"```[\w+-]*\n(.*?)(?:```|\Z)", text, re.S)
    return (m.group(1) if m else text).strip("\n")


class RealmOutput:
    """What a `%%realm generate` cell shows: the text so far, then the result in its format."""

    def __init__(self, text: str = "", fmt: str = "text", meta: dict[str, Any] | None = None,
                 live: bool = True, status: bool = False) -> None:
        self.text, self.fmt, self.meta, self.live = text, fmt, meta or {}, live
        self.status = status  # a progress line, not generated text

    def footer(self) -> str:
        m = self.meta
        if not m:
            return ""
        parts = [m["model"], f"{m['tokens']} tokens", f"{m['tok_s']:.1f} tok/s",
                 f"seed {m['seed']}", f"temperature {m['params'].get('temperature')}",
                 f"finish: {m['finish_reason']}"]
        if m["finish_reason"] == "cancelled":
            parts.append("interrupted, partial text kept")
        return " · ".join(str(p) for p in parts)

    def _repr_mimebundle_(self, include: Any = None,
                          exclude: Any = None) -> tuple[dict[str, str], dict[str, Any]]:
        if self.status:
            line = html.escape(self.text)
            return ({"text/plain": self.text,
                     "text/html": f'<div class="realm-progress" style="opacity:.7">{line}</div>'},
                    {})
        data = {"text/plain": self.text}
        foot = f'<div class="realm-footer" style="opacity:.6;font-size:85%">' \
               f"{html.escape(self.footer())}</div>" if self.meta else ""
        if self.live:
            data["text/html"] = f'<pre class="realm-live">{html.escape(self.text)}▌</pre>'
        elif self.fmt == "markdown":
            data["text/markdown"] = self.text + (f"\n\n<sub>{self.footer()}</sub>"
                                                 if self.meta else "")
        elif self.fmt == "code":
            from IPython.display import Code

            code = Code(code_of(self.text), language="python")
            data["text/html"] = code._repr_html_() + foot
        else:
            data["text/html"] = f'<pre class="realm-text">{html.escape(self.text)}</pre>{foot}'
        return data, ({"realm_nb": self.meta} if self.meta else {})


def output_metadata(g: Generation, mode: str) -> dict[str, Any]:
    """Model, parameters, seed, tokens and speed of one generation (stored with the output)."""
    params = g.params.to_dict() if g.params is not None else {}
    return {"model": g.model, "mode": mode, "tenant": g.tenant, "params": params,
            "seed": params.get("seed"), "tokens": g.usage.get("completion_tokens", 0),
            "prompt_tokens": g.usage.get("prompt_tokens", 0),
            "tok_s": round(float(g.timings.get("tokens_per_s", 0.0)), 2),
            "finish_reason": g.finish_reason}


class _LiveCell:
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

    def finish(self, text: str, meta: dict[str, Any]) -> None:
        out = RealmOutput(text, self.fmt, meta, live=False)
        if self.terminal:
            sys.stdout.write(("\n" if self.text else text + "\n") + out.footer() + "\n")
            return
        self._show(out)

    def _show(self, obj: RealmOutput) -> None:
        if self.handle is None:
            self.handle = display(obj, display_id=True)
        else:
            self.handle.update(obj)


# ----------------------------------------------------------------------------- errors


@contextmanager
def _user_errors() -> Iterator[None]:
    """RealmErrors caused by the user's input or setup become one-line UsageErrors."""
    try:
        yield
    except RealmError as e:
        if e.status_code < 500 or isinstance(e, (PullError, ServerConnectionError)):
            raise UsageError(f"{type(e).__name__}: {' '.join(e.message.split())}") from None
        raise


# ----------------------------------------------------------------------------- the magics


@magics_class
class RealmMagics(Magics):
    """`%realm VERB ...` and `%%realm generate ...`; see `%realm help`."""

    default_model = Unicode(DEFAULT_MODEL, help="model used when -m is not given").tag(
        config=True)
    max_tokens = Int(128, help="tokens generated when -n is not given").tag(config=True)
    temperature = Float(0.8, help="temperature when -t is not given (0 = greedy)").tag(
        config=True)
    tenant = Unicode("", help="tenant id of this notebook's requests (default: the notebook's "
                     "path in Jupyter, else 'default')").tag(config=True)

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        self._realm: Any = None
        self._endpoint: str | None = None
        self._api_key: str | None = None

    @property
    def client(self) -> Any:
        """The `Realm` every verb uses, made on first use: the runtime this kernel finds (the
        Jupyter server's shared one), else in-process (only then does JAX load here)."""
        if self._realm is None:
            from .sdk import Realm

            with _user_errors():
                if self._endpoint:
                    self._realm = Realm(mode="server", endpoint=self._endpoint,
                                        api_key=self._api_key, default_model=self.default_model,
                                        tenant=self.tenant or None)
                else:
                    self._realm = Realm(mode="auto", default_model=self.default_model,
                                        tenant=self.tenant or None)
        return self._realm

    def where(self) -> str:
        """Where this notebook's requests run, for humans (never shows a key)."""
        realm = self.client
        if realm.mode == "local":
            return "in this kernel"
        if realm.runtime is not None and realm.runtime.names_tenants:
            return f"the shared runtime of this Jupyter server ({realm.endpoint})"
        return f"the server at {realm.endpoint}"

    @line_cell_magic
    def realm(self, line: str, cell: str | None = None) -> Any:
        """realm-nb: %realm help | list | use | load | unload | pull | connect | disconnect |
        status | panel, and %%realm generate [flags] with the prompt in the cell."""
        args = PARSER.parse_argstring(line)
        if args.verb == "generate":
            if cell is None:
                raise UsageError("generate is a cell magic: write %%realm generate [flags] and "
                                 "the prompt on the lines below it")
            return self.handle_generate(args, cell)
        if cell is not None:
            raise UsageError(f"%%realm {args.verb}: only generate takes a cell; use "
                             f"%realm {args.verb} on one line")
        handler = getattr(self, f"handle_{args.verb}")
        return handler(args)

    # -- one handler per verb --------------------------------------------------------------

    def handle_help(self, args: argparse.Namespace) -> None:
        verbs = _subparsers(PARSER)
        if args.topic:
            if args.topic not in verbs:
                raise UsageError(f"%realm help: no verb {args.topic!r}; verbs: "
                                 f"{', '.join(verbs)}")
            print(verbs[args.topic].format_help())
            return
        print(PARSER.description)
        for sub in verbs.values():
            print("  " + " ".join(sub.format_usage().split()[1:]))
        print("Settings: %config RealmMagics.default_model = 'NAME' (also max_tokens, "
              "temperature, tenant). More: %realm help VERB")

    def handle_list(self, args: argparse.Namespace) -> None:
        with _user_errors():
            models = self.client.models()
        print(f"{'name':24} {'loaded':6} {'arch':8} {'quant':6} {'size':>10}  aliases")
        for m in models:
            size = f"{m.size_bytes / 2**20:.1f} MiB" if m.size_bytes else "-"
            mark = "*" if self.default_model in (m.name, *m.aliases) else " "
            print(f"{mark}{m.name:23} {'yes' if m.loaded else 'no':6} {m.arch or '-':8} "
                  f"{m.quant or '-':6} {size:>10}  {', '.join(m.aliases) or '-'}")

    def handle_use(self, args: argparse.Namespace) -> None:
        with _user_errors():
            models = self.client.models()
        known = {n for m in models for n in (m.name, m.id, *m.aliases)}
        if args.name not in known:
            raise UsageError(f"%realm use: unknown model {args.name!r}; known: "
                             f"{', '.join(m.name for m in models)} (a .gguf file: %realm load "
                             "PATH --name NAME first)")
        self.default_model = args.name
        print(f"default model: {args.name}")

    def handle_load(self, args: argparse.Namespace) -> None:
        with _user_errors():
            model_id = self.client.load_model(args.path, name=args.name)
        print(f"loaded {args.name or args.path} (id {model_id})")

    def handle_unload(self, args: argparse.Namespace) -> None:
        with _user_errors():
            self.client.unload_model(args.name)
        print(f"unloaded {args.name}")

    def handle_pull(self, args: argparse.Namespace) -> None:
        from .catalogue import pull

        with _user_errors():
            path = pull(args.name)
        print(path)

    def handle_connect(self, args: argparse.Namespace) -> None:
        old = (self._realm, self._endpoint, self._api_key)
        self._realm, self._endpoint, self._api_key = None, args.url, args.api_key
        try:
            with _user_errors():
                n = len(self.client.models())
        except BaseException:
            self._realm, self._endpoint, self._api_key = old
            raise
        print(f"connected to {args.url} ({n} models); %realm disconnect goes back to this kernel")

    def handle_disconnect(self, args: argparse.Namespace) -> None:
        if not self._endpoint:
            raise UsageError("%realm disconnect: not connected to a server")
        self._realm, self._endpoint, self._api_key = None, None, None
        print(f"disconnected; now using {self.where()}")

    def handle_status(self, args: argparse.Namespace) -> None:
        with _user_errors():
            stats = self.client.stats()
        requests = stats.get("requests", {})
        print(f"realm-nb: {self.client.mode} mode, {self.where()}; default model "
              f"{self.default_model}, tenant {stats.get('tenant', self.client.tenant)}")
        store = stats.get("store", {})
        if store:
            print("  store: " + ", ".join(f"{k} {v}" for k, v in store.items()
                                          if not isinstance(v, (list, dict))))
        tenants = stats.get("tenants", [])
        print(f"  tenants: {len(tenants)}, running requests: {stats.get('running', 0)}, "
              f"requests: {requests}")
        for t in tenants:
            mark = "*" if t.get("id") == stats.get("tenant", self.client.tenant) else " "
            print(f"  {mark} {t.get('id')}: {t.get('state')}, {t.get('guests')} guest(s), "
                  f"{t.get('requests')} request(s), {t.get('tokens')} tokens, fuel "
                  f"{t.get('fuel_used')}, memory {int(t.get('memory_bytes', 0)) // 1024} KiB")

    def handle_panel(self, args: argparse.Namespace) -> Any:
        from .widget import RealmPanel

        return RealmPanel(realm=self.client, model=self.default_model)

    def handle_generate(self, args: argparse.Namespace, cell: str) -> None:
        shell = self.shell
        assert shell is not None, "the magics are registered with a shell"
        prompt = cell if args.no_interpolate else interpolate(cell, shell.user_ns)
        prompt = prompt.strip("\n")
        if not prompt.strip():
            raise UsageError("%%realm generate: the cell is empty; write the prompt below the "
                             "magic line")
        if args.output is not None and not args.output.isidentifier():
            raise UsageError(f"%%realm generate: -o {args.output!r} is not a Python name")
        model = args.model or self.default_model
        sampling = self._sampling(args)
        cell_out = _LiveCell(shell, args.format)
        # At once, in the cell: a cold start (runtime, model file, layers, compiles) takes seconds.
        cell_out.progress(f"realm-nb: starting {model}…", terminal=False)
        realm = self.client
        try:
            with _user_errors():
                if args.chat:
                    stream = realm.chat([{"role": "user", "content": prompt}], model=model,
                                        stream=True, on_progress=cell_out.on_progress,
                                        **sampling)
                else:
                    stream = realm.generate(prompt, model=model, stream=True,
                                            on_progress=cell_out.on_progress, **sampling)
        except KeyboardInterrupt:  # before the request started: nothing runs on after this
            cell_out.progress("realm-nb: interrupted before the first token; nothing generated")
            return
        except BaseException:
            cell_out.progress("", terminal=False)
            raise
        try:
            with _user_errors():
                if not args.no_stream:
                    for piece in stream:
                        cell_out.append(piece)
        except KeyboardInterrupt:  # kernel interrupt: stop the guest, keep the partial text
            stream.cancel()
        with _user_errors():
            g = stream.result()
        cell_out.finish(g.text, output_metadata(g, realm.mode))
        if args.output:
            shell.user_ns[args.output] = g
        if args.format == "code" and g.text.strip():
            shell.set_next_input(code_of(g.text), replace=False)

    def _sampling(self, args: argparse.Namespace) -> dict[str, Any]:
        out: dict[str, Any] = {
            "max_tokens": self.max_tokens if args.max_tokens is None else args.max_tokens,
            "temperature": self.temperature if args.temperature is None else args.temperature,
        }
        for key in ("top_k", "top_p", "seed"):
            if getattr(args, key) is not None:
                out[key] = getattr(args, key)
        if args.stop:
            out["stop"] = tuple(unescape_stop(s) for s in args.stop)
        from .types import SamplingParams

        with _user_errors():
            SamplingParams(**out)  # bad values fail here, before anything starts
        return out


# ----------------------------------------------------------------------------- extension


def load_ipython_extension(ipython: Any) -> None:
    """`%load_ext realm_nb`: register the magics and make them configurable with %config."""
    if any(isinstance(c, RealmMagics) for c in ipython.configurables):
        return
    magics = RealmMagics(shell=ipython, parent=ipython)
    ipython.register_magics(magics)
    ipython.configurables.append(magics)


def unload_ipython_extension(ipython: Any) -> None:
    """`%unload_ext realm_nb`: stop this notebook's generations and remove the magics."""
    mine = [c for c in ipython.configurables if isinstance(c, RealmMagics)]
    for magics in mine:
        if magics._realm is not None:
            with suppress(RealmError):
                magics._realm.cancel()
        ipython.configurables.remove(magics)
    table = ipython.magics_manager.magics
    for kind in ("line", "cell"):
        fn = table[kind].get("realm")
        if fn is not None and isinstance(getattr(fn, "__self__", None), RealmMagics):
            del table[kind]["realm"]
    ipython.magics_manager.registry.pop(RealmMagics.__name__, None)
