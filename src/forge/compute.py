"""The compute thread: one thread for all of an app's model work in a process.

PyTorch's CPU build runs its parallel regions on OpenMP (libgomp). Every thread that runs one keeps a team
of OpenMP workers for the rest of its life, and once libgomp manages more threads than there are CPUs it
stops spinning between regions and sleeps instead, so each of the hundreds of parallel regions in a decode
step pays a futex wake-up. Measured on a 2-core machine, SmolLM2-135M int4 with a compiled step: loaded on
the main thread and decoded on another, 34-47 tok/s; loaded and decoded on one thread, 74-91 tok/s.

So the app loads its model, generates, embeds and scores here, and the serving engine runs here
between those jobs (it is a *resident*: the thread calls its ``tick()`` whenever it has no job to run).
On CUDA the kernels run on the GPU and this costs nothing either.

    result = compute.call(fn, *args)          # from any thread; inline when already on the compute thread
    result = await compute.run(fn, *args)     # from async code: the event loop stays free
    compute.attach(engine); compute.wake()    # a resident: tick() -> whether it did work
    result = await compute.run_apart(train)   # long work (training) on a thread of its own that ends with it

A job must not wait for another job (or for an event loop that waits for one): there is one thread.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

__all__ = ["ComputeThread", "Resident", "attach", "call", "detach", "is_current", "run", "run_apart", "submit", "wake"]

T = TypeVar("T")
log = logging.getLogger(__name__)


class Resident(Protocol):
    """Work that lives on the compute thread between jobs (the serving engine)."""

    def tick(self) -> bool:
        """Do one slice of work (one decode step); whether there was any. It must not block waiting for work."""
        ...


class ComputeThread:
    """A thread that runs submitted jobs in order and, between them, ticks its residents until all are idle."""

    def __init__(self, name: str = "forge-compute") -> None:
        self.name = name
        self._jobs: collections.deque[tuple[concurrent.futures.Future[Any], Callable[[], Any]]] = collections.deque()
        self._residents: list[Resident] = []
        self._cond = threading.Condition()
        self._woken = False
        self._closing = False
        self._thread: threading.Thread | None = None

    def is_current(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        """Queue ``fn(*args, **kwargs)``; its future. On the compute thread itself, use :meth:`call` instead."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._cond:
            if not self._closing:
                self._start()
                self._jobs.append((future, lambda: fn(*args, **kwargs)))
                self._cond.notify()
                return future
        try:  # the interpreter is exiting and the thread has ended: run it here
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:
            future.set_exception(e)
        return future

    def call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on the compute thread, waiting for it; inline when called from that thread."""
        if self.is_current():
            return fn(*args, **kwargs)
        return self.submit(fn, *args, **kwargs).result()

    async def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Await ``fn(*args, **kwargs)`` run on the compute thread; cancelling the await does not stop a started job."""
        if self.is_current():  # an event loop on the compute thread (asyncio.run inside a job): nothing to hand over
            return fn(*args, **kwargs)
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    def attach(self, resident: Resident) -> None:
        with self._cond:
            self._start()
            if resident not in self._residents:
                self._residents.append(resident)
            self._woken = True
            self._cond.notify()

    def detach(self, resident: Resident) -> None:
        with self._cond:
            if resident in self._residents:
                self._residents.remove(resident)

    def wake(self) -> None:
        """A resident has work: tick it even if its last tick found none."""
        with self._cond:
            self._woken = True
            self._cond.notify()

    def shutdown(self) -> None:
        """Finish the running job, cancel the queued ones and end the thread. Called at interpreter exit: a daemon
        thread still inside torch's C++ code while the interpreter finalizes aborts the process."""
        with self._cond:
            self._closing = True
            jobs, self._jobs = list(self._jobs), collections.deque()
            thread = self._thread
            self._cond.notify_all()
        for future, _ in jobs:
            future.cancel()
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _start(self) -> None:  # under self._cond
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        busy = False  # whether the residents' last round did work: then go round again without waiting
        while True:
            with self._cond:
                while not self._jobs and not self._woken and not busy and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                job = self._jobs.popleft() if self._jobs else None
                residents, self._woken = list(self._residents), False
            if job is not None:
                future, fn = job
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as e:  # every failure goes to the caller, the thread goes on
                        future.set_exception(e)
                del future, fn, job  # the job's closure (and its tensors) is freed now, not at the next job
            busy = False
            for resident in residents:  # one slice each between two jobs: neither starves the other
                try:
                    busy = resident.tick() or busy
                except BaseException:  # a resident handles its own errors; one that escapes must not stop the thread
                    log.exception("a resident of the compute thread failed; detaching it")
                    self.detach(resident)


async def run_apart(fn: Callable[..., T], /, *args: Any, name: str = "forge-train", **kwargs: Any) -> T:
    """Await ``fn(*args, **kwargs)`` on a new thread of its own, which ends with it (and its OpenMP team with it).

    For long work that must not hold up the compute thread's jobs, such as training one app while another
    serves: the thread and its team are gone when it ends, so they don't slow the compute thread afterwards.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(set_: Callable[[Any], None], value: Any) -> None:
        if not future.cancelled():
            set_(value)

    def target() -> None:
        try:
            result = fn(*args, **kwargs)
        except BaseException as e:  # the awaiting side gets every failure
            loop.call_soon_threadsafe(settle, future.set_exception, e)
        else:
            loop.call_soon_threadsafe(settle, future.set_result, result)

    threading.Thread(target=target, name=name, daemon=True).start()
    return await future


_compute = ComputeThread()
atexit.register(_compute.shutdown)
submit = _compute.submit
call = _compute.call
run = _compute.run
attach = _compute.attach
detach = _compute.detach
wake = _compute.wake
is_current = _compute.is_current
