"""The compute thread (forge.compute): one thread runs an app's model work, jobs and the serving engine's steps."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

import forge.app
from forge import compute
from forge.app import Forge
from forge.compute import ComputeThread
from forge.generator import GenerationConfig


def test_jobs_run_in_order_on_one_thread_and_failures_reach_the_caller() -> None:
    thread = ComputeThread("test-compute")
    seen: list[tuple[int, str]] = []
    futures = [thread.submit(lambda i=i: seen.append((i, threading.current_thread().name))) for i in range(20)]
    for f in futures:
        f.result(timeout=10)
    assert seen == [(i, "test-compute") for i in range(20)]
    with pytest.raises(ZeroDivisionError):
        thread.call(lambda: 1 / 0)
    assert thread.call(lambda: 7) == 7  # a failure does not stop the thread


def test_a_call_from_the_compute_thread_runs_inline() -> None:
    thread = ComputeThread("test-compute")
    # Waiting on a queued job from the one thread that runs jobs would never end: call runs it inline instead.
    assert thread.submit(lambda: thread.call(lambda: thread.is_current())).result(timeout=10) is True
    assert not thread.is_current()


def test_run_awaits_without_blocking_the_loop() -> None:
    thread = ComputeThread("test-compute")
    gate = threading.Event()

    async def main() -> tuple[str, bool]:
        job = asyncio.ensure_future(thread.run(lambda: (gate.wait(10), threading.current_thread().name)[1]))
        await asyncio.sleep(0)
        gate.set()  # the loop ran while the job waited on the compute thread
        return await job, job.done()

    assert asyncio.run(main()) == ("test-compute", True)


class Counter:
    """A resident with ``left`` slices of work; a job can add more."""

    def __init__(self, left: int) -> None:
        self.left, self.ticks, self.worked = left, 0, 0

    def tick(self) -> bool:
        self.ticks += 1
        if self.left == 0:
            return False
        self.left -= 1
        self.worked += 1
        return True


def test_a_resident_is_ticked_between_jobs_and_goes_idle() -> None:
    thread = ComputeThread("test-compute")
    forever = Counter(left=-1)  # never runs out by itself: a job must get in between its ticks to stop it
    thread.attach(forever)
    thread.call(lambda: setattr(forever, "left", 0))  # returns only if jobs run between the resident's ticks
    assert forever.left == 0
    ticks = thread.call(lambda: forever.ticks)
    thread.call(lambda: None)
    assert thread.call(lambda: forever.ticks) <= ticks + 2  # idle: ticked once per job at most, not spun
    forever.left = 3
    thread.wake()
    thread.call(lambda: None)
    thread.call(lambda: None)
    assert forever.left == 0  # woken, it worked its three slices
    thread.detach(forever)


def test_a_resident_that_raises_is_detached_and_jobs_go_on() -> None:
    class Broken:
        def tick(self) -> bool:
            raise RuntimeError("bug")

    thread = ComputeThread("test-compute")
    broken = Broken()
    thread.attach(broken)
    thread.call(lambda: None)  # a round of ticks follows each job
    assert thread.call(lambda: broken in thread._residents) is False
    assert thread.call(lambda: "still here") == "still here"


def test_an_apps_model_work_runs_on_the_compute_thread(bigram_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Load, generate, stream, embed, evaluate and the engine's steps: one thread, so one OpenMP team."""
    threads: set[str] = set()
    real_load = forge.app.load

    def load(*args: Any, **kwargs: Any) -> Any:
        threads.add(threading.current_thread().name)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(forge.app, "load", load)
    app = Forge.load(bigram_dir, defaults=GenerationConfig(temperature=0, max_tokens=4))
    assert app.model is not None
    app.model.tok_emb.register_forward_hook(lambda *_: threads.add(threading.current_thread().name))
    plain = [app.sync.generate("a"), app.sync.generate("e")]
    assert plain[0] == "bcde"
    assert "".join(app.sync.stream("c")) == "defg"
    assert len(app.sync.run_coroutine(app.embed("abc"))[0]) == app.model.config.d_model
    assert app.sync.run_coroutine(app.evaluate("abcdefgh"))["bits_per_byte"] >= 0

    async def batched() -> list[str]:
        await app.start_batching(max_batch=2)
        try:
            replies = list(await asyncio.gather(app.generate("a"), app.generate("e")))
            assert app.batching_stats()["completed"] == 2  # type: ignore[index]
            return replies
        finally:
            await app.stop_batching()

    assert app.sync.run_coroutine(batched()) == plain
    assert threads == {"forge-compute"}
    assert compute.is_current() is False


def test_training_runs_on_a_thread_of_its_own_that_ends(notes: Path) -> None:
    app = Forge(model="tiny", tokenizer="char")
    seen: list[threading.Thread] = []
    app.on("step", lambda _event: seen.append(threading.current_thread()))
    app.sync.train(notes, steps=2, batch_size=2, context=16, eval_batches=2, precision="fp32")
    assert seen and {t.name for t in seen} == {"forge-train"}
    seen[0].join(timeout=10)
    assert not seen[0].is_alive()  # gone with its OpenMP team: it can't slow the compute thread's decoding


def test_an_engine_waiting_for_its_model_does_not_hold_up_other_apps(bigram_dir: Path) -> None:
    """While one app's weights are busy (its lock held, as training holds it), its engine waits without
    blocking the compute thread: another app's request is answered meanwhile."""
    defaults = GenerationConfig(temperature=0, max_tokens=4)
    busy, other = Forge.load(bigram_dir, defaults=defaults), Forge.load(bigram_dir, defaults=defaults)
    expected = other.sync.generate("c")

    async def main() -> tuple[str, bool, str]:
        await busy.start_batching(max_batch=2)
        assert busy._generator is not None
        lock = busy._generator.lock
        lock.acquire()
        try:
            waiting = asyncio.ensure_future(busy.generate("a"))
            await asyncio.sleep(0.2)  # the engine has the request and is waiting for the lock
            answer = await asyncio.wait_for(other.generate("c"), timeout=60)
            still_waiting = not waiting.done()
        finally:
            lock.release()
        first = await asyncio.wait_for(waiting, timeout=60)
        await busy.stop_batching()
        return answer, still_waiting, first

    answer, still_waiting, first = asyncio.run(main())
    assert answer == expected and still_waiting
    assert first == "bcde"  # and the engine went on once the weights were free


def test_shutdown_finishes_the_running_job_and_cancels_the_queued_ones() -> None:
    thread = ComputeThread("test-compute")
    started, gate, ran = threading.Event(), threading.Event(), []
    running = thread.submit(lambda: (started.set(), gate.wait(10), ran.append("first"))[2])
    queued = thread.submit(lambda: ran.append("second"))
    assert started.wait(10)
    stopper = threading.Thread(target=thread.shutdown)
    stopper.start()
    gate.set()
    stopper.join(timeout=10)
    assert not stopper.is_alive() and running.done() and queued.cancelled() and ran == ["first"]
    assert thread.call(lambda: threading.current_thread().name) == threading.current_thread().name  # ran here
