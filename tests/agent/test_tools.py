"""Typed tools: schemas from hints and docstrings, validated calls, sync and async, timeouts."""

from __future__ import annotations

import asyncio
import enum
from typing import Annotated, Literal

import pytest
from pydantic import BaseModel, Field

from forge.agent import Tool, ToolError, tool
from forge.errors import ConfigError


class Unit(enum.Enum):
    C = "celsius"
    F = "fahrenheit"


class Place(BaseModel):
    city: str
    country: str | None = None


@tool
def weather(place: Place, unit: Unit = Unit.C, days: Annotated[int, Field(ge=1, le=7)] = 1) -> dict:
    """The forecast for a place.

    Args:
        place: where to look.
        unit: the temperature scale.
        days: how many days ahead,
            one to seven.
    """
    return {"city": place.city, "unit": unit.value, "days": days}


CANCELLED: list[float] = []


@tool(timeout=0.2)
async def slow(seconds: float) -> str:
    """Sleeps."""
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        CANCELLED.append(seconds)
        raise
    return "done"


def test_schema_comes_from_hints_and_docstring() -> None:
    spec = weather.schema()
    assert spec["type"] == "function" and spec["function"]["name"] == "weather"
    assert spec["function"]["description"] == "The forecast for a place."
    params = spec["function"]["parameters"]
    assert params["required"] == ["place"] and params["additionalProperties"] is False
    assert params["properties"]["days"]["minimum"] == 1 and params["properties"]["days"]["maximum"] == 7
    assert params["properties"]["days"]["description"] == "how many days ahead, one to seven."
    assert "Place" in params["$defs"] and params["$defs"]["Unit"]["enum"] == ["celsius", "fahrenheit"]


def test_calls_are_validated_and_sync_tools_run_in_a_thread() -> None:
    out = asyncio.run(weather.call('{"place": {"city": "Oslo"}, "unit": "fahrenheit", "days": 3}'))
    assert out == {"city": "Oslo", "unit": "fahrenheit", "days": 3}
    assert weather(Place(city="Rome")) == {"city": "Rome", "unit": "celsius", "days": 1}  # still a function
    with pytest.raises(ToolError, match=r"bad arguments for tool 'weather': days: Input should be less than or"):
        asyncio.run(weather.call({"place": {"city": "Oslo"}, "days": 9}))
    with pytest.raises(ToolError, match="place: Field required"):
        asyncio.run(weather.call({}))
    with pytest.raises(ToolError, match="color: Extra inputs are not permitted"):
        asyncio.run(weather.call({"place": {"city": "x"}, "color": "red"}))


def test_async_tools_and_timeouts() -> None:
    assert asyncio.run(slow.call({"seconds": 0.01})) == "done"
    with pytest.raises(ToolError, match=r"'slow' did not finish within 0.2 s"):
        asyncio.run(slow.call({"seconds": 5}))
    assert CANCELLED == [5]  # the call was cancelled at the timeout, not left to finish its sleep


def test_literal_and_list_arguments() -> None:
    @tool(name="pick-one")
    def pick(options: list[str], mode: Literal["first", "last"] = "first") -> str:
        """Pick an option."""
        return options[0] if mode == "first" else options[-1]

    assert isinstance(pick, Tool) and pick.name == "pick-one"
    assert pick.parameters["properties"]["mode"]["enum"] == ["first", "last"]
    assert asyncio.run(pick.call({"options": ["a", "b"], "mode": "last"})) == "b"


def test_bad_definitions_are_named() -> None:
    with pytest.raises(ConfigError, match="argument 'x' has no type hint"):

        @tool
        def untyped(x) -> None:  # type: ignore[no-untyped-def]
            """No hints."""

    with pytest.raises(ConfigError, match=r"\*args can't be described"):

        @tool
        def variadic(*args: int) -> None:
            """Varargs."""

    with pytest.raises(ConfigError, match="tool name 'two words'"):
        tool(name="two words")(lambda: None)
