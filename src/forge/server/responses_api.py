"""``POST /v1/responses``: the OpenAI Responses API over the chat machinery, with stored conversations.

A Responses request becomes a chat request (``input`` and ``instructions`` the
messages, ``text.format`` the response format, flat function ``tools`` OpenAI's
chat tools, ``max_output_tokens`` max_tokens), so it runs exactly as
``/v1/chat/completions`` does: same admission, grammars, batching and errors,
with the fields named as this API names them. The answer is a ``response``
object whose ``output`` holds a message item and/or ``function_call`` items;
streamed, it is the API's typed events (``response.created``, ...,
``response.output_text.delta``, ..., ``response.completed``), see
:mod:`forge.server.responses_events`.

A response is stored (``store``, default true) in memory, in a
:class:`ResponseStore` bounded by count and size with the least recently used
dropped first; ``previous_response_id`` continues its conversation, and
``GET``/``DELETE /v1/responses/{id}`` read and forget it.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from forge.errors import ContextLengthError, ForgeError, GenerationError
from forge.server.errors import ApiError
from forge.server.generation import Job, chat_job, count_tokens
from forge.server.responses_events import Finish, ResponseEvents, function_call_item, message_item, usage_body
from forge.server.schemas import ChatRequest, parse
from forge.server.state import Served
from forge.server.streaming import ClientGone, EventStream, Fanin, until_disconnect

__all__ = [
    "RESPONSES_FIELDS",
    "ResponseStore",
    "ResponsesRequest",
    "create_response",
    "delete_response",
    "get_response",
]

#: Stored responses, at most: the oldest-used go first past either bound.
STORE_MAX_ITEMS = 1000
STORE_MAX_BYTES = 64 * 1024 * 1024
#: GenerationConfig names -> this API's, for errors the app raises.
RESPONSES_FIELDS: Mapping[str, str] = {"max_tokens": "max_output_tokens"}
#: The chat request's field names -> this API's, for errors.
_PARAMS = {
    "messages": "input",
    "max_tokens": "max_output_tokens",
    "max_completion_tokens": "max_output_tokens",
    "response_format.json_schema.schema": "text.format.schema",
    "response_format.json_schema": "text.format",
    "response_format": "text.format",
}


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class InputText(_Body):
    type: Literal["input_text", "output_text", "text"]
    text: str


class MessageItem(_Body):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(_Body):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(_Body):
    type: Literal["function_call_output"]
    call_id: str
    output: str


InputItem = Annotated[MessageItem | FunctionCallItem | FunctionCallOutputItem, Field(union_mode="left_to_right")]


class FunctionTool(_Body):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(_Body):
    type: Literal["function"]
    name: str


class TextFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(_Body):
    format: TextFormat | None = None


class ResponsesRequest(_Body):
    """A ``POST /v1/responses`` body (the subset Forge serves; unknown fields are ignored, as OpenAI does)."""

    model: str | None = None
    input: str | Annotated[list[InputItem], Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: Any = None  # ranges: checked as the chat request's max_tokens
    temperature: Any = None
    top_p: Any = None
    seed: Any = None  # extension, as on chat
    tools: Annotated[list[FunctionTool], Field(max_length=128)] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    previous_response_id: str | None = None
    store: bool = True
    stream: bool = False
    metadata: dict[str, str] | None = None
    user: str | None = None


class ResponseStore:
    """Responses and their conversations, in memory: at most ``max_items`` and ``max_bytes`` (as JSON), LRU.

    >>> store = ResponseStore(max_items=1)
    >>> store.put("resp_a", {"id": "resp_a"}, []); store.put("resp_b", {"id": "resp_b"}, [])
    >>> store.get("resp_a") is None
    True
    """

    def __init__(self, max_items: int = STORE_MAX_ITEMS, max_bytes: int = STORE_MAX_BYTES) -> None:
        self.max_items, self.max_bytes = max_items, max_bytes
        self._entries: OrderedDict[str, tuple[dict[str, Any], list[dict[str, Any]], int]] = OrderedDict()
        self.size = 0

    def put(self, ident: str, response: dict[str, Any], messages: list[dict[str, Any]]) -> None:
        """Keep ``response`` and the conversation it ends, ``messages``; one too large for the store is not kept."""
        size = len(json.dumps([response, messages], ensure_ascii=False))
        if size > self.max_bytes:
            return
        self.delete(ident)
        self._entries[ident] = (response, messages, size)
        self.size += size
        while len(self._entries) > self.max_items or self.size > self.max_bytes:
            _, (_, _, dropped) = self._entries.popitem(last=False)
            self.size -= dropped

    def get(self, ident: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        entry = self._entries.get(ident)
        if entry is None:
            return None
        self._entries.move_to_end(ident)
        return entry[0], entry[1]

    def delete(self, ident: str) -> bool:
        entry = self._entries.pop(ident, None)
        if entry is not None:
            self.size -= entry[2]
        return entry is not None

    def __len__(self) -> int:
        return len(self._entries)


def _not_found(ident: str, param: str | None = None, status: int = 404) -> ApiError:
    return ApiError(
        f"no stored response has the id {ident[:100]!r}: it was never stored (store=false), was deleted, "
        "or was dropped to keep the server's store within its bounds",
        status=status,
        param=param,
        code="previous_response_not_found" if param else "not_found",
    )


def _messages(req: ResponsesRequest, history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chat messages: ``instructions`` (never carried over), the stored conversation, then ``input``."""
    out = [{"role": "system", "content": req.instructions}] if req.instructions else []
    out += history
    items = [MessageItem(role="user", content=req.input)] if isinstance(req.input, str) else req.input
    for item in items:
        if isinstance(item, MessageItem):
            role = "system" if item.role == "developer" else item.role
            out.append({"role": role, "content": item.text()})
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") and not last["content"]:
                last["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
    return out


def _chat_body(req: ResponsesRequest, messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``/v1/chat/completions`` body this request is."""
    body: dict[str, Any] = {"messages": messages, "stream": req.stream, "user": req.user}
    for name, value in (("max_tokens", req.max_output_tokens), ("temperature", req.temperature)):
        if value is not None:
            body[name] = value
    for name in ("top_p", "seed", "parallel_tool_calls"):
        if (value := getattr(req, name)) is not None:
            body[name] = value
    if req.tools:
        body["tools"] = [
            {"type": "function", "function": t.model_dump(exclude_none=True, exclude={"type"})} for t in req.tools
        ]
    if isinstance(req.tool_choice, NamedFunction):
        body["tool_choice"] = {"type": "function", "function": {"name": req.tool_choice.name}}
    elif req.tool_choice is not None:
        body["tool_choice"] = req.tool_choice
    fmt = req.text.format if req.text is not None else None
    if fmt is not None and fmt.type == "json_schema":
        schema = {"name": fmt.name or "response", "schema": fmt.schema_, "strict": fmt.strict}
        body["response_format"] = {"type": "json_schema", "json_schema": {k: v for k, v in schema.items() if v}}
    elif fmt is not None:
        body["response_format"] = {"type": fmt.type}
    return body


def _renamed(error: ApiError) -> ApiError:
    """``error`` with the chat request's field names as this API names them."""
    param = error.param
    if param is None:
        return error
    for chat, ours in _PARAMS.items():
        if param == chat or param.startswith(chat + ".") or param.startswith(chat + "["):
            param = ours + param[len(chat) :]
            message = error.message.replace(f"'{chat}", f"'{ours}").replace(f"{chat} ", f"{ours} ")
            renamed = ApiError(message, status=error.http_status, param=param, code=error.code)
            renamed.error_type, renamed.headers = error.error_type, error.headers
            return renamed
    return error


async def _job(
    served: Served, store: ResponseStore, req: ResponsesRequest, meta: Mapping[str, Any]
) -> tuple[Job, list[dict[str, Any]]]:
    """The chat job of ``req``, and its conversation to store (without the instructions)."""
    history: list[dict[str, Any]] = []
    if req.previous_response_id is not None:
        found = store.get(req.previous_response_id)
        if found is None:
            raise _not_found(req.previous_response_id, "previous_response_id", status=400)
        history = found[1]
    messages = _messages(req, history)
    try:
        chat = parse(ChatRequest, _chat_body(req, messages))
        served.check_model(req.model)
        job = await chat_job(served, chat, meta)
    except ApiError as e:
        raise _renamed(e) from None
    return job, messages[1:] if req.instructions else messages


def response_body(
    served: Served, req: ResponsesRequest, ident: str, created: int, status: str, output: list[dict[str, Any]]
) -> dict[str, Any]:
    """The ``response`` object, without usage (see :func:`usage_body`)."""
    tool_choice = req.tool_choice.model_dump() if isinstance(req.tool_choice, NamedFunction) else req.tool_choice
    fmt = req.text.format.model_dump(by_alias=True, exclude_none=True) if req.text and req.text.format else None
    return {
        "id": ident,
        "object": "response",
        "created_at": created,
        "status": status,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "model": served.model_name,
        "output": output,
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "previous_response_id": req.previous_response_id,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "text": {"format": fmt or {"type": "text"}},
        "tool_choice": tool_choice or "auto",
        "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
        "truncation": "disabled",
        "store": req.store,
        "metadata": req.metadata or {},
        "usage": None,
        "user": req.user,
    }


def _reply(text: str, output: list[dict[str, Any]]) -> dict[str, Any]:
    """The assistant message the response's ``output`` is, for the stored conversation."""
    calls = [item for item in output if item["type"] == "function_call"]
    if not calls:
        return {"role": "assistant", "content": text}
    content = next((item["content"][0]["text"] for item in output if item["type"] == "message"), None)
    tool_calls = [
        {"id": c["call_id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
        for c in calls
    ]
    return {"role": "assistant", "content": content, "tool_calls": tool_calls}


def _finisher(
    served: Served, store: ResponseStore, req: ResponsesRequest, job: Job, base: dict[str, Any], given: list[Any]
) -> Finish:
    """What ends a response: its usage, status and output in the response object, which is stored."""

    async def finish(text: str, output: list[dict[str, Any]], status: str) -> dict[str, Any]:
        body = {**base, "status": status, "output": output}
        body["incomplete_details"] = {"reason": "max_output_tokens"} if status == "incomplete" else None
        body["usage"] = await usage(served, job, text)
        if req.store:
            store.put(body["id"], body, [*given, _reply(text, output)])
        return body

    return finish


async def create_response(served: Served, store: ResponseStore, request: Request, data: Any) -> Response:
    """``POST /v1/responses``: JSON, or the typed events when ``stream`` is true."""
    req = parse(ResponsesRequest, data)
    meta = {"request_id": str(request.scope.get("state", {}).get("request_id", "-")), "user": req.user}
    job, given = await _job(served, store, req, meta)
    base = response_body(served, req, f"resp_{uuid.uuid4().hex}", int(time.time()), "in_progress", [])
    finish = _finisher(served, store, req, job, base, given)
    served.admission.acquire(1)
    if req.stream:
        return await _stream(served, job, request, base, finish)
    try:
        text = await until_disconnect(_answer(served, job), request.receive)
    except ClientGone:
        served.metrics.cancelled.inc(route="/v1/responses")
        raise
    finally:
        served.admission.release(1)
    ctx = job.contexts[0]
    content, calls = ctx.tool_format.parse(text) if ctx.tool_format is not None else (text, [])
    output = [message_item(f"msg_{uuid.uuid4().hex}", content or "", "completed")] if content or not calls else []
    for call in calls:
        arguments = json.dumps(call.arguments, ensure_ascii=False)
        output.append(function_call_item(f"fc_{uuid.uuid4().hex}", call.id, call.name, arguments, "completed"))
    cut = ctx.completion is not None and ctx.completion.finish_reason == "length"
    body = await finish(text, output, "incomplete" if cut and not calls else "completed")
    served.metrics.duration.observe(time.perf_counter() - job.start)
    return JSONResponse(body)


async def _answer(served: Served, job: Job) -> str:
    try:
        return await served.app.handle(job.contexts[0])
    except GenerationError as e:
        raise _refusal(job, e) from None


def _refusal(job: Job, error: GenerationError) -> ForgeError:
    """The 400 for a generation the app refused (a prompt or budget too large or small), in this API's names."""
    if isinstance(error, ContextLengthError):
        return _renamed(job.refusal(error, 0))
    if error.field == "max_tokens":  # e.g. too small for the shortest output the schema admits
        message = error.message.replace("max_tokens", "max_output_tokens")
        return ApiError(message, param="max_output_tokens", code="max_output_tokens_too_small")
    return error


async def usage(served: Served, job: Job, text: str) -> dict[str, Any]:
    """The response's token counts; /metrics's token counters go up by the same."""
    ctx = job.contexts[0]
    if ctx.completion is not None:
        prompt, completion = ctx.completion.prompt_tokens, ctx.completion.completion_tokens
    else:  # a middleware answered: count as the model would have seen it
        prompt = len(ctx.ids) if ctx.ids is not None else await count_tokens(served, ctx.prompt)
        completion = await count_tokens(served, text, prompt=False)
    served.metrics.prompt_tokens.inc(prompt)
    served.metrics.generation_tokens.inc(completion)
    return usage_body(prompt, completion)


async def _stream(served: Served, job: Job, request: Request, base: dict[str, Any], finish: Finish) -> Response:
    async def pieces() -> AsyncIterator[str]:
        try:
            async for piece in served.app.handle_stream(job.contexts[0]):
                yield piece
        except GenerationError as e:
            raise _refusal(job, e) from None

    fanin = Fanin([pieces()])

    async def close() -> None:
        await fanin.aclose()
        served.admission.release(1)

    # The first piece before the headers: a refusal is still an HTTP status, not an event inside a 200.
    try:
        first = await until_disconnect(fanin.get(), request.receive)
    except BaseException:
        await close()
        raise
    if first[2] is not None:
        await close()
        raise first[2]
    return EventStream(
        ResponseEvents(served, job, base, finish).body(fanin, first),
        closed=close,
        on_disconnect=lambda: served.metrics.cancelled.inc(route="/v1/responses"),
    )


async def get_response(store: ResponseStore, ident: str) -> Response:
    """``GET /v1/responses/{id}``: a stored response, or 404."""
    found = store.get(ident)
    if found is None:
        raise _not_found(ident)
    return JSONResponse(found[0])


async def delete_response(store: ResponseStore, ident: str) -> Response:
    """``DELETE /v1/responses/{id}``: forget a stored response."""
    if not store.delete(ident):
        raise _not_found(ident)
    return JSONResponse({"id": ident, "object": "response.deleted", "deleted": True})
