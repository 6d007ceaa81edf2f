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
        if not isinstance(m["content"], str):
            raise ConfigError(f"messages[{i}]['content'] must be a string, got {type(m['content']).__name__}")
        out.append(dict(m))
    return out


def render_chat(
    template: str | None,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = True,
    special_tokens: Mapping[str, str | None] | None = None,
    **variables: Any,
) -> str:
    """The prompt for ``messages`` under ``template`` (:data:`PLAIN_TEMPLATE` when None).

    ``special_tokens`` fills ``bos_token``/``eos_token`` as templates expect.
    """
    compiled = _compile(template or PLAIN_TEMPLATE)
    context = {"bos_token": "", "eos_token": "", **{k: v or "" for k, v in (special_tokens or {}).items()}}
    try:
        return compiled.render(
            messages=check_messages(messages), add_generation_prompt=add_generation_prompt, **context, **variables
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
