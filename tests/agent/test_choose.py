"""A call's closed arguments chosen again by how well the task follows the whole call (forge.agent.choose)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Literal

import pytest

from forge import Forge
from forge.agent import Agent, tool
from forge.agent.choose import (
    MAX_ACTIONS,
    MAX_ARGUMENTS,
    MAX_CANDIDATES,
    _actions,
    action,
    closed_arguments,
    next_tool,
    rechoose,
    rechoose_calls,
)
from forge.toolcalls import ToolCall

Conversion = Literal[
    "km to miles",
    "miles to km",
    "kg to pounds",
    "pounds to kg",
    "celsius to fahrenheit",
    "fahrenheit to celsius",
    "metres to feet",
    "feet to metres",
]
ran: list[tuple[object, ...]] = []


@tool
def convert(value: float, conversion: Conversion) -> str:
    """Convert a value between units: km and miles, kg and pounds, celsius and fahrenheit, metres and feet.

    Args:
        value: the value to convert.
        conversion: from which unit to which.
    """
    ran.append(("convert", value, conversion))
    return f"{value:g} {conversion}"


@tool
def calculator(a: float, operation: Literal["multiply", "divide", "add", "subtract"], b: float) -> str:
    """Compute a (operation) b: multiply, divide, add or subtract two numbers.

    Args:
        a: the first number.
        operation: what to do.
        b: the second number.
    """
    ran.append(("calculator", a, operation, b))
    return {"add": f"{a:g} + {b:g} = {a + b:g}", "subtract": f"{a:g} - {b:g} = {a - b:g}"}.get(operation, "?")


@pytest.fixture(scope="module")
def smol(smollm2_app: Forge) -> Forge:
    return smollm2_app


# The calls SmolLM2-135M wrote itself on benchmarks/answers_agent.py's tasks, its choice wrong in the first three.
@pytest.mark.parametrize(
    ("task", "known", "call", "argument", "right"),
    [
        ("What is 1234 plus 5678?", None, {"a": 1234, "operation": "subtract", "b": 5678}, "operation", "add"),
        (
            "How many kilograms is 150 pounds?",
            None,
            {"value": 150, "conversion": "kg to pounds"},
            "conversion",
            "pounds to kg",
        ),
        (
            "How long is the river Auden in miles?",
            "The river Auden is 212 km long.",
            {"value": 212, "conversion": "miles to km"},
            "conversion",
            "km to miles",
        ),
        ("What is 9876 minus 4321?", None, {"a": 9876, "operation": "subtract", "b": 4321}, "operation", "subtract"),
        (
            "How many feet is 100 metres?",
            None,
            {"value": 100, "conversion": "metres to feet"},
            "conversion",
            "metres to feet",
        ),
    ],
    ids=["plus", "pounds", "after-lookup", "minus-kept", "feet-kept"],
)
def test_the_choice_the_task_follows_best_replaces_the_models(
    smol: Forge, task: str, known: str | None, call: dict[str, object], argument: str, right: str
) -> None:
    schema = (calculator if "operation" in call else convert).schema()
    chosen = rechoose(smol.model, smol.tokenizer, task, schema, call, known)
    assert chosen == {**call, argument: right}


def test_the_agent_runs_the_call_with_the_choice_made_again(smol: Forge, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model's reply calls "subtract" for "plus"; the tool runs with "add", and the trace says so."""
    fmt = smol.tool_format()
    replies = iter(
        [
            fmt.call_text(ToolCall("calculator", {"a": 1234, "operation": "subtract", "b": 5678})),
            "1234 plus 5678 is 6912.",
        ]
    )

    async def scripted(messages: object, **options: object) -> AsyncIterator[str]:
        yield next(replies)

    monkeypatch.setattr(smol, "chat_stream", scripted)
    ran.clear()
    result = Agent(smol, [calculator], time_budget=None, max_iterations=1).sync.run("What is 1234 plus 5678?")
    assert ran == [("calculator", 1234, "add", 5678)]
    assert [e.arguments["operation"] for e in result.tool_calls if e.name == "calculator"] == ["add"]
    assert "6912" in result.answer


def _schema(**options: list[object]) -> dict[str, object]:
    properties = {name: {"enum": values} for name, values in options.items()}
    return {"type": "function", "function": {"name": "f", "parameters": {"properties": {"x": {}, **properties}}}}


def test_only_closed_arguments_of_two_to_the_bound_choices_are_chosen_again() -> None:
    schema = _schema(one=["a"], two=["a", "b"], bound=list(range(MAX_CANDIDATES)), over=list(range(MAX_CANDIDATES + 1)))
    assert list(closed_arguments(schema)) == ["two", "bound"]  # "x" is open, "one" has no choice, "over" too many
    many = _schema(**{f"a{i}": ["p", "q"] for i in range(MAX_ARGUMENTS + 2)})
    assert list(closed_arguments(many)) == [f"a{i}" for i in range(MAX_ARGUMENTS)]
    assert closed_arguments({"type": "function", "function": {"name": "g"}}) == {}


