"""The agent loop: the model calls tools until it gives its final answer.

Every step renders the conversation with the tools (in the model's own
tool format when its chat template has one, else Forge's default) and
generates under a grammar that admits only a call to one of the tools. One of
them is the built-in ``final_answer``, which ends the calls. So each step is a
well-formed call with arguments valid for its tool's schema, even from a
135M model. Then the model writes its answer as plain text, streamed as
token events, from the tool results it gathered.

The loop ends well:

- a tool that raises, or runs past its timeout, answers with the error as
  its result, and the model carries on;
- the first step must call one of your tools, not ``final_answer``: a task
  given to an agent with tools is one to use them on (SmolLM2 otherwise
  answers from memory);
- a call is run once: identical calls in one reply are merged, and a call
  repeated from an earlier step is not run again: the next step may not call
  that tool, and a second repeat means the model has nothing new to do, so it
  answers (small models otherwise copy their last call forever);
- the answer quotes the tool: one that leaves out the numbers of the last
  tool result is replaced by that result, quoted;
- after ``max_iterations`` tool calls, or once ``time_budget`` seconds have
  passed, the model is asked for its final answer from what it has gathered
  (plain text, with the tool results in its context), never a canned "stopped" string.

>>> agent = Agent(app, tools=[calculator, lookup])            # doctest: +SKIP
>>> result = await agent.run("How tall is the Eiffel Tower in feet?")
>>> result.answer, [e.type for e in result.trace]
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from forge import compute
from forge.agent.choose import THOUSANDS, next_tool, rechoose_calls
from forge.agent.memory import Memory
from forge.agent.tools import Tool, tool
from forge.app import Forge
from forge.errors import AgentError, ConfigError, ForgeError, ToolError
from forge.generator import likelihoods
from forge.toolcalls import ToolCall, ToolCallParser

__all__ = [
    "Agent",
    "AgentEvent",
    "AgentFailureEvent",
    "AgentResult",
    "AgentTokenEvent",
    "FinalEvent",
    "ToolCallEvent",
    "ToolResultEvent",
]

FINAL = "final_answer"
INSTRUCTIONS = (
    "Solve the user's task step by step. Call one tool at a time and use its result. "
    f"When you have everything you need, call {FINAL}."
)
# The question, then the results, then what to do with them: SmolLM2 answers from the results this way, where
# results in a turn of their own were copied back or ignored (measured by benchmarks/answers_agent.py).
ANSWER = "Question: {task}\nTool results:\n{results}\n\nAnswer the question in one sentence, quoting the tool result."

#: What the model reads before a task when it judges which tool the task needs (see ``_likeliest_tool``).
TOOL_PROMPT = "Tool: {name}. {about}\nA task for this tool:"
#: ... and whether the last tool result answers the task (``final_answer``).
RESULT_PROMPT = "Known: {result}\nA question this answers:"
#: ... and which of an argument's choices the task needs; more choices than this are left to the model.
CHOICE_PROMPT = "{tool}({name}={value!r})\nA task for this call:"
MAX_CHOICES = 64


@tool(name=FINAL)
def _final_answer() -> str:
    """Call this once the tool results hold everything needed to answer the user's task."""
    return ""


# -- events -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class AgentTokenEvent:
    """A piece of text the model wrote in step ``step``."""

    text: str
    step: int
    type: Literal["token"] = "token"


@dataclass(frozen=True, slots=True)
class ToolCallEvent:
    """The model called ``name`` with ``arguments``."""

    id: str
    name: str
    arguments: dict[str, Any]
    step: int
    type: Literal["tool_call"] = "tool_call"


@dataclass(frozen=True, slots=True)
class ToolResultEvent:
    """What a tool returned (``error``: it raised or timed out, and ``content`` says how)."""

    id: str
    name: str
    content: str
    error: bool
    elapsed: float
    step: int
    type: Literal["tool_result"] = "tool_result"


@dataclass(frozen=True, slots=True)
class FinalEvent:
    """The answer. ``reason``: the model answered, or a limit made it answer."""

    answer: str
    reason: Literal["answer", "max_iterations", "time_budget"]
    steps: int
    type: Literal["final"] = "final"


