"""POST /v1/responses through the official openai client, against a real `forge serve` SmolLM2.

Text and message input, instructions, the typed streaming events, function tools and their outputs,
text.format JSON schemas, stored conversations (previous_response_id), usage and OpenAI-style errors.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pydantic
import pytest
from serving import ServerProcess

from forge import models
from forge.server.responses_api import ResponseStore

GREEDY: dict[str, Any] = {"temperature": 0}
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"],
    },
}
CITY = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "landmarks": {"type": "array", "items": {"type": "string"}}},
    "required": ["city", "landmarks"],
}


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    try:
        path = models.locate("smollm2")
    except Exception as e:
        pytest.skip(f"SmolLM2 is not installed: {e}")
    server = ServerProcess(path, log=tmp_path_factory.mktemp("responses") / "serve.log")
    try:
        yield server.ready(timeout=600)  # a loaded machine takes minutes to import torch and load the model
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(smol: ServerProcess) -> openai.OpenAI:
    return smol.client()


def test_text_input_gives_a_message_with_usage(client: openai.OpenAI, smol: ServerProcess) -> None:
    r = client.responses.create(model=smol.model_id, input="Name a colour.", max_output_tokens=12, **GREEDY)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == smol.model_id
    assert r.status in ("completed", "incomplete")
    [item] = r.output
    assert item.type == "message" and item.role == "assistant" and item.status == "completed"
    assert r.output_text and item.content[0].type == "output_text" and item.content[0].text == r.output_text
    assert r.usage is not None and 0 < r.usage.output_tokens <= 12
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    if r.status == "incomplete":
        assert r.incomplete_details is not None and r.incomplete_details.reason == "max_output_tokens"
        assert r.usage.output_tokens == 12


def test_message_input_and_instructions(client: openai.OpenAI, smol: ServerProcess) -> None:
    messages = [{"role": "user", "content": [{"type": "input_text", "text": "Name a colour."}]}]
    plain = client.responses.create(model=smol.model_id, input=messages, max_output_tokens=4, **GREEDY)
    text = client.responses.create(model=smol.model_id, input="Name a colour.", max_output_tokens=4, **GREEDY)
    assert plain.output_text == text.output_text  # the same conversation, two spellings
    told = client.responses.create(
        model=smol.model_id, input=messages, instructions="Answer in French.", max_output_tokens=4, **GREEDY
    )
    assert told.instructions == "Answer in French."
    # The instructions are the system message: the same prompt and answer as chat's.
    chat = client.chat.completions.create(
        model=smol.model_id,
        messages=[{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Name a colour."}],
        max_tokens=4,
        **GREEDY,
    )
    assert told.usage is not None and chat.usage is not None and plain.usage is not None
    assert told.usage.input_tokens == chat.usage.prompt_tokens != plain.usage.input_tokens
    assert told.output_text == chat.choices[0].message.content


def test_streaming_events_rebuild_the_same_response(client: openai.OpenAI, smol: ServerProcess) -> None:
    options: dict[str, Any] = {"model": smol.model_id, "input": "Write a haiku.", "max_output_tokens": 16, **GREEDY}
    whole = client.responses.create(**options)
    with client.responses.stream(**options) as stream:
        events = list(stream)
    final = events[-1].response  # type: ignore[union-attr]  # (the client's get_final_response: completed only)
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        f"response.{whole.status}",
    ]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text == whole.output_text
    assert final.usage is not None and whole.usage is not None
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_function_tools_and_their_outputs(client: openai.OpenAI, smol: ServerProcess) -> None:
    question = "What is the weather in Paris, in celsius?"
    first = client.responses.create(
        model=smol.model_id, input=question, tools=[WEATHER], tool_choice="required", max_output_tokens=60, **GREEDY
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert [c.name for c in calls] == ["get_weather"]
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["parameters"])
    assert calls[0].call_id and calls[0].status == "completed"
    # The client runs the tool and sends its output back, continuing the stored conversation.
    answer = client.responses.create(
        model=smol.model_id,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "22 degrees, sunny"}],
        tools=[WEATHER],
        max_output_tokens=24,
        **GREEDY,
    )
    assert answer.output_text and answer.previous_response_id == first.id
    assert answer.usage is not None and first.usage is not None
    assert answer.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens - 5
    # The same, with the whole conversation sent back instead of stored.
    sent = [
        {"role": "user", "content": question},
        {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather", "arguments": calls[0].arguments},
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "22 degrees, sunny"},
    ]
    resent = client.responses.create(
        model=smol.model_id, input=sent, tools=[WEATHER], max_output_tokens=24, store=False, **GREEDY
    )
    assert resent.output_text == answer.output_text


def test_a_streamed_function_call(client: openai.OpenAI, smol: ServerProcess) -> None:
    with client.responses.stream(
        model=smol.model_id,
        input="What is the weather in Tokyo?",
        tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=60,
        **GREEDY,
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds and kinds[-1] == "response.completed"
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    [call] = [item for item in final.output if item.type == "function_call"]
    assert call.name == "get_weather" and deltas == done.arguments == call.arguments
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])


class City(pydantic.BaseModel):
    city: str
    landmarks: list[str]


def test_text_format_json_schema_always_parses_even_when_short(client: openai.OpenAI, smol: ServerProcess) -> None:
    fmt = {"format": {"type": "json_schema", "name": "city", "schema": CITY, "strict": True}}
    for seed, budget in ((1, 20), (2, 40)):  # a free string and an open list: the budget closes them
        r = client.responses.create(
            model=smol.model_id,
            input="Describe Paris at length, as JSON.",
            text=fmt,  # type: ignore[arg-type]
            max_output_tokens=budget,
            temperature=0.8,
            extra_body={"seed": seed},
        )
        assert r.status == "completed", r.output_text
        jsonschema.validate(json.loads(r.output_text), CITY)
    parsed = client.responses.parse(
        model=smol.model_id, input="Describe Rome as JSON.", text_format=City, max_output_tokens=40, **GREEDY
    )
    assert isinstance(parsed.output_parsed, City)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=smol.model_id, input="Paris", text=fmt, max_output_tokens=3)  # type: ignore[arg-type]
    assert e.value.body["param"] == "max_output_tokens"  # type: ignore[index]
    assert "max_output_tokens=3 cannot hold" in e.value.body["message"]  # type: ignore[index]


def test_stored_conversations(client: openai.OpenAI, smol: ServerProcess) -> None:
    first = client.responses.create(model=smol.model_id, input="My name is Ada.", max_output_tokens=8, **GREEDY)
    second = client.responses.create(
        model=smol.model_id, previous_response_id=first.id, input="What is my name?", max_output_tokens=8, **GREEDY
    )
    alone = client.responses.create(model=smol.model_id, input="What is my name?", max_output_tokens=8, **GREEDY)
    assert second.usage is not None and alone.usage is not None and first.usage is not None
    assert second.usage.input_tokens >= alone.usage.input_tokens + first.usage.output_tokens
    assert client.responses.retrieve(first.id).output_text == first.output_text
    unstored = client.responses.create(model=smol.model_id, input="Hi", max_output_tokens=2, store=False)
    for missing in (unstored.id, "resp_nope"):
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(model=smol.model_id, previous_response_id=missing, input="Hi", max_output_tokens=2)
        assert e.value.code == "previous_response_not_found"
        assert e.value.body["param"] == "previous_response_id"  # type: ignore[index]
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)


def test_errors_are_openai_shaped(smol: ServerProcess) -> None:
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"input": "Hi", "max_output_tokens": -1}, 400, "max_output_tokens"),
        ({"input": "Hi", "max_output_tokens": "9"}, 400, "max_output_tokens"),
        ({"input": "Hi", "tool_choice": "required"}, 400, "tool_choice"),
        ({"input": []}, 400, "input"),
        ({"input": [{"role": "robot", "content": "Hi"}]}, 400, "input[0]"),
        (
            {"input": "Hi", "text": {"format": {"type": "json_schema", "schema": {"type": 3}}}},
            400,
            "text.format.schema",
        ),
        ({"input": "Hi", "model": "gpt-9"}, 404, "model"),
    ]
    with smol.http() as http:
        for body, status, param in cases:
            response = http.post("/v1/responses", json=body)
            assert response.status_code == status, (body, response.text)
            error = response.json()["error"]
            assert error["param"] is not None and error["param"].startswith(param), (body, error)
            assert error["type"] and error["message"]
        assert http.get("/v1/responses/resp_missing").status_code == 404
    assert httpx.post(f"{smol.url}/v1/responses", json={"input": "Hi"}).status_code == 401  # the API key holds


def test_the_store_is_bounded_by_count_and_size() -> None:
    store = ResponseStore(max_items=2, max_bytes=10_000)
    for name in ("a", "b", "c"):
        store.put(name, {"id": name}, [{"role": "user", "content": name}])
    assert store.get("a") is None and store.get("b") is not None and len(store) == 2
    store.get("b")  # b is now the most recently used: c goes first
    store.put("d", {"id": "d"}, [])
    assert store.get("c") is None and store.get("b") is not None
    store.put("big", {"id": "big"}, [{"role": "user", "content": "x" * 6000}])
    store.put("big2", {"id": "big2"}, [{"role": "user", "content": "y" * 6000}])
    assert store.get("big") is None and store.get("big2") is not None and store.size <= 10_000
    store.put("huge", {"id": "huge"}, [{"role": "user", "content": "z" * 20_000}])  # larger than the store
    assert store.get("huge") is None and store.get("big2") is not None
