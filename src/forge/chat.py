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

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from forge.errors import ConfigError
from forge.structured import ToolCall, ToolFormat

__all__ = ["PLAIN_STOP", "PLAIN_TEMPLATE", "ROLES", "Message", "check_messages", "render_chat"]

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
            f"messages must be a non-empty list of {{'role': ..., 'content': ...}} dicts, got {messages!r:.80}"
        )
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ConfigError(
                f"messages[{i}] = {m!r:.80} needs 'role' and 'content' keys, e.g. {{'role': 'user', 'content': 'Hi'}}"
            )
        if m["role"] not in ROLES:
            raise ConfigError(f"messages[{i}] has role {m['role']!r}; roles are {', '.join(ROLES)}")
        calls = m.get("tool_calls")
        if calls is not None and (
            m["role"] != "assistant" or isinstance(calls, str) or not isinstance(calls, Sequence)
        ):
            raise ConfigError(f"messages[{i}]['tool_calls'] must be a list, on an assistant message")
        if not isinstance(m["content"], str) and not (m["content"] is None and calls):
            raise ConfigError(
                f"messages[{i}]['content'] must be a string, got {type(m['content']).__name__} "
                "(null is allowed only on an assistant message with tool_calls)"
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
            "{'id': ..., 'type': 'function', 'function': {'name': ..., 'arguments': '<JSON object>'}}"
        )
    assert isinstance(call, Mapping)
    return ToolCall(f["name"], arguments, **({"id": str(call["id"])} if call.get("id") else {}))


def _for_template(messages: list[dict[str, Any]], fmt: ToolFormat) -> list[dict[str, Any]]:
    """Tool calls and results as the template expects them: HF's {"function": {"name", "arguments": dict}} for a
    template with tool support; for one without, the call's exact text in the content and the result in a user turn.
    """
    out = []
    for m in messages:
        calls: list[ToolCall] = m.get("tool_calls") or []
        if calls and fmt.native:
            functions = [{"name": c.name, "arguments": c.arguments} for c in calls]
            m = {
                **m,
                "tool_calls": [
                    {"id": c.id, "type": "function", "function": f} for c, f in zip(calls, functions, strict=True)
                ],
            }
        elif m["role"] == "tool" and not fmt.native:
            # Without a tool role of its own, a template gets Hermes' wrapping, in a user turn: small chat models
            # read a result there and move on, where an unknown "tool" role makes them repeat their call.
            m = {"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"}
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


def render_chat(
    template: str | None,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = True,
    special_tokens: Mapping[str, str | None] | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    **variables: Any,
) -> str:
    """The prompt for ``messages`` under ``template`` (:data:`PLAIN_TEMPLATE` when None).

    ``special_tokens`` fills ``bos_token``/``eos_token`` as templates expect.
    ``tools`` (OpenAI ``tools`` entries) go to a template that renders them
    itself; for any other template Forge describes them in the system message
    (see :class:`forge.structured.ToolFormat`).
    """
    compiled = _compile(template or PLAIN_TEMPLATE)
    context = {"bos_token": "", "eos_token": "", **{k: v or "" for k, v in (special_tokens or {}).items()}}
    fmt = ToolFormat.for_template(template)
    checked = check_messages(messages)
    if tools and fmt.native:
        variables["tools"] = [{"type": "function", "function": f} for f in fmt.functions(tools)]
    elif tools:
        checked = _with_tool_prompt(checked, fmt.system_prompt(tools))
    try:
        return compiled.render(
            messages=_for_template(checked, fmt), add_generation_prompt=add_generation_prompt, **context, **variables
        )
    except TemplateError as e:
        raise ConfigError(f"the chat template refused these messages: {e}") from None
    except jinja2.TemplateError as e:
        raise ConfigError(f"the model's chat template failed to render ({e}); pass a fixed template") from None


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
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(
            f"the chat template is not valid Jinja (line {e.lineno}: {e.message}); fix the template"
        ) from None
