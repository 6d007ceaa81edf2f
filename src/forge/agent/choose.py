"""The closed arguments of a call the model wrote, chosen again by how well the task follows the whole call.

A 135M model writes a well-formed call with the right tool and the right
numbers, and then the wrong choice: ``calculator(1234, "subtract", 5678)`` for
"What is 1234 plus 5678?", ``convert(150, "kg to pounds")`` for "How many
kilograms is 150 pounds?". It judges far better backwards (noisy channel, UPR):
each choice of an argument (an enum, a Literal) is put into the call it wrote,
the call is read as an action in words ("Action: convert 150 pounds to kg."),
after the last tool result when there is one ("Known: The river Auden is 212 km
long."), and the choice after which the model finds the task's words likeliest
is kept. The rest of the call (the numbers, the open strings) stays as written.

The next tool after a tool result is judged the same way (:func:`next_tool`):
each tool's likely calls, its number arguments filled with the numbers of the
result and of the task ("Known: Mount Everest is 8849 metres high.\nAction:
calculator 8849 subtract 8000."), where the tools' descriptions alone had
SmolLM2 convert the height.

Bounded: an argument with more than :data:`MAX_CANDIDATES` choices keeps the
model's; each argument takes one batched forward pass of its choices, and at
most :data:`MAX_ARGUMENTS` arguments of a call are chosen again; the next tool
is judged in one pass of at most :data:`MAX_ACTIONS` calls.

>>> rechoose(model, tokenizer, "What is 1234 plus 5678?", schema, {"a": 1234, "operation": "subtract", "b": 5678})
... # doctest: +SKIP
{'a': 1234, 'operation': 'add', 'b': 5678}
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Collection
from typing import Any

from forge.generator import likelihoods
from forge.toolcalls import ToolCall

__all__ = [
    "ACTION_PROMPT",
    "MAX_ARGUMENTS",
    "MAX_CANDIDATES",
    "action",
    "closed_arguments",
    "next_tool",
    "rechoose",
    "rechoose_calls",
]

#: What the model reads before the task when it judges a call: the action in words (the last result first).
ACTION_PROMPT = "{known}Action: {action}.\nThe question this answers:"
KNOWN_PROMPT = "Known: {result}\n"
#: An argument with more choices than this keeps the model's own (one forward pass of at most this many rows).
MAX_CANDIDATES = 16
#: At most this many closed arguments of one call are chosen again (one pass each).
MAX_ARGUMENTS = 4
#: At most this many candidate calls, all tools together, when the next tool is judged (one forward pass).
MAX_ACTIONS = 64
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")  # 48,213 is 48213


def closed_arguments(schema: dict[str, Any]) -> dict[str, list[Any]]:
    """The tool's arguments that have a closed list of 2 to :data:`MAX_CANDIDATES` choices, in schema order,
    at most :data:`MAX_ARGUMENTS` of them."""
    properties = schema.get("function", {}).get("parameters", {}).get("properties", {})
    closed = {
        name: spec["enum"]
        for name, spec in properties.items()
        if isinstance(spec, dict) and isinstance(spec.get("enum"), list) and 2 <= len(spec["enum"]) <= MAX_CANDIDATES
    }
    return dict(list(closed.items())[:MAX_ARGUMENTS])


def action(name: str, arguments: dict[str, Any]) -> str:
    """A call as words: the tool's name, then its argument values in order ("convert 150 pounds to kg")."""
    return " ".join([name, *(_word(v) for v in arguments.values())])


def rechoose(
    model: Any,
    tokenizer: Any,
    task: str,
    schema: dict[str, Any],
    arguments: dict[str, Any],
    known: str | None = None,
) -> dict[str, Any]:
    """``arguments`` with each closed argument (see :func:`closed_arguments`) set to the choice after whose
    call, read as an action after the ``known`` last tool result, the model finds ``task`` likeliest; the
    model's own choice wins a tie. Arguments the call left out stay out."""
    name = schema["function"]["name"]
    context = KNOWN_PROMPT.format(result=known) if known else ""
    chosen = dict(arguments)
    for argument, options in closed_arguments(schema).items():
        if argument not in chosen:
            continue
        own = chosen[argument]
        candidates = [own, *(o for o in options if o != own)]  # the model's first: max() keeps it on a tie
        contexts = [
            ACTION_PROMPT.format(known=context, action=action(name, {**chosen, argument: c})) for c in candidates
        ]
        scores = likelihoods(model, tokenizer, contexts, " " + task)
        chosen[argument] = candidates[max(range(len(candidates)), key=scores.__getitem__)]
    return chosen


