"""A full queue answers 429 with Retry-After; a shutdown lets requests in flight finish.

The server here runs with ``--max-batch 1 --max-queue 1``: two generations at once.
The shutdown test stops it, so it comes last.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading

import httpx
import openai
import pytest
from serving import ServerProcess, metric

SLOW = {"prompt": "to be", "max_tokens": 200, "temperature": 0}


def test_full_queue_is_429_with_retry_after(queue_server: ServerProcess) -> None:
    async def one(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post("/v1/completions", json=SLOW)

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=queue_server.url, headers=queue_server.headers, timeout=60) as client:
            return await asyncio.gather(*(one(client) for _ in range(6)))

    responses = asyncio.run(run())
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) >= 1 and statuses.count(429) >= 1, statuses
    assert set(statuses) == {200, 429}
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            error = r.json()["error"]
            assert (error["type"], error["code"]) == ("rate_limit_error", "queue_full")
    # Once the queue has room again the server answers, and the client sees 429s as RateLimitError.
    with queue_server.http() as http:
        assert http.post("/v1/completions", json={**SLOW, "max_tokens": 2}).status_code == 200
    assert metric(queue_server.metrics(), "forge_requests_total", route="/v1/completions", status="429") >= 1


def test_rate_limit_error_in_the_client(queue_server: ServerProcess) -> None:
    client = queue_server.client()
    errors: list[Exception] = []

    def call() -> None:
        try:
            client.completions.create(model="tiny", **SLOW)
        except openai.RateLimitError as e:
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors, "no request was refused"
    assert errors[0].status_code == 429
    assert errors[0].response.headers["retry-after"]


def test_more_choices_than_capacity_is_400(queue_server: ServerProcess) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        queue_server.client().completions.create(model="tiny", prompt="a", max_tokens=1, n=3)
    assert e.value.param == "n"


def test_graceful_shutdown_finishes_the_stream(queue_server: ServerProcess) -> None:
    body = {**SLOW, "stream": True}
    events = []
    with queue_server.http() as http, http.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
                break
        queue_server.proc.send_signal(signal.SIGINT)  # what Ctrl-C does
        rest = list(lines)
    events += [json.loads(line[6:]) for line in rest if line.startswith("data: {")]
    assert "data: [DONE]" in rest
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(len(e["choices"][0]["text"]) > 0 for e in events) > 1
    code = queue_server.proc.wait(timeout=30)  # one Ctrl-C: no second signal, which would force the exit
    assert code == 130, queue_server.log()  # "interrupted", after the shutdown
    log = queue_server.log()
    assert "Shutting down" in log and "Traceback" not in log
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{queue_server.url}/health")
