"""Requests: built once with typed fields, tokenized once, admitted once (``forge.requests`` and the app's handler).

The app wraps the bigram checkpoint of conftest: from "a" it decodes "bcdefgh...", its context is 64 tokens.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from forge.app import Forge
from forge.chat import PLAIN_STOP
from forge.errors import ConfigError, ContextLengthError
from forge.middleware import Context, Next, cache, prompt_template
from forge.requests import THREAD_CHARS, encode
from forge.toolcalls import ToolFormat
from helpers import GREEDY

WEATHER = {
    "type": "function",
    "function": {"name": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture
def app(bigram_dir: Path) -> Forge:
    return Forge.load(bigram_dir, defaults=GREEDY)


def counting_encodes(app: Forge, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The texts the app's tokenizer encodes as prompts, from now on."""
    tokenizer = app.tokenizer
    assert tokenizer is not None
    seen: list[str] = []
    real = tokenizer.encode_prompt

    def encode_prompt(text: str, **options: bool) -> list[int]:
        seen.append(text)
        return real(text, **options)

    monkeypatch.setattr(tokenizer, "encode_prompt", encode_prompt)
    return seen


# -- building -----------------------------------------------------------------------------------------------
def test_a_chat_request_with_tools_has_typed_fields(app: Forge) -> None:
    ctx = app.request(messages=HELLO, tools=[WEATHER], tool_choice="required")
    assert ctx.messages == ctx.rendered == HELLO
    assert ctx.rendered is not ctx.messages  # a copy: a middleware that edits the messages is noticed
    assert ctx.tools == [WEATHER]
    assert isinstance(ctx.tool_format, ToolFormat)
    assert ctx.params.grammar is not None  # the reply is held to the tool-call format
    assert "weather" in ctx.prompt  # the tools are described in the prompt
    assert set(PLAIN_STOP) <= set(ctx.params.stop)  # the plain template's turns end at the next "User:"
    assert ctx.meta == {}  # Forge keeps nothing in the free-form meta


def test_tool_choice_none_leaves_the_tools_out(app: Forge) -> None:
    ctx = app.request(messages=HELLO, tools=[WEATHER], tool_choice="none")
    assert ctx.tools is None and ctx.tool_format is None and ctx.params.grammar is None
    assert "weather" not in ctx.prompt


def test_id_meta_and_strict_are_the_callers(app: Forge) -> None:
    ctx = app.request("a", id="r-1", meta={"user": "bob"}, strict=True, max_tokens=2, stop=["x", "y"])
    assert (ctx.id, ctx.meta, ctx.strict_budget) == ("r-1", {"user": "bob"}, True)
    assert (ctx.params.max_tokens, ctx.params.stop) == (2, ("x", "y"))
    assert not app.request("a").strict_budget