@dataclass(frozen=True, slots=True)
class AgentFailureEvent:
    """The loop failed: generation raised (a tool's failure is a ToolResultEvent instead)."""

    error: Exception
    step: int
    type: Literal["error"] = "error"


AgentEvent = AgentTokenEvent | ToolCallEvent | ToolResultEvent | FinalEvent | AgentFailureEvent


@dataclass
class AgentResult:
    """The final answer, every event of the run, and the conversation as the model saw it."""

    answer: str
    reason: Literal["answer", "max_iterations", "time_budget"]
    steps: int
    trace: list[AgentEvent] = field(repr=False)
    messages: list[dict[str, Any]] = field(repr=False)

    @property
    def tool_calls(self) -> list[ToolCallEvent]:
        return [e for e in self.trace if isinstance(e, ToolCallEvent)]


@dataclass
class _Run:
    """One run's state, shared by the steps of the loop."""

    task: str
    memory: Memory
    first: int  # where this run's messages start in memory
    system: dict[str, Any]
    schemas: list[dict[str, Any]]
    budget: int  # prompt tokens for the conversation
    seen: list[dict[str, Any]]  # the messages the model was last given (AgentResult.messages)
    started: float  # the agent's clock when the run began
    # (tool, arguments) -> the call and what it returned, in call order
    results: dict[tuple[str, str], tuple[ToolCall, ToolResultEvent]] = field(default_factory=dict)
    blocked: set[str] = field(default_factory=set)  # after a repeated call, the tools the next step may not call
    reason: Literal["answer", "max_iterations", "time_budget"] = "max_iterations"
    step: int = 0
    over: bool = False  # the calls are done: the model answers next
    failed: bool = False  # generation raised: the run ends with an AgentFailureEvent


