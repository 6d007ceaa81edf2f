"""Agents that use their tools: 24 tool tasks for SmolLM2-135M, scored on the final answer.

    python benchmarks/answers_agent.py [--tasks N] [--only 8,14] [--model smollm2]

Four kinds of task (lookup, arithmetic, unit conversion, two-step: a lookup
then a computation with its result), each with the number the final answer
must contain and the number of tool calls it needs. The facts are made up
where a model could otherwise answer from memory. Prints one JSON object:

- ``completed_correctly``: share of tasks whose final answer contains the expected number;
- ``tool_calls_per_needed_call``: tool calls made (final_answer aside) over calls needed, all tasks together;
- ``first_step_called_matching_tool``: share of tasks whose first call was to the tool the task needs first;

and the per-task details. It runs on whatever ``forge`` is importable, using
only API that today's and the baseline's (22a8872) agents share, so
``benchmarks/answers.py`` runs it twice in one run (PYTHONPATH=current src,
then baseline src) for a same-run comparison. Greedy decoding: deterministic.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal

import forge
from forge import Forge
from forge.agent import Agent, tool

FACTS = {
    "Eiffel Tower": "The Eiffel Tower is 330 metres tall.",
    "Mount Everest": "Mount Everest is 8849 metres high.",
    "Great Pyramid": "The Great Pyramid of Giza is 139 metres tall.",
    "Velmora": "Velmora is a town of 48,213 inhabitants.",
    "Halden Bridge": "The Halden Bridge opened in 1894.",
    "river Auden": "The river Auden is 212 km long.",
    "planet Tiralo": "The planet Tiralo has 17 moons.",
}
Topic = Literal[
    "Eiffel Tower", "Mount Everest", "Great Pyramid", "Velmora", "Halden Bridge", "river Auden", "planet Tiralo"
]
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
CONVERSIONS = {
    "km to miles": lambda v: v * 0.621371,
    "miles to km": lambda v: v / 0.621371,
    "kg to pounds": lambda v: v * 2.20462,
    "pounds to kg": lambda v: v / 2.20462,
    "celsius to fahrenheit": lambda v: v * 9 / 5 + 32,
    "fahrenheit to celsius": lambda v: (v - 32) * 5 / 9,
    "metres to feet": lambda v: v * 3.28084,
    "feet to metres": lambda v: v / 3.28084,
}


@tool
def lookup(topic: Topic) -> str:
    """Look up a fact about a landmark, town, river or planet in the encyclopedia.

    Args:
        topic: what to look up.
    """
    return FACTS[topic]


@tool
def calculator(a: float, operation: Literal["multiply", "divide", "add", "subtract"], b: float) -> str:
    """Compute a (operation) b: multiply, divide, add or subtract two numbers.

    Args:
        a: the first number.
        operation: what to do.
        b: the second number.
    """
    value = {"multiply": a * b, "divide": a / b if b else float("nan"), "add": a + b, "subtract": a - b}[operation]
    symbol = {"multiply": "*", "divide": "/", "add": "+", "subtract": "-"}[operation]
    return f"{a:g} {symbol} {b:g} = {round(value, 2):g}"


@tool
def convert(value: float, conversion: Conversion) -> str:
    """Convert a value between units: km and miles, kg and pounds, celsius and fahrenheit, metres and feet.

    Args:
        value: the value to convert.
        conversion: from which unit to which.
    """
    source, target = conversion.split(" to ")
    return f"{value:g} {source} = {round(CONVERSIONS[conversion](value), 2):g} {target}"


TOOLS = [lookup, calculator, convert]


@dataclass(frozen=True)
class Task:
    """A task, the numbers one of which its answer must contain, its first tool, and the calls it needs."""

    kind: Literal["lookup", "arithmetic", "conversion", "two-step"]
    task: str
    expected: tuple[str, ...]
    first_tool: str
    needed_calls: int


TASKS = [
    Task("lookup", "How tall is the Eiffel Tower?", ("330",), "lookup", 1),
    Task("lookup", "How high is Mount Everest?", ("8849",), "lookup", 1),
    Task("lookup", "How tall is the Great Pyramid of Giza?", ("139",), "lookup", 1),
    Task("lookup", "How many people live in Velmora?", ("48213",), "lookup", 1),
    Task("lookup", "When did the Halden Bridge open?", ("1894",), "lookup", 1),
    Task("lookup", "How long is the river Auden?", ("212",), "lookup", 1),
    Task("lookup", "How many moons does the planet Tiralo have?", ("17",), "lookup", 1),
    Task("arithmetic", "What is 17 times 23?", ("391",), "calculator", 1),
    Task("arithmetic", "What is 1234 plus 5678?", ("6912",), "calculator", 1),
    Task("arithmetic", "What is 9876 minus 4321?", ("5555",), "calculator", 1),
    Task("arithmetic", "What is 882 divided by 7?", ("126",), "calculator", 1),
    Task("arithmetic", "What is 3.5 times 48?", ("168",), "calculator", 1),
    Task("arithmetic", "What is 2048 minus 999?", ("1049",), "calculator", 1),
    Task("conversion", "How many miles is 42 km?", ("26.1",), "convert", 1),
    Task("conversion", "How many kilograms is 150 pounds?", ("68.04", "68.0"), "convert", 1),
    Task("conversion", "What is 30 degrees celsius in fahrenheit?", ("86",), "convert", 1),
    Task("conversion", "How many feet is 100 metres?", ("328.08", "328.1"), "convert", 1),
    Task("conversion", "Convert 10 miles to km.", ("16.09", "16.1"), "convert", 1),
    Task("conversion", "What is 212 degrees fahrenheit in celsius?", ("100",), "convert", 1),
    Task("two-step", "How tall is the Eiffel Tower in feet?", ("1082.68", "1082.7"), "lookup", 2),
    Task("two-step", "How long is the river Auden in miles?", ("131.73", "131.7"), "lookup", 2),
    Task("two-step", "How many metres higher than 8000 metres is Mount Everest?", ("849",), "lookup", 2),
    Task("two-step", "How many years before 2024 did the Halden Bridge open?", ("130",), "lookup", 2),
    Task("two-step", "What would the population of Velmora be if it doubled?", ("96426",), "lookup", 2),
]


def subset(n: int | None) -> list[Task]:
    """The first ``n`` tasks taken round-robin over the kinds, so a small subset still mixes them."""
    kinds: dict[str, list[Task]] = {}
    for task in TASKS:
        kinds.setdefault(task.kind, []).append(task)
    order = [t for group in zip(*kinds.values(), strict=False) for t in group]
    order += [t for t in TASKS if t not in order]
    return order[: n or len(order)]


def correct(answer: str, expected: tuple[str, ...]) -> bool:
    """The answer contains one of the expected numbers as a number (thousands separators ignored)."""
    text = re.sub(r"(?<=\d)[,\u202f](?=\d{3}\b)", "", answer)
    numbers = re.findall(r"\d+(?:\.\d+)?", text)
    return any(e in numbers for e in expected)


def run_task(app: Forge, task: Task) -> dict[str, object]:
    began = time.perf_counter()
    try:
        result = Agent(app, tools=TOOLS, temperature=0.0).sync.run(task.task)
    except Exception as e:  # the agent failed (e.g. a call that never closed): the task failed, the run goes on
        return {
            **asdict(task),
            "answer": "",
            "correct": False,
            "tool_calls": 0,
            "calls": [],
            "first_call": None,
            "first_step_matched": False,
            "reason": "error",
            "error": f"{type(e).__name__}: {e}",
            "seconds": round(time.perf_counter() - began, 2),
        }
    calls = [e for e in result.trace if e.type == "tool_call" and e.name != "final_answer"]
    first = next((e for e in result.trace if e.type == "tool_call"), None)
    return {
        **asdict(task),
        "answer": result.answer,
        "correct": correct(result.answer, task.expected),
        "tool_calls": len(calls),
        "calls": [[e.name, e.arguments] for e in calls],
        "first_call": first.name if first is not None else None,
        "first_step_matched": first is not None and first.name == task.first_tool,
        "reason": getattr(result, "reason", None),
        "seconds": round(time.perf_counter() - began, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=None, help="run only the first N tasks (round-robin over kinds)")
    parser.add_argument("--kinds", default=None, help="only these kinds, comma-separated (e.g. two-step)")
    parser.add_argument("--only", default=None, help="only these tasks, by their 0-based index in TASKS (e.g. 8,14)")
    parser.add_argument("--model", default="smollm2", help="what Forge.load() loads (default: smollm2)")
    args = parser.parse_args()
    began = time.perf_counter()
    app = Forge.load(args.model)
    details = []
    kinds = set(args.kinds.split(",")) if args.kinds else None
    only = {TASKS[int(i)] for i in args.only.split(",")} if args.only else None
    for task in subset(args.tasks):
        if (kinds is not None and task.kind not in kinds) or (only is not None and task not in only):
            continue
        details.append(run_task(app, task))
        print(json.dumps({k: details[-1][k] for k in ("task", "correct", "calls", "answer")}), file=sys.stderr)
    n = len(details)
    needed = sum(d["needed_calls"] for d in details)  # type: ignore[misc]
    by_kind: dict[str, dict[str, float]] = {}
    for kind in dict.fromkeys(d["kind"] for d in details):
        rows = [d for d in details if d["kind"] == kind]
        by_kind[str(kind)] = {"tasks": len(rows), "completed_correctly": sum(d["correct"] for d in rows) / len(rows)}  # type: ignore[misc]
    report = {
        "benchmark": "answers_agent",
        "model": args.model,
        "forge": str(forge.__file__),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "tasks": n,
        "completed_correctly": round(sum(d["correct"] for d in details) / n, 4),  # type: ignore[misc]
        "tool_calls_per_needed_call": round(sum(d["tool_calls"] for d in details) / needed, 4),  # type: ignore[misc]
        "first_step_called_matching_tool": round(sum(d["first_step_matched"] for d in details) / n, 4),  # type: ignore[misc]
        "reasons": {r: sum(d["reason"] == r for d in details) for r in dict.fromkeys(d["reason"] for d in details)},
        "by_kind": by_kind,
        "seconds": round(time.perf_counter() - began, 1),
        "details": details,
    }
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
