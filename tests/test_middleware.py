"""Koa-style middleware around every generation request: order, short-circuits, errors.

The built-ins have their own file, test_builtins.py.

The app wraps a "bigram" Transformer (see conftest) saved as a checkpoint:
greedy decoding from a prompt ending in "a" gives "bcdefgh..." one character
per streamed piece, so every expected output is known in advance and depends
on the prompt the model really sees. ``reaches_model`` is registered last, so
it sees exactly the requests that get to the model.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from forge.app import Forge
from forge.errors import ConfigError, ContextLengthError, ForgeError, GenerationError
from forge.events import ErrorEvent, ResponseEvent, TokenEvent
from forge.middleware import (
    Context,
    Middleware,
    Next,
    error_handler,
    prompt_template,
    timer,
)
from helpers import GREEDY, TOO_LONG, Boom, breaks_at, generate, reaches_model, record, stream, tagged


@pytest.fixture
def app(bigram_dir: Path) -> Forge:
    """A fresh app (its stack is built at its first request) that decodes greedily, 4 tokens."""
    return Forge.load(bigram_dir, defaults=GREEDY)


# -- the fixture model is what the tests assume --------------------------------------
def test_the_bigram_app_follows_the_table(app: Forge) -> None:
    assert generate(app, "a") == "bcde"
    assert generate(app, "zzc", max_tokens=6) == "defgha"
    assert stream(app, "a") == ["b", "c", "d", "e"]


# -- order ------------------------------------------------------------------------------
def test_onion_order_for_generate(app: Forge) -> None:
    trace: list[tuple[str, str, str | None]] = []

    def traced(name: str) -> Middleware:
        async def mw(ctx: Context, next: Next) -> None:
            trace.append((name, "before", ctx.response))
            await next()
            trace.append((name, "after", ctx.response))

        return mw

    app.use(traced("outer")).use(traced("inner"))
    assert generate(app, "a") == "bcde"
    # The model answered between the inner middleware's before and after.
    assert trace == [
        ("outer", "before", None),
        ("inner", "before", None),
        ("inner", "after", "bcde"),
        ("outer", "after", "bcde"),
    ]


def test_onion_order_for_stream(app: Forge) -> None:
    trace: list[tuple[str, str, bool]] = []

    def traced(name: str) -> Middleware:
        async def mw(ctx: Context, next: Next) -> None:
            trace.append((name, "before", ctx.chunks is not None))
            await next()
            trace.append((name, "after", ctx.chunks is not None))
            ctx.chunks = tagged(ctx.chunks, f"|{name}")  # type: ignore[arg-type]

        return mw

    app.use(traced("outer")).use(traced("inner"))
    pieces = stream(app, "a", max_tokens=2)
    # The model's stream exists only after the inner middleware's next().
    assert trace == [
        ("outer", "before", False),
        ("inner", "before", False),
        ("inner", "after", True),
        ("outer", "after", True),
    ]
    # Each piece passes the inner wrapper first, then the outer one.
    assert pieces == ["b|inner|outer", "c|inner|outer"]


# -- input, short-circuit, output ----------------------------------------------------------
def test_middleware_changes_the_prompt_the_model_sees(app: Forge) -> None:
    async def to_c(ctx: Context, next: Next) -> None:
        ctx.prompt = ctx.prompt + "c"
        await next()

    seen: list[str] = []
    app.use(to_c).use(reaches_model(seen))
    assert generate(app, "a") == "defg"  # the model continued "ac", not "a"
    assert stream(app, "a") == ["d", "e", "f", "g"]
    assert seen == ["ac", "ac"]


def test_middleware_changes_the_params(app: Forge) -> None:
    async def short(ctx: Context, next: Next) -> None:
        ctx.params = ctx.params.replace(max_tokens=2)
        await next()

    app.use(short)
    assert generate(app, "a", max_tokens=10) == "bc"
    assert stream(app, "a", max_tokens=10) == ["b", "c"]


def test_prompt_template_changes_what_the_model_sees(app: Forge) -> None:
    seen: list[str] = []
    app.use(prompt_template("Q: {prompt} e")).use(reaches_model(seen))
    assert generate(app, "a") == "fgha"  # "...e" continues with "f"
    assert seen == ["Q: a e"]


def test_prompt_template_requires_the_placeholder() -> None:
    with pytest.raises(ConfigError, match=r"\{prompt\}"):
        prompt_template("Q: {question}")


@pytest.mark.parametrize("answer", ["set_text", "response"])
def test_short_circuit_skips_the_model(app: Forge, answer: str) -> None:
    async def canned(ctx: Context, next: Next) -> None:
        if answer == "set_text":
            ctx.set_text("canned")
        else:
            ctx.response = "canned"

    seen: list[str] = []
    events = record(app, "response", "token")
    app.use(canned).use(reaches_model(seen))
    assert generate(app, "a") == "canned"
    assert "".join(stream(app, "a")) == "canned"
    assert seen == []
    assert [e.text for e in events if isinstance(e, ResponseEvent)] == ["canned", "canned"]
    assert "".join(e.text for e in events if isinstance(e, TokenEvent)) == "canned"


def test_post_processing_the_response(app: Forge) -> None:
    async def shout(ctx: Context, next: Next) -> None:
        await next()
        assert ctx.response is not None
        ctx.response = ctx.response.upper() + "!"

    events = record(app, "response")
    app.use(shout)
    assert generate(app, "a") == "BCDE!"
    assert [e.text for e in events if isinstance(e, ResponseEvent)] == ["BCDE!"]


def test_wrapping_the_stream_piece_by_piece(app: Forge) -> None:
    async def upper(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
        async for piece in chunks:
            yield piece.upper()

    async def shout(ctx: Context, next: Next) -> None:
        await next()
        if ctx.stream:
            ctx.chunks = upper(ctx.chunks)  # type: ignore[arg-type]

    events = record(app, "token", "response")
    app.use(shout)
    assert stream(app, "a") == ["B", "C", "D", "E"]
    assert [e.text for e in events if isinstance(e, TokenEvent)] == ["B", "C", "D", "E"]
    assert [e.text for e in events if isinstance(e, ResponseEvent)] == ["BCDE"]


def test_a_middleware_sees_meta_and_id_shared_down_the_stack(app: Forge) -> None:
    seen: list[tuple[str, str]] = []

    async def tag(ctx: Context, next: Next) -> None:
        ctx.meta["user"] = "alice"
        await next()

    async def read(ctx: Context, next: Next) -> None:
        seen.append((ctx.meta["user"], ctx.id))
        await next()

    events = record(app, "request")
    app.use(tag).use(read)
    generate(app, "a")
    assert seen == [("alice", events[0].id)]  # type: ignore[attr-defined]


# -- misuse ---------------------------------------------------------------------------------
def test_calling_next_twice_raises(app: Forge) -> None:
    async def twice(ctx: Context, next: Next) -> None:
        await next()
        await next()

    events = record(app, "error")
    app.use(twice)
    with pytest.raises(ForgeError, match=r"twice.*more than once"):
        generate(app, "a")
    assert [type(e.error) for e in events if isinstance(e, ErrorEvent)] == [ForgeError]


def test_use_after_the_first_request_raises(app: Forge) -> None:
    async def late(ctx: Context, next: Next) -> None:
        ctx.set_text("late")

    generate(app, "a")
    with pytest.raises(ConfigError, match="first request"):
        app.use(late)
    assert generate(app, "a") == "bcde"  # the refused middleware is not in the stack


def test_use_after_a_first_streamed_request_raises(app: Forge) -> None:
    stream(app, "a")
    with pytest.raises(ConfigError, match="first request"):
        app.use(timer())


@pytest.mark.parametrize(
    "middleware",
    [lambda ctx, next: None, print, "timer", timer],
    ids=["sync lambda", "builtin function", "string", "factory not called"],
)
def test_use_needs_an_async_middleware(app: Forge, middleware: Any) -> None:
    with pytest.raises(ConfigError, match="async def"):
        app.use(middleware)


def test_use_takes_an_object_with_an_async_call(app: Forge) -> None:
    class Suffix:
        async def __call__(self, ctx: Context, next: Next) -> None:
            await next()
            ctx.response = (ctx.response or "") + "!"

    assert generate(app.use(Suffix()), "a") == "bcde!"


# -- errors ------------------------------------------------------------------------------------
def test_an_error_in_a_middleware_reaches_the_caller_and_is_an_event(app: Forge) -> None:
    error = Boom("middleware failed")

    async def broken(ctx: Context, next: Next) -> None:
        raise error

    events = record(app, "error", "response")
    app.use(broken)
    with pytest.raises(Boom) as raised:
        generate(app, "a")
    assert raised.value is error
    with pytest.raises(Boom):
        stream(app, "a")
    assert [(type(e), e.error, e.source) for e in events] == [(ErrorEvent, error, "request")] * 2  # type: ignore[attr-defined]


def test_an_error_in_the_model_reaches_the_caller_and_is_an_event(app: Forge) -> None:
    events = record(app, "error")
    with pytest.raises(GenerationError, match="context"):
        generate(app, TOO_LONG)
    with pytest.raises(GenerationError, match="context"):
        stream(app, TOO_LONG)
    # A prompt past the context is the GenerationError that says so: ContextLengthError.
    assert [type(e.error) for e in events if isinstance(e, ErrorEvent)] == [ContextLengthError] * 2


def test_an_error_mid_stream_reaches_the_caller_after_the_first_pieces(app: Forge) -> None:
    async def fail_after_two(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
        async for i, piece in _enumerate(chunks):
            if i == 2:
                raise Boom("stream broke")
            yield piece

    async def breaks(ctx: Context, next: Next) -> None:
        await next()
        ctx.chunks = fail_after_two(ctx.chunks)  # type: ignore[arg-type]

    received: list[str] = []

    async def consume() -> None:
        async for piece in app.stream("a"):
            received.append(piece)

    events = record(app, "error", "response")
    app.use(breaks)
    with pytest.raises(Boom):
        asyncio.run(consume())
    assert received == ["b", "c"]
    assert [(type(e), e.source) for e in events] == [(ErrorEvent, "request")]  # type: ignore[attr-defined]


async def _enumerate(chunks: AsyncIterator[str]) -> AsyncIterator[tuple[int, str]]:
    i = 0
    async for piece in chunks:
        yield i, piece
        i += 1


def test_error_handler_recovers_a_generate(app: Forge) -> None:
    handled: list[Exception] = []

    async def apologise(ctx: Context, error: Exception) -> None:
        handled.append(error)
        ctx.set_text(f"sorry: {type(error).__name__}")

    events = record(app, "response")
    app.use(error_handler(apologise))
    assert generate(app, TOO_LONG) == "sorry: ContextLengthError"
    assert [type(e) for e in handled] == [ContextLengthError]
    assert [e.text for e in events if isinstance(e, ResponseEvent)] == ["sorry: ContextLengthError"]
    assert generate(app, "a") == "bcde"  # requests that succeed are untouched


def test_error_handler_recovers_a_stream(app: Forge) -> None:
    async def apologise(ctx: Context, error: Exception) -> None:
        ctx.set_text("sorry")

    app.use(error_handler(apologise))
    assert stream(app, TOO_LONG) == ["sorry"]
    assert stream(app, "a") == ["b", "c", "d", "e"]


def test_error_handler_finishes_a_stream_that_broke_midway(app: Forge) -> None:
    breaks = breaks_at("d")

    async def apologise(ctx: Context, error: Exception) -> None:
        ctx.set_text("[cut]")

    app.use(error_handler(apologise)).use(breaks)
    assert stream(app, "a") == ["b", "c", "[cut]"]


def test_error_handler_that_does_not_answer_lets_the_error_through(app: Forge) -> None:
    handled: list[Exception] = []

    async def look_only(ctx: Context, error: Exception) -> None:
        handled.append(error)

    events = record(app, "error")
    app.use(error_handler(look_only))
    with pytest.raises(GenerationError):
        generate(app, TOO_LONG)
    with pytest.raises(GenerationError):
        stream(app, TOO_LONG)
    assert [type(e) for e in handled] == [ContextLengthError] * 2
    assert len(events) == 2


def test_error_handler_with_a_sync_handle_fails_early_or_works(app: Forge) -> None:
    """``on_error`` takes sync or async hooks; ``error_handler`` must not turn a sync one into a TypeError.

    Either fix is fine: refuse it when the middleware is built (naming the
    call), or call it like ``on_error`` does. What must not happen is what a
    plain ``await handle(...)`` does: the handler runs, its answer is dropped,
    and the caller gets "NoneType can't be used in 'await' expression"
    instead of the original error.
    """

    def handle(ctx: Context, error: Exception) -> None:
        ctx.set_text("sorry")

    try:
        middleware = error_handler(handle)  # type: ignore[arg-type]
    except ConfigError as e:
        assert "error_handler" in str(e)
        return
    app.use(middleware)
    assert generate(app, TOO_LONG) == "sorry"
    assert stream(app, TOO_LONG) == ["sorry"]


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_on_error_recovers_a_generate(app: Forge, kind: str) -> None:
    def hook(ctx: Context, error: Exception) -> None:
        ctx.set_text(f"hook: {type(error).__name__}")

    async def ahook(ctx: Context, error: Exception) -> None:
        hook(ctx, error)

    events = record(app, "error", "response")
    assert app.on_error(hook if kind == "sync" else ahook) is app
    assert generate(app, TOO_LONG) == "hook: ContextLengthError"
    assert [e.name for e in events] == ["error", "response"]
    assert events[1].text == "hook: ContextLengthError"  # type: ignore[attr-defined]


def test_on_error_recovers_a_stream_that_fails_in_a_middleware(app: Forge) -> None:
    async def broken(ctx: Context, next: Next) -> None:
        raise Boom("before the model")

    app.use(broken).on_error(lambda ctx, error: ctx.set_text("hook"))
    assert stream(app, "a") == ["hook"]


def test_on_error_recovers_a_stream_that_breaks_while_it_is_consumed(app: Forge) -> None:
    """The model's stream starts lazily, so its errors come after the stack has returned."""

    breaks = breaks_at("d")

    handled: list[Exception] = []

    def hook(ctx: Context, error: Exception) -> None:
        handled.append(error)
        ctx.set_text("[cut]")

    events = record(app, "error", "response")
    app.use(breaks).on_error(hook)
    assert stream(app, "a") == ["b", "c", "[cut]"]
    assert [str(e) for e in handled] == ["no d"]
    assert [e.name for e in events] == ["error", "response"]
    assert events[1].text == "bc[cut]"  # type: ignore[attr-defined]


