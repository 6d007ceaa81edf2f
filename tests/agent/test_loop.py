"""The agent loop with SmolLM2-135M: a two-step task, events, limits, failing tools, memory."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Literal

import pytest

from forge import Forge
from forge.agent import (
    Agent,
    AgentFailureEvent,
    AgentTokenEvent,
    FinalEvent,
    Memory,
    ToolCallEvent,
    ToolResultEvent,
    tool,
)
from forge.errors import ConfigError
from forge.toolcalls import ToolCall

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "agent.py"
#: Of 10 seeded runs of the example's two-step task, at least this many must end with the right number.
#: Measured on the development machine: 4 of 10 (see the closing note); the floor leaves room for noise.
SUCCESS_FLOOR = 2


@pytest.fixture(scope="module")
def smol(smollm2_app: Forge) -> Forge:
    return smollm2_app


@pytest.fixture(scope="module")
def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("agent_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["agent_example"] = module
    spec.loader.exec_module(module)
    return module


def test_two_step_task_success_rate(smol: Forge, example: ModuleType) -> None:
    """Look a height up, multiply it: 10 runs with seeds 0-9 at temperature 0.3."""
    successes, runs = 0, []
    for seed in range(10):
        result = example.make_agent(smol, temperature=0.3, seed=seed, time_budget=None).sync.run(example.TASK)
        calls = [(e.name, e.arguments) for e in result.tool_calls]
        # Whatever the answer, every call was well-formed and every argument valid for its tool.
        for event in result.tool_calls:
            if event.name != "final_answer":
                example.lookup.validate(event.arguments) if event.name == "lookup" else example.calculator.validate(
                    event.arguments
                )
        looked_up = ("lookup", {"topic": "Eiffel Tower"}) in calls
        ok = looked_up and "1082" in result.answer
        successes += ok
        runs.append((seed, ok, result.reason, calls, result.answer[:80]))
    print(f"\ntwo-step agent task: {successes}/10 succeeded")
    for run in runs:
        print("  ", run)
    assert successes >= SUCCESS_FLOOR, runs


def test_events_stream_in_order_and_failures_become_results(smol: Forge) -> None:
    """A tool that raises and one that hangs answer with their errors; the run still ends in an answer."""

    @tool
    def explode(city: str) -> str:
        """Look up the population of a city."""
        raise RuntimeError(f"the census office for {city} is closed")

    cancelled: list[str] = []

    @tool(timeout=0.2)
    async def slow(city: str) -> str:
        """Look up the area of a city."""
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:  # the timeout cancels the call, it does not wait it out
            cancelled.append(city)
            raise
        return "never"

    agent = Agent(smol, [explode, slow], max_iterations=3, time_budget=None, temperature=0.7, seed=0)
    task = "Use explode to find the population of Paris, then slow to find its area."

    async def collect() -> list[object]:
        return [event async for event in agent.stream(task)]

    events = asyncio.run(collect())
    kinds = [e.type for e in events]  # type: ignore[attr-defined]
    assert kinds[-1] == "final" and "error" not in kinds and kinds[0] == "token"
    results = [e for e in events if isinstance(e, ToolResultEvent)]
    calls = [e for e in events if isinstance(e, ToolCallEvent)]
    assert len(results) == len([c for c in calls if c.name != "final_answer"]) >= 2
    for result in results:
        assert result.error
        if result.name == "explode" and "already called" not in result.content:
            assert "RuntimeError: the census office for" in result.content
        if result.name == "slow" and "already called" not in result.content:
            assert "did not finish within 0.2 s" in result.content and cancelled
    final = events[-1]
    assert isinstance(final, FinalEvent) and final.answer
    assert (
        "".join(e.text for e in events if isinstance(e, AgentTokenEvent) and e.step == final.steps).strip()
        == final.answer
    )


def test_limits_end_with_the_models_own_answer(smol: Forge) -> None:
    @tool
    def lookup(topic: str) -> str:
        """Look a topic up in the encyclopedia."""
        return f"{topic}: the Seine flows through Paris."

    one_step = Agent(smol, [lookup], max_iterations=1, time_budget=None, temperature=0)
    capped = one_step.sync.run("Which river flows through Paris?")
    assert capped.reason in ("max_iterations", "answer") and capped.steps <= 2
    assert capped.answer and "stopped" not in capped.answer.lower()
    if capped.reason == "max_iterations":
        assert capped.tool_calls[0].name == "lookup"
        assert "the Seine flows through Paris" in capped.messages[-2]["content"]  # what it gathered was asked about
    # A budget spent while the first step generates: its call is not run, and no other step starts. The clock
    # reads 0 at the start and before the first step, then 10 s on: the run no longer depends on how fast it is.
    readings = iter([0.0, 0.0])
    timed = Agent(smol, [lookup], time_budget=1.0, temperature=0, clock=lambda: next(readings, 10.0)).sync.run(
        "Which river flows through Paris?"
    )
    assert timed.reason == "time_budget" and [c.name for c in timed.tool_calls] == ["lookup"] and timed.answer
    result = next(e for e in timed.trace if isinstance(e, ToolResultEvent))
    assert result.error and "time budget is spent" in result.content


def test_memory_carries_a_conversation_across_runs(smol: Forge) -> None:
    memory = Memory(budget=600)
    agent = Agent(smol, [], memory=memory, temperature=0, max_iterations=1)
    agent.sync.run("My name is Ada and my favourite colour is green.")
    assert memory.messages[0]["content"].startswith("My name is Ada") and memory.messages[-1]["role"] == "assistant"
    second = agent.sync.run("What is my favourite colour?")
    assert any("favourite colour is green" in str(m.get("content")) for m in second.messages)


def test_memory_window_and_summary_respect_the_budget(smol: Forge) -> None:
    tokenizer = smol.tokenizer
    assert tokenizer is not None
    turns = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"Fact {i}: the code word number {i} is {w}."}
        for i, w in enumerate(["apple", "river", "candle", "falcon", "marble", "violet", "copper", "harbor"])
    ]
    window = Memory(budget=80)
    window.add(*turns)
    kept = asyncio.run(window.context(smol))
    size = sum(len(tokenizer.encode(m["content"])) + 4 for m in kept)
    assert size <= 80 and kept == turns[-len(kept) :] and 1 < len(kept) < len(turns)

    summary = Memory(budget=80, strategy="summary")
    summary.add(*turns)
    sent = asyncio.run(summary.context(smol))
    assert sent[0]["role"] == "system" and sent[0]["content"].startswith("Summary of the conversation so far: ")
    assert summary.summary and len(summary) < len(turns) and sent[1:] == summary.messages
    assert sent[-1] == turns[-1]


def test_bad_agent_input_is_a_config_error(smol: Forge) -> None:
    with pytest.raises(ConfigError, match="max_iterations"):
        Agent(smol, [], max_iterations=0)
    with pytest.raises(ConfigError, match="sets \\['tool_choice'\\] itself"):
        Agent(smol, [], tool_choice="auto")
    with pytest.raises(ConfigError, match=r"forge\.Forge app"):
        Agent("smollm2", [])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="non-empty string"):
        Agent(smol, []).sync.run("  ")
    with pytest.raises(ConfigError, match="budget"):
        Memory(budget=3)
    assert AgentFailureEvent.__dataclass_fields__["type"].default == "error"


@tool
def lookup(topic: Literal["Eiffel Tower", "Mount Everest"]) -> str:
    """Look up a landmark in the encyclopedia."""
    return {"Eiffel Tower": "330 metres tall", "Mount Everest": "8849 metres high"}[topic]


def test_the_readme_example_calls_its_tool_first_and_quotes_it(smol: Forge) -> None:
    """SmolLM2 answered "324.2 meters" from memory here; its first step must now use the tool."""
    result = Agent(smol, tools=[lookup], time_budget=None).sync.run("How tall is the Eiffel Tower?")
    first = result.tool_calls[0]
    assert (first.name, first.arguments, first.step) == ("lookup", {"topic": "Eiffel Tower"}, 1)
    assert "330" in result.answer and result.reason == "answer", result.answer


def test_identical_calls_in_one_step_run_once(smol: Forge, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reply with the same call twice runs it once; calls repeated in later steps are not run, and end the calls."""
    runs: list[tuple[object, ...]] = []

    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        runs.append(("add", a, b))
        return a + b

    @tool
    def now() -> str:
        """The time of day."""
        runs.append(("now",))
        return "noon"

    fmt = smol.tool_format()
    twice = [fmt.call_text(ToolCall("add", {"a": 1, "b": 2}))] * 2
    replies = iter(
        [
            "\n".join([*twice, fmt.call_text(ToolCall("now", {}))]),
            fmt.call_text(ToolCall("add", {"b": 2, "a": 1})),  # made before: the next step may not call add
            fmt.call_text(ToolCall("now", {})),  # made before too: nothing new to do, so it answers
            "It is noon, and 1 + 2 = 3.",
        ]
    )

    async def scripted(messages: object, **options: object) -> AsyncIterator[str]:
        yield next(replies)

    monkeypatch.setattr(smol, "chat_stream", scripted)
    result = Agent(smol, [add, now], time_budget=None).sync.run("Add 1 and 2, and tell me the time.")
    assert runs == [("add", 1, 2), ("now",)]
    assert [(e.name, e.step) for e in result.tool_calls] == [("add", 1), ("now", 1)]
    assert result.reason == "answer" and result.answer == "It is noon, and 1 + 2 = 3."


