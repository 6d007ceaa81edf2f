"""Running a job: the app handles every choice at once; the answers become OpenAI JSON or server-sent events.

The choices go through the app's middleware stack (``app.handle`` /
``app.handle_stream``) together, so the batching engine decodes them together.
A request the app refuses as too long for the context is a 400 naming the field
at fault (:meth:`Job.refusal`); usage counts come from the model's completions
(or the tokenizer, when a middleware answered).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from forge.errors import ContextLengthError
from forge.middleware import Context
from forge.server import responses as shapes
from forge.server.errors import error_payload
from forge.server.generation import Job, count_tokens
from forge.server.state import Served
from forge.server.streaming import DONE, ClientGone, EventStream, Fanin, Piece, gather_or_cancel, sse, until_disconnect
from forge.toolcalls import ToolCallParser

__all__ = ["run"]


async def run(served: Served, job: Job, request: Request) -> Response:
    """Admit the job, run it, answer: JSON, or server-sent events when it streams."""
    n = len(job.contexts)
    served.admission.acquire(n)
    if job.stream:
        return await _stream(served, job, request)  # releases the slots when the stream ends
    work = gather_or_cancel([_answer(served, job, i) for i in range(n)])
    try:
        texts = await until_disconnect(work, request.receive)
    except ClientGone:
        served.metrics.cancelled.inc(route=job.route)
        raise
    finally:
        served.admission.release(n)
    usage = await _tally(served, job, texts, range(n))
    choices = []
    for i, (ctx, text) in enumerate(zip(job.contexts, texts, strict=True)):
        content, calls = ctx.tool_format.parse(text) if ctx.tool_format is not None else (text, [])
        finish = "tool_calls" if calls else _finish(ctx)
        tool_calls = [c.to_openai() for c in calls] or None
        choices.append(shapes.whole_choice(job.kind, i, content, finish, _logprobs(job, ctx), tool_calls))
    served.metrics.duration.observe(time.perf_counter() - job.start)
    body = shapes.response(job.kind, shapes.new_id(job.kind), served.model_name, choices, usage)
    if job.sources is not None:
        body["sources"] = job.sources
    return JSONResponse(body)


async def _answer(served: Served, job: Job, i: int) -> str:
    """Choice ``i``'s text; a prompt or max_tokens the app refuses is the request's 400."""
    try:
        return await served.app.handle(job.contexts[i])
    except ContextLengthError as e:
        raise job.refusal(e, i) from None


async def _answer_stream(served: Served, job: Job, i: int) -> AsyncIterator[str]:
    """Choice ``i``'s pieces; a prompt or max_tokens the app refuses is the request's 400."""
    try:
        async for piece in served.app.handle_stream(job.contexts[i]):
            yield piece
    except ContextLengthError as e:
        raise job.refusal(e, i) from None


def _finish(ctx: Context) -> str:
    return ctx.completion.finish_reason if ctx.completion is not None else "stop"


def _logprobs(job: Job, ctx: Context, since: tuple[int, int] = (0, 0)) -> dict[str, Any] | None:
    """The choice's logprobs after the first ``since[0]`` (already streamed, covering ``since[1]`` characters)."""
    if not job.logprobs or ctx.completion is None:
        return None  # a middleware answered (a cache hit): there are no model logprobs
    rest = (ctx.completion.logprobs or [])[since[0] :]
    if since[0] and not rest:
        return None
    if job.kind == "chat":
        return shapes.chat_logprobs(rest)
    return shapes.completion_logprobs(rest, start=since[1])


async def _tally(served: Served, job: Job, texts: Sequence[str], done: Sequence[int]) -> shapes.Usage:
    """Usage over the finished choices ``done``; the token counters of /metrics go up by the same."""
    usage = shapes.Usage()
    counted: set[int] = set()
    for i in done:
        ctx, p = job.contexts[i], job.group[i]
        if p not in counted:  # choices of one prompt count it once
            counted.add(p)
            if ctx.completion is not None:
                usage.prompt_tokens += ctx.completion.prompt_tokens
            else:  # a middleware answered: count the prompt as the model would have seen it
                usage.prompt_tokens += len(ctx.ids) if ctx.ids is not None else await count_tokens(served, ctx.prompt)
        if ctx.completion is not None:
            usage.completion_tokens += ctx.completion.completion_tokens
        else:  # and what it answered with
            usage.completion_tokens += await count_tokens(served, texts[i], prompt=False)
    served.metrics.prompt_tokens.inc(usage.prompt_tokens)
    served.metrics.generation_tokens.inc(usage.completion_tokens)
    return usage


async def _stream(served: Served, job: Job, request: Request) -> Response:
    fanin = Fanin([_answer_stream(served, job, i) for i in range(len(job.contexts))])

    async def close() -> None:
        await fanin.aclose()
        served.admission.release(len(job.contexts))

    # Wait for the first piece before sending headers: a refusal (a full queue, a prompt the
    # model rejects) is still an HTTP status, not an error event inside a 200 stream.
    try:
        first = await until_disconnect(fanin.get(), request.receive)
    except ClientGone:
        served.metrics.cancelled.inc(route=job.route)
        await close()
        raise
    except BaseException:
        await close()
        raise
    if first[2] is not None:
        await close()
        raise first[2]
    request_id = request.scope.get("state", {}).get("request_id", "-")
    return EventStream(
        _Events(served, job, request_id).body(fanin, first),
        closed=close,
        on_disconnect=lambda: served.metrics.cancelled.inc(route=job.route),
    )


