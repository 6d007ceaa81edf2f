"""``app.listen(port)``: the app's own model and middleware, served; cancelling it shuts down gracefully."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import httpx
import openai

from forge.app import Forge
from forge.generator import GenerationConfig
from forge.middleware import Context, Next


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_listen_serves_the_app_with_its_middleware(bigram_dir: Path) -> None:
    seen: list[str] = []

    async def audit(ctx: Context, next: Next) -> None:
        seen.append(ctx.prompt)
        await next()
        if ctx.response is not None:
            ctx.response = ctx.response.upper()

    app = Forge.load(bigram_dir, defaults=GenerationConfig(temperature=0)).use(audit)
    port = free_port()

    async def main() -> tuple[str, int, bool]:
        ready = asyncio.Event()
        server = asyncio.create_task(app.listen(port, api_key="sk-test", ready=ready, log_level="warning"))
        await asyncio.wait_for(ready.wait(), timeout=30)
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-test")
        done = await client.completions.create(model=bigram_dir.name, prompt="a", max_tokens=4, temperature=0)
        # A long request in flight when the server is told to stop still finishes.
        slow = asyncio.create_task(
            client.completions.create(model=bigram_dir.name, prompt="a", max_tokens=40, temperature=0)
        )
        await asyncio.sleep(0.05)
        server.cancel()
        finished = await slow
        await asyncio.gather(server, return_exceptions=True)
        async with httpx.AsyncClient() as http:
            try:
                await http.get(f"http://127.0.0.1:{port}/health", timeout=2)
                closed = False
            except httpx.ConnectError:
                closed = True
        return str(done.choices[0].text), finished.usage.completion_tokens, closed

    text, tokens, closed = asyncio.run(main())
    assert text == "BCDE"  # through the app's middleware
    assert seen[0] == "a"
    assert tokens == 40  # the in-flight request finished during the graceful shutdown
    assert closed
    assert app.batching_stats() is None  # the engine was drained and stopped