@tool
def _convert(value: float, conversion: Literal["km to miles", "miles to km", "kg to pounds", "pounds to kg"]) -> str:
    """Convert a value between units.

    Args:
        value: the number to convert.
        conversion: which units, from and to.
    """
    return str(value)


@tool
def _calculate(a: float, operation: Literal["add", "subtract", "multiply", "divide"], b: float) -> str:
    """Compute a (operation) b.

    Args:
        a: the first number.
        operation: what to do.
        b: the second number.
    """
    return str(a)


@tool
def _lookup(topic: Literal["Eiffel Tower", "Mount Everest", "river Auden", "planet Tiralo"]) -> str:
    """Look up a fact in the encyclopedia.

    Args:
        topic: what to look up.
    """
    return topic


@pytest.mark.parametrize(
    ("task", "name", "argument", "value"),
    [
        ("How long is the river Auden?", "_lookup", "topic", "river Auden"),
        ("How many moons does the planet Tiralo have?", "_lookup", "topic", "planet Tiralo"),
        ("Convert 10 miles to km.", "_convert", "conversion", "miles to km"),
        ("What is 882 divided by 7?", "_calculate", "operation", "divide"),
    ],
)
def test_the_first_step_takes_the_tool_and_choice_the_task_names(
    smol: Forge, task: str, name: str, argument: str, value: str
) -> None:
    """Left to its first token, SmolLM2 called the calculator to look things up and "Eiffel Tower" for any topic."""
    from forge.agent.loop import _likeliest_tool

    chosen = _likeliest_tool(smol, task, [t.schema() for t in (_lookup, _convert, _calculate)])
    assert chosen["function"]["name"] == name
    assert chosen["function"]["parameters"]["properties"][argument]["enum"] == [value]


