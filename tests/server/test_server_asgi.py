"""`create_server(app)` as a plain ASGI app: mounted in another Starlette app, validated up front."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient

from forge.app import Forge
from forge.errors import ConfigError, GenerationError
from forge.middleware import Context, Next, RateLimitError, cache
from forge.server import ServerConfig, create_server
from forge.server.protocol import Servable

KEY = {"Authorization": "Bearer sk-mounted"}


@pytest.fixture(scope="module")
def mounted(bigram_chat_dir: Path) -> TestClient:
    server = create_server(Forge.load(bigram_chat_dir, device="cpu"), api_key="sk-mounted", model_name="bigram")
    outer = Starlette(routes=[Mount("/api", app=server)])
    return TestClient(outer)  # the mounted app's lifespan does not run: generation takes the plain path


def test_mounted_routes_and_auth(mounted: TestClient) -> None:
    assert mounted.get("/api/health").json() == {"status": "ok", "model": "bigram"}  # open, below the mount too
    assert mounted.get("/api/v1/models").status_code == 401
    assert mounted.get("/api/v1/models", headers=KEY).json()["data"][0]["id"] == "bigram"


def test_mounted_generation(mounted: TestClient) -> None:
    body = {"prompt": "a", "max_tokens": 4, "temperature": 0}
    response = mounted.post("/api/v1/completions", json=body, headers=KEY)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == "bcde"
    with mounted.stream("POST", "/api/v1/completions", json={**body, "stream": True}, headers=KEY) as stream:
        lines = [line for line in stream.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"


def test_untrained_app_is_refused() -> None:
    with pytest.raises(ConfigError, match="trained model"):
        create_server(Forge("tiny", device="cpu"))


def test_context_is_checked_against_the_model(bigram_chat_dir: Path) -> None:
    app = Forge.load(bigram_chat_dir, device="cpu")
    with pytest.raises(ConfigError, match="context"):
        create_server(app, context=65)
    create_server(app, context=64)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"max_batch": 0}, "max_batch"),
        ({"max_queue": 0}, "max_queue"),
        ({"max_body_size": -1}, "max_body_size"),
        ({"api_key": ""}, "api_key"),
        ({"cors_origins": [""]}, "cors_origins"),
        ({"context": 1}, "context"),
        ({"header_timeout": 0}, "header_timeout"),
        ({"body_timeout": 1e9}, "body_timeout"),
        ({"compile_timeout": "10"}, "compile_timeout"),
        ({"max_connections": 0}, "max_connections"),
        ({"schema_limits": {"max_depth": 3}}, "schema_limits"),
    ],
)
def test_bad_options(options: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=f"ServerConfig.{field}"):
        ServerConfig(**options)  # type: ignore[arg-type]


# -- the app's middleware, seen through HTTP -------------------------------------------------------------------------


async def _explode(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    count = 0
    async for piece in chunks:
        yield piece
        count += 1
        if count == 2:
            raise GenerationError("exploded mid-stream")


@pytest.fixture(scope="module")
def with_middleware(bigram_chat_dir: Path) -> tuple[TestClient, list[dict[str, object]]]:
    seen: list[dict[str, object]] = []

    async def record(ctx: Context, next: Next) -> None:
        seen.append(dict(ctx.meta))
        if ctx.prompt.startswith("busy"):
            raise RateLimitError("too many requests from this user")
        await next()
        if ctx.stream and ctx.prompt.startswith("boom"):
            ctx.chunks = _explode(ctx.chunks)  # type: ignore[arg-type]

    app = Forge.load(bigram_chat_dir, device="cpu").use(cache()).use(record)
    return TestClient(create_server(app)), seen


def test_middleware_sees_the_request(with_middleware: tuple[TestClient, list[dict[str, object]]]) -> None:
    client, seen = with_middleware
    response = client.post(
        "/v1/completions", json={"prompt": "a", "max_tokens": 2, "user": "bob"}, headers={"X-Request-Id": "r-1"}
    )
    assert response.json()["choices"][0]["text"] == "bc"
    assert seen[-1] == {"request_id": "r-1", "user": "bob"}


def test_cache_hit_counts_usage_with_the_tokenizer(with_middleware: tuple[TestClient, list[dict[str, object]]]) -> None:
    client, _ = with_middleware
    body = {"prompt": "c", "max_tokens": 3, "temperature": 0, "logprobs": 1}
    first = client.post("/v1/completions", json=body).json()
    again = client.post("/v1/completions", json=body).json()  # answered by the cache: no model, no logprobs
    assert first["choices"][0]["text"] == again["choices"][0]["text"] == "def"
    assert first["choices"][0]["logprobs"] is not None and again["choices"][0]["logprobs"] is None
    assert again["usage"] == {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}


def test_middleware_error_keeps_its_status(with_middleware: tuple[TestClient, list[dict[str, object]]]) -> None:
    client, _ = with_middleware
    response = client.post("/v1/completions", json={"prompt": "busy", "max_tokens": 2})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"] == {
        "message": "too many requests from this user",
        "type": "rate_limit_error",
        "param": None,
        "code": None,
    }
    stream = client.post("/v1/completions", json={"prompt": "busy", "max_tokens": 2, "stream": True})
    assert stream.status_code == 429  # refused before the stream started: a status, not an event


def test_error_mid_stream_is_an_event(with_middleware: tuple[TestClient, list[dict[str, object]]]) -> None:
    client, _ = with_middleware
    body = {"prompt": "boom a", "max_tokens": 6, "temperature": 0, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == "bc"
    assert chunks[-1]["error"]["message"] == "exploded mid-stream"
    assert client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1}).status_code == 200


# -- the seam: the server maps JSON to the app's requests and back, through the Servable protocol only -----------
class OnlyServable:
    """A Forge app seen through :class:`Servable` alone: the server fails if it reaches for anything else."""

    def __init__(self, app: Forge) -> None:
        self._app = app

    def __getattr__(self, name: str) -> object:
        if name not in PROTOCOL:
            raise AttributeError(f"the server used {name!r}, which is not part of Servable")
        return getattr(self._app, name)


PROTOCOL = {name for name in dir(Servable) if not name.startswith("_")}


@pytest.fixture(scope="module")
def seam(bigram_chat_dir: Path) -> Iterator[TestClient]:
    app = OnlyServable(Forge.load(bigram_chat_dir, device="cpu"))
    with TestClient(create_server(app)) as client:  # with its lifespan: the batching engine runs
        yield client


def test_forge_is_servable(bigram_chat_dir: Path) -> None:
    assert isinstance(Forge.load(bigram_chat_dir, device="cpu"), Servable)


def test_the_server_needs_only_the_servable_protocol(seam: TestClient) -> None:
    body = {"prompt": "a", "max_tokens": 4, "temperature": 0, "logprobs": 1}
    assert seam.post("/v1/completions", json=body).json()["choices"][0]["text"] == "bcde"
    chat = {"messages": [{"role": "user", "content": "a"}], "max_tokens": 3, "temperature": 0, "stream": True}
    with seam.stream("POST", "/v1/chat/completions", json=chat) as response:
        assert response.status_code == 200
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1]) == "bcd"
    assert seam.post("/v1/embeddings", json={"input": "abc"}).status_code == 200
    assert "\nforge_max_batch 8\n" in seam.get("/metrics").text  # the engine the lifespan started, through the protocol


def test_a_prompt_past_the_context_names_its_index(seam: TestClient) -> None:
    response = seam.post("/v1/completions", json={"prompt": ["a", "a" * 100], "max_tokens": 1})
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("prompt[1]", "context_length_exceeded")
    assert "100" in error["message"] and "64" in error["message"]
    streamed = seam.post("/v1/completions", json={"prompt": ["a" * 100, "a"], "max_tokens": 1, "stream": True})
    assert streamed.status_code == 400  # refused before the stream started: a status, not an event
    assert streamed.json()["error"]["param"] == "prompt[0]"


def test_max_completion_tokens_past_the_context_names_that_field(seam: TestClient) -> None:
    body = {"messages": [{"role": "user", "content": "a" * 10}], "max_completion_tokens": 60}
    response = seam.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("max_completion_tokens", "context_length_exceeded")
    for count in ("64", "10", "60", "70", "54"):
        assert count in error["message"]
