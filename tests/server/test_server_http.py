"""The server at the HTTP level: auth, CORS, request ids, limits, metrics, disconnects, batching."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from serving import ORIGIN, ServerProcess, metric, wait_for

ROUTES = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/embeddings"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/tiny"),
    ("GET", "/metrics"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_api_key_on_every_route(tiny_server: ServerProcess, method: str, path: str) -> None:
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": tiny_server.api_key or ""}):
        response = httpx.request(method, tiny_server.url + path, headers=headers, json={})
        assert response.status_code == 401, (headers, response.text)
        error = response.json()["error"]
        assert error["type"] == "authentication_error"
        assert error["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"
    with tiny_server.http() as http:  # the right key gets through (to a 400 for the empty body, or a 200)
        assert http.request(method, path, json={}).status_code in (200, 400)


def test_health_needs_no_key(tiny_server: ServerProcess) -> None:
    response = httpx.get(f"{tiny_server.url}/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "model": "tiny"}


def test_cors_preflight(tiny_server: ServerProcess) -> None:
    response = httpx.options(
        f"{tiny_server.url}/v1/chat/completions",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert response.status_code == 200  # answered before auth: browsers send no key in a preflight
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in response.headers["access-control-allow-methods"]
    assert "authorization" in response.headers["access-control-allow-headers"].lower()
    with tiny_server.http() as http:
        simple = http.get("/v1/models", headers={"Origin": ORIGIN})
    assert simple.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in simple.headers["access-control-expose-headers"].lower()
    other = httpx.options(
        f"{tiny_server.url}/v1/models",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "GET"},
    )
    assert other.status_code == 400
    assert "access-control-allow-origin" not in other.headers


def test_request_id(tiny_server: ServerProcess) -> None:
    with tiny_server.http() as http:
        echoed = http.get("/v1/models", headers={"X-Request-Id": "trace-42"})
        made = http.get("/v1/models")
        refused = http.post("/v1/completions", headers={"X-Request-Id": "abc"}, content=b"{")
        unsafe = http.get("/v1/models", headers={"X-Request-Id": "a b\tc"})
    assert echoed.headers["x-request-id"] == "trace-42"
    assert made.headers["x-request-id"].startswith("req-")
    assert refused.status_code == 400 and refused.headers["x-request-id"] == "abc"
    assert unsafe.headers["x-request-id"].startswith("req-")  # not echoed into headers and logs
    assert httpx.get(f"{tiny_server.url}/v1/models").headers["x-request-id"].startswith("req-")  # on a 401 too
    assert wait_for(lambda: "trace-42 GET /v1/models 200" in tiny_server.log())


def test_body_size_limit(tiny_server: ServerProcess) -> None:
    big = json.dumps({"prompt": "a" * (2 << 20), "max_tokens": 1})
    with tiny_server.http() as http:
        response = http.post("/v1/completions", content=big, headers={"Content-Type": "application/json"})
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"

        def chunks():  # no Content-Length: the limit holds while reading
            for _ in range(40):
                yield b" " * 65536

        assert http.post("/v1/chat/completions", content=chunks()).status_code == 413
        assert http.get("/v1/models").status_code == 200


def test_huge_prompt_is_refused_with_its_length(tiny_server: ServerProcess) -> None:
    with tiny_server.http() as http:  # measured in a worker thread: other streams go on meanwhile
        response = http.post("/v1/completions", json={"prompt": "to be " * 100_000, "max_tokens": 1})
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("prompt", "context_length_exceeded")
    assert "600000" in error["message"] and "512" in error["message"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
@pytest.mark.parametrize(
    "body",
    [b"", b"{", b"[1, 2]", b'"prompt"', b"\xff\xfe\x00", b'{"prompt": "\\udc00", "input": "\\ud800"}', b"[" * 50_000],
)
def test_bad_bodies(tiny_server: ServerProcess, path: str, body: bytes) -> None:
    with tiny_server.http() as http:
        response = http.post(path, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"]


def test_unknown_route_and_method(tiny_server: ServerProcess) -> None:
    with tiny_server.http() as http:
        missing = http.get("/v1/nothing")
        wrong = http.get("/v1/chat/completions")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "invalid_request_error"
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"


def test_metrics(tiny_server: ServerProcess) -> None:
    with tiny_server.http() as http:
        http.post("/v1/completions", json={"prompt": "to be", "max_tokens": 3})
        with http.stream("POST", "/v1/completions", json={"prompt": "to", "max_tokens": 4, "stream": True}) as r:
            r.read()
        http.post("/v1/completions", json={"prompt": "to be", "max_tokens": "3"})
    text = tiny_server.metrics()
    assert metric(text, "forge_requests_total", route="/v1/completions", status="200") >= 2
    assert metric(text, "forge_requests_total", route="/v1/completions", status="400") >= 1
    assert metric(text, "forge_prompt_tokens_total") >= 7
    assert metric(text, "forge_generation_tokens_total") >= 7
    # How many observations the latency histograms hold (one stream was served), not how long anything took.
    assert metric(text, "forge_time_to_first_token_seconds_count") >= 1
    assert metric(text, "forge_inter_token_latency_seconds_count") >= 1
    for name in ("forge_queue_depth", "forge_running_requests", "forge_batch_size_max", "forge_generations_in_flight"):
        assert f"# TYPE {name} gauge" in text
    assert "# TYPE forge_batch_size histogram" in text
    assert 'forge_batch_size_bucket{le="+Inf"}' in text


def test_stream_cancelled_on_disconnect(tiny_server: ServerProcess) -> None:
    cancelled = lambda: metric(tiny_server.metrics(), "forge_requests_cancelled_total", route="/v1/completions")
    freed = lambda: metric(tiny_server.metrics(), "forge_engine_cancelled_total")
    before, freed_before = cancelled(), freed()
    body = {"prompt": "to be", "max_tokens": 500, "stream": True, "temperature": 0}
    with tiny_server.http() as http, http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        events = 0
        for line in response.iter_lines():
            events += line.startswith("data: {")
            if events == 3:
                break  # leaving the blocks closes the connection mid-stream
    assert wait_for(lambda: cancelled() == before + 1), tiny_server.log()
    assert wait_for(lambda: freed() == freed_before + 1)  # the engine freed its batch slot
    assert metric(tiny_server.metrics(), "forge_running_requests") == 0
    with tiny_server.http() as http:  # and the server goes on serving
        response = http.post("/v1/completions", json={"prompt": "to be", "max_tokens": 2})
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 2


def test_request_cancelled_on_disconnect(tiny_server: ServerProcess) -> None:
    cancelled = lambda: metric(tiny_server.metrics(), "forge_requests_cancelled_total", route="/v1/chat/completions")
    freed = lambda: metric(tiny_server.metrics(), "forge_engine_cancelled_total")
    before, freed_before = cancelled(), freed()
    body = {"messages": [{"role": "user", "content": "to be"}], "max_tokens": 480, "temperature": 0}
    with tiny_server.http(timeout=0.2) as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/chat/completions", json=body)
    assert wait_for(lambda: cancelled() == before + 1), tiny_server.log()
    assert wait_for(lambda: freed() == freed_before + 1)
    assert wait_for(lambda: "POST /v1/chat/completions 499" in tiny_server.log())


def test_concurrent_requests_decode_together(tiny_server: ServerProcess) -> None:
    async def one(client: httpx.AsyncClient, i: int) -> str:
        body = {"prompt": f"to be {i}", "max_tokens": 48, "stream": True, "seed": i}
        text = []
        async with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    text += [c["text"] for c in json.loads(line[6:])["choices"]]
        return "".join(text)

    async def run() -> list[str]:
        async with httpx.AsyncClient(base_url=tiny_server.url, headers=tiny_server.headers, timeout=60) as client:
            return await asyncio.gather(*(one(client, i) for i in range(8)))

    steps_before = metric(tiny_server.metrics(), "forge_engine_steps_total")
    texts = asyncio.run(run())
    assert len(texts) == 8 and all(texts)
    text = tiny_server.metrics()
    assert metric(text, "forge_batch_size_max") > 1
    # 8 x 48 tokens took far fewer than 8 x 48 steps: the streams shared them.
    assert metric(text, "forge_engine_steps_total") - steps_before < 8 * 48 * 0.75
    assert metric(text, "forge_batch_size_count") == metric(text, "forge_engine_steps_total")
