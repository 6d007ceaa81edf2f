"""The built-in middleware: logger, timer, cache, rate limit, content filter, prompt template.

Requests go through the bigram checkpoint of conftest, so every expected
output is known in advance (from "a": "bcde", one character per piece).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from forge.app import Forge
from forge.errors import ConfigError, ForgeError, GenerationError
from forge.events import ResponseEvent, TokenEvent
from forge.middleware import (
    Context,
    RateLimitError,
    cache,
    content_filter,
    error_handler,
    logger,
    prompt_template,
    rate_limit,
    timer,
)
from helpers import GREEDY, TOO_LONG, Boom, breaks_at, capture, generate, reaches_model, record, stream


@pytest.fixture
def app(bigram_dir: Path) -> Forge:
    """A fresh app (its stack is built at its first request) that decodes greedily, 4 tokens."""
    return Forge.load(bigram_dir, defaults=GREEDY)


# -- logger and timer -------------------------------------------------------------------------
LOGGED_SCRIPT = """
import logging, sys
from forge import Forge, logger
from forge.generator import GenerationConfig
if sys.argv[2] == "configured":
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="LOG %(name)s %(message)s")
app = Forge(sys.argv[1], defaults=GenerationConfig(temperature=0, max_tokens=4)).use(logger())
print("got", app.sync.generate("a"))
"""


@pytest.mark.parametrize("logging_state", ["unconfigured", "configured"])
def test_logger_without_arguments_is_visible(bigram_dir: Path, logging_state: str) -> None:
    """The README's `app.use(logger())` printed nothing: Python logging drops INFO lines until configured."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", LOGGED_SCRIPT, str(bigram_dir), logging_state],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "got bcde" in proc.stdout
    line = "generate 'a' -> 4 chars (length) in "
    if logging_state == "unconfigured":  # to stderr, as morgan prints by default
        assert line in proc.stderr and line not in proc.stdout
    else:  # through the program's logging, once
        assert proc.stdout.count(line) == 1 and "LOG forge " in proc.stdout and line not in proc.stderr


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


def test_logger_writes_a_line_for_a_failed_request(app: Forge) -> None:
    lines: list[str] = []
    app.use(logger(lines.append))
    with pytest.raises(GenerationError):
        generate(app, TOO_LONG)
    with pytest.raises(GenerationError):
        stream(app, TOO_LONG)
    assert len(lines) == 2
    assert all("failed" in line and "ContextLengthError" in line for line in lines)
    assert [line.split()[1] for line in lines] == ["generate", "stream"]


def test_logger_writes_a_line_for_a_stream_that_breaks_midway(app: Forge) -> None:
    lines: list[str] = []

    app.use(logger(lines.append)).use(breaks_at("d"))
    with pytest.raises(Boom):
        stream(app, "a")
    [line] = lines
    assert "failed after 2 chars" in line and "Boom: no d" in line


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
    """Three requests at once through a bucket of one: without wait two fail, with wait all succeed.

    Without wait the bucket refills once an hour, so no timing or scheduling can let a second request in."""
    app.use(rate_limit(20 if wait else 1 / 3600, burst=1, wait=wait))

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


def test_content_filter_masks_the_longest_blocked_phrase(app: Forge) -> None:
    app.use(content_filter(["cd", "cdef"], replacement="#"))
    assert generate(app, "a", max_tokens=6) == "b#g"
    assert "".join(stream(app, "a", max_tokens=6)) == "b#g"


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
