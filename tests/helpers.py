"""Helpers shared by the middleware tests: run a request, record events, small middleware.

The app under test wraps the bigram checkpoint of conftest (``bigram_dir``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from forge.app import Forge
from forge.cli import main
from forge.events import Event
from forge.generator import GenerationConfig
from forge.middleware import Context, Middleware, Next

#: Greedy, 4 tokens: from "a" the bigram model gives "bcde".
GREEDY = GenerationConfig(temperature=0, max_tokens=4)
TOO_LONG = "a" * 100  # the bigram model's context is 64 tokens


def generate(app: Forge, prompt: str, **options: Any) -> str:
    result = asyncio.run(app.generate(prompt, **options))
    assert isinstance(result, str)
    return result


def stream(app: Forge, prompt: str, **options: Any) -> list[str]:
    async def collect() -> list[str]:
        return [piece async for piece in app.stream(prompt, **options)]

    return asyncio.run(collect())


def record(app: Forge, *names: str) -> list[Event]:
    seen: list[Event] = []
    for name in names:
        app.on(name, seen.append)
    return seen


def reaches_model(prompts: list[str]) -> Middleware:
    """Register last: records the prompt of every request that gets through to the model."""

    async def reaches_model(ctx: Context, next: Next) -> None:
        prompts.append(ctx.prompt)
        await next()

    return reaches_model


def capture(contexts: list[Context]) -> Middleware:
    async def capture(ctx: Context, next: Next) -> None:
        contexts.append(ctx)
        await next()

    return capture


async def tagged(chunks: AsyncIterator[str], tag: str) -> AsyncIterator[str]:
    async for piece in chunks:
        yield piece + tag


class Boom(Exception):
    pass


def breaks_at(bad: str) -> Middleware:
    """A middleware whose stream raises ``Boom`` when the piece ``bad`` comes (after the ones before it)."""

    async def fail(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
        async for piece in chunks:
            if piece == bad:
                raise Boom(f"no {bad}")
            yield piece

    async def breaks(ctx: Context, next: Next) -> None:
        await next()
        ctx.chunks = fail(ctx.chunks)  # type: ignore[arg-type]

    return breaks


def run_cli(args: list[Any], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run `forge ARGS` in-process; returns (exit code, stdout, stderr)."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def assert_cached_decode_matches_full(model: Any, idx: Any) -> None:
    """A prefill of 8 tokens and single-token steps through the KV cache give the full forward's logits."""
    import torch

    from forge.core.kv_cache import CacheWrite

    with torch.no_grad():
        full = model(idx)
        model.setup_cache(idx.shape[0], idx.shape[1])
        rows = slice(0, idx.shape[0])
        try:
            prefill = model(idx[:, :8], write=CacheWrite(rows=rows, pos=0, length=8))
            steps = [
                model(idx[:, t : t + 1], write=CacheWrite(rows=rows, pos=t, length=t + 1))
                for t in range(8, idx.shape[1])
            ]
        finally:
            model.clear_cache()
    torch.testing.assert_close(prefill, full[:, :8], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 8:], rtol=1e-4, atol=1e-5)
