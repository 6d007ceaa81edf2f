"""Fuzzing: bodies built from the request schemas with wrong types and values, and plain junk.

Whatever arrives, the answer is never a 5xx, an error is OpenAI's JSON, and the
server keeps serving. Valid draws keep generation short (max_tokens <= 3, n <= 2).
"""

from __future__ import annotations

import json
import os
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving import ServerProcess

FUZZ = settings(
    max_examples=int(os.environ.get("FORGE_FUZZ_EXAMPLES", "100")),  # more for a longer hunt
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
junk = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
text = st.text(max_size=12)
unit = st.floats(min_value=0, max_value=1)
outside = st.floats(min_value=2.0001, max_value=1e30) | st.floats(max_value=-0.0001) | st.just(float("nan"))

# Valid values (kept cheap: max_tokens <= 3, n <= 2), and out-of-range ones for the same fields.
SAMPLING = {
    "model": st.sampled_from(["tiny"]),  # the tiny server's id; others are 404 model_not_found (in BAD)
    "max_tokens": st.integers(min_value=1, max_value=3),
    "temperature": st.floats(min_value=0, max_value=2),
    "top_p": unit,
    "top_k": st.integers(min_value=1, max_value=400),
    "min_p": unit,
    "repetition_penalty": st.floats(min_value=0.1, max_value=10),
    "presence_penalty": st.floats(min_value=-2, max_value=2),
    "frequency_penalty": st.floats(min_value=-2, max_value=2),
    "stop": st.none() | st.text(min_size=1, max_size=3) | st.lists(st.text(min_size=1, max_size=3), max_size=3),
    "n": st.integers(min_value=1, max_value=2),
    "seed": st.integers(min_value=-(2**63), max_value=2**63 - 1),
    "user": text,
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
}
OPTIONAL = {k: v for k, v in SAMPLING.items() if k != "max_tokens"}  # max_tokens is always there
BAD = {
    "max_tokens": st.sampled_from([0, -1, 10**6, 2**64, 1.5, "2"]),
    "temperature": outside,
    "top_p": outside,
    "top_k": st.integers(max_value=0),
    "min_p": outside,
    "repetition_penalty": st.floats(min_value=10.001) | st.floats(max_value=0.0999),
    "presence_penalty": outside,
    "n": st.sampled_from([0, -1, 129, 10**9]),
    "seed": st.integers(min_value=2**63) | st.integers(max_value=-(2**63) - 1),
    "stop": st.just("") | st.lists(st.just(""), min_size=1, max_size=2) | st.lists(text, min_size=17, max_size=20),
    "top_logprobs": st.integers(min_value=21) | st.integers(max_value=-1),
    "logprobs": st.integers(min_value=21) | st.integers(max_value=-1),
    "dimensions": st.integers(max_value=0),
    "encoding_format": text,
    "messages": st.just([]) | st.lists(st.fixed_dictionaries({"role": text, "content": junk}), min_size=1),
    "input": st.just([]) | st.lists(st.integers(min_value=400), min_size=1, max_size=2),
    "model": text,
    "response_format": st.builds(
        lambda schema: {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        st.deferred(lambda: hostile_schema),
    ),
    "tools": st.builds(
        lambda schema: [{"type": "function", "function": {"name": "f", "parameters": schema}}],
        st.deferred(lambda: hostile_schema),
    ),
}


def _nested(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


big_int = st.integers(min_value=2**64, max_value=2**80) | st.integers(max_value=-(2**63) - 1, min_value=-(2**80))
# Schemas that once made 500s: deep nesting, integers beyond 64 bits, $ref loops; and junk.
hostile_schema = st.one_of(
    st.integers(min_value=65, max_value=200).map(_nested),
    big_int.map(lambda n: {"type": "integer", "minimum": n}),
    big_int.map(lambda n: {"enum": [n]}),
    big_int.map(lambda n: {"const": n}),
    st.just({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}),
    st.dictionaries(st.text(max_size=8), junk, max_size=3),
)

part = st.fixed_dictionaries({"type": st.just("text"), "text": text})
message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "developer", "user", "assistant", "tool"]),
        "content": st.none() | text | st.lists(part, max_size=2),
    },
    optional={"name": text},
)
chat_schema = st.fixed_dictionaries(
    {"messages": st.lists(message, min_size=1, max_size=3), "max_tokens": SAMPLING["max_tokens"]},
    optional={
        **OPTIONAL,
        "max_completion_tokens": st.integers(min_value=1, max_value=3),
        "logprobs": st.booleans(),
        "top_logprobs": st.integers(min_value=0, max_value=20),
        "tools": junk,
    },
)
completion_schema = st.fixed_dictionaries(
    {"prompt": text | st.lists(text, min_size=1, max_size=3), "max_tokens": SAMPLING["max_tokens"]},
    optional={**OPTIONAL, "logprobs": st.integers(min_value=0, max_value=20), "echo": junk},
)
embedding_schema = st.fixed_dictionaries(
    {"input": text | st.lists(text, min_size=1, max_size=3) | st.lists(st.integers(0, 280), min_size=1, max_size=4)},
    optional={"model": SAMPLING["model"], "encoding_format": st.sampled_from(["float", "base64"]), "user": text},
)


