"""Koa-style middleware around every generation request, and the built-ins.

The app wraps a "bigram" Transformer (see conftest) saved as a checkpoint:
greedy decoding from a prompt ending in "a" gives "bcdefgh..." one character
per streamed piece, so every expected output is known in advance and depends
on the prompt the model really sees. ``reaches_model`` is registered last, so
it sees exactly the requests that get to the model.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from forge.app import Forge
from forge.errors import ConfigError, ForgeError, GenerationError
from forge.events import ErrorEvent, Event, ResponseEvent, TokenEvent
from forge.generator import GenerationConfig
from forge.middleware import (
    Context,
    Middleware,
    Next,
    RateLimitError,
    cache,
    content_filter,
    error_handler,
    logger,
    prompt_template,
    rate_limit,
    timer,
)
from forge.models import save
from forge.tokenizer import EOS, Tokenizer

CYCLE = "abcdefgh"
#: a -> b -> ... -> h -> a, and v -> w -> x -> end of text.
TABLE: dict[str | int, str | int] = {
    **{c: CYCLE[(i + 1) % len(CYCLE)] for i, c in enumerate(CYCLE)},
    "v": "w",
    "w": "x",
    "x": EOS,
}
GREEDY = GenerationConfig(temperature=0, max_tokens=4)
TOO_LONG = "a" * 100  # the bigram model's context is 64 tokens


@pytest.fixture(scope="module")
def bigram_dir(
    tmp_path_factory: pytest.TempPathFactory,
    bigram_model: Callable[..., torch.nn.Module],
    char_tokenizer: Tokenizer,
) -> Path:
    path = tmp_path_factory.mktemp("bigram") / "checkpoint"
    save(path, bigram_model(char_tokenizer, TABLE), char_tokenizer)  # type: ignore[arg-type]
    return path


@pytest.fixture
def app(bigram_dir: Path) -> Forge:
    """A fresh app (its stack is built at its first request) that decodes greedily, 4 tokens."""
    return Forge.load(bigram_dir, defaults=GREEDY)


# -- helpers ------------------------------------------------------------------------
def generate(app: Forge, prompt: str, **options: Any) -> str:
    result = asyncio.run(app.generate(prompt, **options))
    assert isinstance(result, str)
    return result


def stream(app: Forge, prompt: str, **options: Any) -> list[str]:
    async def collect() -> list[str]:
        return [piece async for piece in app.stream(prompt, **options)]

    return asyncio.run(collect())


def record(app: Forge, *names: str) -> list[Event]:
    seen: list[Event] = []
    for name in names:
        app.on(name, seen.append)
    return seen


def reaches_model(prompts: list[str]) -> Middleware:
    """Register last: records the prompt of every request that gets through to the model."""

    async def reaches_model(ctx: Context, next: Next) -> None:
        prompts.append(ctx.prompt)
        await next()

    return reaches_model


def capture(contexts: list[Context]) -> Middleware:
    async def capture(ctx: Context, next: Next) -> None:
        contexts.append(ctx)
        await next()

    return capture


async def tagged(chunks: AsyncIterator[str], tag: str) -> AsyncIterator[str]:
    async for piece in chunks:
        yield piece + tag


class Boom(Exception):
    pass


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
    assert [type(e.error) for e in events if isinstance(e, ErrorEvent)] == [GenerationError] * 2


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
    assert generate(app, TOO_LONG) == "sorry: GenerationError"
    assert [type(e) for e in handled] == [GenerationError]
    assert [e.text for e in events if isinstance(e, ResponseEvent)] == ["sorry: GenerationError"]
    assert generate(app, "a") == "bcde"  # requests that succeed are untouched


def test_error_handler_recovers_a_stream(app: Forge) -> None:
    async def apologise(ctx: Context, error: Exception) -> None:
        ctx.set_text("sorry")

    app.use(error_handler(apologise))
    assert stream(app, TOO_LONG) == ["sorry"]
    assert stream(app, "a") == ["b", "c", "d", "e"]


def test_error_handler_finishes_a_stream_that_broke_midway(app: Forge) -> None:
    async def fail_at_d(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
        async for piece in chunks:
            if piece == "d":
                raise Boom("no d")
            yield piece

    async def breaks(ctx: Context, next: Next) -> None:
        await next()
        ctx.chunks = fail_at_d(ctx.chunks)  # type: ignore[arg-type]

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
    assert [type(e) for e in handled] == [GenerationError] * 2
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
    assert generate(app, TOO_LONG) == "hook: GenerationError"
    assert [e.name for e in events] == ["error", "response"]
    assert events[1].text == "hook: GenerationError"  # type: ignore[attr-defined]


def test_on_error_recovers_a_stream_that_fails_in_a_middleware(app: Forge) -> None:
    async def broken(ctx: Context, next: Next) -> None:
        raise Boom("before the model")

    app.use(broken).on_error(lambda ctx, error: ctx.set_text("hook"))
    assert stream(app, "a") == ["hook"]


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
    assert [type(e) for e in seen] == [GenerationError]


def test_on_error_needs_a_callable(app: Forge) -> None:
    with pytest.raises(ConfigError, match="on_error"):
        app.on_error("not a hook")  # type: ignore[arg-type]


# -- logger and timer -------------------------------------------------------------------------
def test_logger_writes_one_line_per_request(app: Forge) -> None:
    lines: list[str] = []
    requests = record(app, "request")
    app.use(logger(lines.append)).use(cache())
    generate(app, "a")
    generate(app, "a")  # a cache hit is still a request
    stream(app, "c")
    assert len(lines) == 3
    ids = [e.id for e in requests]  # type: ignore[attr-defined]
    assert [line.split()[0] for line in lines] == ids
    assert [line.split()[1] for line in lines] == ["generate", "generate", "stream"]
    assert "'a'" in lines[0] and "4 chars" in lines[0] and "(length)" in lines[0]
    assert "(cached)" in lines[1]
    assert "'c'" in lines[2] and "4 chars" in lines[2] and "(length)" in lines[2]


def test_logger_line_is_written_once_the_stream_is_consumed(app: Forge) -> None:
    lines: list[str] = []
    app.use(logger(lines.append))

    async def consume() -> list[int]:
        counts = []
        async for _ in app.stream("a"):
            counts.append(len(lines))
        return counts

    assert asyncio.run(consume()) == [0, 0, 0, 0]
    assert len(lines) == 1


def test_timer_records_total_for_generate(app: Forge) -> None:
    contexts: list[Context] = []
    app.use(capture(contexts)).use(timer())
    generate(app, "a")
    [ctx] = contexts
    assert set(ctx.timings) == {"total"}
    assert ctx.timings["total"] >= 0


def test_timer_records_first_token_and_total_for_stream(app: Forge) -> None:
    contexts: list[Context] = []
    app.use(capture(contexts)).use(timer())
    stream(app, "a")
    [ctx] = contexts
    assert set(ctx.timings) == {"first_token", "total"}
    assert ctx.timings["first_token"] >= 0
    assert ctx.timings["total"] >= 0


# -- cache --------------------------------------------------------------------------------------
def test_cache_hit_skips_the_model(app: Forge) -> None:
    seen: list[str] = []
    responses = record(app, "response")
    app.use(cache()).use(reaches_model(seen))
    first = generate(app, "a")
    second = generate(app, "a")
    assert first == second == "bcde"
    assert seen == ["a"]
    assert [e.cached for e in responses] == [False, True]  # type: ignore[attr-defined]
    assert [e.text for e in responses] == ["bcde", "bcde"]  # type: ignore[attr-defined]


def test_cache_hit_returns_the_stored_text_not_a_new_one(app: Forge) -> None:
    """A sampled answer is cached too: the hit returns the first answer, not a new sample.

    "z" is not in the bigram table, so the model's next-token distribution is uniform.
    """
    options = {"temperature": 1.0, "max_tokens": 12, "seed": None, "stop_at_eos": False}
    app.use(cache())
    sampled = generate(app, "z", **options)
    assert generate(app, "z", **options) == sampled


def test_cache_misses_on_different_params_or_prompt(app: Forge) -> None:
    seen: list[str] = []
    app.use(cache()).use(reaches_model(seen))
    assert generate(app, "a") == "bcde"
    assert generate(app, "a", max_tokens=2) == "bc"
    assert generate(app, "a", stop=["d"]) == "bc"
    assert generate(app, "c") == "defg"
    assert seen == ["a", "a", "a", "c"]


def test_cache_evicts_the_least_recently_used(app: Forge) -> None:
    seen: list[str] = []
    app.use(cache(max_entries=2)).use(reaches_model(seen))
    for prompt in ["a", "b", "a", "c", "a", "b"]:
        generate(app, prompt)
    # "a" was used again before "c" arrived, so "b" (least recently used) was evicted, not "a".
    assert seen == ["a", "b", "c", "b"]


def test_cache_with_one_entry(app: Forge) -> None:
    seen: list[str] = []
    app.use(cache(max_entries=1)).use(reaches_model(seen))
    for prompt in ["a", "a", "b", "a"]:
        generate(app, prompt)
    assert seen == ["a", "b", "a"]


def test_cache_needs_room_for_an_entry() -> None:
    with pytest.raises(ConfigError, match="max_entries"):
        cache(max_entries=0)


def test_cache_stores_a_stream_once_fully_consumed(app: Forge) -> None:
    seen: list[str] = []
    responses = record(app, "response")
    app.use(cache()).use(reaches_model(seen))
    assert stream(app, "a") == ["b", "c", "d", "e"]
    assert "".join(stream(app, "a")) == "bcde"
    assert generate(app, "a") == "bcde"
    assert seen == ["a"]
    assert [e.cached for e in responses] == [False, True, True]  # type: ignore[attr-defined]


def test_cache_does_not_store_a_stream_left_early(app: Forge) -> None:
    seen: list[str] = []
    app.use(cache()).use(reaches_model(seen))

    async def first_piece() -> str:
        agen = app.stream("a")
        try:
            return await agen.__anext__()
        finally:
            await agen.aclose()  # type: ignore[attr-defined]

    assert asyncio.run(first_piece()) == "b"
    assert generate(app, "a") == "bcde"
    assert seen == ["a", "a"]


def test_cache_keys_on_the_prompt_the_model_sees(app: Forge) -> None:
    """Behind a template, two prompts the template maps apart are two entries."""
    seen: list[str] = []
    app.use(prompt_template("{prompt}c")).use(cache()).use(reaches_model(seen))
    assert generate(app, "a") == "defg"
    assert generate(app, "b") == "defg"
    assert seen == ["ac", "bc"]


# -- rate limit ---------------------------------------------------------------------------------
def test_rate_limit_allows_a_burst_then_refuses(app: Forge) -> None:
    errors = record(app, "error")
    app.use(rate_limit(0.001, burst=2))
    assert generate(app, "a") == "bcde"
    assert generate(app, "c") == "defg"
    with pytest.raises(RateLimitError, match="rate limit") as raised:
        generate(app, "a")
    assert raised.value.http_status == 429
    assert isinstance(raised.value, ForgeError)
    with pytest.raises(RateLimitError):
        stream(app, "a")
    assert [type(e.error) for e in errors] == [RateLimitError] * 2  # type: ignore[attr-defined]


def test_rate_limit_refuses_before_the_model_runs(app: Forge) -> None:
    seen: list[str] = []
    app.use(rate_limit(0.001, burst=1)).use(reaches_model(seen))
    generate(app, "a")
    with pytest.raises(RateLimitError):
        generate(app, "b")
    assert seen == ["a"]


def test_rate_limit_error_can_be_answered_by_an_error_handler(app: Forge) -> None:
    async def busy(ctx: Context, error: Exception) -> None:
        if isinstance(error, RateLimitError):
            ctx.set_text("busy")

    app.use(error_handler(busy)).use(rate_limit(0.001, burst=1))
    assert [generate(app, "a"), generate(app, "a")] == ["bcde", "busy"]


@pytest.mark.parametrize("wait", [False, True])
def test_rate_limit_with_wait_queues_requests_instead_of_failing(app: Forge, wait: bool) -> None:
    """Three requests at once through a bucket of one: without wait two fail, with wait all succeed."""
    app.use(rate_limit(20, burst=1, wait=wait))

    async def three() -> list[object]:
        prompts = ["a", "c", "e"]
        return await asyncio.gather(*(app.generate(p) for p in prompts), return_exceptions=True)

    results = asyncio.run(three())
    if wait:
        assert results == ["bcde", "defg", "fgha"]
    else:
        assert results[0] == "bcde"
        assert [type(r) for r in results[1:]] == [RateLimitError, RateLimitError]


@pytest.mark.parametrize(("rate", "burst", "field"), [(0, 1, "rate"), (-1.0, 1, "rate"), (1.0, 0, "burst")])
def test_rate_limit_validates_its_options(rate: float, burst: int, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        rate_limit(rate, burst=burst)


# -- content filter ----------------------------------------------------------------------------------
def test_content_filter_masks_generated_text(app: Forge) -> None:
    app.use(content_filter(["DEF"]))  # matching is case-insensitive
    assert generate(app, "a", max_tokens=7) == "bc***gh"


def test_content_filter_masks_a_word_split_across_pieces(app: Forge) -> None:
    tokens = record(app, "token", "response")
    app.use(content_filter(["def"], replacement="[x]"))
    pieces = stream(app, "a", max_tokens=7)
    # "d", "e" and "f" arrive as three pieces; the filter holds "d", "de" back until "f" decides.
    assert pieces == ["b", "c", "[x]", "g", "h"]
    assert [e.text for e in tokens if isinstance(e, TokenEvent)] == pieces
    assert [e.text for e in tokens if isinstance(e, ResponseEvent)] == ["bc[x]gh"]


def test_content_filter_releases_a_held_back_prefix_at_the_end(app: Forge) -> None:
    app.use(content_filter(["fgz"]))
    assert "".join(stream(app, "a", max_tokens=6)) == "bcdefg"


def test_content_filter_masks_a_word_at_the_very_end(app: Forge) -> None:
    app.use(content_filter(["ef"]))
    assert stream(app, "a", max_tokens=5) == ["b", "c", "d", "***"]
    assert generate(app, "a", max_tokens=5) == "bcd***"


def test_content_filter_needs_a_word() -> None:
    with pytest.raises(ConfigError, match="blocked"):
        content_filter(["", ""])


# -- built-ins together ---------------------------------------------------------------------------
def test_builtins_compose(app: Forge) -> None:
    lines: list[str] = []
    seen: list[str] = []
    app.use(logger(lines.append)).use(timer()).use(cache()).use(content_filter(["cd"])).use(
        prompt_template("{prompt}a")
    ).use(reaches_model(seen))
    assert generate(app, "x") == "b***e"
    assert "".join(stream(app, "x")) == "b***e"  # from the cache, filtered once
    assert seen == ["xa"]
    assert len(lines) == 2
