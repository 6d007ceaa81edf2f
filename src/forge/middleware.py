"""Koa-style middleware around every generation request, and the built-ins.

A middleware is ``async def mw(ctx, next)``. Code before ``await next()`` sees
the request (and may change ``ctx.prompt`` or ``ctx.params``); code after it
sees the response. Not calling ``next`` short-circuits (a cache hit sets
``ctx.response`` and returns). For a streaming request the response is
``ctx.chunks``, an async iterator of text pieces that a middleware may wrap
(``ctx.chunks = my_filter(ctx.chunks)``) instead of ``ctx.response``.

Errors are handled explicitly, by :func:`error_handler` or ``Forge.on_error``;
nothing is inferred from a function's arity.

>>> async def shout(ctx, next):
...     await next()
...     ctx.response = ctx.response.upper()
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import json
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from forge.errors import ConfigError, ForgeError, RateLimitError  # RateLimitError: re-exported
from forge.generator import AsyncTextStream, Completion, GenerationConfig, TokenLogprob
from forge.textstream import held_back
from forge.toolcalls import ToolFormat

__all__ = [
    "Context",
    "Middleware",
    "Next",
    "RateLimitError",
    "cache",
    "compose",
    "content_filter",
    "error_handler",
    "guarded",
    "logger",
    "prompt_template",
    "rate_limit",
    "recover",
    "timer",
]

Next = Callable[[], Awaitable[None]]
Middleware = Callable[["Context", Next], Awaitable[None]]
ErrorHandler = Callable[["Context", Exception], Awaitable[None]]


@dataclass
class Context:
    """One generation request as it travels through the middleware stack.

    The app builds it (``app.request(...)``); middleware read and change it.

    prompt / messages: the input (``messages`` is for chat requests; change them and the
    app renders the prompt again).
    params: the generation options; replace them with ``ctx.params = ctx.params.replace(...)``.
    response: the full text (non-streaming requests), set by the model or a middleware.
    chunks: the text pieces (streaming requests), which a middleware may wrap.
    completion: finish reason and token counts from the model, once known.
    tools / tool_format: a chat request's OpenAI ``tools`` and the format that parses the
    reply's calls (``ctx.tool_format.parse(text)``); None without tools.
    rendered: the messages ``prompt`` was rendered from. ids: the prompt's token ids.
    strict_budget: refuse an explicit ``max_tokens`` that does not fit after the prompt
    (``ContextLengthError``) rather than stop at the context length (the HTTP server sets it).
    meta: free-form data of the caller and the middleware (the server puts ``request_id`` and
    ``user`` there); Forge itself keeps nothing in it. timings: seconds, by name.
    """

    prompt: str
    params: GenerationConfig
    stream: bool = False
    messages: list[dict[str, Any]] | None = None
    response: str | None = None
    chunks: AsyncIterator[str] | None = None
    completion: Completion | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    id: str = field(default_factory=lambda: f"req-{uuid.uuid4().hex[:12]}")
    cached: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_format: ToolFormat | None = None
    rendered: list[dict[str, Any]] | None = None
    strict_budget: bool = False
    #: Set by the app when the model answers: the stream the text comes from (see :meth:`logprobs_so_far`).
    model_stream: AsyncTextStream | None = field(default=None, repr=False, compare=False)
    #: Set by the app: tells its ``error`` listeners about a failure (see :meth:`report_error`).
    reporter: Callable[[Exception], None] | None = field(default=None, repr=False, compare=False)
    _reported: list[Exception] = field(default_factory=list, repr=False, compare=False)
    # The ids with the prompt they encode: a middleware that changes ``prompt`` makes them stale.
    _encoded: tuple[str, list[int]] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def ids(self) -> list[int] | None:
        """The prompt's token ids, once tokenized; None again after a middleware changes ``ctx.prompt``."""
        if self._encoded is None or self._encoded[0] != self.prompt:
            return None
        return self._encoded[1]

    @ids.setter
    def ids(self, ids: Sequence[int] | None) -> None:
        self._encoded = None if ids is None else (self.prompt, list(ids))

    def logprobs_so_far(self) -> list[TokenLogprob]:
        """The logprobs of the tokens the model has generated so far, while it streams.

        Empty unless ``params.logprobs`` asked for them and the model (not a middleware) answers.
        """
        return self.model_stream.partial_logprobs if self.model_stream is not None else []

    def report_error(self, error: Exception) -> None:
        """Report ``error`` to the app (an ``error`` event) once, whether or not it is recovered."""
        if any(error is seen for seen in self._reported):
            return
        self._reported.append(error)
        if self.reporter is not None:
            self.reporter(error)

    def set_text(self, text: str) -> None:
        """Answer the request with ``text``, whether it streams or not (used by short-circuits)."""
        if self.stream:
            self.chunks = _one_piece(text)
        else:
            self.response = text


async def _one_piece(text: str) -> AsyncIterator[str]:
    yield text


