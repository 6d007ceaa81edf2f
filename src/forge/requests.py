"""Requests: a prompt or a conversation, with its options, made into one :class:`Context`.

Every generation the app runs starts here, once: chat messages are checked and
rendered with the model's template (with their tools), a tool call's grammar and
the plain template's stop strings are set, and the options become one
:class:`GenerationConfig`. The prompt is tokenized once too, with :func:`encode`,
when the model runs (or given as ``ids``); the length check and the token budget
are the generator's admission, which refuses a prompt that does not fit.

>>> ctx = build_request(tokenizer, GenerationConfig(), "Hello", max_tokens=8)  # doctest: +SKIP
>>> ctx.params.max_tokens
8
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Mapping, Sequence
from typing import Any

from forge.chat import PLAIN_STOP, check_messages, render_chat
from forge.errors import ConfigError
from forge.generator import GenerationConfig
from forge.middleware import Context
from forge.structured import OutputSpec, output_spec
from forge.tokenizer import Tokenizer
from forge.toolcalls import ToolFormat

__all__ = ["THREAD_CHARS", "build_request", "encode", "parsed", "render", "schema_option"]

#: Texts longer than this are tokenized in a worker thread, so the event loop keeps serving meanwhile.
THREAD_CHARS = 4096

Messages = Sequence[Mapping[str, Any]] | str
Tools = Sequence[Mapping[str, Any]]


async def encode(tokenizer: Tokenizer, text: str, *, prompt: bool = True, remember: bool = True) -> list[int]:
    """The token ids of ``text``: as a prompt (with BOS when the model wants one), or plain text.

    ``remember``: a long prompt is tokenized only past what it shares with a recent one (``forge.prompt_memory``).

    >>> await encode(tokenizer, "Hello")  # doctest: +SKIP
    [19556]
    """
    encoder = functools.partial(tokenizer.encode_prompt, remember=remember) if prompt else tokenizer.encode
    return encoder(text) if len(text) <= THREAD_CHARS else await asyncio.to_thread(encoder, text)


def render(
    tokenizer: Tokenizer, messages: Messages, *, add_generation_prompt: bool = True, tools: Tools | None = None
) -> str:
    """The prompt for ``messages`` (and ``tools``, OpenAI ``tools`` entries) in the tokenizer's chat template.

    >>> render(tokenizer, [{"role": "user", "content": "Hi"}])  # doctest: +SKIP
    '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
    """
    return render_chat(  # render_chat validates the messages
        tokenizer.chat_template,
        messages,  # type: ignore[arg-type]
        add_generation_prompt=add_generation_prompt,
        special_tokens={"bos_token": tokenizer.bos, "eos_token": tokenizer.eos},
        tools=tools,
    )


def build_request(
    tokenizer: Tokenizer | None,
    defaults: GenerationConfig,
    prompt: str | None = None,
    *,
    messages: Messages | None = None,
    stream: bool = False,
    tools: Tools | None = None,
    allowed_tools: Tools | None = None,
    tool_choice: str | None = None,
    parallel_tool_calls: bool = False,
    id: str | None = None,
    strict: bool = False,
    ids: Sequence[int] | None = None,
    meta: Mapping[str, Any] | None = None,
    **options: Any,
) -> Context:
    """A complete request: a ``prompt``, or chat ``messages`` (which need the ``tokenizer``'s chat template).

    ``options`` are :class:`GenerationConfig` fields over ``defaults``. With ``tools``,
    ``tool_choice`` (``"auto"``, ``"required"``, ``"none"`` or a tool's name) and
    ``parallel_tool_calls`` keep OpenAI's meanings: the tools are described in the prompt
    and the reply is held to the model's tool-call format (``ctx.tool_format`` parses it);
    ``allowed_tools`` narrows the ones the reply may call. ``strict`` refuses an explicit
    ``max_tokens`` that does not fit after the prompt; ``ids`` are the prompt's token ids
    when the caller has them; ``id`` and ``meta`` become ``ctx.id`` and ``ctx.meta``.
    """
    if (prompt is None) == (messages is None):
        raise ConfigError("app.request() needs a prompt or messages, not both and not neither")
    if messages is None:
        if not isinstance(prompt, str):
            raise ConfigError(f"prompt must be a string, got {type(prompt).__name__}", field="prompt")
        if tools:
            raise ConfigError("tools need a chat request: pass messages=[...] with the tools", field="tools")
        ctx = Context(prompt=prompt, params=_params(defaults, options), stream=stream)
    else:
        if tokenizer is None:
            raise ConfigError("a chat request needs a model and its tokenizer: train or load one first")
        choice = (tool_choice or "auto", parallel_tool_calls)
        ctx = _chat(tokenizer, defaults, messages, stream, tools, allowed_tools or tools, choice, options)
    if id is not None:
        ctx.id = id
    ctx.strict_budget = strict
    ctx.meta.update(meta or {})
    if ids is not None:
        ctx.ids = ids
    return ctx


def _params(defaults: GenerationConfig, options: dict[str, Any]) -> GenerationConfig:
    if options.get("stop") is not None and not isinstance(options["stop"], str):
        options["stop"] = tuple(options["stop"])
    return defaults.replace(**options)


def _chat(
    tokenizer: Tokenizer,
    defaults: GenerationConfig,
    messages: Messages,
    stream: bool,
    tools: Tools | None,
    allowed: Tools | None,
    choice: tuple[str, bool],
    options: dict[str, Any],
) -> Context:
    """A chat request: the messages rendered once, with the tool-call grammar when the reply may call tools."""
    checked = check_messages(messages)
    tool_choice, parallel = choice
    if tool_choice == "none":  # no call can follow: described tools only make a small model write call text
        tools = None
    listed = [dict(t) for t in tools] if tools else None
    prompt = render(tokenizer, checked, tools=listed)
    params = _params(defaults, options)
    ctx = Context(prompt=prompt, params=params, stream=stream)
    if listed:
        if params.grammar is not None:
            raise ConfigError("pass tools or a schema / response_format, not both: a reply is one or the other")
        ctx.tool_format = ToolFormat.for_template(tokenizer.chat_template)
        grammar = ctx.tool_format.grammar(allowed, tool_choice, parallel=parallel)
        ctx.params = params.replace(grammar=grammar)
    if tokenizer.chat_template is None:
        # The plain template's turns end at the next "User:" line, whatever else the caller stops at.
        ctx.params = ctx.params.replace(stop=tuple(dict.fromkeys((*ctx.params.stop, *PLAIN_STOP))))
    ctx.messages, ctx.tools = checked, listed
    ctx.rendered = [dict(m) for m in checked]  # a copy: a middleware that edits ctx.messages is seen
    return ctx


def schema_option(schema: Any, options: dict[str, Any]) -> OutputSpec | None:
    """Turn ``schema=`` (a pydantic model, a JSON schema or a regex) into the ``grammar`` option of
    ``options``; the spec returned parses the reply afterwards (see :func:`parsed`)."""
    if schema is None:
        return None
    spec = output_spec(schema)
    options["grammar"] = spec.grammar
    return spec


def parsed(spec: OutputSpec | None, text: str, ctx: Context) -> Any:
    """The reply ``text`` as ``spec`` parses it (a model instance, JSON values, the match), or the text."""
    if spec is None:
        return text
    return spec.parse(text, ctx.completion.finish_reason if ctx.completion is not None else None)
