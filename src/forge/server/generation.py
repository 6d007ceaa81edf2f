"""Chat and text completions as jobs: OpenAI request bodies become the app's requests, one per choice.

Every choice is one ``app.request(...)`` call with typed inputs (the prompt or the
messages, the options, the tools, its id, the caller's meta); :mod:`forge.server.running`
then handles them all at once, so the batching engine decodes them together. The app
admits each: a prompt that does not fit, or an explicit ``max_tokens`` that does not
fit after it (``strict``), is a ``ContextLengthError``, which :meth:`Job.refusal` turns
into a 400 with both counts, never a silent truncation.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from forge import compute
from forge.errors import ChatTemplateError, ConfigError, ContextLengthError, ForgeError
from forge.middleware import Context
from forge.requests import encode
from forge.server import responses as shapes
from forge.server.errors import ApiError, forge_error_param
from forge.server.schemas import ChatMessage, ChatRequest, CompletionRequest, NamedToolChoice
from forge.server.state import Served
from forge.structured import Constraint, Grammar

__all__ = ["CHAT_FIELDS", "COMPLETION_FIELDS", "Job", "chat_job", "completion_job", "count_tokens"]

#: Below these, sampling would divide logits into infinities, or a float32 top_p would round to 0
#: and drop every token: both mean "only the most likely token", which is greedy decoding.
MIN_TEMPERATURE = 1e-5
MIN_TOP_P = 1e-6
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
    prompt_param: str  # the request's field that holds the prompt: "messages" or "prompt"
    max_param: str  # and the one that holds max_tokens (chat may call it max_completion_tokens)
    sources: list[dict[str, Any]] | None = None  # retrieved passages the answer may cite (a RAG server)
    start: float = field(default_factory=time.perf_counter)

    @property
    def route(self) -> str:
        return "/v1/chat/completions" if self.kind == "chat" else "/v1/completions"

    @property
    def fields(self) -> Mapping[str, str]:
        """GenerationConfig names -> this route's, for errors the app raises."""
        return CHAT_FIELDS if self.kind == "chat" else COMPLETION_FIELDS

    def refusal(self, error: ContextLengthError, i: int) -> ApiError:
        """The 400 for choice ``i`` that the app refused: the field at fault, in the request's own names."""
        n, limit = error.prompt_tokens, error.context
        if error.field == "max_tokens" and error.requested is not None:
            asked, name = error.requested, self.max_param
            message = (
                f"this model's maximum context length is {limit} tokens, but {n + asked} were requested "
                f"({n} in the prompt + {asked} in {name}); reduce the prompt or {name} (at most {limit - n} here)"
            )
            return ApiError(message, param=name, code="context_length_exceeded")
        several = self.kind == "completion" and len(set(self.group)) > 1
        message = (
            f"the prompt is {n} tokens but this model's maximum context length is {limit} tokens "
            f"(prompt and completion together); shorten the prompt to at most {limit - 1} tokens"
        )
        param = f"{self.prompt_param}[{self.group[i]}]" if several else self.prompt_param
        return ApiError(message, param=param, code="context_length_exceeded")


def _options(served: Served, req: ChatRequest | CompletionRequest, max_tokens: int | None) -> dict[str, Any]:
    """The options of the app's request: GenerationConfig fields (the app's defaults fill the rest) and ``strict``.

    Without ``max_tokens`` the completion may fill the context (or ``default_max_tokens`` of it):
    the app stops it there. One the client gave is ``strict``: refused if it does not fit after the prompt.
    """
    options: dict[str, Any] = {
        "max_tokens": max_tokens or served.config.default_max_tokens or served.context,
        "strict": max_tokens is not None,
    }
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


def _check_capacity(served: Served, count: int) -> None:
    if count > served.config.capacity:
        raise ApiError(
            f"this request asks for {count} completions but the server runs or queues at most "
            f"{served.config.capacity} at once; lower n (or the number of prompts)",
            param="n",
        )


def _contexts(
    served: Served,
    prompts: Sequence[dict[str, Any]],
    req: ChatRequest | CompletionRequest,
    options: dict[str, Any],
    meta: Mapping[str, Any],
) -> tuple[list[Context], list[int]]:
    """``req.n`` requests per prompt; choice i samples with ``seed + i`` and has the id ``request_id-i``."""
    contexts, group = [], []
    count = len(prompts) * req.n
    request_id = meta.get("request_id")
    for p, prompt in enumerate(prompts):
        for k in range(req.n):
            index = p * req.n + k
            seed = {"seed": req.seed + index} if req.seed is not None else {}
            # The app's events and logger lines carry the server's id (one per choice when there are several).
            ident = (request_id if count == 1 else f"{request_id}-{index}") if request_id else None
            ctx = served.app.request(**prompt, stream=bool(req.stream), id=ident, meta=meta, **options, **seed)
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
    max_tokens, max_param = req.max_tokens, "max_tokens"
    if req.max_completion_tokens is not None:
        max_tokens, max_param = req.max_completion_tokens, "max_completion_tokens"
    _check_capacity(served, req.n)
    options = _options(served, req, max_tokens)
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
        messages, sources, grounding = await compute.run(retriever.augment, messages, k, mode)
        if grammar is None and grounding is not None:
            options["grammar"] = grounding
            grammar = "messages"
    # Rendering the template and compiling grammars take as long as the client makes them: never on the loop.
    contexts, group = await _off_loop(served, _chat_contexts, served, req, options, messages, meta, compile=grammar)
    return Job(
        "chat",
        contexts,
        group,
        bool(req.stream),
        req.include_usage,
        logprobs=bool(req.logprobs),
        prompt_param="messages",
        max_param=max_param,
        sources=sources,
    )


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
    served: Served,
    req: ChatRequest,
    options: dict[str, Any],
    messages: list[dict[str, Any]],
    meta: Mapping[str, Any],
) -> tuple[list[Context], list[int]]:
    """The chat's contexts, with their grammars compiled (in a worker thread: see ``chat_job``)."""
    options.update(_structured(served, req))
    schema_param = "tools" if req.tools else "response_format.json_schema.schema"
    try:
        contexts, group = _contexts(served, [{"messages": messages}], req, options, meta)
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
    prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    _check_capacity(served, len(prompts) * req.n)
    options = _options(served, req, req.max_tokens)
    if req.logprobs is not None:
        options["logprobs"] = req.logprobs
    try:
        contexts, group = _contexts(served, [{"prompt": p} for p in prompts], req, options, meta)
    except ForgeError as e:
        raise _request_error(e, COMPLETION_FIELDS, "prompt") from None
    return Job(
        "completion",
        contexts,
        group,
        bool(req.stream),
        req.include_usage,
        logprobs=req.logprobs is not None,
        prompt_param="prompt",
        max_param="max_tokens",
    )


async def count_tokens(served: Served, text: str, *, prompt: bool = True) -> int:
    """The number of tokens in ``text`` (as a prompt: with BOS when the model wants one)."""
    tokenizer = served.app.tokenizer
    assert tokenizer is not None
    return len(await encode(tokenizer, text, prompt=prompt))
