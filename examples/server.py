"""Serve an app over the OpenAI API, with its middleware, and talk to it with the openai client.

    python examples/server.py [DATA]

The same server runs from the command line: `forge serve runs/tiny --api-key sk-local`.
Any OpenAI client works against it; here the official one, chat and streaming.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys

from openai import AsyncOpenAI

from forge import Forge, logger
from forge.data import stdlib_corpus

DATA = sys.argv[1] if len(sys.argv) > 1 else str(stdlib_corpus())
STEPS = int(os.environ.get("FORGE_EXAMPLE_STEPS", "200"))
API_KEY = "sk-example"


async def audit(ctx, next):
    """Custom middleware: the server puts its request id and the OpenAI `user` field in ctx.meta."""
    print(f"audit: {ctx.meta.get('request_id')} from {ctx.meta.get('user')!r}")
    await next()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def main() -> None:
    app = Forge(model="tiny", tokenizer="char").use(logger(print)).use(audit)
    await app.train(DATA, steps=STEPS, batch_size=16, context=128, eval_every=0)

    port, ready = free_port(), asyncio.Event()
    server = asyncio.create_task(app.listen(port, api_key=API_KEY, ready=ready, log_level="warning"))
    await ready.wait()
    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY)

    models = await client.models.list()
    print("models:", [m.id for m in models.data])
    reply = await client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Who is there?"}], max_tokens=30, seed=0, user="alice"
    )
    print("chat:", repr(reply.choices[0].message.content), f"({reply.usage.total_tokens} tokens)")
    stream = await client.completions.create(model="tiny", prompt="To be", max_tokens=30, seed=0, stream=True)
    pieces = [chunk.choices[0].text async for chunk in stream if chunk.choices]
    print(f"stream: {len(pieces)} pieces: {''.join(pieces)!r}")

    await client.close()
    server.cancel()  # a graceful shutdown: requests in flight would finish first
    with contextlib.suppress(asyncio.CancelledError):
        await server
    print("server stopped")


if __name__ == "__main__":
    asyncio.run(main())
