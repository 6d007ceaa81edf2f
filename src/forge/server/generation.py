"""Chat and text completions: requests become app contexts, contexts become OpenAI responses.

Every choice is its own ``app.request(...)`` context, handled through the app's
middleware stack (``app.handle`` / ``app.handle_stream``), all choices at once so
the batching engine decodes them together. Prompts are measured with the
tokenizer before anything runs: a prompt that does not fit, or a ``max_tokens``
that does not fit after it, is a 400 with both counts, never a silent truncation.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from forge.errors import ChatTemplateError, ConfigError, ForgeError
from forge.middleware import Context
from forge.server import responses as shapes
from forge.server.errors import ApiError, error_payload, forge_error_param
from forge.server.schemas import ChatMessage, ChatRequest, CompletionRequest, NamedToolChoice
from forge.server.state import Served
from forge.server.streaming import DONE, ClientGone, EventStream, Fanin, Piece, gather_or_cancel, sse, until_disconnect
from forge.structured import Constraint, Grammar, ToolCallParser, ToolFormat

__all__ = ["CHAT_FIELDS", "COMPLETION_FIELDS", "Job", "chat_job", "completion_job", "count_tokens", "run"]

#: Below these, sampling would divide logits into infinities, or a float32 top_p would round to 0
#: and drop every token: both mean "only the most likely token", which is greedy decoding.
MIN_TEMPERATURE = 1e-5
MIN_TOP_P = 1e-6
#: Longer texts are tokenized in a worker thread, so the event loop keeps streaming meanwhile.
THREAD_CHARS = 8192
#: GenerationConfig names -> the request's, for errors the app raises.
CHAT_FIELDS: Mapping[str, str] = {"logprobs": "top_logprobs"}
COMPLETION_FIELDS: Mapping[str, str] = {}
T = TypeVar("T")


@dataclass
class Job:
    """One HTTP request's generations: a context per choice, in choice order."""

    kind: shapes.Kind
    contexts: list[Context]
    group: list[int]  # the prompt each choice answers (usage counts a prompt once)
    stream: bool
    include_usage: bool
    logprobs: bool
    prompt_tokens: list[int] = field(default_factory=list)  # per prompt, measured before generating
    sources: list[dict[str, Any]] | None = None  # retrieved passages the answer may cite (a RAG server)
    start: float = field(default_factory=time.perf_counter)

    @property
    def route(self) -> str:
        return "/v1/chat/completions" if self.kind == "chat" else "/v1/completions"

    @property
    def fields(self) -> Mapping[str, str]:
        """GenerationConfig names -> this route's, for errors the app raises."""
        return CHAT_FIELDS if self.kind == "chat" else COMPLETION_FIELDS


def _options(req: ChatRequest | CompletionRequest) -> dict[str, Any]:
    """The GenerationConfig options a request sets; the app's defaults fill the rest."""
    options: dict[str, Any] = {}
    for name in (
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
    ):
        if (value := getattr(req, name)) is not None:
            options[name] = value
    if options.get("temperature") is not None and options["temperature"] < MIN_TEMPERATURE:
        options["temperature"] = 0.0
    if options.get("top_p") is not None and options["top_p"] < MIN_TOP_P:  # OpenAI allows top_p=0
        options.pop("top_p")
        options["temperature"] = 0.0
    if req.stop is not None:
        options["stop"] = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)
    return options


def _contexts(
    served: Served, prompts: Sequence[dict[str, Any]], req: ChatRequest | CompletionRequest, options: dict[str, Any]
) -> tuple[list[Context], list[int]]:
    """``req.n`` contexts per prompt; choice i samples with ``seed + i``."""
    contexts, group = [], []
    for p, prompt in enumerate(prompts):
        for k in range(req.n):
            index = p * req.n + k
            seed = {"seed": req.seed + index} if req.seed is not None else {}
            ctx = served.app.request(**prompt, stream=bool(req.stream), **options, **seed)
            contexts.append(ctx)
            group.append(p)
    return contexts, group


