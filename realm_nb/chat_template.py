"""Chat templates: untrusted jinja2 (it comes with the model file), rendered within a budget.

Templates render in jinja2's `ImmutableSandboxedEnvironment`, extended so that one render cannot
take the process down: every loop iteration, call, attribute lookup, operator and output chunk is
a step, and steps check a count, a deadline and the caller's cancel check (`TemplateBudget`);
operators, filters and `str` methods that can build large values are measured before they run,
and every value built counts against a size budget. So a nested loop that outputs nothing still
stops, `'a' * 10**9` is refused before it is built, and a render can be cancelled. Past its budget
a render is a `ChatTemplateBudgetError`; any other failure (`{% include %}`, a macro that recurses
without end) a `ChatTemplateError`: both are HTTP 400, never 500.
"""

from __future__ import annotations

import functools
import re
import threading
import time
from collections.abc import Callable
from typing import Any

from jinja2 import FunctionLoader, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from .errors import ChatTemplateBudgetError, ChatTemplateError, InvalidRequestError, RealmError
from .limits import TemplateBudget  # the budget's numbers live with the other request limits

__all__ = ["TemplateBudget", "render_template", "validate_messages"]


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """`messages` if it is a non-empty list of dicts with string role and content."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError(
            f"messages must be a non-empty list of {{'role', 'content'}} dicts, got "
            f"{_short(messages)}", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(
                m.get("content"), str):
            raise InvalidRequestError(
                f"messages[{i}] = {_short(m)} must be a dict with string 'role' and 'content'",
                param="messages")
    return messages


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ------------------------------------------------------------------------------ budgets

TEMPLATE_WORK_FACTOR = 16  # all the values a render builds: at most this x budget.max_chars
TEMPLATE_MAX_SOURCE = 256 * 1024  # characters of template source (compiling is not budgeted)
_MAX_INT_BITS = 1 << 16  # integers a template may compute (no 10**10**9)
_POLL_EVERY = 64  # steps between looks at the clock and the caller's check


class _Render:
    """The budget of the render running in this thread."""

    def __init__(self, budget: TemplateBudget, check: Callable[[], None] | None) -> None:
        self.budget = budget
        self.check = check
        self.deadline = time.monotonic() + budget.time_s
        self.steps = 0
        self.built = 0
        self.output = 0

    def over(self, what: str) -> ChatTemplateBudgetError:
        return ChatTemplateBudgetError(
            f"the model's chat template went past its budget: {what}. It loops without end or "
            "builds a huge string; use a model whose template renders within the budget, or "
            "send a plain prompt (/v1/completions, generate()) instead of messages",
            param="messages")

    def tick(self) -> None:
        self.steps += 1
        if self.steps > self.budget.max_steps:
            raise self.over(f"more than {self.budget.max_steps} steps (loop iterations, calls, "
                            "lookups)")
        if self.steps % _POLL_EVERY == 0:
            self.poll()

    def poll(self) -> None:
        if time.monotonic() > self.deadline:
            raise self.over(f"it ran for more than {self.budget.time_s:g} s")
        if self.check is not None:
            self.check()

    def fits(self, n: int, what: str) -> None:
        """Refuse, before building it, a value of `n` characters (or items)."""
        if n > self.budget.max_chars:
            raise self.over(f"{what} would hold {n} characters, more than "
                            f"{self.budget.max_chars}")

    def charge(self, value: Any, what: str = "a value") -> Any:
        """Count a value the template built; refuse one too big, or too many together."""
        if isinstance(value, (str, list, tuple)):
            self.fits(len(value), what)
            self.built += len(value)
            limit = TEMPLATE_WORK_FACTOR * self.budget.max_chars
            if self.built > limit:
                raise self.over(f"it built more than {limit} characters in all")
        elif isinstance(value, int) and not isinstance(value, bool) and \
                value.bit_length() > _MAX_INT_BITS:
            raise self.over(f"an integer of more than {_MAX_INT_BITS} bits")
        return value


_local = threading.local()


def _render_state() -> _Render | None:
    return getattr(_local, "render", None)


_BRACE_SPEC = re.compile(r"\{[^{}:]*:([^{}]*)\}")  # "{0:>12.3f}" → ">12.3f"
_NESTED_SPEC = re.compile(r"\{[^{}:]*:[^{}]*\{")  # "{:>{w}}": the width is an argument
_PERCENT_SPEC = re.compile(r"%[-+ #0]*(\d+|\*)?(?:\.(\d+|\*))?[a-zA-Z]")  # "%-*.3f"


def _check_format(r: _Render, fmt: Any, args: Any = ()) -> None:
    """Refuse a format string whose widths or precisions (written in it, or given as
    arguments through `*` or a nested field) would make a value too big."""
    if not isinstance(fmt, str):
        return
    numbers = [n for m in _BRACE_SPEC.finditer(fmt) for n in re.findall(r"\d+", m.group(1))]
    star = _NESTED_SPEC.search(fmt) is not None
    for m in _PERCENT_SPEC.finditer(fmt):
        for part in m.groups():
            star = star or part == "*"
            if part is not None and part != "*":
                numbers.append(part)
    for n in numbers:
        r.fits(int(n), "a formatted value")
    if star:
        values = args.values() if isinstance(args, dict) else \
            args if isinstance(args, (tuple, list)) else (args,)
        for v in values:
            if isinstance(v, int) and not isinstance(v, bool):
                r.fits(v, "a formatted value")


def _estimate_call(r: _Render, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
                   ) -> tuple[Any, ...]:
    """Refuse a str method call whose result would be too big; returns the args to call with
    (an iterable to join is made a list first, so that it can be measured)."""
    target = getattr(fn, "__wrapped__", fn)  # the sandbox wraps str.format
    owner = getattr(target, "__self__", None)
    if not isinstance(owner, str):
        return args
    name = getattr(target, "__name__", "")
    arg0 = args[0] if args else next(iter(kwargs.values()), None)
    if name in ("center", "ljust", "rjust", "zfill") and isinstance(arg0, int):
        r.fits(arg0, f"str.{name}()")
    elif name == "expandtabs":
        size = arg0 if isinstance(arg0, int) else 8
        r.fits(len(owner) + owner.count("\t") * max(size, 0), "str.expandtabs()")
    elif name == "replace" and len(args) >= 2 and all(isinstance(a, str) for a in args[:2]):
        count = args[2] if len(args) > 2 and isinstance(args[2], int) and args[2] >= 0 \
            else len(owner) + 1
        grow = max(0, len(args[1]) - len(args[0]))
        r.fits(len(owner) + min(count, len(owner) + 1) * grow, "str.replace()")
    elif name == "join" and args:
        items = list(args[0])
        r.fits(sum(len(x) if isinstance(x, str) else 1 for x in items)
               + len(owner) * max(0, len(items) - 1), "str.join()")
        return (items, *args[1:])
    elif name == "format":
        _check_format(r, owner, (*args, *kwargs.values()))
    elif name == "format_map":
        _check_format(r, owner, arg0 if isinstance(arg0, dict) else ())
    elif name == "translate":
        table = arg0 if isinstance(arg0, dict) else {}
        grow = max((len(v) for v in table.values() if isinstance(v, str)), default=1)
        r.fits(len(owner) * max(grow, 1), "str.translate()")
    return args


def _estimate_filter(r: _Render, name: str, args: tuple[Any, ...],
                     kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Refuse a filter call whose result would be too big (args: after any context/env)."""
    value = args[0] if args else None
    rest = args[1:]
    if name in ("center", "batch", "slice") and rest and isinstance(rest[0], int):
        r.fits(rest[0], f"the {name} filter")
    elif name == "indent" and isinstance(value, str):
        width = rest[0] if rest else kwargs.get("width", 4)
        per_line = len(width) if isinstance(width, str) else width if isinstance(width, int) \
            else 4
        r.fits(len(value) + (value.count("\n") + 1) * max(per_line, 0), "the indent filter")
    elif name == "replace" and isinstance(value, str) and len(rest) >= 2:
        old, new = str(rest[0]), str(rest[1])
        r.fits(len(value) + (len(value) + 1) * max(0, len(new) - len(old)), "the replace filter")
    elif name == "format":
        _check_format(r, value, (*rest, *kwargs.values()))
    elif name == "join" and value is not None and not isinstance(value, str):
        items = list(value)
        sep = rest[0] if rest and isinstance(rest[0], str) else kwargs.get("d", "")
        r.fits(sum(len(x) if isinstance(x, str) else 1 for x in items)
               + len(str(sep)) * max(0, len(items) - 1), "the join filter")
        return (items, *rest)
    return args


