"""Tool calls: how a model writes them, the grammar that admits them, and a parser that reads them as they stream.

A :class:`ToolFormat` is the layout one chat template teaches its model
(``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, or Llama 3.1's
bare JSON object); :meth:`ToolFormat.grammar` turns OpenAI ``tools`` into a
:class:`forge.structured.Grammar` that admits a call to one of them (or, with
``tool_choice="auto"``, free text instead), and :class:`ToolCallParser` splits
the generated text into content and :class:`ToolCall` s, piece by piece, in
the shapes of OpenAI's streamed ``tool_calls`` deltas.

>>> fmt = ToolFormat()
>>> fmt.parse('<tool_call>{"name": "lookup", "arguments": {"topic": "Paris"}}</tool_call>')[1][0].arguments
{'topic': 'Paris'}
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from forge.errors import ConfigError
from forge.structured import JSON_STYLE, Grammar, check_schema, closed_schema

__all__ = ["Delta", "ToolCall", "ToolCallParser", "ToolChoice", "ToolFormat"]


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call the model made: a tool name and its JSON arguments."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI ``tool_calls`` entry (``arguments`` as a JSON string)."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)},
        }


ToolChoice = Literal["auto", "required", "none"] | str


@dataclass(frozen=True, slots=True)
class ToolFormat:
    """How a model writes a tool call: ``{open}{"name": "...", "{arguments_key}": {...}}{close}``.

    ``native``: the chat template renders the tools itself (its ``tools``
    variable), as Qwen 2.5, Hermes and Llama 3.1 templates do. Otherwise Forge
    describes the tools in the system message (:meth:`system_prompt`).
    """

    open: str = "<tool_call>"
    close: str = "</tool_call>"
    arguments_key: str = "arguments"
    native: bool = False

    @classmethod
    def for_template(cls, template: str | None) -> ToolFormat:
        """The format a chat template teaches its model; Forge's default when it has none."""
        if not template or not re.search(r"\btools\b", template):
            return cls()
        if "<tool_call>" in template:
            opening, closing = "<tool_call>", "</tool_call>"
        else:  # Llama 3.1 style: a bare JSON object
            opening, closing = "", ""
        key = "parameters" if '"parameters"' in template and '"arguments"' not in template else "arguments"
        return cls(opening, closing, key, native=True)

    def call_text(self, call: ToolCall) -> str:
        """The exact text the model writes for ``call`` (the grammar admits exactly this layout)."""
        arguments = json.dumps(call.arguments, ensure_ascii=False)
        return f'{self.open}{{"name": {json.dumps(call.name)}, "{self.arguments_key}": {arguments}}}{self.close}'

    @staticmethod
    def functions(tools: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """The function definitions of OpenAI ``tools`` entries, checked."""
        return [_function(t) for t in tools]

    def system_prompt(self, tools: Sequence[Mapping[str, Any]]) -> str:
        """Forge's tool instructions, for templates that have no tool support of their own.

        The wording is the Hermes function-calling prompt, the most common one in instruction-tuning data.
        """
        lines = [json.dumps(_function(t), ensure_ascii=False) for t in tools]
        return (
            "You are a function calling AI model. You are provided with function signatures within <tools></tools> "
            "XML tags. You may call one or more functions to assist with the user query. Here are the available "
            "tools: <tools>\n" + "\n".join(lines) + "\n</tools>\nFor each function call return a json object with "
            f"function name and arguments within {self.open}{self.close} XML tags:\n"
            f'{self.open}{{"name": <function-name>, "{self.arguments_key}": <args-json-object>}}{self.close}'
        )

    def grammar(
        self, tools: Sequence[Mapping[str, Any]], choice: ToolChoice = "auto", *, parallel: bool = False
    ) -> Grammar:
        """What the model may write: a call to one of ``tools``, or (``auto``) free text instead.

        ``choice`` is "auto", "required", or one tool's name. ``parallel`` allows
        several calls, one per line.
        """
        functions = [_function(t) for t in tools]
        names = [f["name"] for f in functions]
        if choice not in ("auto", "required") and choice not in names:
            raise ConfigError(f"tool_choice names {choice!r}, but the tools are {names}; pass one of them")
        chosen = [f for f in functions if choice in ("auto", "required") or f["name"] == choice]
        rules = []
        for i, f in enumerate(chosen):
            parameters = {**closed_schema(f.get("parameters") or {"type": "object"}), "x-guidance": JSON_STYLE}
            head = json.dumps(f'{{"name": {json.dumps(f["name"])}, "{self.arguments_key}": ')
            rules.append(f'call_{i}: {head} %json {json.dumps(parameters)} "}}"')
        alternatives = " | ".join(f"call_{i}" for i in range(len(chosen)))
        closing = f" {json.dumps(self.close)}" if self.close else ""
        opening = f"{json.dumps(self.open)} " if self.open else ""
        calls = 'call ("\\n" call)*' if parallel else "call"
        lines = [f"call: {opening}({alternatives}){closing}", *rules]
        if choice == "auto":
            start = self.open or '{"name"'
            text = f"TEXT: /(.|\\n)+/ & ~/{_regex_literal(start)}(.|\\n)*/"  # any text that does not open a call
            lines.insert(0, f"start: TEXT | calls\ncalls: {calls}\n{text}")
        else:
            lines.insert(0, f"start: {calls}")
        return Grammar.lark("\n".join(lines), "tool-call format")

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """Split a reply into its text content and its tool calls."""
        parser = ToolCallParser(self)
        for _ in parser.feed(text):
            pass
        for _ in parser.finish():
            pass
        return parser.content, parser.calls


def _function(tool: Mapping[str, Any]) -> dict[str, Any]:
    """The function part of an OpenAI tools entry ({"type": "function", "function": {...}}) or of a bare one."""
    f = tool.get("function", tool) if tool.get("type", "function") == "function" else None
    name = f.get("name") if isinstance(f, Mapping) else None
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
        raise ConfigError(
            f"tool {dict(tool)!r:.120} must be {{'type': 'function', 'function': {{'name': ..., "
            "'parameters': {...}}} with a name of letters, digits, '_', '.' or '-' (at most 64)"
        )
    assert isinstance(f, Mapping)
    if "parameters" in f:
        check_schema(f["parameters"])
    return dict(f)


def _regex_literal(text: str) -> str:
    return re.sub(r"([\\.^$|?*+()\[\]{}/])", r"\\\1", text)


# -- reading calls as they stream ------------------------------------------------------------------------------------
Delta = tuple[Literal["text"], str] | tuple[Literal["call"], int, str, str] | tuple[Literal["arguments"], int, str]


class ToolCallParser:
    """Reads a reply written under :meth:`ToolFormat.grammar` piece by piece.

    :meth:`feed` yields ``("text", piece)`` for plain content, ``("call", index,
    id, name)`` when a call's name is known, and ``("arguments", index, piece)``
    as its arguments stream: the shapes of OpenAI's streamed ``tool_calls`` deltas.

    A call identical to an earlier one (same name and arguments) is dropped, so
    each call runs once: small models repeat their call when parallel calls are
    allowed. So the first call streams as it is written, and each later one comes
    whole (its name, then its arguments in one delta) once it is known to be new.
    """

    def __init__(self, fmt: ToolFormat) -> None:
        self.fmt = fmt
        self.calls: list[ToolCall] = []
        self._text: list[str] = []
        self._mode: Literal["start", "text", "call"] = "start"
        self._buffer = ""  # text not yet parsed
        self._stage: Literal["name", "args", "closing", "between"] = "name"
        self._skip = 0
        self._name: str | None = None
        self._id = ""
        self._args: list[str] = []
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._seen: set[tuple[str, str]] = set()  # the calls so far, as (name, arguments JSON)
        self._held: list[Delta] = []  # a later call's deltas, until it is known not to repeat one

    @property
    def content(self) -> str | None:
        return "".join(self._text) if self._text else None

    def feed(self, piece: str) -> Iterator[Delta]:
        self._buffer += piece
        while self._buffer:
            if self._mode == "text":
                self._text.append(self._buffer)
                yield ("text", self._buffer)
                self._buffer = ""
            elif self._mode == "start":
                start = self.fmt.open or '{"name"'
                if self._buffer.startswith(start):  # as the grammar has it: a call opens the reply
                    self._buffer, self._mode = self._buffer[len(self.fmt.open) :], "call"
                elif start.startswith(self._buffer):
                    return  # could still become a call: wait for more
                else:
                    self._mode = "text"
            else:
                deltas = self._read_call()
                if deltas is None:
                    return
                yield from deltas

    def finish(self) -> Iterator[Delta]:
        """The end of the reply: whatever was held back comes out as text."""
        if self._mode == "start" and self._buffer:
            self._mode = "text"
            yield from self.feed("")
        self._buffer = ""

    def _read_call(self) -> list[Delta] | None:
        """One step of reading a call from the buffer: its deltas; None when it needs more text."""
        if self._stage == "closing":  # the grammar guarantees '}' and the closing tag: skip them
            n = min(self._skip, len(self._buffer))
            self._buffer, self._skip = self._buffer[n:], self._skip - n
            if self._skip:
                return None
            self._stage = "between"
        if self._stage == "between":  # after a call: another one (parallel calls), or the end
            text = self._buffer.lstrip("\n")
            if not text or (self.fmt.open.startswith(text) and self.fmt.open):
                return None
            self._buffer = text[len(self.fmt.open) :] if text.startswith(self.fmt.open) else text
            self._stage = "name"
        if self._stage == "name":
            head, key = '{"name": "', f'", "{self.fmt.arguments_key}": '
            end = self._buffer.find('"', len(head)) if self._buffer.startswith(head) else -1
            if end < 0 or not self._buffer.startswith(key, end):
                return None  # wait for the whole name
            self._name, self._id = self._buffer[len(head) : end], f"call_{uuid.uuid4().hex[:24]}"
            self._buffer = self._buffer[end + len(key) :]
            self._stage, self._depth, self._in_string, self._escaped, self._args = "args", 0, False, False, []
            return self._stream(("call", len(self.calls), self._id, self._name))
        for i, ch in enumerate(self._buffer):  # the arguments: one JSON object, read up to its closing brace
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    piece, self._buffer = self._buffer[: i + 1], self._buffer[i + 1 :]
                    self._args.append(piece)
                    self._stage, self._skip = "closing", 1 + len(self.fmt.close)
                    return self._complete(piece)
        piece, self._buffer = self._buffer, ""
        self._args.append(piece)
        return self._stream(("arguments", len(self.calls), piece))

    def _stream(self, delta: Delta) -> list[Delta]:
        """The first call streams; a later one is held until it is complete (it may repeat an earlier one)."""
        if not self.calls:
            return [delta]
        if delta[0] == "call":
            self._held = [delta]
        return []

    def _complete(self, piece: str) -> list[Delta]:
        """The call just read: kept and its last deltas out, or dropped if it repeats an earlier call."""
        arguments = json.loads("".join(self._args))
        key = (self._name or "", json.dumps(arguments, sort_keys=True))
        held, self._held = self._held, []
        if key in self._seen:
            return []
        self._seen.add(key)
        index = len(self.calls)
        self.calls.append(ToolCall(self._name or "", arguments, self._id))
        if index == 0:
            return [("arguments", 0, piece)]
        return [*held, ("arguments", index, "".join(self._args))]
