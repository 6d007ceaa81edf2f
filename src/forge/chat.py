"""Chat: messages in, a prompt out, rendered with the model's own Jinja chat template.

Templates come from the model (GGUF ``tokenizer.chat_template`` or HF
``tokenizer_config.json``) and are rendered the way transformers renders
them: a sandboxed Jinja environment with ``trim_blocks``/``lstrip_blocks``,
``raise_exception`` and ``strftime_now``, and the tokenizer's special tokens
as variables. A model without a template (a Forge-trained toy model) gets
:data:`PLAIN_TEMPLATE`, plain "User: ..." lines.

>>> render_chat(None, [{"role": "user", "content": "Hi"}])
'User: Hi\\nAssistant:'
"""

from __future__ import annotations

import contextvars
import datetime
import functools
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.runtime import Context, LoopContext, Macro
from jinja2.sandbox import ImmutableSandboxedEnvironment

from forge.errors import ChatTemplateError, ConfigError
from forge.toolcalls import ToolCall, ToolFormat

__all__ = [
    "PLAIN_STOP",
    "PLAIN_TEMPLATE",
    "ROLES",
    "Message",
    "TemplateLimits",
    "check_messages",
    "render_chat",
]

Message = Mapping[str, Any]
ROLES = ("system", "user", "assistant", "tool")

#: For models without a chat template: one "Role: content" line per message.
PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
#: With :data:`PLAIN_TEMPLATE`, the reply ends where the model starts the user's next line.
PLAIN_STOP = ("\nUser:",)


def check_messages(messages: object) -> list[dict[str, Any]]:
    """Validate chat messages: a non-empty list of {"role", "content"} dicts; returns plain dicts.

    A string is taken as one user message.
    """
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    if not isinstance(messages, Sequence) or not messages:
        raise ConfigError(
            f"messages must be a non-empty list of {{'role': ..., 'content': ...}} dicts, got {messages!r:.80}",
            field="messages",
        )
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ConfigError(
                f"messages[{i}] = {m!r:.80} needs 'role' and 'content' keys, e.g. {{'role': 'user', 'content': 'Hi'}}",
                field=f"messages[{i}]",
            )
        if m["role"] not in ROLES:
            raise ConfigError(
                f"messages[{i}] has role {m['role']!r}; roles are {', '.join(ROLES)}", field=f"messages[{i}]"
            )
        calls = m.get("tool_calls")
        if calls is not None and (
            m["role"] != "assistant" or isinstance(calls, str) or not isinstance(calls, Sequence)
        ):
            raise ConfigError(
                f"messages[{i}]['tool_calls'] must be a list, on an assistant message", field=f"messages[{i}]"
            )
        if not isinstance(m["content"], str) and not (m["content"] is None and calls):
            raise ConfigError(
                f"messages[{i}]['content'] must be a string, got {type(m['content']).__name__} "
                "(null is allowed only on an assistant message with tool_calls)",
                field=f"messages[{i}]",
            )
        out.append({**m, "tool_calls": [_tool_call(c, i) for c in calls]} if calls else dict(m))
    return out


def _tool_call(call: object, i: int) -> ToolCall:
    """An OpenAI tool_calls entry ({"id", "type": "function", "function": {"name", "arguments"}}) as a ToolCall."""
    if isinstance(call, ToolCall):
        return call
    f = call.get("function") if isinstance(call, Mapping) else None
    arguments = f.get("arguments", {}) if isinstance(f, Mapping) else None
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except json.JSONDecodeError:
            arguments = None
    if not isinstance(f, Mapping) or not isinstance(f.get("name"), str) or not isinstance(arguments, dict):
        raise ConfigError(
            f"messages[{i}] has a malformed tool call {call!r:.120}; expected "
            "{'id': ..., 'type': 'function', 'function': {'name': ..., 'arguments': '<JSON object>'}}",
            field=f"messages[{i}]",
        )
    assert isinstance(call, Mapping)
    return ToolCall(f["name"], arguments, **({"id": str(call["id"])} if call.get("id") else {}))


