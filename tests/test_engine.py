"""The serving engine: continuous batching through the app, with the same text the plain generator gives.

Uses a random tiny model with a char tokenizer (varied text, ~1 ms a token)
and the bigram checkpoint of conftest for known outputs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

from forge.app import Forge
from forge.errors import ConfigError, ContextLengthError, GenerationError, QueueFullError
from forge.generator import GenerationConfig
from forge.models import create_model, padded_vocab, save
from forge.tokenizer import Tokenizer

T = TypeVar("T")
PROMPTS = ["to be", "or not", "that is the question", "a", "whether 'tis nobler in the mind", "q"]


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory: pytest.TempPathFactory, char_tokenizer: Tokenizer) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("engine") / "ckpt"
    save(path, create_model("tiny", vocab_size=padded_vocab(char_tokenizer.vocab_size)), char_tokenizer)
    return path


def run(main: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(main())


async def serving(path: Path, **options: Any) -> Forge:
    app = Forge.load(path, defaults=GenerationConfig(temperature=0, max_tokens=24))
    return await app.start_batching(**options)


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.001)

    await asyncio.wait_for(poll(), timeout)


def test_concurrent_requests_decode_together_and_match_the_plain_generator(random_dir: Path) -> None:
    plain = Forge.load(random_dir, defaults=GenerationConfig(temperature=0, max_tokens=24))
    expected = [plain.sync.generate(p) for p in PROMPTS]

    async def main() -> tuple[list[str], dict[str, Any]]:
        app = await serving(random_dir, max_batch=4)
        texts = await asyncio.gather(*(app.generate(p) for p in PROMPTS))
        stats = app.batching_stats()
        await app.stop_batching()
        return list(texts), stats or {}

    texts, stats = run(main)
    assert texts == expected
    assert stats["batch_size_max"] == 4  # six requests, four rows: they really shared steps
    assert stats["completed"] == len(PROMPTS) and stats["running"] == 0 and stats["queue_depth"] == 0


def test_seeded_sampling_is_reproducible_under_batching(random_dir: Path) -> None:
    async def main() -> list[str]:
        app = await serving(random_dir, max_batch=3)
        options = dict(temperature=1.0, top_p=0.9, max_tokens=20)
        texts = await asyncio.gather(*(app.generate("to be", seed=s, **options) for s in (1, 2, 1, 3)))
        await app.stop_batching()
        return list(texts)

    a, b, c, d = run(main)
    assert a == c and len({a, b, d}) > 1
    plain = Forge.load(random_dir)
    assert plain.sync.generate("to be", seed=1, temperature=1.0, top_p=0.9, max_tokens=20) == a


def test_a_short_request_does_not_wait_for_a_long_one(random_dir: Path) -> None:
    async def main() -> list[str]:
        app = await serving(random_dir, max_batch=2)
        order: list[str] = []

        async def one(name: str, tokens: int) -> None:
            await app.generate("to be", max_tokens=tokens, stop_at_eos=False)
            order.append(name)

        await asyncio.gather(one("long", 200), one("short", 5))
        await app.stop_batching()
        return order

    assert run(main) == ["short", "long"]


def test_streams_stop_strings_and_logprobs_work_under_batching(bigram_dir: Path) -> None:
    async def main() -> tuple[list[str], str, Any]:
        app = await serving(bigram_dir)
        pieces = [p async for p in app.stream("a", max_tokens=6)]
        stopped = await app.generate("a", max_tokens=6, stop=["de"])
        ctx = app.request("a", max_tokens=3, logprobs=2)
        await app.handle(ctx)
        await app.stop_batching()
        return pieces, stopped, ctx.completion

    pieces, stopped, completion = run(main)
    assert pieces == ["b", "c", "d", "e", "f", "g"]
    assert stopped == "bc"
    assert completion.text == "bcd" and completion.finish_reason == "length"
    assert [lp.token for lp in completion.logprobs] == ["b", "c", "d"]
    assert all(lp.logprob <= 0 and lp.top[0][0] == lp.token for lp in completion.logprobs)


def test_a_full_queue_is_refused_with_retry_after(random_dir: Path) -> None:
    async def main() -> QueueFullError:
        app = await serving(random_dir, max_batch=1, max_queue=1)
        running = [asyncio.create_task(app.generate("to be", max_tokens=300, stop_at_eos=False))]
        await until(lambda: (app.batching_stats() or {}).get("running") == 1)
        running.append(asyncio.create_task(app.generate("to be", max_tokens=300, stop_at_eos=False)))
        await until(lambda: (app.batching_stats() or {}).get("queue_depth") == 1)  # one runs, one waits
        try:
            with pytest.raises(QueueFullError) as refused:
                await app.generate("one too many")
        finally:
            await asyncio.gather(*running)
            await app.stop_batching()
        return refused.value

    error = run(main)
    assert error.http_status == 429 and error.retry_after > 0 and "queue is full" in error.message


def test_leaving_a_stream_early_frees_its_slot(random_dir: Path) -> None:
    async def main() -> dict[str, Any]:
        app = await serving(random_dir, max_batch=1)
        stream = app.stream("to be", max_tokens=500, stop_at_eos=False)
        got = [await stream.__anext__() for _ in range(3)]
        await stream.aclose()
        assert len(got) == 3
        # The only row is free again: the next request runs at once.
        text = await asyncio.wait_for(app.generate("or", max_tokens=5), timeout=30)
        assert isinstance(text, str)
        stats = app.batching_stats() or {}
        await app.stop_batching()
        return stats

    stats = run(main)
    assert stats["cancelled"] == 1 and stats["completed"] == 1


def test_cancelling_a_request_task_frees_its_slot(random_dir: Path) -> None:
    async def main() -> dict[str, Any]:
        app = await serving(random_dir, max_batch=1)
        task = asyncio.create_task(app.generate("to be", max_tokens=500, stop_at_eos=False))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(app.generate("or", max_tokens=5), timeout=30)
        stats = app.batching_stats() or {}
        await app.stop_batching()
        return stats

    stats = run(main)
    assert stats["cancelled"] == 1 and stats["completed"] == 1


def test_stopping_with_drain_lets_running_requests_finish(random_dir: Path) -> None:
    async def main() -> tuple[str, int]:
        app = await serving(random_dir, max_batch=2)
        task = asyncio.create_task(app.generate("to be", max_tokens=40, stop_at_eos=False))
        await asyncio.sleep(0.02)
        await app.stop_batching(drain=True)
        text = await task
        return text, len(app.tokenizer.encode(text)) if app.tokenizer else 0  # type: ignore[union-attr]

    _, n = run(main)
    assert n >= 30  # all 40 tokens came (a char tokenizer: about one token per character)


def test_engine_errors_are_clear(random_dir: Path, bigram_dir: Path) -> None:
    async def main() -> None:
        app = await serving(bigram_dir, context=16)
        with pytest.raises(GenerationError, match="20 tokens but the context is 16"):
            await app.generate("a" * 20)
        with pytest.raises(ConfigError, match="already on"):
            await app.start_batching()
        await app.stop_batching()
        with pytest.raises(ConfigError, match="max_batch=0"):
            await Forge.load(random_dir).start_batching(max_batch=0)
        with pytest.raises(ConfigError, match="context 10000"):
            await Forge.load(random_dir).start_batching(context=10000)

    run(main)


def test_the_engine_takes_encoded_prompts_and_refuses_a_strict_budget(bigram_dir: Path) -> None:
    """Admission is the plain generator's: ids already encoded are used as they are; strict budgets must fit."""

    async def main() -> tuple[str, ContextLengthError]:
        app = await serving(bigram_dir, context=16)
        engine = app._engine
        assert engine is not None and app.tokenizer is not None
        ids = app.tokenizer.encode_prompt("a")
        text = "".join([p async for p in engine.stream("a", GenerationConfig(temperature=0, max_tokens=3), ids=ids)])
        with pytest.raises(ContextLengthError) as refused:
            engine.stream("a" * 10, GenerationConfig(max_tokens=10), strict=True)
        await app.stop_batching()
        return text, refused.value

    text, error = run(main)
    assert text == "bcd"
    assert (error.field, error.context, error.requested) == ("max_tokens", 16, 10) and error.http_status == 400