def _made(*calls: tuple[str, dict[str, object]]) -> list[tuple[str, str]]:
    return [(name, json.dumps(arguments, sort_keys=True)) for name, arguments in calls]


@pytest.mark.parametrize(
    ("task", "made", "unfinished"),
    [
        # a number the task holds that no call has used: the computation is still to come
        ("How many years before 2024 did the bridge open?", _made(("_lookup", {"topic": "river Auden"})), True),
        ("What is 17 times 23?", _made(("_calculate", {"a": 17.0, "operation": "multiply", "b": 23})), False),
        # a word of an unused tool's choices ("... in miles": the conversion "km to miles")
        ("How long is the river Auden in miles?", _made(("_lookup", {"topic": "river Auden"})), True),
        ("How long is the river Auden?", _made(("_lookup", {"topic": "river Auden"})), False),
        ("How many miles is 42 km?", _made(("_convert", {"value": 42, "conversion": "km to miles"})), False),
        ("How long is the river Auden in miles?", [], False),  # nothing made yet: the first step decides
    ],
)
def test_a_task_is_not_done_while_it_names_what_no_call_has_used(
    task: str, made: list[tuple[str, str]], unfinished: bool
) -> None:
    from forge.agent.loop import _unfinished

    tools = [t.schema() for t in (_lookup, _convert, _calculate)]
    assert _unfinished(task, tools, made) is unfinished


def test_a_word_the_results_already_hold_does_not_keep_the_task_open() -> None:
    """ "How many miles longer ...": the lookup said "131 miles", so "miles" asks for no conversion; once the
    subtraction is made the task is done. "... in miles" after "212 km" still asks for one."""
    from forge.agent.loop import _unfinished

    tools = [t.schema() for t in (_lookup, _convert, _calculate)]
    task = "How many miles longer than 100 miles is the river Auden?"
    made = _made(("_lookup", {"topic": "river Auden"}), ("_calculate", {"a": 131, "operation": "subtract", "b": 100}))
    known = ["The river Auden is 131 miles long.", "131 - 100 = 31"]
    assert _unfinished(task, tools, made)  # without the results, "miles" names the unused conversion
    assert not _unfinished(task, tools, made, known)
    assert _unfinished(task, tools, made[:1], known[:1])  # 100 is not used yet: the computation is to come
    miles = "How long is the river Auden in miles?"
    assert _unfinished(miles, tools, made[:1], ["The river Auden is 212 km long."])


def test_a_tool_of_closed_choices_the_task_never_mentions_is_not_offered() -> None:
    from forge.agent.loop import _may_help

    assert not _may_help("What is 1234 plus 5678?", _lookup.schema())  # no topic of its list is named
    assert _may_help("How far is the planet Tiralo?", _lookup.schema())
    assert _may_help("What is 1234 plus 5678?", _calculate.schema())  # open arguments: it may always help


def test_the_two_step_task_takes_the_conversion_after_the_lookup(smol: Forge) -> None:
    """SmolLM2 answered "330 feet" from the lookup alone; the task's "in miles" keeps the conversion offered."""
    from forge.agent.loop import FINAL, _final_answer, _likeliest_tool

    tools = [t.schema() for t in (_lookup, _convert, _calculate, _final_answer)]
    made = _made(("_lookup", {"topic": "river Auden"}))
    chosen = _likeliest_tool(
        smol, "How long is the river Auden in miles?", tools, "The river Auden is 212 km long.", made
    )
    assert chosen["function"]["name"] not in (FINAL, "_lookup")