def _for_template(messages: list[dict[str, Any]], fmt: ToolFormat) -> list[dict[str, Any]]:
    """Tool calls and results as the template expects them: HF's {"function": {"name", "arguments": dict}} for a
    template with tool support; for one without, the call's exact text in the content and the result in a user turn.
    """
    out: list[dict[str, Any]] = []
    question, names = "", {}  # the user's last question; call id -> tool name
    said: list[str] = []  # the results of the tool messages in a row, rendered as one user turn
    for m in messages:
        calls: list[ToolCall] = m.get("tool_calls") or []
        names.update({c.id: c.name for c in calls})
        question = m["content"] if m["role"] == "user" else question
        if m["role"] == "tool" and not fmt.native:
            # Without a tool role of its own, a template gets the results in a user turn, each named, then the
            # question again: SmolLM2 copied a bare <tool_response> back or called again, and answers from this.
            name = m.get("name") or names.get(m.get("tool_call_id") or "", "the tool")
            said.append(f"The tool {name} returned: {m['content']}")
            if len(said) > 1:
                out.pop()
            out.append({"role": "user", "content": "\n".join(said) + f"\n\nUsing this result, answer: {question}"})
            continue
        said = []
        if calls and fmt.native:
            functions = [{"name": c.name, "arguments": c.arguments} for c in calls]
            m = {
                **m,
                "tool_calls": [
                    {"id": c.id, "type": "function", "function": f} for c, f in zip(calls, functions, strict=True)
                ],
            }
        elif calls:
            text = "\n".join(fmt.call_text(c) for c in calls)
            m = {k: v for k, v in m.items() if k != "tool_calls"} | {"content": ((m["content"] or "") + text)}
        out.append(m)
    return out


def _with_tool_prompt(messages: list[dict[str, Any]], prompt: str) -> list[dict[str, Any]]:
    """Forge's tool instructions added to the system message (or as one, first)."""
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{prompt}"}, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


@dataclass(frozen=True, slots=True, kw_only=True)
class TemplateLimits:
    """Bounds on rendering a chat template: a model file's template is untrusted input, like a request.

    Real templates stay far below these; a template past one fails with :class:`ChatTemplateError`
    (HTTP 400) instead of hanging the server or exhausting its memory.

    >>> TemplateLimits().steps
    1000000
    """

    #: Characters of template source.
    source_chars: int = 256 * 1024
    #: Loop iterations, calls and arithmetic operations of one render, counted together.
    steps: int = 1_000_000
    #: Nested macro calls and recursive loops.
    depth: int = 64
    #: Characters of any string (or items of any list) the template builds, the prompt included.
    string_chars: int = 1 << 23
    #: Wall-clock seconds of one render.
    seconds: float = 5.0


def render_chat(
    template: str | None,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = True,
    special_tokens: Mapping[str, str | None] | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    limits: TemplateLimits | None = None,
    **variables: Any,
) -> str:
    """The prompt for ``messages`` under ``template`` (:data:`PLAIN_TEMPLATE` when None).

    ``special_tokens`` fills ``bos_token``/``eos_token`` as templates expect.
    ``tools`` (OpenAI ``tools`` entries) go to a template that renders them
    itself; for any other template Forge describes them in the system message
    (see :class:`forge.toolcalls.ToolFormat`). Rendering is bounded by ``limits``
    (:class:`TemplateLimits`); a template that fails or exceeds them raises :class:`ChatTemplateError`.
    """
    limits = limits or TemplateLimits()
    source = template or PLAIN_TEMPLATE
    if len(source) > limits.source_chars:
        raise ChatTemplateError(
            f"the chat template is {len(source)} characters, over the limit of {limits.source_chars} "
            "(TemplateLimits.source_chars); pass a shorter template"
        )
    context = {"bos_token": "", "eos_token": "", **{k: v or "" for k, v in (special_tokens or {}).items()}}
    fmt = ToolFormat.for_template(template)
    checked = check_messages(messages)
    if tools and fmt.native:
        variables["tools"] = [{"type": "function", "function": f} for f in fmt.functions(tools)]
    elif tools:
        checked = _with_tool_prompt(checked, fmt.system_prompt(tools))
    token = _BUDGET.set(_Budget(limits))  # compiling folds constants, so it runs under the budget too
    try:
        return _compile(source).render(
            messages=_for_template(checked, fmt), add_generation_prompt=add_generation_prompt, **context, **variables
        )
    except TemplateError as e:
        said = " ".join(str(e).split())[:300]  # the template's own words: one line, bounded
        raise ChatTemplateError(f"the chat template refused these messages: {said}") from None
    except _LimitExceeded as e:
        raise ChatTemplateError(f"the model's chat template {e}; it is not a usable chat template") from None
    except ConfigError:
        raise
    except Exception as e:  # anything else an untrusted template does wrong: 400, not 500
        detail = " ".join(f"{type(e).__name__}: {e}"[:200].split())
        raise ChatTemplateError(
            f"the model's chat template failed to render ({detail}); pass a fixed template"
        ) from None
    finally:
        _BUDGET.reset(token)