def _delta(delta: tuple[Any, ...]) -> dict[str, Any]:
    """A :class:`ToolCallParser` delta as the ``delta`` of an OpenAI chat chunk."""
    if delta[0] == "text":
        return {"content": delta[1]}
    if delta[0] == "call":
        _, index, call_id, name = delta
        call = {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
        return {"tool_calls": [call]}
    _, index, piece = delta
    return {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}


class _Events:
    """The SSE body of a streaming job: role chunks (chat), a chunk per piece, a final chunk per choice,
    usage, ``[DONE]``."""

    def __init__(self, served: Served, job: Job, request_id: str) -> None:
        n = len(job.contexts)
        self.served, self.job, self.request_id = served, job, request_id
        self.ident, self.created = shapes.new_id(job.kind), int(time.time())
        self.parsers = [ToolCallParser(ctx.tool_format) if ctx.tool_format else None for ctx in job.contexts]
        self.texts: list[list[str]] = [[] for _ in range(n)]
        self.sent: list[tuple[int, int]] = [(0, 0)] * n  # per choice: logprobs already sent, and their text length
        self.chars = [0] * n  # per choice: characters streamed
        self.last: dict[int, float] = {}  # per choice: when its last piece came

    def event(self, choices: list[dict[str, Any]], usage: shapes.Usage | None = None, **extra: Any) -> bytes:
        job = self.job
        body = shapes.chunk(
            job.kind,
            self.ident,
            self.served.model_name,
            self.created,
            choices,
            with_usage=job.include_usage,
            usage=usage,
        )
        return sse({**body, **extra})

    async def body(self, fanin: Fanin, first: Piece) -> AsyncIterator[bytes]:
        job, n = self.job, len(self.job.contexts)
        if job.kind == "chat":
            yield self.event([shapes.role_choice(0)], **({"sources": job.sources} if job.sources is not None else {}))
            for i in range(1, n):  # the sources travel with the first chunk only
                yield self.event([shapes.role_choice(i)])
        done: list[int] = []
        item = first
        while True:
            i, piece, error = item
            if error is not None:
                _, body, _ = error_payload(error, request_id=self.request_id, fields=job.fields)
                yield sse(body)
                break
            if piece is None:
                for chunk in self._finished(i):
                    yield chunk
                done.append(i)
                if len(done) == n:
                    break
            else:
                for chunk in self._piece(i, piece):
                    yield chunk
            item = await fanin.get()
        usage = await _tally(self.served, job, ["".join(t) for t in self.texts], done)
        if job.include_usage and len(done) == n:
            yield self.event([], usage)
        yield DONE
        self.served.metrics.duration.observe(time.perf_counter() - job.start)

    def _piece(self, i: int, piece: str) -> list[bytes]:
        """The chunks for piece ``piece`` of choice ``i``: its text (with logprobs), or tool-call deltas."""
        now, metrics = time.perf_counter(), self.served.metrics
        if not self.last:
            metrics.ttft.observe(now - self.job.start)
        if i in self.last:
            metrics.itl.observe(now - self.last[i])
        self.last[i] = now
        self.texts[i].append(piece)
        self.chars[i] += len(piece)
        parser = self.parsers[i]
        if parser is not None:  # tool calls stream as OpenAI's tool_calls deltas
            return [self.event([shapes.delta_choice(i, _delta(delta))]) for delta in parser.feed(piece)]
        logprobs = self._new_logprobs(i)
        return [self.event([shapes.piece_choice(self.job.kind, i, piece, logprobs)])]

    def _finished(self, i: int) -> list[bytes]:
        """The chunks that end choice ``i``: the tool-call deltas still held back, then its finish reason."""
        ctx, parser = self.job.contexts[i], self.parsers[i]
        finish = _finish(ctx)
        chunks = []
        if parser is not None:
            chunks = [self.event([shapes.delta_choice(i, _delta(delta))]) for delta in parser.finish()]
            finish = "tool_calls" if parser.calls else finish
        rest = _logprobs(self.job, ctx, since=self.sent[i])
        return [*chunks, self.event([shapes.final_choice(self.job.kind, i, finish, rest)])]

    def _new_logprobs(self, i: int) -> dict[str, Any] | None:
        """Logprobs of choice ``i``'s tokens that the characters streamed so far cover.

        The model may already be a token or two ahead of the text sent; those
        tokens' logprobs wait for the chunk that carries their text (or the last one).
        """
        if not self.job.logprobs:
            return None
        done, offset = self.sent[i]
        new = []
        for lp in self.job.contexts[i].logprobs_so_far()[done:]:
            if offset + len(lp.token) > self.chars[i]:
                break
            new.append(lp)
            offset += len(lp.token)
        if not new:
            return None
        self.sent[i] = (done + len(new), offset)
        if self.job.kind == "chat":
            return shapes.chat_logprobs(new)
        return shapes.completion_logprobs(new, start=offset - sum(len(lp.token) for lp in new))
