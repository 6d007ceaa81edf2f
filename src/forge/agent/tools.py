"""Typed tools: plain Python functions, described to the model by their docstring and type hints.

``@tool`` turns a function (sync or async) into a :class:`Tool`: its name, the
first paragraph of its docstring as the description, and a JSON schema of its
parameters built by pydantic from the type hints (pydantic models, enums,
``Literal``, ``list``, bounded numbers through ``Annotated[int, Field(ge=0)]``,
defaults as optional fields; "Args:" lines of the docstring describe each
parameter). Calling a tool validates the model's arguments against the same
schema first, runs a sync function in a worker thread, and enforces a timeout.
"""

from __future__ import annotations

import asyncio
import inspect
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from forge.errors import ConfigError, ToolError

__all__ = ["Tool", "tool"]


@dataclass(frozen=True)
class Tool:
    """A function the model may call. Build one with :func:`tool`."""

    name: str
    description: str
    fn: Callable[..., Any]
    arguments: type[BaseModel] = field(repr=False)
    timeout: float | None = 30.0

    @property
    def parameters(self) -> dict[str, Any]:
        """The JSON schema of the arguments (an object), as OpenAI's ``tools`` expect it.

        pydantic's generated "title" keys are left out: they repeat the names and cost prompt tokens.
        """
        return _untitled(self.arguments.model_json_schema())

    def schema(self) -> dict[str, Any]:
        """The OpenAI ``tools`` entry: ``{"type": "function", "function": {name, description, parameters}}``."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    def validate(self, arguments: Mapping[str, Any] | str) -> BaseModel:
        """The arguments checked against the schema (a JSON string or a mapping), or a ToolError saying why."""
        try:
            if isinstance(arguments, str):
                return self.arguments.model_validate_json(arguments or "{}")
            return self.arguments.model_validate(dict(arguments))
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'arguments'}: {err['msg']}" for err in e.errors())
            raise ToolError(f"bad arguments for tool {self.name!r}: {problems}") from None

    async def call(self, arguments: Mapping[str, Any] | str) -> Any:
        """Validate, then run the tool (a sync one in a worker thread), within its timeout."""
        values = self.validate(arguments)
        kwargs = {name: getattr(values, name) for name in type(values).model_fields}
        if inspect.iscoroutinefunction(self.fn):
            run: Awaitable[Any] = self.fn(**kwargs)
        else:
            run = asyncio.to_thread(self.fn, **kwargs)
        try:
            return await asyncio.wait_for(run, self.timeout)
        except TimeoutError:
            raise ToolError(f"tool {self.name!r} did not finish within {self.timeout} s") from None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The function itself, unchanged: a decorated tool stays callable from Python."""
        return self.fn(*args, **kwargs)


def tool(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    timeout: float | None = 30.0,
) -> Any:
    """Make ``fn`` a :class:`Tool`; use bare (``@tool``) or with options (``@tool(timeout=5)``).

    >>> @tool
    ... def add(a: int, b: int = 1) -> int:
    ...     '''Add two integers.'''
    ...     return a + b
    >>> add.schema()["function"]["parameters"]["required"]
    ['a']
    """

    def build(f: Callable[..., Any]) -> Tool:
        return _build(f, name=name, description=description, timeout=timeout)

    return build(fn) if fn is not None else build


def _build(fn: Callable[..., Any], *, name: str | None, description: str | None, timeout: float | None) -> Tool:
    if not callable(fn):
        raise ConfigError(f"@tool needs a function, got {fn!r}")
    tool_name = name or fn.__name__
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", tool_name):
        raise ConfigError(f"tool name {tool_name!r} must be 1-64 letters, digits, '_' or '-' (OpenAI's rule)")
    if timeout is not None and timeout <= 0:
        raise ConfigError(f"tool {tool_name!r}: timeout must be > 0 seconds or None, got {timeout}")
    doc = inspect.getdoc(fn) or ""
    summary, arg_docs = _parse_docstring(doc)
    hints = get_type_hints(fn, include_extras=True)
    fields: dict[str, Any] = {}
    for param in inspect.signature(fn).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ConfigError(f"tool {tool_name!r}: *{param.name} can't be described to a model; name each argument")
        if param.name not in hints:
            raise ConfigError(
                f"tool {tool_name!r}: argument {param.name!r} has no type hint; add one (e.g. {param.name}: str)"
            )
        default = ... if param.default is param.empty else param.default
        fields[param.name] = (hints[param.name], Field(default, description=arg_docs.get(param.name)))
    model = create_model(  # type: ignore[call-overload]
        f"{tool_name}_arguments", __config__=ConfigDict(extra="forbid"), **fields
    )
    return Tool(
        name=tool_name, description=description or summary or tool_name, fn=fn, arguments=model, timeout=timeout
    )


def _untitled(schema: Any) -> Any:
    """``schema`` without pydantic's "title" annotations (a property named "title" stays)."""
    if isinstance(schema, list):
        return [_untitled(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "title" and isinstance(value, str):
            continue
        if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
            out[key] = {name: _untitled(sub) for name, sub in value.items()}
        else:
            out[key] = _untitled(value)
    return out


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """(first paragraph, {argument: description}) from a Google-style docstring."""
    summary = " ".join(doc.split("\n\n", 1)[0].split())
    args: dict[str, str] = {}
    section = re.search(r"^(?:Args|Arguments|Parameters):\s*\n(.*?)(?:\n\s*\n|\Z)", doc, re.S | re.M)
    if section:
        current = None
        for line in section.group(1).splitlines():
            match = re.match(r"\s*(\w+)(?:\s*\([^)]*\))?\s*:\s*(.*)", line)
            if match:
                current = match.group(1)
                args[current] = match.group(2).strip()
            elif current and line.strip():
                args[current] += " " + line.strip()
    return summary, args