def compose(middleware: Sequence[Middleware], handler: Callable[[Context], Awaitable[None]]) -> Callable[..., Any]:
    """Chain middleware around ``handler`` (the model); returns ``run(ctx)``."""
    stack = tuple(middleware)

    async def run(ctx: Context) -> None:
        async def dispatch(i: int) -> None:
            if i == len(stack):
                await handler(ctx)
                return
            called = False

            async def next_() -> None:
                nonlocal called
                if called:
                    name = getattr(stack[i], "__name__", repr(stack[i]))
                    raise ForgeError(f"middleware {name} called next() more than once; call it at most once")
                called = True
                await dispatch(i + 1)

            await stack[i](ctx, next_)

        await dispatch(0)

    return run


def _wrap_chunks(ctx: Context, transform: Callable[[AsyncIterator[str]], AsyncIterator[str]]) -> None:
    assert ctx.chunks is not None
    ctx.chunks = transform(ctx.chunks)


async def _tap(
    chunks: AsyncIterator[str],
    done: Callable[[str], None],
    failed: Callable[[str, Exception], None] | None = None,
) -> AsyncIterator[str]:
    """Pass pieces through; once the stream has run to its end, call ``done(full text)``.

    If the stream raises, ``failed(text so far, error)`` is called and the error goes on.
    """
    text = []
    try:
        async for piece in chunks:
            text.append(piece)
            yield piece
    except Exception as e:
        if failed is not None:
            failed("".join(text), e)
        raise
    done("".join(text))


# -- built-ins ---------------------------------------------------------------------------------


def logger(log: Callable[[str], None] | None = None, *, preview: int = 40) -> Middleware:
    """Log one line per request: id, prompt preview, characters out, finish reason, time.

    A failed request is logged too, with the error (``... failed after 12 chars: ValueError: ...``).
    ``log`` defaults to ``logging.getLogger("forge").info`` once logging is configured, and until then
    to standard error, so ``app.use(logger())`` shows its lines as Express's morgan does.
    """
    emit = log or _log_or_stderr

    def head(ctx: Context) -> str:
        prompt = ctx.prompt if len(ctx.prompt) <= preview else ctx.prompt[:preview] + "…"
        return f"{ctx.id} {'stream' if ctx.stream else 'generate'} {prompt!r}"

    def line(ctx: Context, text: str, start: float) -> str:
        reason = ctx.completion.finish_reason if ctx.completion else ("cached" if ctx.cached else "-")
        ms = (time.perf_counter() - start) * 1000
        return f"{head(ctx)} -> {len(text)} chars ({reason}) in {ms:.0f} ms"

    def failure(ctx: Context, text: str, error: Exception, start: float) -> str:
        ms = (time.perf_counter() - start) * 1000
        return f"{head(ctx)} failed after {len(text)} chars in {ms:.0f} ms: {type(error).__name__}: {error}"

    async def logger_mw(ctx: Context, next: Next) -> None:
        start = time.perf_counter()
        try:
            await next()
        except Exception as e:
            emit(failure(ctx, "", e, start))
            raise
        if ctx.stream:
            _wrap_chunks(
                ctx,
                lambda c: _tap(
                    c,
                    lambda text: emit(line(ctx, text, start)),
                    lambda text, e: emit(failure(ctx, text, e, start)),
                ),
            )
        else:
            emit(line(ctx, ctx.response or "", start))

    return logger_mw


def _log_or_stderr(message: str) -> None:
    # Checked per line, not at import: a program may configure logging after building its app.
    forge_log = logging.getLogger("forge")
    if forge_log.hasHandlers():
        forge_log.info(message)
    else:  # unconfigured, logging would drop INFO lines: print rather than stay silent
        print(message, file=sys.stderr, flush=True)