@st.composite
def corrupted(draw: st.DrawFn, schema: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    """A valid body with 0 to 2 fields given a wrong type or an out-of-range value (0 about a third of the time)."""
    body = draw(schema)
    for _ in range(draw(st.integers(min_value=0, max_value=2))):
        name = draw(st.sampled_from(sorted({*body, *BAD})))
        body[name] = draw(BAD.get(name, junk) | junk)
    return body


def encode(body: Any) -> bytes:
    return json.dumps(body).encode()  # NaN and Infinity included, as some clients send them


def bodies(schema: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[bytes]:
    valid = schema.map(encode)
    return st.one_of(valid, corrupted(schema).map(encode), corrupted(schema).map(encode), junk.map(encode),
                     st.binary(max_size=40))  # fmt: skip


def check(server: ServerProcess, http: httpx.Client, path: str, body: bytes) -> None:
    response = http.post(path, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code < 500, f"{response.status_code} for {body[:300]!r}: {response.text[:500]}"
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert error["type"] in ("invalid_request_error", "rate_limit_error")
        assert error["param"] is None or isinstance(error["param"], str)
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.rstrip().endswith("data: [DONE]"), response.text[-300:]
    else:
        assert response.json()["object"] in ("chat.completion", "text_completion", "list")


@pytest.fixture(scope="module")
def http(tiny_server: ServerProcess) -> httpx.Client:
    with tiny_server.http() as client:
        yield client  # type: ignore[misc]
    assert httpx.get(f"{tiny_server.url}/health").status_code == 200
    assert "Traceback" not in tiny_server.log()


@FUZZ
@given(body=bodies(chat_schema))
def test_fuzz_chat(tiny_server: ServerProcess, http: httpx.Client, body: bytes) -> None:
    check(tiny_server, http, "/v1/chat/completions", body)


@FUZZ
@given(body=bodies(completion_schema))
def test_fuzz_completions(tiny_server: ServerProcess, http: httpx.Client, body: bytes) -> None:
    check(tiny_server, http, "/v1/completions", body)


@FUZZ
@given(body=bodies(embedding_schema))
def test_fuzz_embeddings(tiny_server: ServerProcess, http: httpx.Client, body: bytes) -> None:
    check(tiny_server, http, "/v1/embeddings", body)


def test_still_serving_after_fuzzing(tiny_server: ServerProcess, http: httpx.Client) -> None:
    response = http.post("/v1/completions", json={"prompt": "to be", "max_tokens": 2})
    assert response.status_code == 200
    assert httpx.get(f"{tiny_server.url}/health").json()["status"] == "ok"