def _request_error(error: ForgeError, fields: Mapping[str, str], default: str | None) -> ApiError:
    return ApiError(
        error.message,
        status=error.http_status,
        param=forge_error_param(error, fields) or default,
        error_type=error.error_type,
    )


async def chat_job(served: Served, req: ChatRequest, meta: Mapping[str, Any]) -> Job:
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError("top_logprobs needs 'logprobs': true", param="top_logprobs")
    for i, m in enumerate(req.messages):
        if m.role == "tool" and not m.tool_call_id:
            raise ApiError(
                f"messages[{i}] has role 'tool' but no tool_call_id; give the id of the call it answers",
                param=f"messages[{i}].tool_call_id",
            )
    options = _options(req)
    max_tokens, max_param = req.max_tokens, "max_tokens"
    if req.max_completion_tokens is not None:
        max_tokens, max_param = req.max_completion_tokens, "max_completion_tokens"
    if req.logprobs:
        options["logprobs"] = req.top_logprobs or 0
    messages = [_message(m) for m in req.messages]
    fmt = req.response_format
    grammar = "tools" if req.tools else "response_format" if fmt is not None and fmt.type != "text" else None
    sources = None
    if served.config.retriever is not None and any(m["role"] == "user" for m in messages):
        # Retrieval, reranking and the grounding grammar are slow work; a request's own format wins over it.
        mode = "free" if grammar else served.config.rag_mode
        retriever, k = served.config.retriever, served.config.rag_k
        messages, sources, grounding = await asyncio.to_thread(retriever.augment, messages, k, mode)
        if grammar is None and grounding is not None:
            options["grammar"] = grounding
            grammar = "messages"
    # Rendering the template and compiling grammars take as long as the client makes them: never on the loop.
    contexts, group = await _off_loop(served, _chat_contexts, served, req, options, messages, compile=grammar)
    job = Job("chat", contexts, group, bool(req.stream), req.include_usage, logprobs=bool(req.logprobs))
    job.sources = sources
    await _fit(served, job, max_tokens, max_param, "messages", meta)
    return job


async def _off_loop(served: Served, fn: Callable[..., T], *args: Any, compile: str | None) -> T:
    """``fn(*args)`` in a worker thread. Grammar compilation gets the server's own small pool (so it can't
    take every thread the loop relies on) and ``compile_timeout``; ``compile`` names the request's field that
    holds the grammar. A thread that runs past the timeout, bounded by ``schema_limits``, finishes on its own."""
    if not compile:
        return await asyncio.to_thread(fn, *args)
    future = asyncio.get_running_loop().run_in_executor(served.compiler, fn, *args)
    try:
        return await asyncio.wait_for(future, served.config.compile_timeout)
    except TimeoutError:
        raise ApiError(
            f"the request's JSON schema or tools did not compile into a grammar within "
            f"{served.config.compile_timeout:g} s; make them smaller or simpler",
            param=compile,
            code="schema_too_complex",
        ) from None


def _chat_contexts(
    served: Served, req: ChatRequest, options: dict[str, Any], messages: list[dict[str, Any]]
) -> tuple[list[Context], list[int]]:
    """The chat's contexts, with their grammars compiled (in a worker thread: see ``chat_job``)."""
    options.update(_structured(served, req))
    schema_param = "tools" if req.tools else "response_format.json_schema.schema"
    try:
        contexts, group = _contexts(served, [{"messages": messages}], req, options)
    except ChatTemplateError as e:
        raise _request_error(e, CHAT_FIELDS, "messages") from None
    except ConfigError as e:
        raise _request_error(e, CHAT_FIELDS, schema_param if req.tools else "messages") from None
    except ForgeError as e:
        raise _request_error(e, CHAT_FIELDS, "messages") from None
    model, tokenizer = served.app.model, served.app.tokenizer
    assert model is not None and tokenizer is not None
    for grammar in {ctx.params.grammar for ctx in contexts if ctx.params.grammar is not None}:
        try:  # compiled once here, then cached: the engine's own Constraint only copies it
            Constraint(grammar, tokenizer, model.config.vocab_size)
        except ConfigError as e:
            raise ApiError(e.message, param=schema_param) from None
    return contexts, group


