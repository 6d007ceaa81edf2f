"""Tool calling and structured output against a real `forge serve` SmolLM2, through the official openai client."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from serving import ServerProcess

from forge import models

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The local time in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20}},
                "required": ["city"],
            },
        },
    },
]
QUESTION = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]


@pytest.fixture(scope="module")
def smol_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    try:
        smol = models.locate("smollm2")
    except Exception as e:
        pytest.skip(f"SmolLM2 is not installed: {e}")
    server = ServerProcess(smol, log=tmp_path_factory.mktemp("tools") / "serve.log")
    yield server.ready(timeout=180)
    server.stop()


def test_tool_call_round_trip(smol_server: ServerProcess) -> None:
    """The whole flow: the model calls a tool, the client runs it and sends the result, the model answers."""
    client = smol_server.client()
    first = client.chat.completions.create(
        model=smol_server.model_id, messages=QUESTION, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=64
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in ("get_weather", "get_time")
    arguments = json.loads(call.function.arguments)  # valid JSON for the tool's schema, by construction
    if call.function.name == "get_weather":
        assert arguments["city"] in ("Paris", "London", "Tokyo") and arguments["unit"] in ("celsius", "fahrenheit")
    else:
        assert set(arguments) == {"city"} and len(arguments["city"]) <= 20
    followup = [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees celsius and sunny"},
    ]
    answer = client.chat.completions.create(
        model=smol_server.model_id, messages=followup, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=40
    )
    assert answer.choices[0].finish_reason in ("stop", "length")
    content = answer.choices[0].message.content
    assert content and not answer.choices[0].message.tool_calls
    # The model read the result and answered from it (it used to copy back "<tool_response>..." or ignore it).
    assert ("18" in content or "sunny" in content) and "tool_response" not in content, content


def test_named_tool_choice_and_streamed_deltas(smol_server: ServerProcess) -> None:
    """A named tool is the one called; streamed deltas rebuild exactly the non-streamed call."""
    client = smol_server.client()
    named = {"type": "function", "function": {"name": "get_time"}}
    whole = client.chat.completions.create(
        model=smol_server.model_id, messages=QUESTION, tools=TOOLS, tool_choice=named, temperature=0, max_tokens=64
    )
    calls = whole.choices[0].message.tool_calls
    assert {c.function.name for c in calls} == {"get_time"} and whole.choices[0].finish_reason == "tool_calls"
    stream = client.chat.completions.create(
        model=smol_server.model_id,
        messages=QUESTION,
        tools=TOOLS,
        tool_choice=named,
        temperature=0,
        max_tokens=64,
        stream=True,
    )
    streamed: dict[int, dict[str, str]] = {}
    finish, pieces = None, 0
    for chunk in stream:
        delta = chunk.choices[0].delta
        for tc in delta.tool_calls or []:
            if tc.id:  # a call opens with its id and name, then its arguments arrive in pieces
                assert tc.index == len(streamed) and tc.type == "function"
                streamed[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
            streamed[tc.index]["arguments"] += tc.function.arguments or ""
            pieces += 1
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and pieces > 2 * len(streamed)
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed.values()] == [
        (c.function.name, json.loads(c.function.arguments)) for c in calls
    ]
    single = client.chat.completions.create(
        model=smol_server.model_id,
        messages=QUESTION,
        tools=TOOLS,
        tool_choice=named,
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=64,
    )
    assert len(single.choices[0].message.tool_calls) == 1


def test_parallel_tool_calls_never_repeat_a_call(smol_server: ServerProcess) -> None:
    """parallel_tool_calls (on by default): SmolLM2 writes its call again and again; each call comes back once."""
    client = smol_server.client()
    options = {"model": smol_server.model_id, "messages": QUESTION, "tools": TOOLS, "tool_choice": "required"}
    whole = client.chat.completions.create(**options, temperature=0, max_tokens=160)
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in whole.choices[0].message.tool_calls]
    assert calls and len({json.dumps(c, sort_keys=True) for c in calls}) == len(calls), calls
    streamed: dict[int, list[str]] = {}
    for chunk in client.chat.completions.create(**options, temperature=0, max_tokens=160, stream=True):
        for tc in chunk.choices[0].delta.tool_calls or []:
            streamed.setdefault(tc.index, [tc.function.name or "", ""])[1] += tc.function.arguments or ""
    assert [(name, json.loads(arguments)) for name, arguments in streamed.values()] == calls


def test_auto_may_answer_in_text_and_none_never_calls(smol_server: ServerProcess) -> None:
    client = smol_server.client()
    chat = [{"role": "user", "content": "Say hello."}]
    none = client.chat.completions.create(
        model=smol_server.model_id, messages=chat, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=16
    )
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content
    auto = client.chat.completions.create(
        model=smol_server.model_id, messages=chat, tools=TOOLS, temperature=0, max_tokens=16
    )
    message = auto.choices[0].message
    # Either is valid under "auto"; whichever it is, it is well-formed.
    if message.tool_calls:
        assert auto.choices[0].finish_reason == "tool_calls"
        json.loads(message.tool_calls[0].function.arguments)
    else:
        assert message.content and "<tool_call>" not in message.content


def test_response_format_json_schema_and_json_object(smol_server: ServerProcess) -> None:
    client = smol_server.client()
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 30},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 3},
        },
        "required": ["name", "age", "pets"],
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
    messages = [{"role": "user", "content": "Invent a person."}]
    r = client.chat.completions.create(
        model=smol_server.model_id, messages=messages, response_format=fmt, temperature=0.7, seed=1, max_tokens=80
    )
    person = json.loads(r.choices[0].message.content)
    assert set(person) == {"name", "age", "pets"} and 0 <= person["age"] <= 120
    assert len(person["pets"]) <= 3 and set(person["pets"]) <= {"cat", "dog"}
    stream = client.chat.completions.create(
        model=smol_server.model_id,
        messages=messages,
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=80,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert isinstance(json.loads(text), dict)


def test_bad_tool_requests_are_400s(smol_server: ServerProcess) -> None:
    with smol_server.http() as http:
        base = {"model": smol_server.model_id, "messages": QUESTION}
        unknown = http.post(
            "/v1/chat/completions",
            json={**base, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        )
        assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "tool_choice"
        assert "nope" in unknown.json()["error"]["message"]
        bad_schema = http.post(
            "/v1/chat/completions",
            json={
                **base,
                "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}},
            },
        )
        assert bad_schema.status_code == 400, bad_schema.text
        assert bad_schema.json()["error"]["param"] == "response_format.json_schema.schema"
        bad_tool = http.post("/v1/chat/completions", json={**base, "tools": [{"type": "function", "function": {}}]})
        assert bad_tool.status_code == 400 and "tools[0].function.name" in bad_tool.json()["error"]["param"]
        no_tools = http.post("/v1/chat/completions", json={**base, "tool_choice": "required"})
        assert no_tools.status_code == 400 and no_tools.json()["error"]["param"] == "tool_choice"
        alive = http.post("/v1/chat/completions", json={**base, "max_tokens": 2})
        assert alive.status_code == 200