@pytest.mark.parametrize(
    ("args", "options", "match"),
    [
        ((), {}, "a prompt or messages"),
        (("a",), {"messages": HELLO}, "a prompt or messages"),
        (("a",), {"tools": [WEATHER]}, "tools need a chat request"),
        ((["a"],), {}, "prompt must be a string"),
        (("a",), {"colour": "red"}, "unknown generation options"),
    ],
)
def test_a_malformed_request_is_a_config_error(app: Forge, args: tuple[Any, ...], options: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        app.request(*args, **options)


# -- tokenizing once ------------------------------------------------------------------------------------------
def test_the_prompt_is_tokenized_once(app: Forge, monkeypatch: pytest.MonkeyPatch) -> None:
    encoded = counting_encodes(app, monkeypatch)
    assert app.sync.generate("a") == "bcde"
    assert encoded == ["a"]


def test_the_prompt_is_tokenized_once_when_batching(app: Forge, monkeypatch: pytest.MonkeyPatch) -> None:
    encoded = counting_encodes(app, monkeypatch)

    async def main() -> str:
        await app.start_batching(max_batch=2)
        try:
            return str(await app.generate("a"))
        finally:
            await app.stop_batching()

    assert asyncio.run(main()) == "bcde"
    assert encoded == ["a"]


def test_given_ids_are_not_tokenized_again(app: Forge, monkeypatch: pytest.MonkeyPatch) -> None:
    assert app.tokenizer is not None
    ids = app.tokenizer.encode_prompt("a")
    encoded = counting_encodes(app, monkeypatch)
    ctx = app.request("a", ids=ids)
    assert asyncio.run(app.handle(ctx)) == "bcde"
    assert encoded == [] and ctx.ids == ids


def test_ids_go_stale_when_a_middleware_changes_the_prompt(app: Forge, monkeypatch: pytest.MonkeyPatch) -> None:
    assert app.tokenizer is not None
    ctx = Context(prompt="zzz", params=GREEDY)
    ctx.ids = [1, 2, 3]
    ctx.prompt = "y"
    assert ctx.ids is None
    app.use(prompt_template("{prompt}a"))
    ids = app.tokenizer.encode_prompt("q")
    encoded = counting_encodes(app, monkeypatch)
    ctx = app.request("q", ids=ids)
    assert asyncio.run(app.handle(ctx)) == "bcde"  # from "qa", not from the ids of "q"
    assert encoded == ["qa"]


def test_a_middleware_that_changes_the_messages_gets_them_rendered_again(app: Forge) -> None:
    async def rewrite(ctx: Context, next: Next) -> None:
        assert ctx.messages is not None
        ctx.messages[-1]["content"] = "Goodbye"
        await next()

    app.use(rewrite)
    ctx = app.request(messages=HELLO, max_tokens=1)
    asyncio.run(app.handle(ctx))
    assert "Goodbye" in ctx.prompt and "Hello" not in ctx.prompt
    assert ctx.rendered == ctx.messages


def test_long_texts_are_tokenized_off_the_event_loop(app: Forge, monkeypatch: pytest.MonkeyPatch) -> None:
    tokenizer = app.tokenizer
    assert tokenizer is not None
    threads: list[bool] = []
    real = tokenizer.encode_prompt

    def encode_prompt(text: str, **options: bool) -> list[int]:
        threads.append(threading.current_thread() is threading.main_thread())
        return real(text, **options)

    monkeypatch.setattr(tokenizer, "encode_prompt", encode_prompt)

    async def main() -> None:
        await encode(tokenizer, "a" * THREAD_CHARS)
        await encode(tokenizer, "a" * (THREAD_CHARS + 1))

    asyncio.run(main())
    assert threads == [True, False]


# -- admitting once ---------------------------------------------------------------------------------------------
def test_a_strict_budget_refuses_max_tokens_past_the_context(app: Forge) -> None:
    with pytest.raises(ContextLengthError) as refused:
        asyncio.run(app.handle(app.request("a", max_tokens=100, strict=True)))
    error = refused.value
    assert (error.field, error.prompt_tokens, error.context, error.requested) == ("max_tokens", 1, 64, 100)
    ctx = app.request("a", max_tokens=100)  # not strict: it stops at the context
    asyncio.run(app.handle(ctx))
    assert ctx.completion is not None
    assert (ctx.completion.finish_reason, ctx.completion.completion_tokens) == ("length", 63)


def test_a_prompt_past_the_context_is_refused_with_its_counts(app: Forge) -> None:
    with pytest.raises(ContextLengthError) as refused:
        asyncio.run(app.handle(app.request("a" * 100)))
    assert (refused.value.field, refused.value.prompt_tokens, refused.value.context) == ("prompt", 100, 64)


# -- logprobs while streaming ---------------------------------------------------------------------------------
def test_logprobs_so_far_follow_the_stream(app: Forge) -> None:
    async def main() -> tuple[list[int], Context]:
        ctx = app.request("a", stream=True, logprobs=1)
        counts = []
        async for _ in app.handle_stream(ctx):
            counts.append(len(ctx.logprobs_so_far()))
        return counts, ctx

    counts, ctx = asyncio.run(main())
    assert len(counts) == 4 and all(n >= i + 1 for i, n in enumerate(counts))  # the model may be ahead of the text
    assert ctx.completion is not None and ctx.completion.logprobs is not None
    assert [lp.token for lp in ctx.logprobs_so_far()] == [lp.token for lp in ctx.completion.logprobs] == list("bcde")


def test_logprobs_so_far_are_empty_when_a_middleware_answers(app: Forge) -> None:
    app.use(cache())

    async def main() -> list[Context]:
        contexts = []
        for _ in range(2):
            ctx = app.request("a", stream=True, logprobs=1)
            contexts.append(ctx)
            assert "".join([piece async for piece in app.handle_stream(ctx)]) == "bcde"
        return contexts

    first, again = asyncio.run(main())
    assert len(first.logprobs_so_far()) == 4
    assert again.cached and again.logprobs_so_far() == []
