"""Request bodies of the OpenAI API, as strict pydantic models.

Strict: ``"max_tokens": "10"`` or ``"n": true`` is a 400 naming the field, not
a silent coercion. Fields OpenAI has and Forge does not use (``logit_bias``,
...) are ignored, as OpenAI ignores unknown ones.

The generation fields' ranges are ``GenerationConfig``'s own bounds, except
where :data:`HTTP_RANGES` follows OpenAI's documented API instead (tests check
that each lies inside the option's, top_p's 0 aside: see there).

>>> parse(CompletionRequest, {"prompt": "Hi", "max_tokens": 4}).max_tokens
4
"""

from __future__ import annotations

import dataclasses
import re
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from forge.config import Bound, specs
from forge.errors import ApiError
from forge.generator import GenerationConfig

__all__ = [
    "HTTP_RANGES",
    "ChatMessage",
    "ChatRequest",
    "CompletionRequest",
    "EmbeddingRequest",
    "RagQueryRequest",
    "ResponseFormat",
    "StreamOptions",
    "TextPart",
    "ToolDef",
    "http_bound",
    "parse",
]

M = TypeVar("M", bound=BaseModel)

#: Where HTTP takes OpenAI's documented range rather than the option's own (changes to its Bound): temperature
#: up to 2, as OpenAI; top_p from 0, as OpenAI, where 0 means greedy (server/generation.py maps it, since
#: GenerationConfig needs top_p > 0); repetition_penalty in [0.1, 10], as vLLM's extension.
HTTP_RANGES: dict[str, dict[str, float | None]] = {
    "temperature": {"le": 2},
    "top_p": {"ge": 0, "gt": None},
    "repetition_penalty": {"ge": 0.1, "gt": None, "le": 10},
}


def http_bound(name: str) -> Bound:
    """The range the HTTP API allows for GenerationConfig's ``name``."""
    bound = specs(GenerationConfig)[name].bound
    assert bound is not None, name
    return dataclasses.replace(bound, **HTTP_RANGES.get(name, {}))


def _option(name: str) -> Any:
    """An optional request field with the range of GenerationConfig's ``name`` (see HTTP_RANGES)."""
    bound = http_bound(name)
    limits = {"ge": bound.ge, "gt": bound.gt, "le": bound.le, "lt": bound.lt}
    return Field(None, **{k: v for k, v in limits.items() if v is not None})


#: torch seeds are 64-bit (GenerationConfig.seed's bound); choice i uses seed + i, and n <= 128.
SEED_MIN, SEED_MAX = int(http_bound("seed").low[0]), int(http_bound("seed").high[0])
MAX_N = 128
MAX_STOPS = 16
MAX_INPUTS = 2048
MAX_FILTER_KEYS, MAX_FILTER_VALUES = 16, 256

Stop = Annotated[str, Field(min_length=1)]


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(_Request):
    include_usage: bool | None = None


class TextPart(_Request):
    """A text part of a message's content (``{"type": "text", "text": "..."}``); images are not supported."""

    type: Literal["text"]
    text: str


class FunctionCall(_Request):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallIn(_Request):
    """A tool call of an earlier assistant message, sent back in the conversation."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class _Sampling(_Request):
    """Fields chat and completions share."""

    model: str | None = None
    max_tokens: int | None = _option("max_tokens")
    temperature: float | None = _option("temperature")
    top_p: float | None = _option("top_p")
    top_k: int | None = _option("top_k")  # extension, as vLLM
    min_p: float | None = _option("min_p")  # extension
    repetition_penalty: float | None = _option("repetition_penalty")  # extension
    presence_penalty: float | None = _option("presence_penalty")
    frequency_penalty: float | None = _option("frequency_penalty")
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOPS)] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = _option("seed")
    user: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class FunctionDef(_Request):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_Request):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Request):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = _option("max_tokens")
    logprobs: bool | None = None
    top_logprobs: int | None = _option("logprobs")
    tools: Annotated[list[ToolDef], Field(max_length=128)] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_N)]
    logprobs: int | None = _option("logprobs")


#: A metadata value a filter can match: what SQLite stores (its integers are 64-bit).
FilterValue = str | Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)] | float | bool | None


class RagQueryRequest(_Request):
    query: Annotated[str, Field(min_length=1)]
    k: int = Field(5, ge=1, le=100)
    # key -> a value, or a list of the values allowed; never objects or nested lists
    filter: (
        Annotated[
            dict[str, FilterValue | Annotated[list[FilterValue], Field(max_length=MAX_FILTER_VALUES)]],
            Field(max_length=MAX_FILTER_KEYS),
        ]
        | None
    ) = None


class EmbeddingRequest(_Request):
    input: (
        str
        | Annotated[list[str], Field(min_length=1, max_length=MAX_INPUTS)]
        | Annotated[list[int], Field(min_length=1)]
        | Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1, max_length=MAX_INPUTS)]
    )
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


# Union members and wrappers show up in pydantic's error locations ("str", "list[str]", "function-after[...]").
_FIELD_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "dict", "list"})


def param_of(loc: tuple[int | str, ...]) -> str | None:
    """``("messages", 0, "content", "str")`` -> ``"messages[0].content"``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _FIELD_NAME.match(part) and part not in _TYPE_TAGS:
            out += f".{part}" if out else part
    return out or None


def parse(model: type[M], data: Any) -> M:
    """Validate a parsed JSON body; a 400 ``ApiError`` naming the first field at fault."""
    if not isinstance(data, dict):
        raise ApiError(f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        first = errors[0]["loc"][:1]
        # Of a union's alternatives, the deepest error says most ("messages[0].content[0].type").
        error = max((err for err in errors if err["loc"][:1] == first), key=lambda err: len(err["loc"]))
        param = param_of(error["loc"])
        if error["type"] == "missing":
            raise ApiError(
                f"missing required parameter: '{param}'", param=param, code="missing_required_parameter"
            ) from None
        got = repr(error.get("input"))
        got = got if len(got) <= 60 else got[:57] + "..."
        raise ApiError(f"invalid value for '{param}': {error['msg']} (got {got})", param=param) from None
