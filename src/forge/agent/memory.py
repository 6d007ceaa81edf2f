"""Conversation memory with a token budget.

``Memory`` holds a conversation and, when it is asked for the messages to
send, returns the newest ones that fit ``budget`` tokens. What no longer fits
is either dropped (``strategy="window"``) or folded into a running summary
that the model itself writes (``strategy="summary"``), sent first as a
system message.

>>> memory = Memory(budget=1000)
>>> memory.add({"role": "user", "content": "Hi"})
>>> len(memory)
1
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from forge.errors import ConfigError

if TYPE_CHECKING:
    from forge.app import Forge

__all__ = ["Memory", "count_tokens"]

Strategy = Literal["window", "summary"]
#: Tokens a chat template spends around each message (role header, end-of-turn), on top of the content.
MESSAGE_OVERHEAD = 4

SUMMARY_PREFIX = "Summary of the conversation so far: "
SUMMARY_PROMPT = (
    "Summarize the conversation below in a few sentences. Keep every fact, number and name that was found; "
    "leave out greetings."
)


def count_tokens(encode: Callable[[str], list[int]], message: Mapping[str, Any]) -> int:
    """Tokens ``message`` takes in a prompt: its content and tool calls, plus :data:`MESSAGE_OVERHEAD`."""
    text = message.get("content") or ""
    for call in message.get("tool_calls") or []:
        text += json.dumps(call if isinstance(call, Mapping) else {"name": call.name, "arguments": call.arguments})
    return len(encode(text)) + MESSAGE_OVERHEAD


class Memory:
    """A conversation that is sent within ``budget`` tokens.

    ``strategy="window"`` keeps the newest messages that fit; ``"summary"``
    asks the model to summarize what falls out, and sends that summary first.
    The newest message is always sent, whatever its size.
    """

    def __init__(self, budget: int | None = None, *, strategy: Strategy = "window") -> None:
        if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 16):
            raise ConfigError(f"Memory(budget={budget!r}) must be an integer of at least 16 tokens (or None)")
        if strategy not in ("window", "summary"):
            raise ConfigError(f"Memory(strategy={strategy!r}) must be 'window' or 'summary'")
        #: None: the agent sets it to what its model's context leaves free.
        self.budget = budget
        self.strategy: Strategy = strategy
        self.messages: list[dict[str, Any]] = []
        #: The model's summary of the messages that no longer fit (strategy "summary").
        self.summary: str | None = None

    def add(self, *messages: Mapping[str, Any]) -> None:
        for m in messages:
            if not isinstance(m, Mapping) or "role" not in m:
                raise ConfigError(f"Memory.add() takes chat messages ({{'role': ..., 'content': ...}}), got {m!r:.80}")
            self.messages.append(dict(m))

    def clear(self) -> None:
        self.messages, self.summary = [], None

    def __len__(self) -> int:
        return len(self.messages)

    async def context(self, app: Forge, budget: int | None = None) -> list[dict[str, Any]]:
        """The messages to send: the newest that fit the budget, after the summary if there is one."""
        budget = budget or self.budget
        if budget is None:
            raise ConfigError("Memory has no token budget; pass Memory(budget=...)")
        tokenizer = app.tokenizer
        if tokenizer is None:
            raise ConfigError("Memory.context() needs an app with a model")
        encode = tokenizer.encode
        sizes = [count_tokens(encode, m) for m in self.messages]
        summary_size = count_tokens(encode, self._summary_message()) if self.summary else 0
        keep = _without_orphans(self.messages, _newest_fitting(sizes, budget - summary_size))
        if keep < len(self.messages) and self.strategy == "summary":
            # Room for the new summary first: it is at most budget // 4 tokens (its max_tokens), plus its prefix.
            reserve = budget // 4 + count_tokens(encode, {"content": SUMMARY_PREFIX}) + 4
            keep = _without_orphans(self.messages, _newest_fitting(sizes, budget - reserve))
            dropped = self.messages[: len(self.messages) - keep]
            self.summary = await self._summarize(app, dropped, budget)
            self.messages = self.messages[len(self.messages) - keep :]
        head = [self._summary_message()] if self.summary else []
        return head + self.messages[len(self.messages) - keep :]

    def _summary_message(self) -> dict[str, Any]:
        return {"role": "system", "content": f"{SUMMARY_PREFIX}{self.summary}"}

    async def _summarize(self, app: Forge, dropped: Sequence[Mapping[str, Any]], budget: int) -> str:
        lines = [f"Earlier summary: {self.summary}"] if self.summary else []
        for m in dropped:
            text = m.get("content") or ""
            for call in m.get("tool_calls") or []:
                function = call.get("function", {}) if isinstance(call, Mapping) else {}
                text += f" [called {function.get('name')} with {function.get('arguments')}]"
            lines.append(f"{m['role']}: {text}")
        prompt = [{"role": "system", "content": SUMMARY_PROMPT}, {"role": "user", "content": "\n".join(lines)}]
        text = await app.chat(prompt, temperature=0, max_tokens=max(16, budget // 4))
        return str(text).strip()


def _newest_fitting(sizes: Sequence[int], budget: int) -> int:
    """How many of the newest messages fit ``budget`` (always at least the newest one)."""
    total, keep = 0, 0
    for size in reversed(sizes):
        if keep and total + size > budget:
            break
        total, keep = total + size, keep + 1
    return keep


def _without_orphans(messages: Sequence[Mapping[str, Any]], keep: int) -> int:
    """Fewer kept messages, so the kept ones don't start with tool results whose call was dropped."""
    start = len(messages) - keep
    while keep > 1 and messages[start]["role"] == "tool":
        start, keep = start + 1, keep - 1
    return keep
