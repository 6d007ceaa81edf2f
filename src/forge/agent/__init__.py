"""Agents: typed tools (and, next, the loop, constrained tool calls and memory).

>>> from forge.agent import tool
>>> @tool
... def lookup(city: str) -> str:
...     '''The population of a city.'''
...     return "2.1 million"
>>> lookup.name, lookup.description
('lookup', 'The population of a city.')
"""

from forge.agent.tools import Tool, ToolError, tool

__all__ = ["Tool", "ToolError", "tool"]
