"""The IPython face: `%load_ext realm_nb`, the `%realm` line verbs, `%%realm generate` and
`%%realm chat` (a conversation kept per notebook).

Grammar apart from actions (after jupyter-ai's magics): `build_parser` is the one argument
grammar, built on IPython's `MagicArgumentParser` so that a bad flag is a one-line `UsageError`;
each verb has one `handle_<verb>` method. Settings are traitlets with `config=True`:

    %config RealmMagics.default_model = "smollm2-135m"

Sampling defaults (max tokens, temperature, top-k, top-p, min-p, repetition penalty) come from
`SamplingParams`, the one source the panel follows too.

Loading the extension imports neither JAX nor wasmtime: the `Realm` is made on first use.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import Any, NoReturn

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import MagicArgumentParser
from IPython.utils.process import arg_split
from traitlets import Float, Int, Unicode

from .catalogue import DEFAULT_MODEL
from .cell_output import LiveCell, code_cell, output_metadata
from .errors import (
    ContextLengthError,
    ModelNotFoundError,
    PullError,
    RealmError,
    ServerConnectionError,
)
from .types import Generation, SamplingParams, size_text

FORMATS = ("text", "markdown", "code")
CELL_VERBS = ("generate", "chat")
CHAT_ACTIONS = ("history", "reset")

# ----------------------------------------------------------------------------- grammar


class _Parser(MagicArgumentParser):
    """A MagicArgumentParser whose errors name the verb and fit on one line."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.HelpFormatter)  # no reST "::" in help
        super().__init__(*args, **kwargs)

    def parse_argstring(self, argstring: str, *_: Any, **__: Any) -> argparse.Namespace:
        # *_ / **__: IPython 9 adds a keyword (partial=); taking any keeps both 8 and 9 typed
        return self.parse_args(arg_split(argstring, posix=True))  # quotes group, then go

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {' '.join(message.split())} (see %realm help)")


def _add_sampling_flags(v: argparse.ArgumentParser) -> None:
    """The flags `%%realm generate` and `%%realm chat` share; defaults as in `SamplingParams`."""
    d = SamplingParams  # the one source of defaults (the panel starts from it too)
    v.add_argument("-m", "--model", help="model name (default: RealmMagics.default_model)")
    v.add_argument("-n", "--max-tokens", type=int,
                   help=f"most tokens to generate (default {d.max_tokens})")
    v.add_argument("-t", "--temperature", type=float,
                   help=f"0 = greedy (default {d.temperature})")
    v.add_argument("--top-k", type=int,
                   help=f"sample among the k likeliest tokens (default {d.top_k})")
    v.add_argument("--top-p", type=float,
                   help=f"nucleus: the likeliest tokens up to this mass (default {d.top_p})")
    v.add_argument("--min-p", type=float, help="drop tokens less likely than min-p times the "
                   f"likeliest (default {d.min_p})")
    v.add_argument("--repeat-penalty", type=float, help="penalise tokens seen in the last "
                   f"{d.repeat_window} (1 = off, 1.1-1.3 curbs loops; default {d.repeat_penalty})")
    v.add_argument("--seed", type=int, help="seed of the sampler (reproducible output)")
    v.add_argument("--stop", action="append", help="stop string, \\n escapes allowed (repeatable)")
    v.add_argument("-o", "--output", metavar="VAR", help="store the Generation in VAR")
    v.add_argument("-f", "--format", choices=FORMATS, default="text",
                   help="render the result as text, markdown, or code (inserted as a new cell)")
    v.add_argument("--no-stream", action="store_true", help="show the result only at the end")
    v.add_argument("--no-interpolate", action="store_true",
                   help="send the cell as written, without filling {name} / {In[n]} / {Out[n]}")


