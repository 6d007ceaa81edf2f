"""Hostile requests, in process: client-made work stays off the event loop, and client mistakes are 4xx, not 500."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from forge import structured
from forge.app import Forge
from forge.server import create_server
from forge.server.app import EMBED_BATCH

CHAT = [{"role": "user", "content": "a"}]


class FakeRetriever:
    """Records the filters it is asked with; a real store would fail on objects or nested lists."""

    def __init__(self) -> None:
        self.filters: list[Any] = []

    def search(self, query: str, k: int, filter: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        self.filters.append(filter)
        return []

    def augment(
        self, messages: Sequence[Mapping[str, str]], k: int, mode: str = "quote"
    ) -> tuple[list[dict[str, str]], list[Any], None]:
        return [dict(m) for m in messages], [], None


@pytest.fixture(scope="module")
def bigram_app(bigram_chat_dir: Path) -> Forge:
    return Forge.load(bigram_chat_dir, device="cpu")


@pytest.fixture(scope="module")
def client(bigram_app: Forge) -> Iterator[TestClient]:
    with TestClient(create_server(bigram_app, model_name="bigram", retriever=FakeRetriever())) as client:
        yield client


def _nested(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def _format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


@pytest.mark.parametrize(
    "schema",
    [
        _nested(120),
        {"type": "integer", "minimum": 2**64},
        {"type": "object", "properties": {"n": {"enum": [1, 2**64]}}},
        {"const": -(2**65)},
        {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(1500)}},
        {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
    ],
    ids=["deep", "minimum", "enum", "const", "wide", "recursive-ref"],
)
def test_hostile_schemas_are_400s(client: TestClient, schema: dict[str, Any]) -> None:
    body = {"messages": CHAT, "max_tokens": 2, "response_format": _format(schema)}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "response_format.json_schema.schema"
    assert "<state>" not in error["message"] and len(error["message"]) < 500
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    r = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2, "tools": [tool]})
    assert r.status_code in (200, 400), r.text  # (the bigram's 64-token context can't hold a tools prompt)
    if r.status_code == 400:
        assert r.json()["error"]["param"] in ("tools", "messages") and "<state>" not in r.json()["error"]["message"]


def test_a_tool_message_needs_its_call_id(client: TestClient) -> None:
    messages = [*CHAT, {"role": "tool", "content": "42"}]
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "messages[1].tool_call_id"


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
def test_unknown_model_names_are_404s(client: TestClient, route: str, bigram_chat_dir: Path) -> None:
    body = {"messages": CHAT, "prompt": "a", "input": "a", "max_tokens": 1}
    r = client.post(route, json={**body, "model": "gpt-4"})
    assert r.status_code == 404
    assert r.json()["error"] == {
        "message": r.json()["error"]["message"],
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }
    assert "'bigram'" in r.json()["error"]["message"]
    for name in ("bigram", bigram_chat_dir.name, str(bigram_chat_dir)):  # the id, and the documented aliases
        assert client.post(route, json={**body, "model": name}).status_code == 200


@pytest.mark.parametrize("value", [{"a": 1}, [[1, 2]], [{"x": 1}], [1, [2]]])
def test_rag_filters_of_the_wrong_shape_are_400s(client: TestClient, value: Any) -> None:
    retriever: FakeRetriever = client.app.state.forge.config.retriever  # type: ignore[attr-defined]
    r = client.post("/v1/rag/query", json={"query": "q", "filter": {"tag": value}})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "filter"
    assert not retriever.filters  # refused before the store saw it
    ok = client.post("/v1/rag/query", json={"query": "q", "filter": {"tag": ["a", 1, None], "n": 2.5}})
    assert ok.status_code == 200 and retriever.filters.pop() == {"tag": ["a", 1, None], "n": 2.5}


def test_embeddings_get_429_when_the_server_is_full(bigram_app: Forge) -> None:
    with TestClient(create_server(bigram_app, max_batch=1, max_queue=1)) as client:
        assert client.post("/v1/embeddings", json={"input": "ab"}).status_code == 200
        admission = client.app.state.forge.admission  # type: ignore[attr-defined]
        admission.in_flight = admission.capacity  # as if generations filled every slot
        r = client.post("/v1/embeddings", json={"input": "ab"})
        assert r.status_code == 429 and r.headers["retry-after"]
        assert r.json()["error"]["code"] == "queue_full"


def test_embeddings_stop_when_the_client_leaves(bigram_app: Forge, monkeypatch: pytest.MonkeyPatch) -> None:
    """The client disconnects once the first batch is being computed: the rest are never computed."""
    computed: list[int] = []
    left = asyncio.Event()
    real_embed = bigram_app.embed

    async def embed(texts: Sequence[str]) -> list[list[float]]:
        computed.append(len(texts))
        left.set()
        await asyncio.sleep(0.05)  # the disconnect arrives while this batch runs
        return await real_embed(list(texts))

    monkeypatch.setattr(bigram_app, "embed", embed)
    server = create_server(bigram_app, batching=False)
    body = json.dumps({"input": ["abc"] * (EMBED_BATCH * 5)}).encode()
    sent: list[dict[str, Any]] = []

    async def main() -> None:
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            await left.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "method": "POST",
            "path": "/v1/embeddings",
            "raw_path": b"/v1/embeddings",
            "query_string": b"",
            "headers": [(b"content-type", b"application/json")],
            "http_version": "1.1",
            "scheme": "http",
            "server": ("test", 80),
            "client": ("test", 1),
            "root_path": "",
        }
        await server(scope, receive, send)

    asyncio.run(main())
    assert computed == [EMBED_BATCH]  # one batch of five, then it stopped
    assert sent[0]["status"] == 499


def test_health_answers_while_a_big_schema_compiles(bigram_app: Forge, monkeypatch: pytest.MonkeyPatch) -> None:
    """The schema's compilation waits (in its thread) until /health has answered: on the loop, it could not."""
    health_answered = threading.Event()
    waited: list[bool] = []
    real = structured.Grammar.json_schema.__func__  # type: ignore[attr-defined]

    def slow_compile(cls: type[structured.Grammar], *args: Any, **kwargs: Any) -> structured.Grammar:
        waited.append(health_answered.wait(timeout=10))  # False: the loop was blocked while it waited
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(structured.Grammar, "json_schema", classmethod(slow_compile))
    schema = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(900)}}
    order: list[str] = []

    async def main() -> None:
        server = create_server(bigram_app, batching=False)
        transport = httpx.ASGITransport(app=server)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as http:

            async def big() -> None:
                body = {"messages": CHAT, "max_tokens": 1, "response_format": _format(schema)}
                await http.post("/v1/chat/completions", json=body)
                order.append("schema")

            async def health() -> None:
                await asyncio.sleep(0.2)  # the schema request is compiling by now
                assert (await http.get("/health")).status_code == 200
                order.append("health")
                health_answered.set()

            await asyncio.gather(big(), health())

    asyncio.run(main())
    assert waited == [True]
    assert order == ["health", "schema"]