def rechoose_calls(
    app: Any, task: str, schemas: list[dict[str, Any]], calls: list[ToolCall], known: str | None = None
) -> list[ToolCall]:
    """Each of ``calls`` with its closed arguments chosen again (see :func:`rechoose`; ``schemas``: the tools'
    OpenAI entries, ``known``: the last tool result); calls made identical by it are merged."""
    by_name = {s["function"]["name"]: s for s in schemas}
    chosen: dict[tuple[str, str], ToolCall] = {}
    for call in calls:
        schema = by_name.get(call.name)
        if schema is not None and closed_arguments(schema):
            arguments = rechoose(app.model, app.tokenizer, task, schema, call.arguments, known)
            call = ToolCall(call.name, arguments, call.id)
        chosen.setdefault((call.name, json.dumps(call.arguments, sort_keys=True)), call)
    return list(chosen.values())


def next_tool(
    model: Any, tokenizer: Any, task: str, tools: list[dict[str, Any]], last: str, made: Collection[Any] = ()
) -> dict[str, Any]:
    """The tool to call after a tool returned ``last``: each tool's likely calls (see :func:`_actions`: its
    open number arguments filled with the numbers of ``last`` then of ``task``, each combination of its
    closed choices) read as actions after "Known: <last>"; the tool of the call after which the task is
    likeliest wins, its closed arguments held to that call's choices. A call of closed arguments only that
    was ``made`` before is not offered. Judged by the tool's description instead, SmolLM2 converted
    "8849 metres" "feet to metres" for "How many metres higher than 8000 metres is Mount Everest?"."""
    numbers = list(dict.fromkeys(_NUMBER.findall(THOUSANDS.sub("", f"{last} {task}"))))
    share = max(1, MAX_ACTIONS // max(1, len(tools)))
    rows = [(schema, a) for schema in tools for a in _actions(schema, numbers, made)[:share]]
    rows = rows or [(schema, a) for schema in tools for a in _actions(schema, numbers)[:share]]
    context = KNOWN_PROMPT.format(result=last)
    contexts = [ACTION_PROMPT.format(known=context, action=action(s["function"]["name"], a)) for s, a in rows]
    schema, chosen = rows[max(range(len(rows)), key=likelihoods(model, tokenizer, contexts, " " + task).__getitem__)]
    function = schema["function"]
    properties = dict(function.get("parameters", {}).get("properties", {}))
    for name in closed_arguments(schema):
        properties[name] = {**properties[name], "enum": [chosen[name]]}
    return {
        **schema,
        "function": {**function, "parameters": {**function.get("parameters", {}), "properties": properties}},
    }


def _actions(schema: dict[str, Any], numbers: list[str], made: Collection[Any] = ()) -> list[dict[str, Any]]:
    """A tool's likely calls: its open number arguments take ``numbers`` in turn (the last one repeats), its
    other open arguments their names, and its closed ones each combination of their choices (the first
    :data:`MAX_CANDIDATES`); a call of closed arguments only that is in ``made`` is left out."""
    function = schema["function"]
    properties = function.get("parameters", {}).get("properties", {})
    closed = closed_arguments(schema)
    fixed: dict[str, Any] = {}
    used = 0
    for name, spec in properties.items():
        if name in closed:
            continue
        enum = spec.get("enum") if isinstance(spec, dict) else None
        if isinstance(enum, list) and enum:
            fixed[name] = enum[0]
        elif isinstance(spec, dict) and spec.get("type") in ("number", "integer") and numbers:
            fixed[name], used = numbers[min(used, len(numbers) - 1)], used + 1
        else:
            fixed[name] = name
    combos = itertools.islice(itertools.product(*closed.values()), MAX_CANDIDATES)
    calls = [{n: {**fixed, **dict(zip(closed, c, strict=True))}[n] for n in properties} for c in combos]
    if len(closed) == len(properties):
        calls = [c for c in calls if (function["name"], json.dumps(c, sort_keys=True)) not in made]
    return calls


def _word(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    if isinstance(value, bool | int | float) or value is None:
        return json.dumps(value)
    return json.dumps(value, ensure_ascii=False, default=str)