def test_on_error_recovers_a_stream_whose_model_fails(app: Forge) -> None:
    app.on_error(lambda ctx, error: ctx.set_text(f"hook: {type(error).__name__}"))
    assert stream(app, TOO_LONG) == ["hook: ContextLengthError"]


def test_a_failure_recovered_by_error_handler_is_still_an_error_event(app: Forge) -> None:
    async def apologise(ctx: Context, error: Exception) -> None:
        ctx.set_text("sorry")

    events = record(app, "error", "response")
    app.use(error_handler(apologise))
    assert generate(app, TOO_LONG) == "sorry"
    assert stream(app, TOO_LONG) == ["sorry"]
    assert [e.name for e in events] == ["error", "response"] * 2
    assert {type(e.error) for e in events if isinstance(e, ErrorEvent)} == {ContextLengthError}


def test_an_error_seen_by_two_handlers_is_one_error_event(app: Forge) -> None:
    async def look_only(ctx: Context, error: Exception) -> None:
        pass

    events = record(app, "error")
    app.use(error_handler(look_only)).use(error_handler(look_only)).on_error(lambda ctx, error: ctx.set_text("ok"))
    assert generate(app, TOO_LONG) == "ok"
    assert len(events) == 1


def test_on_error_hooks_run_in_order_until_one_answers(app: Forge) -> None:
    calls: list[str] = []

    def silent(ctx: Context, error: Exception) -> None:
        calls.append("silent")

    def answers(ctx: Context, error: Exception) -> None:
        calls.append("answers")
        ctx.set_text("answered")

    def never(ctx: Context, error: Exception) -> None:
        calls.append("never")

    app.on_error(silent).on_error(answers).on_error(never)
    assert generate(app, TOO_LONG) == "answered"
    assert calls == ["silent", "answers"]


def test_on_error_hook_that_does_not_answer_lets_the_error_through(app: Forge) -> None:
    seen: list[Exception] = []
    app.on_error(lambda ctx, error: seen.append(error))
    with pytest.raises(GenerationError):
        generate(app, TOO_LONG)
    assert [type(e) for e in seen] == [ContextLengthError]


def test_on_error_needs_a_callable(app: Forge) -> None:
    with pytest.raises(ConfigError, match="on_error"):
        app.on_error("not a hook")  # type: ignore[arg-type]
