"""Agents: typed tools, a loop that ends well, and conversation memory.

>>> from forge.agent import Agent, tool
>>> @tool
... def lookup(city: str) -> str:
...     '''The population of a city.'''
...     return "2.1 million"
>>> lookup.name, lookup.description
('lookup', 'The population of a city.')
"""

from forge.agent.loop import (
    Agent,
    AgentError,
    AgentEvent,
    AgentResult,
    ErrorEvent,
    FinalEvent,
    TokenEvent,
    ToolCallEvent,
    ToolResultEvent,
)
from forge.agent.memory import Memory
from forge.agent.tools import Tool, ToolError, tool

__all__ = [
    "Agent",
    "AgentError",
    "AgentEvent",
    "AgentResult",
    "ErrorEvent",
    "FinalEvent",
    "Memory",
    "TokenEvent",
    "Tool",
    "ToolCallEvent",
    "ToolError",
    "ToolResultEvent",
    "tool",
]