class TemplateError(Exception):
    """Raised by a template's ``raise_exception(...)`` (e.g. "roles must alternate")."""


def _raise(message: str) -> None:
    raise TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # transformers' tojson: no HTML escaping, unicode kept as is.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(
            f"the chat template is not valid Jinja (line {e.lineno}: {e.message}); fix the template"
        ) from None
    except RecursionError:
        raise ChatTemplateError("the chat template is nested too deeply to compile; fix the template") from None


# -- the bounded sandbox ------------------------------------------------------------------------------------------
# Jinja's sandbox stops a template from reaching Python's internals, but not from looping, recursing or
# building strings without end. Every loop item, call and arithmetic operator below ticks a per-render
# budget (steps, depth, a deadline), and anything that sizes a string or list is checked before it is built.


#: Integers a template may compute: far beyond any real use, yet quick to multiply.
_MAX_INT_BITS = 1 << 16


class _LimitExceeded(Exception):
    """A template went past one of its :class:`TemplateLimits`; the message names the limit."""


class _Budget:
    def __init__(self, limits: TemplateLimits) -> None:
        self.limits, self.steps, self.depth = limits, 0, 0
        self.deadline = time.monotonic() + limits.seconds

    def tick(self) -> None:
        self.steps += 1
        if self.steps > self.limits.steps:
            raise _LimitExceeded(
                f"ran more than {self.limits.steps} loop iterations, calls and operations (TemplateLimits.steps)"
            )
        if time.monotonic() > self.deadline:
            raise _LimitExceeded(f"took longer than {self.limits.seconds:g} s to render (TemplateLimits.seconds)")

    def size(self, n: int, what: str) -> None:
        if n > self.limits.string_chars:
            raise _LimitExceeded(
                f"asks for {what} of size {n}, over the limit of {self.limits.string_chars} characters or items "
                "(TemplateLimits.string_chars)"
            )

    def number(self, bits: int) -> None:
        if bits > _MAX_INT_BITS:  # no template needs such numbers, and their arithmetic is slow
            raise _LimitExceeded(f"computed a number of more than {_MAX_INT_BITS} bits")


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("forge_template_budget", default=None)


def _budget() -> _Budget:
    # Outside render_chat (never in Forge) a template still gets the size checks, on a budget of its own.
    return _BUDGET.get() or _Budget(TemplateLimits())


#: Callables (str methods, filters, globals) whose integer arguments size what they build: a width, a count.
_SIZING = {
    "center", "ljust", "rjust", "zfill", "expandtabs", "indent", "slice", "batch", "wordwrap", "truncate",
    "tojson", "generate_lorem_ipsum",
}  # fmt: skip
#: Widths and precisions in a %-format ("%-10.3f") and in str.format fields ("{:>10}").
_PERCENT_SPEC = re.compile(r"%[#0 +\-]*(\d*)(?:\.(\d*))?")
_BRACE_SPEC = re.compile(r"\{[^{}]*?:([^{}]*)\}")
#: A width taken from the arguments: "%*d", "{:{}}".
_NESTED_SPEC = re.compile(r"%[#0 +\-]*\*|\{[^{}]*\{")


def _format_widths(fmt: str) -> Iterator[int]:
    numbers = [n for m in _PERCENT_SPEC.finditer(fmt) for n in m.groups() if n]
    numbers += [n for m in _BRACE_SPEC.finditer(fmt) for n in re.findall(r"\d+", m.group(1))]
    return (int(n) if len(n) < 12 else 1 << 40 for n in numbers)


def _sized(value: object) -> int | None:
    return len(value) if isinstance(value, (str, list, tuple, dict, bytes)) else None