def test_a_call_reads_as_its_tool_and_values_in_words() -> None:
    assert action("convert", {"value": 150.0, "conversion": "pounds to kg"}) == "convert 150 pounds to kg"
    assert action("calculator", {"a": 3.5, "operation": "multiply", "b": 48}) == "calculator 3.5 multiply 48"
    assert action("f", {"flag": True, "items": ["x"], "none": None}) == 'f true ["x"] null'


def test_calls_without_closed_arguments_or_tools_are_kept_and_merged_when_made_identical(smol: Forge) -> None:
    """A call to an unknown tool or one with open arguments only is passed through unscored; two calls that
    become the same call are run once."""
    calls = [
        ToolCall("calculator", {"a": 1234, "operation": "subtract", "b": 5678}, "c1"),
        ToolCall("calculator", {"a": 1234, "operation": "add", "b": 5678}, "c2"),
        ToolCall("other", {"q": "x"}, "c3"),
    ]
    chosen = rechoose_calls(smol, "What is 1234 plus 5678?", [calculator.schema()], calls)
    assert [(c.id, c.arguments.get("operation")) for c in chosen] == [("c1", "add"), ("c3", None)]


@tool
def lookup(topic: Literal["Eiffel Tower", "Mount Everest", "river Auden"]) -> str:
    """Look up a fact about a landmark or river in the encyclopedia.

    Args:
        topic: what to look up.
    """
    return topic


@pytest.mark.parametrize(
    ("task", "last", "name", "argument", "right"),
    [
        # judged by the tools' descriptions, SmolLM2 converted "8849 metres" "feet to metres" here
        (
            "How many metres higher than 8000 metres is Mount Everest?",
            "Mount Everest is 8849 metres high.",
            "calculator",
            "operation",
            "subtract",
        ),
        (
            "How long is the river Auden in miles?",
            "The river Auden is 212 km long.",
            "convert",
            "conversion",
            "km to miles",
        ),
    ],
    ids=["subtract", "convert"],
)
def test_the_next_tool_is_the_one_whose_likely_call_the_task_follows_best(
    smol: Forge, task: str, last: str, name: str, argument: str, right: str
) -> None:
    tools = [t.schema() for t in (lookup, calculator, convert)]
    topic = "Mount Everest" if "Everest" in task else "river Auden"
    made = [("lookup", f'{{"topic": "{topic}"}}')]
    chosen = next_tool(smol.model, smol.tokenizer, task, tools, last, made)
    assert chosen["function"]["name"] == name
    assert chosen["function"]["parameters"]["properties"][argument]["enum"] == [right]


def test_likely_calls_take_the_numbers_in_turn_each_choice_and_leave_out_calls_made() -> None:
    calls = _actions(calculator.schema(), ["8849", "8000"])
    assert [c["operation"] for c in calls] == ["multiply", "divide", "add", "subtract"]
    assert all((c["a"], c["b"]) == ("8849", "8000") for c in calls)
    assert (
        {c["a"] for c in _actions(calculator.schema(), ["7"])}
        == {"7"}
        == {c["b"] for c in _actions(calculator.schema(), ["7"])}
    )
    assert {c["a"] for c in _actions(calculator.schema(), [])} == {"a"}  # no number: the argument's name
    made = [("lookup", '{"topic": "Mount Everest"}')]
    assert [c["topic"] for c in _actions(lookup.schema(), [], made)] == ["Eiffel Tower", "river Auden"]
    wide = _schema(p=list(range(MAX_CANDIDATES)), q=list(range(MAX_CANDIDATES)))
    assert len(_actions(wide, [])) == MAX_CANDIDATES  # combinations, bounded


def test_the_next_tool_is_judged_in_one_pass_of_at_most_the_bound_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    passes: list[int] = []

    def counted(model: object, tokenizer: object, contexts: list[str], continuation: str) -> list[float]:
        passes.append(len(contexts))
        return [float(i == 1) for i in range(len(contexts))]  # the second call is the likeliest

    monkeypatch.setattr("forge.agent.choose.likelihoods", counted)
    wide = [_schema(p=list(range(MAX_CANDIDATES)), q=["x", "y"]) for _ in range(8)]
    wide = [{**w, "function": {**w["function"], "name": f"f{i}"}} for i, w in enumerate(wide)]
    chosen = next_tool(None, None, "task", wide, "12 apples")
    assert passes == [MAX_ACTIONS]
    assert chosen["function"]["name"] == "f0"
    assert chosen["function"]["parameters"]["properties"]["p"]["enum"] == [0]
    assert chosen["function"]["parameters"]["properties"]["q"]["enum"] == ["y"]
