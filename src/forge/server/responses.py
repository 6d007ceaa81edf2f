"""OpenAI's response bodies: completions, chat completions, their stream chunks, logprobs, usage.

Plain dicts in exactly the shapes the official clients parse.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from forge.generator import TokenLogprob

__all__ = [
    "Kind",
    "Usage",
    "chat_logprobs",
    "chunk",
    "completion_logprobs",
    "delta_choice",
    "final_choice",
    "new_id",
    "piece_choice",
    "response",
    "role_choice",
]

Kind = Literal["chat", "completion"]


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def to_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


def new_id(kind: Kind) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def _object(kind: Kind, stream: bool) -> str:
    if kind == "chat":
        return "chat.completion.chunk" if stream else "chat.completion"
    return "text_completion"


def response(
    kind: Kind, id: str, model: str, choices: list[dict[str, Any]], usage: Usage, created: int | None = None
) -> dict[str, Any]:
    """A whole (non-streaming) response."""
    return {
        "id": id,
        "object": _object(kind, False),
        "created": created or int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage.to_dict(),
        "system_fingerprint": None,
    }


def chunk(
    kind: Kind,
    id: str,
    model: str,
    created: int,
    choices: list[dict[str, Any]],
    *,
    with_usage: bool = False,
    usage: Usage | None = None,
) -> dict[str, Any]:
    """One stream chunk; with ``stream_options.include_usage`` every chunk has ``usage`` (null but the last)."""
    body: dict[str, Any] = {
        "id": id,
        "object": _object(kind, True),
        "created": created,
        "model": model,
        "choices": choices,
        "system_fingerprint": None,
    }
    if with_usage:
        body["usage"] = usage.to_dict() if usage is not None else None
    return body


def whole_choice(
    kind: Kind,
    index: int,
    text: str | None,
    finish_reason: str,
    logprobs: dict[str, Any] | None,
    tool_calls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    if kind == "chat":
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        if tool_calls:
            message["tool_calls"] = tool_calls
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def role_choice(index: int) -> dict[str, Any]:
    """Chat streams open each choice with the assistant's role."""
    return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}


def piece_choice(kind: Kind, index: int, text: str, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """A chunk of a choice's text, with the logprobs of the tokens that came since the last chunk."""
    if kind == "chat":
        return {"index": index, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": None}
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": None}


def delta_choice(index: int, delta: dict[str, Any]) -> dict[str, Any]:
    """A chat chunk with any ``delta``: content, or a tool call's id and name, or its next arguments."""
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}


def final_choice(kind: Kind, index: int, finish_reason: str, logprobs: dict[str, Any] | None) -> dict[str, Any]:
    """A choice's last chunk: its finish reason, and the logprobs no earlier chunk carried."""
    if kind == "chat":
        return {"index": index, "delta": {}, "logprobs": logprobs, "finish_reason": finish_reason}
    return {"index": index, "text": "", "logprobs": logprobs, "finish_reason": finish_reason}


def _finite(logprob: float) -> float:
    """JSON has no -inf: an impossible token gets -9999, as OpenAI reports it."""
    return logprob if math.isfinite(logprob) else -9999.0


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))


def chat_logprobs(logprobs: Sequence[TokenLogprob] | None) -> dict[str, Any] | None:
    """``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}], "refusal": None}``."""
    if logprobs is None:
        return None
    content = [
        {
            "token": lp.token,
            "logprob": _finite(lp.logprob),
            "bytes": _bytes(lp.token),
            "top_logprobs": [{"token": t, "logprob": _finite(v), "bytes": _bytes(t)} for t, v in lp.top],
        }
        for lp in logprobs
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(logprobs: Sequence[TokenLogprob] | None, start: int = 0) -> dict[str, Any] | None:
    """The legacy shape: parallel lists of tokens, their logprobs, top alternatives and text offsets.

    ``start``: the text offset of the first token (a stream's later chunks continue the count).
    """
    if logprobs is None:
        return None
    offsets, at = [], start
    for lp in logprobs:
        offsets.append(at)
        at += len(lp.token)
    return {
        "tokens": [lp.token for lp in logprobs],
        "token_logprobs": [_finite(lp.logprob) for lp in logprobs],
        "top_logprobs": [{t: _finite(v) for t, v in lp.top} for lp in logprobs],
        "text_offset": offsets,
    }
