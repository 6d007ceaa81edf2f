"""Server-sent events, several generations merged into one stream, and client disconnects.

A client that goes away cancels its generation: the SSE response watches for
``http.disconnect`` while it streams and closes the generation's iterator (which
frees its batch slot); a non-streaming request races its handler against the
same signal.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any, TypeVar

from starlette.background import BackgroundTask
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

__all__ = ["DONE", "ClientGone", "EventStream", "Fanin", "Piece", "gather_or_cancel", "sse", "until_disconnect"]

T = TypeVar("T")
DONE = b"data: [DONE]\n\n"


def sse(data: Mapping[str, Any]) -> bytes:
    """One server-sent event carrying ``data`` as JSON."""
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


class ClientGone(Exception):
    """The client disconnected before the answer was ready."""


async def _disconnected(receive: Receive) -> None:
    """Returns once the client has gone (the request body has already been read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(work: Awaitable[T], receive: Receive) -> T:
    """The result of ``work``; if the client disconnects first, ``work`` is cancelled and ClientGone raised."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler itself is cancelled (a forced shutdown)
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientGone
    return task.result()


async def gather_or_cancel(coros: Sequence[Coroutine[Any, Any, T]]) -> list[T]:
    """Run ``coros`` concurrently; the first failure cancels the rest and is raised."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        return [task.result() for task in tasks]
    finally:
        pending = [t for t in tasks if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


Piece = tuple[int, str | None, BaseException | None]  # (stream index, text or None at its end, error)


class Fanin:
    """Pieces of several text streams through one queue, tagged with the stream's index.

    ``get()`` returns ``(i, piece, None)``, ``(i, None, None)`` when stream i has
    ended, or ``(i, None, error)`` when it failed. ``aclose()`` stops and closes them all.
    """

    def __init__(self, streams: Sequence[AsyncIterator[str]]) -> None:
        self._queue: asyncio.Queue[Piece] = asyncio.Queue(maxsize=64 * max(1, len(streams)))
        self._tasks = [asyncio.ensure_future(self._pump(i, s)) for i, s in enumerate(streams)]

    async def _pump(self, i: int, stream: AsyncIterator[str]) -> None:
        try:
            async for piece in stream:
                await self._queue.put((i, piece, None))
            await self._queue.put((i, None, None))
        except Exception as e:
            await self._queue.put((i, None, e))
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    async def get(self) -> Piece:
        return await self._queue.get()

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class EventStream(Response):
    """A ``text/event-stream`` response that stops ``body`` when the client disconnects.

    The body iterator is always closed, then ``closed()`` awaited (to free what the
    stream held); ``on_disconnect()`` is called if the client left before the end.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        body: AsyncIterator[bytes],
        *,
        headers: Mapping[str, str] | None = None,
        closed: Callable[[], Awaitable[None]] | None = None,
        on_disconnect: Callable[[], None] | None = None,
        background: BackgroundTask | None = None,
    ) -> None:
        self.body_iterator = body
        self.status_code = 200
        self.background = background
        self.closed = closed
        self.on_disconnect = on_disconnect
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})

    async def _stream(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for chunk in self.body_iterator:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = asyncio.ensure_future(self._stream(send))
        watch = asyncio.ensure_future(_disconnected(receive))
        gone = False
        try:
            await asyncio.wait({stream, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not stream.done():
                gone = True
                stream.cancel()
                await asyncio.gather(stream, return_exceptions=True)
            elif not stream.cancelled() and isinstance(stream.exception(), OSError):
                gone = True  # the transport broke while sending
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
            if self.closed is not None:
                await self.closed()
            if gone and self.on_disconnect is not None:
                self.on_disconnect()
        if not gone and (error := stream.exception()) is not None:
            raise error
        if self.background is not None and not gone:
            await self.background()