def _message(m: ChatMessage) -> dict[str, Any]:
    """A chat message for the app; OpenAI's "developer" role is the system prompt of newer models."""
    out: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
    if m.tool_calls:
        out["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        out["content"] = m.text() or None
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        out["name"] = m.name
    return out


def _structured(served: Served, req: ChatRequest) -> dict[str, Any]:
    """The app options for ``tools`` / ``tool_choice`` and ``response_format``."""
    options: dict[str, Any] = {}
    limits = served.config.schema_limits
    if req.tools:
        try:  # all the tools' schemas together: they compile into one grammar
            limits.check([t.function.parameters for t in req.tools], "the tools' parameter schemas")
        except ConfigError as e:
            raise ApiError(e.message, param="tools") from None
    fmt = req.response_format
    if fmt is not None and fmt.type != "text":
        if req.tools and req.tool_choice != "none":
            raise ApiError(
                "response_format and tools can't be combined here: a reply is either a tool call or the "
                "formatted answer; send tool_choice 'none' or leave one out",
                param="response_format",
            )
        schema: dict[str, Any] = {"type": "object"}
        if fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise ApiError(
                    "response_format of type 'json_schema' needs json_schema.schema (a JSON schema object)",
                    param="response_format.json_schema",
                )
            schema = fmt.json_schema.schema_
        try:
            limits.check(schema, "the response_format schema")
            options["grammar"] = Grammar.json_schema(schema, "response_format schema")
        except ConfigError as e:
            raise ApiError(e.message, param="response_format.json_schema.schema") from None
    if req.tools:
        options["tools"] = [t.model_dump(exclude_none=True) for t in req.tools]
        choice = req.tool_choice
        options["tool_choice"] = choice.function.name if isinstance(choice, NamedToolChoice) else choice or "auto"
        options["parallel_tool_calls"] = req.parallel_tool_calls is not False
        names = [t.function.name for t in req.tools]
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ApiError(
                f"tool_choice names {choice.function.name!r}, which is not among the tools {names}",
                param="tool_choice",
            )
    elif req.tool_choice not in (None, "none", "auto"):
        raise ApiError("tool_choice needs tools: send the tools the model may call", param="tool_choice")
    return options


async def completion_job(served: Served, req: CompletionRequest, meta: Mapping[str, Any]) -> Job:
    options = _options(req)
    if req.logprobs is not None:
        options["logprobs"] = req.logprobs
    prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    try:
        contexts, group = _contexts(served, [{"prompt": p} for p in prompts], req, options)
    except ForgeError as e:
        raise _request_error(e, COMPLETION_FIELDS, "prompt") from None
    job = Job("completion", contexts, group, bool(req.stream), req.include_usage, logprobs=req.logprobs is not None)
    await _fit(served, job, req.max_tokens, "max_tokens", "prompt", meta)
    return job


async def encode(served: Served, text: str, *, prompt: bool = True) -> list[int]:
    """The token ids of ``text`` (as a prompt: with BOS when the model wants one); long texts in a thread."""
    tokenizer = served.app.tokenizer
    assert tokenizer is not None
    encoder = tokenizer.encode_prompt if prompt else tokenizer.encode
    return encoder(text) if len(text) < THREAD_CHARS else await asyncio.to_thread(encoder, text)


async def count_tokens(served: Served, text: str, *, prompt: bool = True) -> int:
    return len(await encode(served, text, prompt=prompt))


async def _fit(
    served: Served, job: Job, max_tokens: int | None, max_param: str, prompt_param: str, meta: Mapping[str, Any]
) -> None:
    """Measure each prompt and set every choice's ``max_tokens``; 400 with the counts if it cannot fit."""
    limit = served.context
    if len(job.contexts) > served.config.capacity:
        raise ApiError(
            f"this request asks for {len(job.contexts)} completions but the server runs or queues at most "
            f"{served.config.capacity} at once; lower n (or the number of prompts)",
            param="n",
        )
    measured: dict[int, int] = {}
    encoded: dict[int, list[int]] = {}
    for ctx, p in zip(job.contexts, job.group, strict=True):
        if p not in encoded:
            encoded[p] = await encode(served, ctx.prompt)
            # An empty prompt still takes one position: the generator starts it from BOS/EOS.
            measured[p] = n = max(1, len(encoded[p]))
            where = f"{prompt_param}[{p}]" if prompt_param == "prompt" and len(set(job.group)) > 1 else prompt_param
            if n >= limit:
                raise ApiError(
                    f"the prompt is {n} tokens but this model's maximum context length is {limit} tokens "
                    f"(prompt and completion together); shorten the prompt to at most {limit - 1} tokens",
                    param=where,
                    code="context_length_exceeded",
                )
            if max_tokens is not None and n + max_tokens > limit:
                raise ApiError(
                    f"this model's maximum context length is {limit} tokens, but {n + max_tokens} were requested "
                    f"({n} in the prompt + {max_tokens} in {max_param}); reduce the prompt or {max_param} "
                    f"(at most {limit - n} here)",
                    param=max_param,
                    code="context_length_exceeded",
                )
        ctx.encoded = (ctx.prompt, encoded[p])  # the engine reuses them: one tokenization
        room = limit - measured[p]
        budget = max_tokens if max_tokens is not None else min(room, served.config.default_max_tokens or room)
        ctx.params = ctx.params.replace(max_tokens=budget)
        ctx.meta.update(meta)
    request_id = meta.get("request_id")
    if request_id:  # the app's events and logger lines carry the server's id (one per choice when n > 1)
        for i, ctx in enumerate(job.contexts):
            ctx.id = request_id if len(job.contexts) == 1 else f"{request_id}-{i}"
    job.prompt_tokens = [measured[p] for p in sorted(measured)]


# -- running a job ----------------------------------------------------------------------------------------------


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


def _new_logprobs(job: Job, ctx: Context, sent: list[tuple[int, int]], i: int, text: int) -> dict[str, Any] | None:
    """Logprobs of choice ``i``'s tokens that the first ``text`` characters streamed so far cover.

    The model may already be a token or two ahead of the text sent; those
    tokens' logprobs wait for the chunk that carries their text (or the last one).
    """
    partial = ctx.meta.get("partial_logprobs")
    if not job.logprobs or partial is None:
        return None
    done, offset = sent[i]
    new = []
    for lp in partial()[done:]:
        if offset + len(lp.token) > text:
            break
        new.append(lp)
        offset += len(lp.token)
    if not new:
        return None
    sent[i] = (done + len(new), offset)
    if job.kind == "chat":
        return shapes.chat_logprobs(new)
    return shapes.completion_logprobs(new, start=sent[i][1] - sum(len(lp.token) for lp in new))


async def _tally(served: Served, job: Job, texts: Sequence[str], done: Sequence[int]) -> shapes.Usage:
    """Usage over the finished choices ``done``; the token counters of /metrics go up by the same."""
    usage = shapes.Usage()
    counted: set[int] = set()
    for i in done:
        ctx, p = job.contexts[i], job.group[i]
        if p not in counted:
            counted.add(p)
            usage.prompt_tokens += ctx.completion.prompt_tokens if ctx.completion else job.prompt_tokens[p]
        if ctx.completion is not None:
            usage.completion_tokens += ctx.completion.completion_tokens
        else:  # a middleware answered: count what it answered with
            usage.completion_tokens += await count_tokens(served, texts[i], prompt=False)
    served.metrics.prompt_tokens.inc(usage.prompt_tokens)
    served.metrics.generation_tokens.inc(usage.completion_tokens)
    return usage


async def run(served: Served, job: Job, request: Request) -> Response:
    """Admit the job, run it, answer: JSON, or server-sent events when it streams."""
    n = len(job.contexts)
    served.admission.acquire(n)
    if job.stream:
        return await _stream(served, job, request)  # releases the slots when the stream ends
    work = gather_or_cancel([served.app.handle(ctx) for ctx in job.contexts])
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
        fmt: ToolFormat | None = ctx.meta.get("tool_format")
        content, calls = fmt.parse(text) if fmt is not None else (text, [])
        finish = "tool_calls" if calls else _finish(ctx)
        tool_calls = [c.to_openai() for c in calls] or None
        choices.append(shapes.whole_choice(job.kind, i, content, finish, _logprobs(job, ctx), tool_calls))
    served.metrics.duration.observe(time.perf_counter() - job.start)
    body = shapes.response(job.kind, shapes.new_id(job.kind), served.model_name, choices, usage)
    if job.sources is not None:
        body["sources"] = job.sources
    return JSONResponse(body)


async def _stream(served: Served, job: Job, request: Request) -> Response:
    fanin = Fanin([served.app.handle_stream(ctx) for ctx in job.contexts])

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
        _events(served, job, fanin, first, request_id),
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


async def _events(served: Served, job: Job, fanin: Fanin, first: Piece, request_id: str) -> AsyncIterator[bytes]:
    """The SSE body: role chunks (chat), a chunk per piece, a final chunk per choice, usage, ``[DONE]``."""
    n, kind, model = len(job.contexts), job.kind, served.model_name
    ident, created = shapes.new_id(kind), int(time.time())

    def event(choices: list[dict[str, Any]], usage: shapes.Usage | None = None) -> bytes:
        return sse(shapes.chunk(kind, ident, model, created, choices, with_usage=job.include_usage, usage=usage))

    if kind == "chat":
        for i in range(n):
            if i == 0 and job.sources is not None:  # the sources travel with the first chunk
                body = shapes.chunk(kind, ident, model, created, [shapes.role_choice(i)], with_usage=job.include_usage)
                yield sse({**body, "sources": job.sources})
                continue
            yield event([shapes.role_choice(i)])
    parsers = [ToolCallParser(fmt) if (fmt := ctx.meta.get("tool_format")) else None for ctx in job.contexts]
    texts: list[list[str]] = [[] for _ in range(n)]
    sent: list[tuple[int, int]] = [(0, 0)] * n  # per choice: logprobs already sent, and their text length
    chars = [0] * n  # per choice: characters streamed
    last: dict[int, float] = {}
    done: list[int] = []
    item = first
    while True:
        i, piece, error = item
        if error is not None:
            _, body, _ = error_payload(error, request_id=request_id, fields=job.fields)
            yield sse(body)
            break
        if piece is None:
            ctx = job.contexts[i]
            parser = parsers[i]
            finish = _finish(ctx)
            if parser is not None:
                for delta in parser.finish():
                    yield event([shapes.delta_choice(i, _delta(delta))])
                finish = "tool_calls" if parser.calls else finish
            rest = _logprobs(job, ctx, since=sent[i])
            yield event([shapes.final_choice(kind, i, finish, rest)])
            done.append(i)
            if len(done) == n:
                break
        else:
            now = time.perf_counter()
            if not last:
                served.metrics.ttft.observe(now - job.start)
            if i in last:
                served.metrics.itl.observe(now - last[i])
            last[i] = now
            texts[i].append(piece)
            chars[i] += len(piece)
            parser = parsers[i]
            if parser is not None:  # tool calls stream as OpenAI's tool_calls deltas
                for delta in parser.feed(piece):
                    yield event([shapes.delta_choice(i, _delta(delta))])
            else:
                lps = _new_logprobs(job, job.contexts[i], sent, i, chars[i])
                yield event([shapes.piece_choice(kind, i, piece, lps)])
        item = await fanin.get()
    usage = await _tally(served, job, ["".join(t) for t in texts], done)
    if job.include_usage and len(done) == n:
        yield event([], usage)
    yield DONE
    served.metrics.duration.observe(time.perf_counter() - job.start)
