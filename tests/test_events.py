"""Events on the app: typed payloads, their order, on / once / off / emit, and failing listeners.

Training runs a tiny char-level model for a few steps on the start of Hamlet;
generation runs the "bigram" model of conftest, whose greedy output is known.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from forge.app import Forge
from forge.errors import ConfigError
from forge.events import (
    EVENT_NAMES,
    CheckpointEvent,
    EndEvent,
    ErrorEvent,
    EvalEvent,
    Event,
    RequestEvent,
    ResponseEvent,
    StartEvent,
    StepEvent,
    TokenEvent,
)
from forge.generator import GenerationConfig

#: Small and quick: a char tokenizer, short windows, a cheap evaluation.
FAST: dict[str, Any] = {"batch_size": 2, "context": 16, "eval_batches": 2, "precision": "fp32"}
TRAINING = ("start", "step", "eval", "checkpoint", "end")
GENERATION = ("request", "token", "response")


@pytest.fixture
def untrained() -> Forge:
    return Forge(model="tiny", tokenizer="char")


@pytest.fixture
def bigram(bigram_dir: Path) -> Forge:
    return Forge.load(bigram_dir, defaults=GenerationConfig(temperature=0, max_tokens=4))


def record(app: Forge, names: tuple[str, ...] = EVENT_NAMES) -> list[Event]:
    seen: list[Event] = []
    for name in names:
        app.on(name, seen.append)
    return seen


def compact(names: list[str]) -> list[str]:
    """Collapse runs of "step" or "token" into one entry."""
    out: list[str] = []
    for n in names:
        if not (n in ("step", "token") and out and out[-1] == n):
            out.append(n)
    return out


def step_event(step: int) -> StepEvent:
    return StepEvent(
        step=step, total_steps=10, loss=2.0, lr=1e-3, grad_norm=1.0, tokens_per_sec=1.0, elapsed=1.0, eta=1.0
    )


def stream(app: Forge, prompt: str, **options: Any) -> list[str]:
    async def collect() -> list[str]:
        return [piece async for piece in app.stream(prompt, **options)]

    return asyncio.run(collect())


# -- training events ---------------------------------------------------------------------
def test_training_event_order_and_payloads(untrained: Forge, notes: Path, tmp_path: Path) -> None:
    events = record(untrained)
    result = asyncio.run(untrained.train(notes, steps=4, out=tmp_path / "run", **FAST))
    assert compact([e.name for e in events]) == ["start", "eval", "step", "eval", "checkpoint", "end"]
    by_kind = {kind: [e for e in events if isinstance(e, kind)] for kind in (StartEvent, StepEvent, EvalEvent)}
    [start] = by_kind[StartEvent]
    assert (start.start_step, start.total_steps) == (0, 4)  # type: ignore[attr-defined]
    assert start.parameters == untrained.model.num_params()  # type: ignore[attr-defined,union-attr]
    assert [e.step for e in by_kind[StepEvent]] == [1, 2, 3, 4]  # type: ignore[attr-defined]
    assert [(e.step, e.loss) for e in by_kind[StepEvent]] == result.losses  # type: ignore[attr-defined]
    assert [e.step for e in by_kind[EvalEvent]] == [0, 4]  # type: ignore[attr-defined]
    [checkpoint] = [e for e in events if isinstance(e, CheckpointEvent)]
    assert (checkpoint.step, checkpoint.path) == (4, str(tmp_path / "run"))
    [end] = [e for e in events if isinstance(e, EndEvent)]
    assert (end.step, end.interrupted, end.train_loss) == (4, False, result.train_loss)


def test_training_without_out_has_no_checkpoint_event(untrained: Forge, notes: Path) -> None:
    events = record(untrained, TRAINING)
    asyncio.run(untrained.train(notes, steps=2, **FAST))
    assert compact([e.name for e in events]) == ["start", "eval", "step", "eval", "end"]


def test_sync_training_emits_the_same_events(untrained: Forge, notes: Path) -> None:
    events = record(untrained, TRAINING)
    untrained.sync.train(notes, steps=2, **FAST)
    assert compact([e.name for e in events]) == ["start", "eval", "step", "eval", "end"]


# -- generation events --------------------------------------------------------------------
def test_generate_events(bigram: Forge) -> None:
    events = record(bigram, GENERATION)
    wall = time.perf_counter()
    text = asyncio.run(bigram.generate("a"))
    wall = time.perf_counter() - wall
    request, response = events
    assert isinstance(request, RequestEvent) and isinstance(response, ResponseEvent)
    assert (request.prompt, request.stream, request.params["max_tokens"]) == ("a", False, 4)
    assert response.id == request.id
    assert response.text == text == "bcde"
    assert (response.finish_reason, response.prompt_tokens, response.completion_tokens) == ("length", 1, 4)
    assert response.cached is False
    assert 0 < response.elapsed <= wall  # seconds, measured inside the call (not a speed check)


def test_stream_events(bigram: Forge) -> None:
    events = record(bigram, GENERATION)
    pieces = stream(bigram, "c", max_tokens=5, stop=["h"])
    assert compact([e.name for e in events]) == ["request", "token", "response"]
    request, *tokens, response = events
    assert isinstance(request, RequestEvent) and request.stream
    assert all(isinstance(t, TokenEvent) and t.id == request.id for t in tokens)
    assert [t.index for t in tokens] == list(range(len(pieces)))  # type: ignore[attr-defined]
    assert [t.text for t in tokens] == pieces == ["d", "e", "f", "g"]  # type: ignore[attr-defined]
    assert isinstance(response, ResponseEvent)
    assert (response.id, response.text, response.finish_reason) == (request.id, "defg", "stop")


def test_each_request_has_its_own_id(bigram: Forge) -> None:
    events = record(bigram, ("request", "response"))

    async def two() -> None:
        await asyncio.gather(bigram.generate("a"), bigram.generate("c"))

    asyncio.run(two())
    requests = {e.id: e.prompt for e in events if isinstance(e, RequestEvent)}
    responses = {e.id: e.text for e in events if isinstance(e, ResponseEvent)}
    assert len(requests) == 2
    assert {requests[i]: responses[i] for i in requests} == {"a": "bcde", "c": "defg"}


def test_generate_with_a_list_of_prompts_emits_per_prompt(bigram: Forge) -> None:
    events = record(bigram, ("request", "response"))
    assert asyncio.run(bigram.generate(["a", "e"])) == ["bcde", "fgha"]
    assert sorted(e.text for e in events if isinstance(e, ResponseEvent)) == ["bcde", "fgha"]
    assert len([e for e in events if isinstance(e, RequestEvent)]) == 2


# -- on / once / off / emit ----------------------------------------------------------------------
def test_emit_delivers_to_listeners_in_order(untrained: Forge) -> None:
    calls: list[tuple[str, int]] = []
    untrained.on("step", lambda e: calls.append(("first", e.step)))
    untrained.on("step", lambda e: calls.append(("second", e.step)))
    untrained.emit(step_event(1)).emit(step_event(2))
    assert calls == [("first", 1), ("second", 1), ("first", 2), ("second", 2)]


def test_emit_only_reaches_listeners_of_that_name(untrained: Forge) -> None:
    steps: list[Event] = []
    evals: list[Event] = []
    untrained.on("step", steps.append).on("eval", evals.append)
    untrained.emit(EvalEvent(step=3, val_loss=1.0, val_perplexity=2.7))
    assert steps == []
    assert [e.step for e in evals] == [3]  # type: ignore[attr-defined]


def test_once_fires_once(untrained: Forge, notes: Path) -> None:
    once: list[int] = []
    every: list[int] = []
    untrained.once("step", lambda e: once.append(e.step)).on("step", lambda e: every.append(e.step))
    asyncio.run(untrained.train(notes, steps=3, **FAST))
    assert once == [1]
    assert every == [1, 2, 3]


def test_off_removes_one_listener(untrained: Forge) -> None:
    kept: list[int] = []
    removed: list[int] = []

    def remove_me(e: StepEvent) -> None:
        removed.append(e.step)

    untrained.on("step", remove_me).on("step", lambda e: kept.append(e.step))
    untrained.emit(step_event(1)).off("step", remove_me).emit(step_event(2))
    assert removed == [1]
    assert kept == [1, 2]


def test_off_without_a_listener_removes_all_of_that_name(untrained: Forge) -> None:
    seen: list[Event] = []
    untrained.on("step", seen.append).on("step", lambda e: seen.append(e)).on("eval", seen.append)
    untrained.off("step")
    untrained.emit(step_event(1)).emit(EvalEvent(step=1, val_loss=1.0, val_perplexity=2.7))
    assert [e.name for e in seen] == ["eval"]


def test_off_removes_a_once_listener_before_it_fires(untrained: Forge) -> None:
    seen: list[Event] = []

    def listener(event: Event) -> None:
        seen.append(event)

    untrained.once("step", listener).off("step", listener)
    untrained.emit(step_event(1))
    assert seen == []


def test_off_removes_a_bound_method_listener(untrained: Forge) -> None:
    """``obj.method`` is a new object at each access; ``off`` must still find the one given to ``on``."""

    class Progress:
        def __init__(self) -> None:
            self.steps: list[int] = []

        def update(self, event: StepEvent) -> None:
            self.steps.append(event.step)

    progress = Progress()
    untrained.on("step", progress.update).emit(step_event(1))
    untrained.off("step", progress.update).emit(step_event(2))
    assert progress.steps == [1]
    assert "step" not in untrained.info()["listeners"]


def test_off_an_unregistered_listener_is_harmless(untrained: Forge) -> None:
    seen: list[Event] = []
    untrained.on("step", seen.append).off("step", print).off("eval")
    untrained.emit(step_event(1))
    assert len(seen) == 1


@pytest.mark.parametrize("method", ["on", "once", "off"])
def test_unknown_event_names_raise(untrained: Forge, method: str) -> None:
    register = getattr(untrained, method)
    with pytest.raises(ConfigError, match=r"'stpe'.*step"):
        register("stpe", print)


def test_listener_must_be_callable(untrained: Forge) -> None:
    with pytest.raises(ConfigError, match="callable"):
        untrained.on("step", "print")  # type: ignore[arg-type]


def test_every_event_name_can_be_listened_to(untrained: Forge) -> None:
    for name in EVENT_NAMES:
        untrained.on(name, print)
    assert untrained.info()["listeners"] == dict.fromkeys(EVENT_NAMES, 1)


# -- failing listeners ---------------------------------------------------------------------
def test_a_failing_listener_does_not_stop_training(untrained: Forge, notes: Path) -> None:
    raised: list[Exception] = []

    def broken(event: StepEvent) -> None:
        error = RuntimeError(f"listener bug at step {event.step}")
        raised.append(error)
        raise error

    steps: list[int] = []
    errors: list[ErrorEvent] = []
    untrained.on("step", broken).on("step", lambda e: steps.append(e.step)).on("error", errors.append)
    result = asyncio.run(untrained.train(notes, steps=3, **FAST))
    assert result.step == 3
    assert steps == [1, 2, 3]  # a later listener still sees every event
    assert [(e.source, e.error) for e in errors] == [("listener:step", error) for error in raised]
    assert len(errors) == 3
    assert all(isinstance(e, ErrorEvent) for e in errors)


def test_a_failing_listener_without_error_listeners_is_logged(
    untrained: Forge, notes: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(event: EndEvent) -> None:
        raise RuntimeError("end listener bug")

    untrained.on("end", broken)
    with caplog.at_level(logging.ERROR, logger="forge"):
        result = asyncio.run(untrained.train(notes, steps=2, **FAST))
    assert result.step == 2
    assert "end listener bug" in caplog.text


def test_an_error_listener_that_raises_is_only_logged(
    untrained: Forge, notes: Path, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[str] = []

    def broken(event: StepEvent) -> None:
        raise RuntimeError("step listener bug")

    def broken_error_listener(event: ErrorEvent) -> None:
        calls.append(event.source)
        raise RuntimeError("error listener bug")

    untrained.on("step", broken).on("error", broken_error_listener)
    with caplog.at_level(logging.ERROR, logger="forge"):
        result = asyncio.run(untrained.train(notes, steps=2, **FAST))
    assert result.step == 2
    assert calls == ["listener:step", "listener:step"]  # no error event about the error listener itself
    assert "error listener bug" in caplog.text


def test_a_failing_listener_does_not_break_a_stream(bigram: Forge) -> None:
    def broken(event: TokenEvent) -> None:
        raise RuntimeError("token listener bug")

    errors: list[ErrorEvent] = []
    bigram.on("token", broken).on("request", broken).on("error", errors.append)
    assert stream(bigram, "a") == ["b", "c", "d", "e"]
    assert asyncio.run(bigram.generate("a")) == "bcde"
    assert [e.source for e in errors] == ["listener:request"] + ["listener:token"] * 4 + ["listener:request"]


# -- async listeners ------------------------------------------------------------------------------
def test_async_listener_during_training(untrained: Forge, notes: Path) -> None:
    main = threading.get_ident()
    seen: list[tuple[int, int]] = []

    async def slow_listener(event: StepEvent) -> None:
        await asyncio.sleep(0)
        seen.append((event.step, threading.get_ident()))

    async def run() -> None:
        await untrained.train(notes, steps=3, **FAST)
        await asyncio.wait_for(_until(lambda: len(seen) == 3), timeout=10)

    untrained.on("step", slow_listener)
    asyncio.run(run())
    assert sorted(step for step, _ in seen) == [1, 2, 3]
    assert {thread for _, thread in seen} == {main}  # on the app's event loop, not the training thread


def test_async_listeners_have_finished_when_train_returns(untrained: Forge, notes: Path) -> None:
    seen: list[str] = []

    async def slow(event: Event) -> None:
        await asyncio.sleep(0.05)
        seen.append(event.name)

    untrained.on("step", slow).on("end", slow)
    asyncio.run(untrained.train(notes, steps=2, **FAST))
    assert sorted(seen) == ["end", "step", "step"]


def test_async_listeners_have_finished_when_sync_train_returns(untrained: Forge, notes: Path) -> None:
    seen: list[str] = []

    async def slow(event: Event) -> None:
        await asyncio.sleep(0.05)
        seen.append(event.name)

    untrained.on("end", slow)
    untrained.sync.train(notes, steps=1, **FAST)
    assert seen == ["end"]


def test_an_async_listener_may_generate_after_training(untrained: Forge, notes: Path) -> None:
    """Waiting for listeners must not deadlock one that uses the app itself."""
    samples: list[str] = []

    async def sample(event: EndEvent) -> None:
        samples.append(str(await untrained.generate("to", max_tokens=3, temperature=0)))

    untrained.on("end", sample)
    asyncio.run(asyncio.wait_for(untrained.train(notes, steps=1, **FAST), timeout=60))
    assert len(samples) == 1


def test_async_listener_that_raises_is_an_error_event(untrained: Forge, notes: Path) -> None:
    errors: list[ErrorEvent] = []

    async def broken(event: EndEvent) -> None:
        raise RuntimeError("async listener bug")

    async def run() -> None:
        await untrained.train(notes, steps=2, **FAST)
        await asyncio.wait_for(_until(lambda: bool(errors)), timeout=10)

    untrained.on("end", broken).on("error", errors.append)
    asyncio.run(run())
    [error] = errors
    assert error.source == "listener:end"
    assert str(error.error) == "async listener bug"


def test_async_listener_on_stream_tokens(bigram: Forge) -> None:
    seen: list[str] = []

    async def listener(event: TokenEvent) -> None:
        seen.append(event.text)

    async def run() -> list[str]:
        pieces = [piece async for piece in bigram.stream("a")]
        await asyncio.wait_for(_until(lambda: len(seen) == len(pieces)), timeout=10)
        return pieces

    bigram.on("token", listener)
    assert asyncio.run(run()) == seen == ["b", "c", "d", "e"]


def test_async_listener_on_an_emit_outside_any_loop(untrained: Forge) -> None:
    seen: list[int] = []

    async def listener(event: StepEvent) -> None:
        seen.append(event.step)

    untrained.on("step", listener).emit(step_event(7))
    assert seen == [7]


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.001)
