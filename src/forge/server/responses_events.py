"""The Responses API's output items and its streamed events, in the order OpenAI's clients rebuild them from.

A streamed response is ``response.created`` and ``response.in_progress``; then
per output item ``response.output_item.added``, for a message
``response.content_part.added``, ``response.output_text.delta``...,
``response.output_text.done``, ``response.content_part.done``, for a function
call ``response.function_call_arguments.delta``...,
``response.function_call_arguments.done``; then ``response.output_item.done``;
and last ``response.completed`` (or ``response.incomplete`` when
``max_output_tokens`` cut it, or ``error`` and ``response.failed``), carrying
the whole response. Every event has a ``sequence_number``.
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from forge.server.errors import error_payload
from forge.server.generation import Job
from forge.server.state import Served
from forge.server.streaming import Fanin, Piece
from forge.toolcalls import ToolCallParser

__all__ = ["Finish", "ResponseEvents", "function_call_item", "message_item", "usage_body"]

#: ``finish(text, output, status)``: usage counted, the response stored; the final response object.
Finish = Callable[[str, list[dict[str, Any]], str], Awaitable[dict[str, Any]]]


def message_item(ident: str, text: str | None, status: str) -> dict[str, Any]:
    """An assistant message output item; ``text`` None: its content not begun."""
    content = [] if text is None else [_text_part(text)]
    return {"type": "message", "id": ident, "status": status, "role": "assistant", "content": content}


def function_call_item(ident: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": ident,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def usage_body(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _event(kind: str, seq: int, **fields: Any) -> bytes:
    data = json.dumps({"type": kind, "sequence_number": seq, **fields}, ensure_ascii=False, separators=(",", ":"))
    return f"event: {kind}\ndata: {data}\n\n".encode()


class ResponseEvents:
    """The SSE body of one streamed response.

    ``base`` is the response object as it starts (status ``in_progress``, no output); ``finish`` makes the
    final one once the text is whole.
    """

    def __init__(self, served: Served, job: Job, base: dict[str, Any], finish: Finish) -> None:
        self.served, self.job, self.base, self.finish = served, job, base, finish
        ctx = job.contexts[0]
        self.parser = ToolCallParser(ctx.tool_format) if ctx.tool_format is not None else None
        self.seq = 0
        self.output: list[dict[str, Any]] = []  # items done, and the one open last
        self.open: dict[str, Any] | None = None  # the item being written
        self.texts: list[str] = []  # the whole reply, as the model wrote it
        self.first: float | None = None

    def _emit(self, kind: str, **fields: Any) -> bytes:
        out = _event(kind, self.seq, **fields)
        self.seq += 1
        return out

    async def body(self, fanin: Fanin, first: Piece) -> AsyncIterator[bytes]:
        yield self._emit("response.created", response=self.base)
        yield self._emit("response.in_progress", response=self.base)
        item = first
        while True:
            _, piece, error = item
            if error is not None:
                for chunk in self._failed(error):
                    yield chunk
                return
            if piece is None:
                break
            for chunk in self._piece(piece):
                yield chunk
            item = await fanin.get()
        deltas = list(self.parser.finish()) if self.parser is not None else []
        for chunk in self._deltas(deltas):
            yield chunk
        for chunk in self._close():
            yield chunk
        text = "".join(self.texts)
        finish = self.job.contexts[0].completion
        cut = finish is not None and finish.finish_reason == "length"
        calls = any(i["type"] == "function_call" for i in self.output)
        status = "incomplete" if cut and not calls else "completed"
        final = await self.finish(text, self.output, status)
        yield self._emit(f"response.{status}", response=final)
        self.served.metrics.duration.observe(time.perf_counter() - self.job.start)

    def _piece(self, piece: str) -> list[bytes]:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
            self.served.metrics.ttft.observe(now - self.job.start)
        self.texts.append(piece)
        if self.parser is None:
            return self._deltas([("text", piece)])
        return self._deltas(list(self.parser.feed(piece)))

    def _deltas(self, deltas: list[tuple[Any, ...]]) -> list[bytes]:
        out: list[bytes] = []
        for delta in deltas:
            if delta[0] == "text":
                if not delta[1]:
                    continue
                out += self._open_message()
                item = self.open
                assert item is not None
                item["content"][0]["text"] += delta[1]
                where = {"item_id": item["id"], "output_index": len(self.output) - 1, "content_index": 0}
                out.append(self._emit("response.output_text.delta", **where, delta=delta[1], logprobs=[]))
            elif delta[0] == "call":
                _, _, call_id, name = delta
                out += self._close()
                item = function_call_item(f"fc_{uuid.uuid4().hex}", call_id, name, "", "in_progress")
                out += self._add(item)
            else:
                item = self.open
                assert item is not None and item["type"] == "function_call", "arguments come after their call"
                item["arguments"] += delta[2]
                where = {"item_id": item["id"], "output_index": len(self.output) - 1}
                out.append(self._emit("response.function_call_arguments.delta", **where, delta=delta[2]))
        return out

    def _add(self, item: dict[str, Any]) -> list[bytes]:
        self.open = item
        self.output.append(item)
        return [self._emit("response.output_item.added", output_index=len(self.output) - 1, item=copy.deepcopy(item))]

    def _open_message(self) -> list[bytes]:
        if self.open is not None and self.open["type"] == "message":
            return []
        out = self._close()
        out += self._add(message_item(f"msg_{uuid.uuid4().hex}", None, "in_progress"))
        assert self.open is not None
        self.open["content"].append(_text_part(""))
        where = {"item_id": self.open["id"], "output_index": len(self.output) - 1, "content_index": 0}
        out.append(self._emit("response.content_part.added", **where, part=_text_part("")))
        return out

    def _close(self) -> list[bytes]:
        """The events that finish the open item."""
        item, self.open = self.open, None
        if item is None:
            return []
        index, out = len(self.output) - 1, []
        item["status"] = "completed"
        if item["type"] == "message":
            text = item["content"][0]["text"]
            where = {"item_id": item["id"], "output_index": index, "content_index": 0}
            out.append(self._emit("response.output_text.done", **where, text=text, logprobs=[]))
            out.append(self._emit("response.content_part.done", **where, part=_text_part(text)))
        else:
            where = {"item_id": item["id"], "output_index": index}
            args = item["arguments"]
            out.append(self._emit("response.function_call_arguments.done", **where, name=item["name"], arguments=args))
        out.append(self._emit("response.output_item.done", output_index=index, item=copy.deepcopy(item)))
        return out

    def _failed(self, error: BaseException) -> list[bytes]:
        _, body, _ = error_payload(error, request_id=str(self.job.contexts[0].meta.get("request_id", "-")))
        detail = body["error"]
        assert isinstance(detail, dict)
        code = detail.get("code") or detail.get("type")
        failed = {**self.base, "status": "failed", "error": {"code": code, "message": detail["message"]}}
        return [
            self._emit("error", code=code, message=detail["message"], param=detail.get("param")),
            self._emit("response.failed", response=failed),
        ]