def _guard_filter(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    from jinja2.utils import _PassArg

    skip = 0 if _PassArg.from_obj(fn) is None else 1  # context / eval context / environment

    @functools.wraps(fn)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        r = _render_state()
        if r is None:
            return fn(*args, **kwargs)
        r.tick()
        args = (*args[:skip], *_estimate_filter(r, name, args[skip:], kwargs))
        return r.charge(fn(*args, **kwargs), f"the {name} filter's result")

    return guarded


def _ticking(value: Any) -> Any:
    """What a `{% for %}` loop iterates: the same items, one step each."""
    r = _render_state()
    for item in value:
        if r is not None:
            r.tick()
        yield item


def _sized(value: Any) -> Any:
    """A `~` concatenation's result, counted."""
    r = _render_state()
    return value if r is None else r.charge(value, "a ~ concatenation")


class _Instrument(NodeTransformer):
    """Every loop steps through `_ticking`; every `~` goes through `_sized`."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)  # in place
        node.iter = nodes.Filter(node.iter, "_realm_tick", [], [], None, None,
                                 lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        concat = self.generic_visit(node)
        return nodes.Filter(concat, "_realm_sized", [], [], None, None, lineno=concat.lineno)


# ------------------------------------------------------------------------------ the sandbox


class _BudgetedSandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox, with each step checked against this thread's `_Render`."""

    intercepted_binops = frozenset({"+", "*", "%", "**"})

    def __init__(self) -> None:
        # optimized=False: no constant folding, which would run filters while compiling
        super().__init__(trim_blocks=True, lstrip_blocks=True, optimized=False)
        self.globals.pop("lipsum", None)  # lipsum(n=10**9)
        self.globals["raise_exception"] = _raise_exception
        self.loader = FunctionLoader(_no_other_templates)
        self.filters = {name: _guard_filter(name, fn) for name, fn in self.filters.items()}
        self.filters["_realm_tick"] = _ticking
        self.filters["_realm_sized"] = _sized

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        instrumented: nodes.Template = _Instrument().visit(tree)
        return instrumented

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        r = _render_state()
        if r is None:
            return super().call(__context, __obj, *args, **kwargs)
        r.tick()
        args = _estimate_call(r, __obj, args, kwargs)
        return r.charge(super().call(__context, __obj, *args, **kwargs), "a call's result")

    def getattr(self, obj: Any, attribute: str) -> Any:
        r = _render_state()
        if r is not None:
            r.tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        r = _render_state()
        if r is not None:
            r.tick()
        return super().getitem(obj, argument)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        r = _render_state()
        if r is None:
            return super().call_binop(context, operator, left, right)
        r.tick()
        ints = all(isinstance(x, int) and not isinstance(x, bool) for x in (left, right))
        if operator == "*" and ints:
            if left.bit_length() + right.bit_length() > _MAX_INT_BITS:
                raise r.over(f"an integer of more than {_MAX_INT_BITS} bits")
        elif operator == "*":
            seq, times = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, (str, list, tuple)) and isinstance(times, int):
                r.fits(len(seq) * times, "a * repetition")
        elif operator == "**" and ints and right > 0 and \
                left.bit_length() * right > _MAX_INT_BITS:
            raise r.over(f"an integer of more than {_MAX_INT_BITS} bits")
        elif operator == "+" and isinstance(left, (str, list, tuple)) and \
                isinstance(right, (str, list, tuple)):
            r.fits(len(left) + len(right), "a + concatenation")
        elif operator == "%":
            _check_format(r, left, right)
        return r.charge(super().call_binop(context, operator, left, right),
                        f"a {operator} result")


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"the model's chat template refused the messages: {message}",
                            param="messages")