# -- the agent --------------------------------------------------------------------------------------------------------
class Agent:
    """A model that calls Python tools to do a task; see the module docstring.

    ``tools``: functions made with :func:`forge.agent.tool` (plain functions
    are wrapped). ``system``: your instructions, before Forge's. ``memory``:
    the conversation across runs (a token-budgeted :class:`Memory`; by default
    a fresh window per run, sized to the model's context). ``clock``: what
    ``time_budget`` is measured with, in seconds (a test passes its own).
    Other keyword options (``temperature``, ``seed``, ``max_tokens``...) go
    to every generation; by default the agent decodes greedily.
    """

    def __init__(
        self,
        app: Forge,
        tools: Sequence[Tool | Any] = (),
        *,
        system: str | None = None,
        max_iterations: int = 6,
        time_budget: float | None = 120.0,
        memory: Memory | None = None,
        clock: Callable[[], float] = time.monotonic,
        **generation: Any,
    ) -> None:
        if not isinstance(app, Forge):
            raise ConfigError(f"Agent(app, ...) needs a forge.Forge app, got {type(app).__name__}")
        if not isinstance(max_iterations, int) or isinstance(max_iterations, bool) or max_iterations < 1:
            raise ConfigError(f"Agent(max_iterations={max_iterations!r}) must be a positive integer")
        if time_budget is not None and not time_budget > 0:
            raise ConfigError(f"Agent(time_budget={time_budget!r}) must be > 0 seconds or None")
        if reserved := {"tools", "tool_choice", "grammar", "schema", "stop"} & set(generation):
            raise ConfigError(f"Agent(...) sets {sorted(reserved)} itself; leave them out")
        self.app = app
        self.tools: dict[str, Tool] = {}
        for t in [*tools, _final_answer]:
            t = t if isinstance(t, Tool) else tool(t)
            if t.name in self.tools:
                raise ConfigError(f"two tools are named {t.name!r}; give one another name with @tool(name=...)")
            self.tools[t.name] = t
        self.system = system
        self.max_iterations, self.time_budget = max_iterations, time_budget
        self.memory, self.clock = memory, clock
        self.generation = {"temperature": 0.0, "max_tokens": 512, **generation}

    # -- public API ----------------------------------------------------------------------------------------------
    async def run(self, task: str) -> AgentResult:
        """Do ``task``; the final answer and the trace. Raises AgentError if the model fails."""
        trace: list[AgentEvent] = []
        messages: list[dict[str, Any]] = []
        async for event in self._events(task, messages):
            trace.append(event)
            if isinstance(event, AgentFailureEvent):
                raise AgentError(f"the agent failed at step {event.step}: {event.error}") from event.error
            if isinstance(event, FinalEvent):
                return AgentResult(event.answer, event.reason, event.steps, trace, messages)
        raise AgentError("the agent stopped without an answer; this is a bug in Forge")  # pragma: no cover

    async def stream(self, task: str) -> AsyncIterator[AgentEvent]:
        """The run as typed events: token, tool_call, tool_result, and last final (or error)."""
        async for event in self._events(task, []):
            yield event

    @property
    def sync(self) -> SyncAgent:
        """Blocking twins: ``agent.sync.run(task)``, ``for event in agent.sync.stream(task)``."""
        return SyncAgent(self)

    # -- the loop ------------------------------------------------------------------------------------------------------
    async def _events(self, task: str, seen: list[dict[str, Any]]) -> AsyncIterator[AgentEvent]:
        run = self._start(task, seen)
        while run.step < self.max_iterations and not run.over:
            if self._time_left(run) == 0:
                run.reason = "time_budget"
                break
            run.step += 1
            async for event in self._step(run):
                yield event
            if run.failed:
                return
        async for event in self._answer(run):
            yield event

    def _start(self, task: str, seen: list[dict[str, Any]]) -> _Run:
        """A run's state, after checking that there is a task and a model to do it."""
        if not isinstance(task, str) or not task.strip():
            raise ConfigError(f"agent.run(task) needs a non-empty string, got {task!r:.80}")
        model, tokenizer = self.app.model, self.app.tokenizer
        if model is None or tokenizer is None:
            raise ConfigError("the agent's app has no model yet; train it or use Forge.load(...) first")
        memory = self.memory if self.memory is not None else Memory()
        first = len(memory)
        memory.add({"role": "user", "content": task})
        system = {"role": "system", "content": f"{self.system}\n\n{INSTRUCTIONS}" if self.system else INSTRUCTIONS}
        schemas = [t.schema() for t in self.tools.values()]
        tool_prompt = len(tokenizer.encode(self.app.render([system], tools=schemas, add_generation_prompt=True)))
        budget = memory.budget or model.config.context_length - self.generation["max_tokens"] - tool_prompt - 16
        return _Run(task, memory, first, system, schemas, budget, seen, self.clock())

    def _time_left(self, run: _Run) -> float | None:
        """Seconds left of the time budget (0 once it is spent); None without a budget."""
        if self.time_budget is None:
            return None
        return max(0.0, self.time_budget - (self.clock() - run.started))

    async def _step(self, run: _Run) -> AsyncIterator[AgentEvent]:
        """One step: the model calls a tool (or is judged done), and the new calls run."""
        messages = [run.system, *await run.memory.context(self.app, run.budget)]
        run.seen[:] = messages
        allowed = await self._allowed(run)
        if not allowed:  # the model's judgement: the results so far answer the task
            yield ToolCallEvent(f"call_{run.step}", FINAL, {}, run.step)
            run.reason, run.over = "answer", True
            return
        calls: list[ToolCall] = []
        try:
            async for item in self._calls(messages, run.schemas, allowed, run.step):
                if isinstance(item, AgentTokenEvent):
                    yield item
                else:  # the calls, their closed arguments chosen again from the task (see forge.agent.choose)
                    last = [r.content for _, r in run.results.values() if not r.error][-1:]
                    calls = await compute.run(rechoose_calls, self.app, run.task, run.schemas, item, *last)
        except Exception as e:
            yield AgentFailureEvent(e, run.step)
            run.failed = True
            return
        async for event in self._run_calls(run, calls):
            yield event

    async def _allowed(self, run: _Run) -> list[dict[str, Any]]:
        """The tools this step may call; none when ``final_answer`` is the likeliest (the task is done)."""
        # The first step uses a tool: a task given to an agent with tools is one to use them on.
        allowed = [t for t in run.schemas if run.step > 1 or len(run.schemas) == 1 or t["function"]["name"] != FINAL]
        allowed = [t for t in allowed if t["function"]["name"] not in run.blocked]
        if len(allowed) > 1:  # which tool, or whether it is done: the model's judgement, not its first token
            last = next(reversed(run.results.values()))[1].content if run.results else None
            made = run.results.keys()
            known = [r.content for _, r in run.results.values() if not r.error]
            allowed = [await compute.run(_likeliest_tool, self.app, run.task, allowed, last, made, known)]
            if allowed[0]["function"]["name"] == FINAL:
                return []
        return allowed

    async def _run_calls(self, run: _Run, calls: list[ToolCall]) -> AsyncIterator[AgentEvent]:
        """Run the step's new calls; a call made before is not run again (see the module docstring)."""
        if done := next((c for c in calls if c.name == FINAL), None):
            yield ToolCallEvent(done.id, done.name, done.arguments, run.step)
            run.reason, run.over = "answer", True
            return
        fresh = [c for c in calls if _key(c) not in run.results]
        if not fresh:
            if run.blocked:  # again: it has nothing new to do, so it answers
                run.reason, run.over = "answer", True
            else:  # a call made before: once, it may want another tool (two-step tasks)
                run.blocked, run.reason = {c.name for c in calls}, "answer"  # if no step is left, it was done
            return
        run.blocked, run.reason = set(), "max_iterations"
        for call in fresh:
            yield ToolCallEvent(call.id, call.name, call.arguments, run.step)
            result = await self._call(call, run.step, self._time_left(run))
            run.results[_key(call)] = (call, result)
            yield result
        run.memory.add(
            {"role": "assistant", "content": None, "tool_calls": [c.to_openai() for c in fresh]},
            *[
                {"role": "tool", "tool_call_id": c.id, "name": c.name, "content": run.results[_key(c)][1].content}
                for c in fresh
            ],
        )

    async def _answer(self, run: _Run) -> AsyncIterator[AgentEvent]:
        """The answer, in the model's own words, from everything gathered (also when a limit stopped the calls):
        the task and the results in one message, after the conversation before it, which small models follow best."""
        history = await run.memory.context(self.app, run.budget)
        earlier = history[: max(0, len(history) - (len(run.memory) - run.first))]
        # Newest first: the last result is usually the one that completes the task, and small models favour
        # what they read first (on the two-step test task, 5 of 5 answers used it, against 2 of 5 oldest first).
        found = "\n".join(
            f"- {c.name}({_arguments(c.arguments)}) returned: {r.content}" for c, r in reversed(run.results.values())
        )
        ask = ANSWER.format(task=run.task, results=found or "- none")
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages += [*earlier, {"role": "user", "content": ask}]
        run.seen[:] = messages
        step, pieces = run.step + 1, []
        try:
            async for piece in self.app.chat_stream(messages, **self.generation):
                pieces.append(piece)
                yield AgentTokenEvent(piece, step)
        except Exception as e:
            yield AgentFailureEvent(e, step)
            return
        answer = "".join(pieces).strip()
        if quote := _quote(answer, [r for _, r in run.results.values() if not r.error]):
            answer = f"{answer} {quote}" if answer else quote.strip("()")
            yield AgentTokenEvent(f" {quote}", step)
        run.memory.add({"role": "assistant", "content": answer})
        run.seen.append({"role": "assistant", "content": answer})
        yield FinalEvent(answer, run.reason, step)

    async def _calls(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], allowed: list[dict[str, Any]], step: int
    ) -> AsyncIterator[AgentTokenEvent | list[ToolCall]]:
        """One step's reply as token events, then its calls (identical ones merged: each runs once)."""
        parser = ToolCallParser(self.app.tool_format())
        stream = self.app.chat_stream(
            messages, tools=tools, tool_choice="required", allowed_tools=allowed, **self.generation
        )
        async for piece in stream:
            yield AgentTokenEvent(piece, step)
            list(parser.feed(piece))
        list(parser.finish())
        if not parser.calls:
            raise ForgeError(
                "the model's reply ended before its tool call was complete; raise max_tokens "
                f"(now {self.generation['max_tokens']})"
            )
        yield list({_key(c): c for c in reversed(parser.calls)}.values())[::-1]

    async def _call(self, call: ToolCall, step: int, remaining: float | None) -> ToolResultEvent:
        """Run one tool; its failure is its result, so the model can read it and recover."""
        began = time.perf_counter()
        tool_ = self.tools[call.name]  # the grammar admits only these names
        try:
            if remaining == 0:
                raise ToolError(f"tool {call.name!r} was not run: the agent's time budget is spent")
            value = await asyncio.wait_for(tool_.call(call.arguments), remaining)
            content, error = _as_text(value), False
        except TimeoutError:
            content, error = f"error: tool {call.name!r} was stopped: the agent's time budget ran out", True
        except Exception as e:  # the tool's own failure goes back to the model
            content, error = f"error: {e}" if isinstance(e, ToolError) else f"error: {type(e).__name__}: {e}", True
        return ToolResultEvent(call.id, call.name, content, error, time.perf_counter() - began, step)