def build_parser() -> _Parser:
    """The whole `%realm` / `%%realm` grammar: one sub-parser per verb."""
    p = _Parser(prog="%realm", description="Run GGUF models in this kernel (realm-nb).")
    sub = p.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    sub.required = True

    v = sub.add_parser("help", help="list the verbs, or show one verb's flags",
                       prog="%realm help")
    v.add_argument("topic", nargs="?", help="a verb")
    sub.add_parser("list", help="models: catalogue, loaded, found on disk; residency and size",
                   prog="%realm list")
    v = sub.add_parser("use", help="make NAME the default model", prog="%realm use")
    v.add_argument("name")
    v = sub.add_parser("load", help="load a catalogue name or a .gguf path", prog="%realm load")
    v.add_argument("path")
    v.add_argument("--name", help="name to register the model under")
    v = sub.add_parser("unload", help="drop a model's weights", prog="%realm unload")
    v.add_argument("name")
    v = sub.add_parser("pull", help="fetch a catalogue model, or hf://OWNER/REPO/FILE.gguf or "
                       "OWNER/REPO:QUANT from the Hugging Face Hub", prog="%realm pull")
    v.add_argument("name", nargs="?", default=DEFAULT_MODEL)
    v = sub.add_parser("connect", help="talk to a realm-nb server at URL", prog="%realm connect")
    v.add_argument("url")
    v.add_argument("--api-key", help="API key (maps to a tenant on the server)")
    sub.add_parser("disconnect", help="back to the runtime found at start (or this kernel)",
                   prog="%realm disconnect")
    sub.add_parser("status", help="mode, default model, tenants, counters", prog="%realm status")
    sub.add_parser("panel", help="the interactive panel (RealmPanel)", prog="%realm panel")

    v = sub.add_parser("generate", help="(cell) complete the cell's text; --chat for one "
                       "chat-template turn", prog="%%realm generate")
    _add_sampling_flags(v)
    v.add_argument("--chat", action="store_true",
                   help="apply the model's chat template (one turn; %%%%realm chat keeps one)")
    v = sub.add_parser("chat", help="(cell) talk to the model, the conversation kept per "
                       "notebook; as a line: chat history, chat reset", prog="%%realm chat")
    v.add_argument("action", nargs="?", choices=CHAT_ACTIONS,
                   help="(line) history: show the conversation; reset: start a new one")
    v.add_argument("--system", help="system prompt of the conversation (kept until reset)")
    _add_sampling_flags(v)
    return p