def _no_other_templates(name: str) -> str:
    raise ChatTemplateError(
        f"the model's chat template loads another template ({name!r}, with {{% include %}}, "
        "{% import %} or {% extends %}); a chat template must stand alone: send a plain prompt "
        "instead of messages", param="messages")


_sandbox = functools.lru_cache(maxsize=1)(_BudgetedSandbox)


@functools.lru_cache(maxsize=32)
def _compiled(template: str) -> Any:
    return _sandbox().from_string(template)


def render_template(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool,
                    *, budget: TemplateBudget | None = None,
                    check: Callable[[], None] | None = None, **extra: Any) -> str:
    """Render a chat template within `budget` (ChatTemplateBudgetError past it); `check` is
    called every few steps and may raise to stop the render (a cancelled request)."""
    budget = budget or TemplateBudget()
    if len(template) > TEMPLATE_MAX_SOURCE:
        raise ChatTemplateBudgetError(
            f"the model's chat template has {len(template)} characters, more than "
            f"{TEMPLATE_MAX_SOURCE}; send a plain prompt instead of messages", param="messages")
    r = _Render(budget, check)
    outer = _render_state()  # a render never nests, but restore whatever was there
    _local.render = r
    try:
        r.poll()
        tmpl = _compiled(template)
        parts: list[str] = []
        for chunk in tmpl.generate(messages=validate_messages(messages),
                                   add_generation_prompt=add_generation_prompt, **extra):
            r.output += len(chunk)
            if r.output > budget.max_chars:
                raise r.over(f"its output reached {r.output} characters, more than "
                             f"{budget.max_chars}")
            r.tick()
            parts.append(chunk)
        return "".join(parts)
    except RealmError:
        raise
    except RecursionError:
        raise ChatTemplateError("the model's chat template failed to render: it recurses too "
                                "deeply (a macro that calls itself without end?); send a plain "
                                "prompt instead of messages", param="messages") from None
    except MemoryError:
        raise r.over("it ran out of memory") from None
    except Exception as e:  # TemplateError, and the TypeError of {% include %} without a loader
        raise ChatTemplateError(
            f"the model's chat template failed to render: {type(e).__name__}: {e}; the "
            "template comes with the model file: send a plain prompt instead of messages",
            param="messages") from None
    finally:
        _local.render = outer