def _key(call: ToolCall) -> tuple[str, str]:
    """What makes two calls the same: the tool and its arguments."""
    return call.name, json.dumps(call.arguments, sort_keys=True)


def _quote(answer: str, results: list[ToolResultEvent]) -> str | None:
    """The last tool result with a number, quoted, if the answer leaves out its last number (the number the
    task asks for: a lookup's figure, a calculation's result; in a two-step task the second call's, made from
    the first one's result, which SmolLM2's answer repeated instead); None when it has it or there is none."""
    said = set(_NUMBER.findall(THOUSANDS.sub("", answer)))
    last = next((r for r in reversed(results) if _NUMBER.search(r.content)), None)
    if last is None or _NUMBER.findall(THOUSANDS.sub("", last.content))[-1] in said:
        return None
    return f'({last.name} returned "{last.content}")'


_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def _likeliest_tool(
    app: Forge,
    task: str,
    tools: list[dict[str, Any]],
    last: str | None = None,
    made: Collection[Any] = (),
    known: Sequence[str] = (),
) -> dict[str, Any]:
    """The tool whose description ``task`` follows best, by the chat model's likelihood of the task's words,
    with its choices narrowed (see ``_likeliest_choices``); ``final_answer`` is judged by how well the task
    follows the ``last`` tool result (is it the answer?). A tool whose narrowed call repeats one of the calls
    ``made`` is not offered: the task names it, so it would win again and again. Neither is a tool whose
    arguments are all closed choices none of which the task mentions (a lookup of "Eiffel Tower" does not
    help with "What is 1234 plus 5678?"), unless nothing else is left. While the task is plainly not done
    (see ``_unfinished``; ``known``: the results so far), ``final_answer`` is not offered. A tool that wins
    after a ``last`` result is judged again with that result (see ``forge.agent.choose.next_tool``)."""
    model, tokenizer = app.model, app.tokenizer
    assert model is not None and tokenizer is not None, "checked before the loop"
    relevant = [t for t in tools if t["function"]["name"] == FINAL or _may_help(task, t)]
    if any(t["function"]["name"] != FINAL for t in relevant):
        tools = relevant
    narrowed = [t if t["function"]["name"] == FINAL else _likeliest_choices(model, tokenizer, task, t) for t in tools]
    offered = [t for t in narrowed if _determined(t) not in made] or narrowed
    if _unfinished(task, tools, made, known) and any(t["function"]["name"] != FINAL for t in offered):
        offered = [t for t in offered if t["function"]["name"] != FINAL]
    described = [
        RESULT_PROMPT.format(result=last or "nothing yet")
        if t["function"]["name"] == FINAL
        else TOOL_PROMPT.format(name=t["function"]["name"], about=_about(t["function"]))
        for t in offered
    ]
    scores = likelihoods(model, tokenizer, described, " " + task)
    chosen = offered[max(range(len(offered)), key=scores.__getitem__)]
    if last is None or chosen["function"]["name"] == FINAL:
        return chosen
    return next_tool(model, tokenizer, task, [t for t in tools if t["function"]["name"] != FINAL], last, made)