PARSER = build_parser()


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _verb_help(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each verb's one-line description, in the grammar's order."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {a.dest: a.help or "" for a in action._choices_actions}
    return {}


# ----------------------------------------------------------------------------- interpolation

# {name} or {In[n]} / {Out[n]}, never inside doubled braces ({{name}} stays as written).
_FIELD = re.compile(r"(?<!\{)\{(?:(?P<hist>In|Out)\[(?P<n>\d+)\]|(?P<name>[A-Za-z_]\w*))\}(?!\})")


def interpolate(text: str, namespace: Mapping[str, Any],
                missing: list[str] | None = None) -> str:
    """Fill {identifier} and {In[n]}/{Out[n]} that exist in `namespace`; leave every other brace.

    Dict and set comprehensions, JSON, LaTeX and f-string bodies pass through untouched, because
    only a bare identifier or a history reference between single braces is a field, and only
    when it names something that exists. `missing` collects the {identifier}s that do not.
    """

    def fill(m: re.Match[str]) -> str:
        if m.group("name") is not None:
            name = m.group("name")
            if name in namespace:
                return str(namespace[name])
            if missing is not None and name not in missing:
                missing.append(name)
            return m.group(0)
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


# ----------------------------------------------------------------------------- errors


@contextmanager
def _user_errors(context_hint: str = "") -> Iterator[None]:
    """RealmErrors caused by the user's input or setup become one-line UsageErrors
    (`context_hint` is added to a ContextLengthError's)."""
    try:
        yield
    except RealmError as e:
        if e.status_code < 500 or isinstance(e, (PullError, ServerConnectionError)):
            hint = context_hint if isinstance(e, ContextLengthError) else ""
            raise UsageError(f"{type(e).__name__}: {' '.join(e.message.split())}{hint}") \
                from None
        raise


# ----------------------------------------------------------------------------- the magics


@magics_class
class RealmMagics(Magics):
    """`%realm VERB ...` and `%%realm generate ...`; see `%realm help`."""

    default_model = Unicode(DEFAULT_MODEL, help="model used when -m is not given").tag(
        config=True)
    # Sampling defaults: SamplingParams' own, as in the panel (RealmPanel).
    max_tokens = Int(SamplingParams.max_tokens, help="tokens generated when -n is not given").tag(
        config=True)
    temperature = Float(SamplingParams.temperature,
                        help="temperature when -t is not given (0 = greedy)").tag(config=True)
    top_k = Int(SamplingParams.top_k, help="top-k when --top-k is not given").tag(config=True)
    top_p = Float(SamplingParams.top_p, help="top-p when --top-p is not given").tag(config=True)
    min_p = Float(SamplingParams.min_p, help="min-p when --min-p is not given").tag(config=True)
    repeat_penalty = Float(SamplingParams.repeat_penalty,
                           help="repetition penalty when --repeat-penalty is not given (1 = off)"
                           ).tag(config=True)
    tenant = Unicode("", help="tenant id of this notebook's requests (default: the notebook's "
                     "path in Jupyter, else 'default')").tag(config=True)

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        self._realm: Any = None
        self._endpoint: str | None = None
        self._api_key: str | None = None
        # %%realm chat: this notebook's conversation (user and assistant turns, in order)
        self.chat_system = ""
        self.chat_messages: list[dict[str, str]] = []

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
        status | panel | chat history | chat reset, and %%realm generate / %%realm chat
        [flags] with the prompt in the cell."""
        args = PARSER.parse_argstring(line)
        if args.verb == "chat":
            return self.handle_chat(args, cell)
        if args.verb == "generate":
            if cell is None:
                raise UsageError("generate is a cell magic: write %%realm generate [flags] and "
                                 "the prompt on the lines below it")
            return self.handle_generate(args, cell)
        if cell is not None:
            raise UsageError(f"%%realm {args.verb}: only {' and '.join(CELL_VERBS)} take a "
                             f"cell; use %realm {args.verb} on one line")
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
        for verb, about in _verb_help(PARSER).items():
            magic = "%%realm" if verb in CELL_VERBS else "%realm"
            print(f"  {magic + ' ' + verb:18} {about}")
        print("Settings: %config RealmMagics.default_model = 'NAME' (also max_tokens, "
              "temperature, top_k, top_p, min_p, repeat_penalty, tenant). "
              "Flags of a verb: %realm help VERB")

    def handle_list(self, args: argparse.Namespace) -> None:
        with _user_errors():
            models = self.client.models()
        width = max([23, *(len(m.name) for m in models)])
        print(f" {'name':{width}} {'state':10} {'resident':>10} {'file':>10} {'quant':6} "
              f"{'source':10}  aliases")
        for m in models:
            mark = "*" if self.default_model in (m.name, *m.aliases) else " "
            aliases = ", ".join(a for a in m.aliases if a != m.path) or "-"
            print(f"{mark}{m.name:{width}} {m.state:10} {size_text(m.resident_bytes):>10} "
                  f"{size_text(m.size_bytes):>10} {m.quant or '-':6} {m.source or '-':10}  "
                  f"{aliases}")

    def handle_use(self, args: argparse.Namespace) -> None:
        with _user_errors():
            try:
                self.client.use_model(args.name)  # the SDK's check: names, aliases and ids
            except ModelNotFoundError:
                models = self.client.models()
                raise UsageError(f"%realm use: unknown model {args.name!r}; known: "
                                 f"{', '.join(m.name for m in models)} (a .gguf file: "
                                 "%realm load PATH --name NAME first)") from None
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
        from . import catalogue, hub

        with _user_errors():
            ref = hub.parse_ref(args.name)
            path = hub.pull(ref) if ref is not None else catalogue.pull(args.name)
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
        prompt = self._prompt(args, cell, "generate")
        model = args.model or self.default_model
        sampling = self._sampling(args)

        def start(realm: Any, progress: Callable[[dict[str, Any]], None]) -> Any:
            if args.chat:  # one turn with the chat template; %%realm chat keeps a conversation
                return realm.chat([{"role": "user", "content": prompt}], model=model,
                                  stream=True, on_progress=progress, **sampling)
            return realm.generate(prompt, model=model, stream=True, on_progress=progress,
                                  **sampling)

        self._stream_into_cell(args, model, start, continuation=not args.chat)

    def handle_chat(self, args: argparse.Namespace, cell: str | None) -> None:
        """`%%realm chat`: one more turn of this notebook's conversation, with the model's chat
        template over the whole of it; `%realm chat history` / `reset` on a line."""
        if cell is None:
            if args.action is None:
                raise UsageError("chat is a cell magic: write %%realm chat [flags] and your "
                                 "message below it; %realm chat history | reset on a line")
            if args.action == "reset":
                self.chat_messages = []
                self.chat_system = args.system or ""
                print("realm-nb: new conversation" + (
                    f" (system: {self.chat_system})" if self.chat_system else ""))
            else:
                self._print_chat_history()
            return
        if args.action is not None:
            raise UsageError(f"%%realm chat: {args.action} is a line verb; write "
                             f"%realm chat {args.action} on its own line")
        message = self._prompt(args, cell, "chat")
        if args.system is not None:
            self.chat_system = args.system
        model = args.model or self.default_model
        sampling = self._sampling(args)
        history = ([{"role": "system", "content": self.chat_system}] if self.chat_system else [])
        messages = [*history, *self.chat_messages, {"role": "user", "content": message}]
        turn = len(self.chat_messages) // 2 + 1

        def start(realm: Any, progress: Callable[[dict[str, Any]], None]) -> Any:
            return realm.chat(messages, model=model, stream=True, on_progress=progress,
                              **sampling)

        g = self._stream_into_cell(args, model, start, continuation=False, chat_turn=turn,
                                   context_hint="; the conversation is too long for the model's "
                                   "context: %realm chat reset starts a new one")
        if g is not None and g.text:  # an interrupted reply is kept as far as it went
            self.chat_messages += [{"role": "user", "content": message},
                                   {"role": "assistant", "content": g.text}]

    def _print_chat_history(self) -> None:
        if not self.chat_messages and not self.chat_system:
            print("realm-nb: no conversation yet; %%realm chat starts one")
            return
        if self.chat_system:
            print(f"[system] {self.chat_system}")
        for i, m in enumerate(self.chat_messages):
            turn = i // 2 + 1
            print(f"[{turn} {m['role']}] {m['content'].strip()}")

    # -- generation into the cell ----------------------------------------------------------

    def _prompt(self, args: argparse.Namespace, cell: str, verb: str) -> str:
        """The cell's text with {name} fields filled; one line on stderr for unknown names."""
        shell = self.shell
        assert shell is not None, "the magics are registered with a shell"
        missing: list[str] = []
        prompt = cell if args.no_interpolate else interpolate(cell, shell.user_ns, missing)
        prompt = prompt.strip("\n")
        if not prompt.strip():
            raise UsageError(f"%%realm {verb}: the cell is empty; write the prompt below the "
                             "magic line")
        if args.output is not None and not args.output.isidentifier():
            raise UsageError(f"%%realm {verb}: -o {args.output!r} is not a Python name")
        if missing:
            names = ", ".join("{" + n + "}" for n in missing)
            print(f"realm-nb: {names} {'is' if len(missing) == 1 else 'are'} not defined in "
                  "this notebook, sent as written (--no-interpolate sends every brace as "
                  "written)", file=sys.stderr)
        return prompt

    def _stream_into_cell(self, args: argparse.Namespace, model: str,
                          start: Callable[[Any, Callable[[dict[str, Any]], None]], Any], *,
                          continuation: bool, chat_turn: int | None = None,
                          context_hint: str = "") -> Generation | None:
        """Start a generation, stream it into the cell, render the result with its footer and
        metadata; returns it (None when interrupted before it started)."""
        shell = self.shell
        assert shell is not None, "the magics are registered with a shell"
        cell_out = LiveCell(shell, args.format)
        # At once, in the cell: a cold start (runtime, model file, layers, compiles) takes seconds.
        cell_out.progress(f"realm-nb: starting {model}…", terminal=False)
        realm = self.client
        try:
            with _user_errors(context_hint):
                stream = start(realm, cell_out.on_progress)
        except KeyboardInterrupt:  # before the request started: nothing runs on after this
            cell_out.progress("realm-nb: interrupted before the first token; nothing generated")
            return None
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
            g: Generation = stream.result()
        code = code_cell(g, continuation) if args.format == "code" else None
        extra: dict[str, Any] = {"format": args.format}
        if chat_turn is not None:
            extra["chat_turn"] = chat_turn
        if args.format == "code":
            extra["continuation"] = continuation and isinstance(g.prompt, str)
        cell_out.finish(g.text, output_metadata(g, realm.mode, **extra), code)
        if args.output:
            shell.user_ns[args.output] = g
        if code is not None and code.strip() and g.text.strip():
            shell.set_next_input(code, replace=False)
        return g

    def _sampling(self, args: argparse.Namespace) -> dict[str, Any]:
        """Flags given, else the settings (whose defaults are SamplingParams', as the panel's)."""
        out: dict[str, Any] = {}
        for key in ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repeat_penalty"):
            flag = getattr(args, key)
            out[key] = getattr(self, key) if flag is None else flag
        if args.seed is not None:
            out["seed"] = args.seed
        if args.stop:
            out["stop"] = tuple(unescape_stop(s) for s in args.stop)
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
