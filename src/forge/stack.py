"""The middleware stack around the model, as the app runs it: built once, with error hooks and events.

Starlette's discipline under Koa's ``use()``: the stack is composed on the first
request and never changes after; ``on_error`` hooks run outside all middleware;
every request, streamed piece, failure and response is an event for the app's
listeners.

>>> stack = Stack(Emitter(), model_handler)  # doctest: +SKIP
>>> stack.middleware.append(timer())  # doctest: +SKIP
>>> text = await stack.handle(ctx)  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from forge.events import Emitter, ErrorEvent, RequestEvent, ResponseEvent, TokenEvent
from forge.middleware import Context, Middleware, compose, guarded, recover

__all__ = ["ErrorHook", "Handler", "Stack"]

Handler = Callable[[Context], Awaitable[None]]
ErrorHook = Callable[[Context, Exception], Any]


class Stack:
    """``middleware`` around ``model`` (the innermost handler), then ``error_hooks``; events go to ``emitter``."""

    def __init__(self, emitter: Emitter, model: Handler) -> None:
        self.middleware: list[Middleware] = []
        self.error_hooks: list[ErrorHook] = []
        self._emitter = emitter
        self._model = model
        self._run_stack: Handler | None = None

    @property
    def built(self) -> bool:
        """Whether the stack has served a request (and so can take no more middleware)."""
        return self._run_stack is not None

    async def handle(self, ctx: Context) -> str:
        """Run a non-streaming request through the stack; the response text."""
        start = time.perf_counter()
        await self._run(ctx)
        if ctx.response is None and ctx.chunks is not None:  # a middleware answered with chunks
            ctx.response = "".join([piece async for piece in ctx.chunks])
        text = ctx.response or ""
        self._emit_response(ctx, text, start)
        return text

    async def handle_stream(self, ctx: Context) -> AsyncIterator[str]:
        """Run a streaming request through the stack; text pieces as they arrive."""
        start = time.perf_counter()
        await self._run(ctx)
        chunks = ctx.chunks if ctx.chunks is not None else _pieces(ctx.response or "")
        received: list[str] = []
        try:
            async for piece in chunks:
                if piece:
                    self._emitter.emit(TokenEvent(id=ctx.id, index=len(received), text=piece))
                    received.append(piece)
                    yield piece
        except Exception as e:
            ctx.report_error(e)  # once, even if a middleware already reported it
            raise
        finally:
            aclose = getattr(chunks, "aclose", None)
            if callable(aclose):
                await aclose()
        self._emit_response(ctx, "".join(received), start)

    async def _run(self, ctx: Context) -> None:
        """The stack, with the on_error hooks outside it."""
        if self._run_stack is None:
            self._run_stack = compose(self.middleware, self._model)
        self._emitter.bind_loop(asyncio.get_running_loop())
        self._emitter.emit(RequestEvent(id=ctx.id, prompt=ctx.prompt, stream=ctx.stream, params=ctx.params.to_dict()))
        ctx.reporter = lambda error: self._emitter.emit(ErrorEvent(error=error, source="request"))
        try:
            await self._run_stack(ctx)
        except Exception as e:
            await recover(ctx, e, self._answer_error)
            return
        if ctx.stream and ctx.chunks is not None:  # errors raised while the stream is consumed reach on_error too
            ctx.chunks = guarded(ctx.chunks, ctx, self._answer_error)

    async def _answer_error(self, ctx: Context, error: Exception) -> None:
        """The on_error hooks, in order, until one answers."""
        for hook in self.error_hooks:
            result = hook(ctx, error)
            if inspect.isawaitable(result):
                await result
            if ctx.response is not None or ctx.chunks is not None:
                return

    def _emit_response(self, ctx: Context, text: str, start: float) -> None:
        done = ctx.completion
        self._emitter.emit(
            ResponseEvent(
                id=ctx.id,
                text=text,
                finish_reason=done.finish_reason if done else None,
                prompt_tokens=done.prompt_tokens if done else None,
                completion_tokens=done.completion_tokens if done else None,
                elapsed=time.perf_counter() - start,
                cached=ctx.cached,
            )
        )


async def _pieces(text: str) -> AsyncIterator[str]:
    if text:
        yield text