def _unfinished(task: str, tools: list[dict[str, Any]], made: Collection[Any], known: Sequence[str] = ()) -> bool:
    """Whether ``task`` plainly needs another call after those ``made``: it names a tool not used yet
    ("... then use the calculator"), or an unused tool's choice that no result ``known`` holds ("... in feet"
    after "330 metres"; not "metres higher" after "8849 metres"), or a number no call has used."""
    if not made:
        return False
    used = {name for name, _ in made}
    said = " ".join(known)
    for t in tools:
        name = t["function"]["name"]
        if name != FINAL and name not in used and (_names(task, name) or _mentions(task, t, said)):
            return True
    used_numbers = {n for _, arguments in made for n in _numbers(arguments)}
    return bool(_numbers(task) - used_numbers)


def _numbers(text: str) -> set[float]:
    """The numbers in ``text``, as values: 17 and 17.0 are one number, 48,213 is 48213."""
    return {float(n) for n in _NUMBER.findall(THOUSANDS.sub("", text))}


def _choices(schema: dict[str, Any]) -> dict[str, list[Any] | None]:
    """Each argument of a tool and its closed list of choices (an enum, a Literal), or None."""
    properties = schema["function"].get("parameters", {}).get("properties", {})
    return {
        k: v.get("enum") if isinstance(v, dict) and isinstance(v.get("enum"), list) else None
        for k, v in properties.items()
    }


