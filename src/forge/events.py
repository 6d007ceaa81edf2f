"""Typed event payloads, and the emitter that delivers them.

Listeners receive one of these dataclasses; ``event.name`` is the name they
are registered under:

* training: ``"start"``, ``"step"``, ``"eval"``, ``"checkpoint"``, ``"end"``;
* generation: ``"request"``, ``"token"`` (streaming), ``"response"``;
* ``"error"``: a listener or a request failed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from forge.errors import ConfigError

__all__ = [
    "EVENT_NAMES",
    "CheckpointEvent",
    "Emitter",
    "EndEvent",
    "ErrorEvent",
    "EvalEvent",
    "Event",
    "Listener",
    "RequestEvent",
    "ResponseEvent",
    "StartEvent",
    "StepEvent",
    "TokenEvent",
]

log = logging.getLogger("forge")


@dataclass(frozen=True, slots=True)
class Event:
    name: ClassVar[str] = "event"


@dataclass(frozen=True, slots=True)
class StartEvent(Event):
    """Training is about to run its first step (``start_step`` > 0 on resume)."""

    name: ClassVar[str] = "start"
    start_step: int
    total_steps: int
    parameters: int
    device: str
    precision: str
    train_tokens: int
    val_tokens: int
    tokens_per_step: int
    compiled: bool = False  # the training step runs under torch.compile


@dataclass(frozen=True, slots=True)
class StepEvent(Event):
    """One optimizer step finished. ``step`` counts from 1."""

    name: ClassVar[str] = "step"
    step: int
    total_steps: int
    loss: float
    lr: float
    grad_norm: float
    tokens_per_sec: float
    elapsed: float
    eta: float


@dataclass(frozen=True, slots=True)
class EvalEvent(Event):
    """Validation loss and perplexity after ``step`` optimizer steps."""

    name: ClassVar[str] = "eval"
    step: int
    val_loss: float
    val_perplexity: float


@dataclass(frozen=True, slots=True)
class CheckpointEvent(Event):
    name: ClassVar[str] = "checkpoint"
    step: int
    path: str


@dataclass(frozen=True, slots=True)
class EndEvent(Event):
    """Training stopped: finished, or ``interrupted`` (Ctrl-C) after saving."""

    name: ClassVar[str] = "end"
    step: int
    train_loss: float | None
    val_loss: float | None
    elapsed: float
    interrupted: bool
    #: The step whose weights the run ended with, when it was not the last (``keep_best``: later steps overfit).
    kept_step: int | None = None


@dataclass(frozen=True, slots=True)
class RequestEvent(Event):
    """A generation request entered the middleware stack."""

    name: ClassVar[str] = "request"
    id: str
    prompt: str
    stream: bool
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TokenEvent(Event):
    """A piece of streamed text reached the caller (after middleware)."""

    name: ClassVar[str] = "token"
    id: str
    index: int
    text: str


@dataclass(frozen=True, slots=True)
class ResponseEvent(Event):
    """A generation request finished; ``text`` is what the caller received."""

    name: ClassVar[str] = "response"
    id: str
    text: str
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    elapsed: float
    cached: bool = False


@dataclass(frozen=True, slots=True)
class ErrorEvent(Event):
    """Something failed: a listener (``source="listener:<event>"``) or a request (``"request"``)."""

    name: ClassVar[str] = "error"
    error: BaseException
    source: str


EVENT_NAMES = ("start", "step", "eval", "checkpoint", "end", "request", "token", "response", "error")

Listener = Callable[[Any], Awaitable[None] | None]


class Emitter:
    """``on``, ``once``, ``off`` and ``emit``; a listener's exception becomes an ``error`` event.

    Sync listeners run in the emitting thread (training emits from its worker
    thread). Async listeners are scheduled on the event loop given to
    :meth:`bind_loop`, from any thread.

    >>> seen = []
    >>> em = Emitter().on("step", seen.append)
    >>> em.emit(StepEvent(1, 10, 2.5, 1e-3, 0.5, 100.0, 1.0, 9.0))
    >>> seen[0].loss
    2.5
    """

    def __init__(self) -> None:
        self._listeners: dict[str, list[tuple[Listener, bool]]] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        # Async listeners still running: strong refs, so they aren't collected, and so drain() can wait.
        self._tasks: set[asyncio.Future[None] | concurrent.futures.Future[None]] = set()

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def on(self, name: str, listener: Listener) -> Emitter:
        """Call ``listener(event)`` on every ``name`` event; returns self for chaining."""
        return self._add(name, listener, once=False)

    def once(self, name: str, listener: Listener) -> Emitter:
        """Like :meth:`on`, but only for the next ``name`` event."""
        return self._add(name, listener, once=True)

    def off(self, name: str, listener: Listener | None = None) -> Emitter:
        """Remove one listener, or every listener of ``name`` when none is given."""
        _check_name(name, "off")
        with self._lock:
            if listener is None:
                self._listeners.pop(name, None)
            else:
                self._listeners[name] = [(fn, o) for fn, o in self._listeners.get(name, []) if fn != listener]
        return self

    def listeners(self, name: str) -> list[Listener]:
        with self._lock:
            return [fn for fn, _ in self._listeners.get(name, [])]

    def emit(self, event: Event) -> None:
        """Deliver ``event`` to the listeners of ``event.name``."""
        with self._lock:
            entries = list(self._listeners.get(event.name, []))
            if any(once for _, once in entries):
                self._listeners[event.name] = [(fn, o) for fn, o in entries if not o]
        for fn, _ in entries:
            try:
                result = fn(event)
                if inspect.isawaitable(result):
                    self._schedule(result, event)
            except Exception as e:
                self._listener_failed(e, event)

    def _add(self, name: str, listener: Listener, *, once: bool) -> Emitter:
        _check_name(name, "once" if once else "on")
        if not callable(listener):
            raise ConfigError(f"on({name!r}, ...) needs a callable listener, got {type(listener).__name__}")
        with self._lock:
            self._listeners.setdefault(name, []).append((listener, once))
        return self

    def _schedule(self, awaitable: Awaitable[None], event: Event) -> None:
        async def run() -> None:
            try:
                await awaitable
            except Exception as e:
                self._listener_failed(e, event)

        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        future: asyncio.Future[None] | concurrent.futures.Future[None]
        if running is not None:
            future = running.create_task(run())
        elif self._loop is not None and self._loop.is_running():
            future = asyncio.run_coroutine_threadsafe(run(), self._loop)
        else:
            asyncio.run(run())
            return
        with self._lock:
            self._tasks.add(future)
        future.add_done_callback(self._forget)

    def _forget(self, future: Any) -> None:
        with self._lock:
            self._tasks.discard(future)

    async def drain(self) -> None:
        """Wait until every async listener scheduled so far (and any it schedules) has finished.

        ``Forge.train`` awaits this, so async listeners of its events are done when it returns.
        """
        while True:
            loop, me = asyncio.get_running_loop(), asyncio.current_task()
            with self._lock:  # a task of another event loop can't be awaited here, nor can the caller itself
                pending = [
                    f
                    for f in self._tasks
                    if f is not me and (isinstance(f, concurrent.futures.Future) or f.get_loop() is loop)
                ]
            if not pending:
                return
            await asyncio.gather(
                *(asyncio.wrap_future(f) if isinstance(f, concurrent.futures.Future) else f for f in pending),
                return_exceptions=True,
            )
            with self._lock:
                self._tasks.difference_update(pending)

    def _listener_failed(self, error: Exception, event: Event) -> None:
        if isinstance(event, ErrorEvent) or not self.listeners("error"):
            # Nobody listens for errors, or an error listener itself failed: log, never raise.
            log.error("listener for %r failed: %r", event.name, error, exc_info=error)
            return
        self.emit(ErrorEvent(error=error, source=f"listener:{event.name}"))


def _check_name(name: str, method: str) -> None:
    if name not in EVENT_NAMES:
        raise ConfigError(f"{method}({name!r}, ...): unknown event {name!r}; events are {', '.join(EVENT_NAMES)}")