def test_a_request_that_breaks_the_model_fails_alone(random_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An internal failure in one request's prefill is that request's 500; the others and the engine go on.

    Both join in one batched prefill, which fails; one at a time, only the culprit's fails.
    """
    from forge.core.decode import Batcher
    from forge.errors import ForgeError

    real_add_many = Batcher.add_many

    def add_many(self: Batcher, seqs: list[Any]) -> list[Any]:
        if any(seq.prompt[:3] == app_tokens for seq in seqs):  # the forward fails after the rows were taken
            for seq in seqs:
                seq.row = len(self.running)
                self.running.append(seq)
            raise RuntimeError("simulated kernel failure")
        return real_add_many(self, seqs)

    plain = Forge.load(random_dir, defaults=GenerationConfig(temperature=0, max_tokens=8))
    app_tokens = plain.tokenizer.encode_prompt("zzz")[:3]  # type: ignore[union-attr]
    expected = plain.sync.generate("to be")
    monkeypatch.setattr(Batcher, "add_many", add_many)

    async def main() -> tuple[list[Any], dict[str, Any], str]:
        app = await serving(random_dir, max_batch=4)
        app.defaults = GenerationConfig(temperature=0, max_tokens=8)
        results = await asyncio.gather(app.generate("to be"), app.generate("zzz"), return_exceptions=True)
        after = await app.generate("to be")
        stats = app.batching_stats() or {}
        await app.stop_batching()
        return list(results), stats, str(after)

    (ok, failed), stats, after = run(main)
    assert ok == expected and after == expected
    assert isinstance(failed, ForgeError) and failed.http_status == 500 and "simulated kernel failure" in str(failed)
    assert stats["failed"] == 1 and stats["running"] == 0


# -- the KV cache fits in memory ----------------------------------------------------------------------------------
# Llama 3.1 and Qwen2.5 declare 131072 positions: a cache that long for 8 rows (24 GB for SmolLM2) was allocated at
# start, and the server was OOM-killed without a word.
LONG = 131072


@pytest.fixture(scope="module")
def long_dir(tmp_path_factory: pytest.TempPathFactory, char_tokenizer: Tokenizer) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("engine") / "long"
    model = create_model("llama-tiny", vocab_size=padded_vocab(char_tokenizer.vocab_size), context_length=LONG)
    save(path, model, char_tokenizer)
    return path


@pytest.fixture
def memory_64mb(monkeypatch: pytest.MonkeyPatch) -> None:
    # llama-tiny: 2 (k, v) x 4 layers x 2 heads x 32 dims x 4 bytes = 2 kB a position a row; half of 64 MB is 2048 x 8.
    monkeypatch.setattr("forge.core.kv_cache.free_memory", lambda device: 64 << 20)


def test_a_long_context_model_gets_a_cache_that_fits(
    long_dir: Path, memory_64mb: None, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> tuple[list[torch.Size], str, GenerationError]:
        app = await serving(long_dir)
        engine = app._engine
        assert engine is not None
        shapes = [c.k.shape for c in engine.batcher.caches]
        text = await app.generate("to be")
        with pytest.raises(GenerationError) as caught:
            await app.generate("x" * 3000)  # longer than the cache: a 400, not a crash
        await app.stop_batching()
        return shapes, text, caught.value

    with caplog.at_level("INFO", logger="forge.engine"):
        shapes, text, error = run(main)
    assert set(shapes) == {torch.Size([8, 2, 2048, 32])}
    assert text and error.http_status == 400 and "context is 2048" in str(error)
    assert "KV cache: context 2048 tokens (the model allows 131072) x 8 requests" in caplog.text


def test_asking_for_a_cache_that_cannot_fit_is_a_config_error(long_dir: Path, memory_64mb: None) -> None:
    app = Forge.load(long_dir)
    with pytest.raises(ConfigError, match=r"context 131072 x 8 requests needs 2\.0 GB.*lower --context or --max-batch"):
        run(lambda: app.start_batching(max_batch=8, context=LONG))
    run(lambda: app.start_batching(max_batch=1, context=16384))  # 32 MB: allowed up to 90% of free memory
    run(app.stop_batching)


def test_forge_serve_sizes_the_cache_and_says_so(
    long_dir: Path, memory_64mb: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from helpers import run_cli

    served: dict[str, Any] = {}

    async def fake_serve(app: Forge, **options: Any) -> None:
        served.update(options)

    monkeypatch.setattr("forge.server.serve", fake_serve)
    code, _, err = run_cli(["serve", long_dir, "--device", "cpu", "--dtype", "float32"], capsys)
    assert code == 0, err
    assert served["context"] == 2048 and served["max_batch"] == 8
    assert "KV cache: context 2048 tokens (the model allows 131072) x 8 requests at once = 32 MB" in err
    assert "change with --context and --max-batch" in err
    code, _, err = run_cli(["serve", long_dir, "--device", "cpu", "--dtype", "float32", "--context", "24576"], capsys)
    assert code == 0 and served["context"] == 24576 and served["max_batch"] == 1  # fewer rows, the context asked for
    code, _, err = run_cli(
        ["serve", long_dir, "--device", "cpu", "--dtype", "float32", "--context", LONG, "--max-batch", 8], capsys
    )
    assert code == 2 and "Traceback" not in err and "lower --context or --max-batch" in err


def test_each_prefill_chunk_s_first_tokens_go_out_before_the_next_chunk(
    random_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests joining together but prefilled in several chunks (here: each shares a new system prompt with the
    first, which is prefilled alone so that the rest reuse its cached keys): a chunk's first tokens are handed to
    their streams before the next chunk's prefill starts, not after every chunk (TTFT of the first request)."""
    from forge.engine import Engine

    held: list[int] = []  # tokens not yet handed over when each chunk's prefill starts
    real_prefill = Engine._prefill

    def prefill(self: Engine, chunk: list[Any]) -> None:
        held.append(sum(len(items) for items in self._outbox.values()))
        real_prefill(self, chunk)

    monkeypatch.setattr(Engine, "_prefill", prefill)
    system = "you answer questions about the text: " * 3  # 100+ characters: whole blocks of the prefix cache

    async def main() -> list[str]:
        app = await serving(random_dir, max_batch=4)
        app.defaults = GenerationConfig(temperature=0, max_tokens=4)
        texts = await asyncio.gather(*(app.generate(system + p) for p in PROMPTS[:3]))
        await app.stop_batching()
        return list(texts)

    texts = run(main)
    assert len(texts) == 3 and all(texts)
    assert len(held) >= 2  # the first request alone, then the two that reuse its prefix
    assert held == [0] * len(held)


def test_a_prefill_chunk_is_bounded_by_the_tokens_it_computes_padding_included(
    random_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PREFILL_TOKENS bounds a chunk by what its forward computes: prompts found in the prefix cache count only
    their uncached tails (requests sharing a system prompt join in one chunk after the first), and prompts of
    unequal length count as the longest, which the batch is padded to."""
    import forge.engine

    sizes: list[list[int]] = []
    real_prefill = forge.engine.Engine._prefill

    def prefill(self: Any, chunk: list[Any]) -> None:
        sizes.append([len(j.seq.prompt) for j in chunk])
        real_prefill(self, chunk)

    monkeypatch.setattr(forge.engine.Engine, "_prefill", prefill)
    monkeypatch.setattr(forge.engine, "PREFILL_TOKENS", 250)
    system = "you answer questions about the text: " * 4  # ~150 tokens: two whole prompts are more than 250

    async def main(prompts: list[str]) -> list[str]:
        app = await serving(random_dir, max_batch=4)
        app.defaults = GenerationConfig(temperature=0, max_tokens=2)
        texts = await asyncio.gather(*(app.generate(p) for p in prompts))
        await app.stop_batching()
        return list(texts)

    assert all(run(lambda: main([system + p for p in PROMPTS[:4]])))
    assert [len(chunk) for chunk in sizes] == [1, 3]  # the first computes the prefix; the rest, their tails
    sizes.clear()
    short, long = "ab", system + "tell me more"  # no shared blocks: both computed whole
    assert all(run(lambda: main([short, long])))
    assert len(sizes) == 2  # 2 x the longer prompt is more than 250 (their sum is not)
    assert sum(sizes[0] + sizes[1]) <= 250 < 2 * max(sizes[0] + sizes[1])