def _mentions(task: str, schema: dict[str, Any], known: str = "") -> bool:
    """Whether ``task`` shares a word (three letters or more) with one of the tool's choices, other than the
    words of ``known`` (what the tool results already said)."""
    words = {w for w in _words(task) if len(w) >= 3} - _words(known)
    return any(words & _words(str(c)) for options in _choices(schema).values() for c in options or ())


def _may_help(task: str, schema: dict[str, Any]) -> bool:
    """A tool some argument of which is open, or whose choices the task mentions."""
    choices = _choices(schema)
    return not choices or any(c is None for c in choices.values()) or _mentions(task, schema)


def _words(text: str) -> set[str]:
    return set(re.findall(r"[^\W_]+", text.lower()))


def _names(task: str, tool_name: str) -> bool:
    """Whether ``task`` names the tool (``unit_convert`` as "unit convert" too)."""
    pattern = rf"\b{re.escape(tool_name.replace('_', ' '))}\b"
    return re.search(pattern, task.replace("_", " "), re.IGNORECASE) is not None


def _determined(schema: dict[str, Any]) -> tuple[str, str] | None:
    """The call ``schema`` admits when each of its arguments has one choice left (as ``_key`` writes it)."""
    choices = _choices(schema)
    if not choices or any(c is None or len(c) != 1 for c in choices.values()):
        return None
    return schema["function"]["name"], json.dumps({k: c[0] for k, c in choices.items() if c}, sort_keys=True)


def _about(function: dict[str, Any]) -> str:
    """A tool's description and arguments, with their choices: a task names what it needs in those words."""
    arguments = []
    for name, spec in function.get("parameters", {}).get("properties", {}).items():
        options = spec.get("enum") if isinstance(spec, dict) else None
        listed = f" ({', '.join(map(str, options[:MAX_CHOICES]))})" if isinstance(options, list) else ""
        arguments.append(f"{name}{listed}")
    return f"{function.get('description', '')} Arguments: {'; '.join(arguments) or 'none'}."


def _likeliest_choices(
    model: Any, tokenizer: Any, task: str, schema: dict[str, Any], context: str = ""
) -> dict[str, Any]:
    """``schema`` with each argument that has a list of choices (an enum, a Literal) held to the one the task
    follows best (read after ``context``): small models pick "Eiffel Tower" for any landmark, "miles to km"
    for any conversion."""
    function = schema["function"]
    properties = dict(function.get("parameters", {}).get("properties", {}))
    for name, spec in properties.items():
        options = spec.get("enum") if isinstance(spec, dict) else None
        if isinstance(options, list) and len(options) > 1 and len(options) <= MAX_CHOICES:
            contexts = [context + CHOICE_PROMPT.format(tool=function["name"], name=name, value=v) for v in options]
            scores = likelihoods(model, tokenizer, contexts, " " + task)
            properties[name] = {**spec, "enum": [options[max(range(len(options)), key=scores.__getitem__)]]}
    parameters = {**function.get("parameters", {}), "properties": properties}
    return {**schema, "function": {**function, "parameters": parameters}}


def _arguments(arguments: dict[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in arguments.items())


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(value)


class SyncAgent:
    """The blocking facade of an :class:`Agent`, on its app's event-loop thread."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    def run(self, task: str) -> AgentResult:
        """:meth:`Agent.run`, blocking."""
        return self._agent.app.sync.run_coroutine(self._agent.run(task))

    def stream(self, task: str) -> Iterator[AgentEvent]:
        """:meth:`Agent.stream`, as a plain iterator."""
        return self._agent.app.sync.iterate(self._agent.stream(task))