def timer() -> Middleware:
    """Record ``ctx.timings["total"]`` and, when streaming, ``ctx.timings["first_token"]`` (seconds)."""

    async def timer_mw(ctx: Context, next: Next) -> None:
        start = time.perf_counter()
        await next()
        if not ctx.stream:
            ctx.timings["total"] = time.perf_counter() - start
            return

        async def timed(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
            async for piece in chunks:
                ctx.timings.setdefault("first_token", time.perf_counter() - start)
                yield piece
            ctx.timings["total"] = time.perf_counter() - start

        _wrap_chunks(ctx, timed)

    return timer_mw


def cache(max_entries: int = 256) -> Middleware:
    """An LRU cache keyed on the prompt (or messages) and every generation parameter.

    A hit short-circuits the stack (``ctx.cached = True``); streaming requests
    are cached once fully streamed. Sampled outputs are cached too: a hit
    returns the first answer, as a cache should.
    """
    if max_entries < 1:
        raise ConfigError(f"cache(max_entries={max_entries}) must keep at least 1 entry")
    entries: collections.OrderedDict[str, str] = collections.OrderedDict()

    def store(key: str, text: str) -> None:
        entries[key] = text
        entries.move_to_end(key)
        while len(entries) > max_entries:
            entries.popitem(last=False)

    async def cache_mw(ctx: Context, next: Next) -> None:
        key = json.dumps([ctx.prompt, ctx.messages, ctx.params.to_dict()], sort_keys=True, default=str)
        if key in entries:
            entries.move_to_end(key)
            ctx.cached = True
            ctx.set_text(entries[key])
            return
        await next()
        if ctx.stream:  # only a stream that runs to its end is cached
            _wrap_chunks(ctx, lambda c: _tap(c, lambda text: store(key, text)))
        elif ctx.response is not None:
            store(key, ctx.response)

    cache_mw.entries = entries  # type: ignore[attr-defined]
    return cache_mw


def rate_limit(rate: float, *, burst: int = 1, wait: bool = False) -> Middleware:
    """A token bucket: ``rate`` requests per second on average, ``burst`` at once.

    An empty bucket raises :class:`RateLimitError` (HTTP 429), or, with
    ``wait=True``, sleeps until a token is free.
    """
    if not rate > 0:
        raise ConfigError(f"rate_limit(rate={rate}) must be > 0 requests per second")
    if burst < 1:
        raise ConfigError(f"rate_limit(burst={burst}) must be >= 1")
    state = {"tokens": float(burst), "at": time.monotonic()}

    def take() -> float:
        """Take a token if there is one; else return the seconds until one is free."""
        now = time.monotonic()
        state["tokens"] = min(burst, state["tokens"] + (now - state["at"]) * rate)
        state["at"] = now
        if state["tokens"] >= 1:
            state["tokens"] -= 1
            return 0.0
        return (1 - state["tokens"]) / rate

    async def rate_limit_mw(ctx: Context, next: Next) -> None:
        while (delay := take()) > 0:
            if not wait:
                raise RateLimitError(
                    f"rate limit exceeded: {rate:g} requests/s with bursts of {burst}; retry in {delay:.2f} s"
                )
            await asyncio.sleep(delay)
        await next()

    return rate_limit_mw


def content_filter(blocked: Sequence[str], *, replacement: str = "***") -> Middleware:
    """Replace every occurrence of a blocked word or phrase (case-insensitive) in the output.

    Streaming output is filtered piece by piece: text that could be the start
    of a blocked phrase is held back until the next piece decides it.
    """
    # Longest first, so "bad word" is masked whole even when "bad" is blocked too.
    words = sorted({w.lower() for w in blocked if w}, key=len, reverse=True)
    if not words:
        raise ConfigError("content_filter(blocked=...) needs at least one non-empty word or phrase")

    def mask(text: str) -> str:
        lower, out, i = text.lower(), [], 0
        while i < len(text):
            hit = next((w for w in words if lower.startswith(w, i)), None)
            if hit:
                out.append(replacement)
                i += len(hit)
            else:
                out.append(text[i])
                i += 1
        return "".join(out)

    async def filtered(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
        pending = ""
        async for piece in chunks:
            pending += piece
            keep = held_back(pending.lower(), words)
            ready, pending = pending[: len(pending) - keep], pending[len(pending) - keep :]
            if ready:
                yield mask(ready)
        if pending:
            yield mask(pending)

    async def content_filter_mw(ctx: Context, next: Next) -> None:
        await next()
        if ctx.stream:
            _wrap_chunks(ctx, filtered)
        elif ctx.response is not None:
            ctx.response = mask(ctx.response)

    return content_filter_mw


def prompt_template(template: str) -> Middleware:
    """Wrap the prompt: ``prompt_template("Q: {prompt}\\nA:")``."""
    if "{prompt}" not in template:
        raise ConfigError(f"prompt_template({template!r}) must contain the placeholder {{prompt}}")

    async def prompt_template_mw(ctx: Context, next: Next) -> None:
        ctx.prompt = template.replace("{prompt}", ctx.prompt)
        await next()

    return prompt_template_mw


def error_handler(handle: ErrorHandler) -> Middleware:
    """Catch errors from the rest of the stack: ``await handle(ctx, error)``.

    The handler recovers by answering (``ctx.set_text(...)``); if it returns
    without answering, or raises, the error goes on up. Errors raised while a
    stream is consumed reach it too.
    """

    async def error_handler_mw(ctx: Context, next: Next) -> None:
        try:
            await next()
        except Exception as e:
            await recover(ctx, e, handle)
            return
        if ctx.stream and ctx.chunks is not None:
            _wrap_chunks(ctx, lambda chunks: guarded(chunks, ctx, handle))

    return error_handler_mw


async def recover(ctx: Context, error: Exception, handle: ErrorHandler) -> None:
    """Let ``handle`` answer for ``error``; re-raise it if the handler gives no answer.

    The error is reported (an ``error`` event) even when it is recovered.
    """
    ctx.report_error(error)
    ctx.response, ctx.chunks = None, None
    result = handle(ctx, error)
    if inspect.isawaitable(result):
        await result
    if ctx.response is None and ctx.chunks is None:
        raise error


async def guarded(chunks: AsyncIterator[str], ctx: Context, handle: ErrorHandler) -> AsyncIterator[str]:
    """``chunks``, with an error raised while they are consumed handed to ``handle`` (see :func:`recover`)."""
    try:
        async for piece in chunks:
            yield piece
    except Exception as e:
        await recover(ctx, e, handle)
        if ctx.chunks is not None:  # the handler answered: finish with its text
            async for piece in ctx.chunks:
                yield piece
        elif ctx.response:
            yield ctx.response