def _check_args(budget: _Budget, name: str, value: object, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Refuse, before running it, a call whose arguments make it build something over the size limit."""
    if name in _SIZING:
        _check_ints(budget, f"the {name}() width or count", args, kwargs)
    if name in ("format", "format_map") and isinstance(value, str):
        for width in _format_widths(value):
            budget.size(width, "a format width")
        if _NESTED_SPEC.search(value):
            _check_ints(budget, "a format width", args, kwargs)  # widths come from the arguments
    if name == "replace" and isinstance(value, str) and len(args) >= 2:
        old, new = str(args[0]), str(args[1])
        hits = value.count(old) if old else len(value) + 1
        budget.size(len(value) + hits * max(0, len(new) - len(old)), "a replace() result")
    if name == "join":
        sep, items = (value, args[0] if args else ()) if isinstance(value, str) else (args[0] if args else "", value)
        if isinstance(sep, str) and (n := _sized(items)) is not None:
            budget.size(len(sep) * n, "a join() result")


def _listed(items: Any) -> Any:
    """A generator (``map``, ``select``) as a list, so that joining it can be measured first."""
    return items if _sized(items) is not None or not isinstance(items, Iterable) else list(items)


def _check_ints(budget: _Budget, what: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    for arg in (*args, *kwargs.values()):
        if isinstance(arg, int) and not isinstance(arg, bool):
            budget.size(abs(arg), what)


def _check_result(budget: _Budget, result: object) -> object:
    if (n := _sized(result)) is not None:
        budget.size(n, "a string or list")
    return result


def _bounded_filter(name: str, f: Callable[..., Any]) -> Callable[..., Any]:
    # Filters are called directly by the compiled template, not through the sandbox's call(): wrap each.
    skip = 2 if getattr(f, "jinja_pass_arg", None) is not None else 1  # (context,) value, *args

    @functools.wraps(f)  # keeps jinja_pass_arg
    def bounded(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.tick()
        value = args[skip - 1] if len(args) >= skip else None
        if name == "join" and len(args) >= skip:
            value = _listed(value)  # measured before joining
            args = (*args[: skip - 1], value, *args[skip:])
        _check_args(budget, name, value, args[skip:], kwargs)
        return _check_result(budget, f(*args, **kwargs))

    return bounded


class _BoundedCodeGenerator(CodeGenerator):
    """Jinja's compiler, with every for loop's iterable and every ``~`` going through the budget."""

    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        wrapper = nodes.EnvironmentAttribute("bounded_iter")
        if not (isinstance(node.iter, nodes.Call) and node.iter.node == wrapper):
            node.iter = nodes.Call(wrapper, [node.iter], [], None, None, lineno=node.lineno)
        super().visit_For(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.concat((str(x) for x in (")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write(")))")


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The sandbox transformers renders chat templates in, with :class:`TemplateLimits` enforced."""

    code_generator_class = _BoundedCodeGenerator
    # Intercepted operators are also never folded at compile time, where they would run unbounded.
    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})

    def concat(self, parts: Iterable[str]) -> str:  # type: ignore[override]
        """Join output pieces (the prompt, block sets, macro results, ``~``), stopping at the size limit."""
        budget, out, total = _budget(), [], 0
        for part in parts:
            total += len(part)
            budget.size(total, "a string")
            out.append(part)
        return "".join(out)

    def bounded_iter(self, iterable: Iterable[Any]) -> Iterator[Any]:
        budget = _budget()
        for item in iterable:
            budget.tick()
            yield item

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        budget.tick()
        if operator == "+" and type(left) is str and type(right) is str:  # the common case, kept fast
            budget.size(len(left) + len(right), "a concatenated string")
            return left + right
        ints = all(isinstance(x, int) and not isinstance(x, bool) for x in (left, right))
        if operator == "**" and ints and right > 0:
            budget.number(left.bit_length() * right)
        elif operator == "*" and ints:
            budget.number(left.bit_length() + right.bit_length())
        elif operator == "*" and isinstance(right, int) and (n := _sized(left)) is not None:
            budget.size(n * right, "a repeated string or list")
        elif operator == "*" and isinstance(left, int) and (n := _sized(right)) is not None:
            budget.size(n * left, "a repeated string or list")
        elif operator == "+" and (n := _sized(left)) is not None and (m := _sized(right)) is not None:
            budget.size(n + m, "a concatenated string or list")
        elif operator == "%" and isinstance(left, str):
            _check_args(budget, "format", left, (right,) if not isinstance(right, tuple) else right, {})
        return _check_result(budget, super().call_binop(context, operator, left, right))

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.tick()
        nested = isinstance(__obj, (Macro, LoopContext))
        if nested:
            budget.depth += 1
            if budget.depth > budget.limits.depth:
                raise _LimitExceeded(
                    f"nested macro calls or recursive loops more than {budget.limits.depth} deep (TemplateLimits.depth)"
                )
            if isinstance(__obj, LoopContext) and args:  # loop(children): the recursion's items count too
                args = (__self.bounded_iter(args[0]), *args[1:])
        else:
            target = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
            name, value = getattr(target, "__name__", ""), getattr(target, "__self__", None)
            if name == "join" and isinstance(value, str) and args:
                args = (_listed(args[0]), *args[1:])  # measured before joining
            _check_args(budget, name, value, args, kwargs)
        try:
            return _check_result(budget, super().call(__context, __obj, *args, **kwargs))
        finally:
            if nested:
                budget.depth -= 1
