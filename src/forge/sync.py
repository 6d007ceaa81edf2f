"""``SyncForge``: the blocking twin of :class:`forge.app.Forge`, as ``app.sync``.

Each call runs the app's async method on a private event-loop thread, so it works in
plain scripts and inside notebooks (which already run a loop of their own).

>>> app = Forge("tiny")  # doctest: +SKIP
>>> app.sync.generate("Once upon a time", max_tokens=8)  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from forge.data import DataSource
    from forge.trainer import TrainResult

__all__ = ["SyncForge"]

T = TypeVar("T")


class AsyncApp(Protocol):
    """The async methods the facade wraps: the app builds its SyncForge, so this module can't name the app."""

    async def train(self, data: DataSource, **options: Any) -> TrainResult: ...
    async def generate(self, prompt: str | Sequence[str], **options: Any) -> Any: ...
    async def chat(self, messages: Sequence[Mapping[str, Any]] | str, **options: Any) -> Any: ...
    async def listen(self, port: int = 8000, *, host: str = "127.0.0.1", **options: Any) -> None: ...
    def stream(self, prompt: str, **options: Any) -> AsyncIterator[str]: ...
    def chat_stream(self, messages: Sequence[Mapping[str, Any]] | str, **options: Any) -> AsyncIterator[str]: ...


class SyncForge:
    """The sync facade: each call runs the async method on the app's own event-loop thread.

    That works in plain scripts and inside notebooks (which already run a loop).
    """

    def __init__(self, app: AsyncApp) -> None:
        self._app = app
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        future = self._submit(coro)
        try:
            return future.result()
        except KeyboardInterrupt:
            future.cancel()  # Ctrl-C stops the work on the loop too (a generation ends), not just the wait
            raise

    def run_coroutine(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the app's event-loop thread and wait for its result; Ctrl-C cancels it there too.

        The blocking twins of objects built on the app (``agent.sync``) run their coroutines this way.
        """
        return self._run(coro)

    def iterate(self, agen: AsyncIterator[T]) -> Iterator[T]:
        """The items of ``agen``, each produced on the app's event-loop thread; leaving the loop early closes it."""
        return self._iterate(agen)

    def train(self, data: DataSource, **options: Any) -> TrainResult:
        return self._run(self._app.train(data, **options))

    def generate(self, prompt: str | Sequence[str], **options: Any) -> Any:
        return self._run(self._app.generate(prompt, **options))

    def chat(self, messages: Sequence[Mapping[str, Any]] | str, **options: Any) -> Any:
        return self._run(self._app.chat(messages, **options))

    def listen(self, port: int = 8000, *, host: str = "127.0.0.1", **options: Any) -> None:
        """Serve until Ctrl-C, then shut down gracefully (in-flight requests finish)."""
        stop = threading.Event()

        async def until_stopped() -> None:
            server = asyncio.create_task(self._app.listen(port, host=host, **options))
            while not server.done() and not stop.is_set():
                await asyncio.wait({server}, timeout=0.1)
            if not server.done():
                server.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await server
            if not server.cancelled():
                server.result()  # re-raise a failure, e.g. the port is in use

        future = self._submit(until_stopped())
        try:
            future.result()
        except KeyboardInterrupt:
            stop.set()
            future.result()

    def _submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                threading.Thread(target=self._loop.run_forever, name="forge-sync", daemon=True).start()
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def stream(self, prompt: str, **options: Any) -> Iterator[str]:
        return self._iterate(self._app.stream(prompt, **options))

    def chat_stream(self, messages: Sequence[Mapping[str, Any]] | str, **options: Any) -> Iterator[str]:
        return self._iterate(self._app.chat_stream(messages, **options))

    def _iterate(self, agen: AsyncIterator[T]) -> Iterator[T]:
        pending: set[asyncio.Task[Any]] = set()

        async def step() -> T:
            task = asyncio.current_task()
            assert task is not None
            pending.add(task)
            try:
                return await agen.__anext__()
            finally:
                pending.discard(task)

        async def close() -> None:
            # Ctrl-C (or a `break`) can leave a step running on the loop: cancel it, which stops the
            # generation, and let it unwind before closing the generator it is still inside.
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
            await agen.aclose()  # type: ignore[attr-defined]

        try:
            while True:
                try:
                    yield self._run(step())
                except StopAsyncIteration:
                    return
        finally:
            self._run(close())
