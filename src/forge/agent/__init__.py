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
    AgentEvent,
    AgentFailureEvent,
    AgentResult,
    AgentTokenEvent,
    FinalEvent,
    ToolCallEvent,
    ToolResultEvent,
)
from forge.agent.memory import Memory
from forge.agent.tools import Tool, tool
from forge.errors import AgentError, ToolError

__all__ = [
    "Agent",
    "AgentError",
    "AgentEvent",
    "AgentFailureEvent",
    "AgentResult",
    "AgentTokenEvent",
    "FinalEvent",
    "Memory",
    "Tool",
    "ToolCallEvent",
    "ToolError",
    "ToolResultEvent",
    "tool",
]
