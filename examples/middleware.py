"""Middleware: Koa-style `async def mw(ctx, next)` around every generation.

    python examples/middleware.py [DATA]

Built-ins (logger, timer, cache, rate_limit, content_filter, prompt_template,
error_handler) and custom middleware that changes the input, post-processes
the output, and wraps streaming output piece by piece.
"""

from __future__ import annotations

import asyncio
import os
import sys

from forge import (
    Forge,
    RateLimitError,
    cache,
    content_filter,
    error_handler,
    logger,
    prompt_template,
    rate_limit,
    timer,
)
from forge.data import stdlib_corpus

DATA = sys.argv[1] if len(sys.argv) > 1 else str(stdlib_corpus())
STEPS = int(os.environ.get("FORGE_EXAMPLE_STEPS", "200"))


async def tag_request(ctx, next):
    """Before next(): change the input. After: post-process the output, or wrap the stream."""
    ctx.meta["user"] = "example"
    await next()
    if ctx.stream:
        ctx.chunks = upper_first(ctx.chunks)
    else:
        ctx.response = ctx.response.strip()


async def upper_first(chunks):
    first = True
    async for piece in chunks:
        yield piece.upper() if first else piece
        first = False


async def apologise(ctx, error):
    """An explicit error handler: answer instead of failing."""
    if isinstance(error, RateLimitError):
        ctx.set_text(f"[busy: {error}]")


async def main() -> None:
    app = (
        Forge(model="tiny")
        .use(error_handler(apologise))  # outermost: sees every error below it
        .use(logger(print))
        .use(timer())
        .use(rate_limit(1 / 3600, burst=4))  # 4 at once, then one an hour
        .use(cache(max_entries=100))
        .use(content_filter(["None"], replacement="nothing"))
        .use(prompt_template("{prompt}"))
        .use(tag_request)
    )
    await app.train(DATA, steps=STEPS, batch_size=16, context=128, eval_every=0)

    first = await app.generate("Return the", max_tokens=30, seed=0)
    again = await app.generate("Return the", max_tokens=30, seed=0)  # a cache hit: the model is not called
    print("same text from the cache:", first == again)
    print("stream:", "".join([p async for p in app.stream("If the", max_tokens=30, seed=0)]))
    for i in range(3):  # the 4th request empties the bucket; the error handler answers the rest
        print(i, await app.generate(f"Return {i}", max_tokens=5, seed=0))


if __name__ == "__main__":
    asyncio.run(main())
