"""The serving engine: continuous batching behind an async API.

The engine owns a :class:`forge.core.decode.Batcher`, the token loop, and runs it on the compute thread
(:mod:`forge.compute`), one step per tick between the app's other jobs. Async callers
submit a prompt and get an :class:`AsyncTextStream` back; between two batched
steps the engine admits waiting requests into free cache rows and drops the
ones that finished or were cancelled, so no request waits for another to
finish. Requests are admitted by the plain generator's ``admit`` (one length
check, budget, seed and grammar for both), and text (detokenization, stop
strings, logprobs) is assembled on the caller's side by the same ``StreamRow``.

>>> engine = Engine(model, tokenizer, max_batch=8, max_queue=64)   # doctest: +SKIP
>>> stream = engine.stream("Once upon a time", GenerationConfig(max_tokens=20))
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from forge import compute
from forge.core.cuda_graphs import forget
from forge.core.decode import Batcher, Sequence, StepResult
from forge.core.kv_cache import plan_cache
from forge.core.prefix_cache import BLOCK, PrefixCache
from forge.core.speculative import SPECULATE_MODES
from forge.core.transformer import Transformer
from forge.errors import ConfigError, ForgeError, QueueFullError
from forge.generator import AsyncTextStream, GenerationConfig, StreamRow, admit
from forge.tokenizer import Tokenizer

__all__ = ["Engine"]

log = logging.getLogger("forge.engine")

#: Joining requests are prefilled together up to this many tokens a forward, padding included (bounds its
#: activations); a prompt's tokens found in the prefix cache are not computed and don't count.
PREFILL_TOKENS = 4096
#: How long a step waits for the model's lock (held by training) before the compute thread's other jobs go first.
LOCK_WAIT_S = 0.05
#: The prefix cache's default bound, as a share of the batch's KV cache (at least 16 MB).
PREFIX_CACHE_FRACTION = 0.25


@dataclass(eq=False)
class _Job:
    seq: Sequence
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[tuple[str, Any]]
    cancelled: bool = False


class Engine:
    """Continuous batching of every request on ``model``; see the module docstring.

    ``lock`` is held for each step (the plain generator and training take it
    too), so weights never change under a step. ``prefix_cache``: keep the keys and values of
    prompts seen (``prefix_cache_bytes`` of them, by default a quarter of the batch's KV cache) and
    start each request from its longest stored prefix (see ``forge.core.prefix_cache``).
    ``speculate="ngram"``: every request decodes speculatively (``forge.core.speculative``); ``"draft"``:
    with proposals from ``draft``, a smaller model with the same tokenizer (``forge.core.draft``).
    ``cuda_graphs`` (on CUDA): decode steps replay CUDA graphs of the whole batch while any rows run,
    captured on first use; rows not running compute in their free rows and are dropped.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        max_len: int | None = None,
        lock: threading.Lock | None = None,
        prefix_cache: bool = True,
        prefix_cache_bytes: int | None = None,
        speculate: str = "off",
        draft: Transformer | None = None,
        cuda_graphs: bool = True,
    ) -> None:
        context = model.config.context_length
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if max_len is not None and not 1 < max_len <= context:
            raise ConfigError(f"context {max_len} must be between 2 and the model's context of {context}")
        if speculate not in SPECULATE_MODES:
            raise ConfigError(f"speculate={speculate!r} is not a mode; use one of {', '.join(SPECULATE_MODES)}")
        if speculate == "draft" and draft is None:
            raise ConfigError(
                "speculate='draft' needs a draft model: start the server with `forge serve MODEL --draft DRAFT`"
            )
        self.model, self.tokenizer = model.eval(), tokenizer
        # The cache is allocated whole, now: a model declaring 131072 positions gets what fits in memory.
        weight = model.tok_emb.weight
        plan = plan_cache(model.config, dtype=weight.dtype, device=weight.device, max_batch=max_batch, context=max_len)
        if plan.chosen:
            log.info("%s", plan.describe())
        self.max_len = plan.context
        self.max_queue = max_queue
        self.lock = lock or threading.Lock()
        self.prefix_cache = _prefix_cache(prefix_cache, prefix_cache_bytes, plan.bytes)
        self.speculate = speculate  # "ngram": every request speculates; "off": each request's own choice
        self.batcher = Batcher(
            model,
            max_batch=plan.max_batch,
            max_len=self.max_len,
            vocab_limit=tokenizer.vocab_size,
            prefix_cache=self.prefix_cache,
            draft=draft,  # with a draft model, every speculating request takes its proposals
            # On CUDA, decode steps replay CUDA graphs of the whole batch, however many rows run: an eager
            # step of a 1B model took ~15 ms of host time on an H200 for 2 ms of GPU work.
            graphs=("engine", id(self)) if cuda_graphs and weight.device.type == "cuda" else None,
            partial_graphs=True,
        )
        self._waiting: collections.deque[_Job] = collections.deque()
        self._jobs: dict[int, _Job] = {}  # id(seq) -> job, for the running ones
        self._cond = threading.Condition()
        self._stopping = False
        self._drain = True
        self._stopped: concurrent.futures.Future[None] | None = None  # set while attached to the compute thread
        self._error: BaseException | None = None
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[tuple[str, Any]], StepResult]]] = {}
        self.stats: dict[str, Any] = {
            "steps": 0,
            "tokens": 0,
            "batch_size_max": 0,
            "batch_size_hist": collections.Counter(),
            **dict.fromkeys(("completed", "cancelled", "failed"), 0),
            **dict.fromkeys(("speculative_proposed", "speculative_accepted", "speculative_steps"), 0),
        }

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> Engine:
        """Run on the compute thread (``forge.compute``), one step per tick, between the app's other jobs."""
        if self._stopped is None:
            self._stopped = concurrent.futures.Future()
            compute.attach(self)
        return self

    async def stop(self, *, drain: bool = True) -> None:
        """Stop the worker; with ``drain``, running and waiting requests finish first."""
        with self._cond:
            self._stopping, self._drain = True, drain
            if not drain:
                for job in [*self._waiting, *self._jobs.values()]:
                    job.cancelled = True
        if self._stopped is not None:
            compute.wake()
            await asyncio.wrap_future(self._stopped)
            self._stopped = None
        forget(self.model, ("engine", id(self)))  # its graphs and caches are not the model's to keep

    def snapshot(self) -> dict[str, Any]:
        """Counters for metrics: queue depth, running requests, batch sizes per step."""
        with self._cond:
            return {
                "queue_depth": len(self._waiting),
                "running": len(self.batcher.running),
                "max_batch": self.batcher.max_batch,
                **{k: (dict(v) if isinstance(v, collections.Counter) else v) for k, v in self.stats.items()},
                "prefix_cache": self.prefix_cache.snapshot() if self.prefix_cache is not None else None,
            }

    # -- requests -------------------------------------------------------------------------------
    def stream(
        self, prompt: str, cfg: GenerationConfig, *, ids: list[int] | None = None, strict: bool = False
    ) -> AsyncTextStream:
        """Generate for ``prompt``; pieces as they come. Raises QueueFullError when the queue is full.

        ``ids``: the prompt already encoded (``tokenizer.encode_prompt``). ``strict``: a ``max_tokens`` that
        does not fit after the prompt raises ``ContextLengthError`` instead of being cut to the context
        (``max_len``), which the prompt must fit in any case (see :func:`forge.generator.admit`).
        """
        admitted = admit(
            self.tokenizer,
            cfg,
            context=self.max_len,
            vocab_size=self.model.config.vocab_size,
            device=self.batcher.device,
            prompt=prompt,
            ids=ids,
            strict=strict,
            remember=self.prefix_cache is not None,  # prefix caching off: the prompt's tokens are not reused either
        )
        seq, row = admitted.seq, admitted.row
        if cfg.speculate == "draft" and self.batcher.draft is None:
            raise ConfigError(
                "speculate='draft' needs a draft model: start the server with `forge serve MODEL --draft DRAFT`",
                field="speculate",
            )
        seq.speculate = seq.speculate or self.speculate != "off"
        job = _Job(seq, asyncio.get_running_loop(), asyncio.Queue())
        with self._cond:
            if self._stopping:
                raise QueueFullError("the server is shutting down; retry on another instance", retry_after=5.0)
            if self._error is not None:
                raise ForgeError(f"the engine stopped after an internal error: {self._error!r}; restart the server")
            # Rows not yet filled count as room: the worker admits waiting jobs between steps.
            if len(self._waiting) + len(self.batcher.running) >= self.max_queue + self.batcher.max_batch:
                raise QueueFullError(
                    f"the queue is full ({self.max_queue} requests waiting, {self.batcher.max_batch} running); "
                    "retry shortly",
                    retry_after=1.0,
                )
            self._waiting.append(job)
        compute.wake()
        return AsyncTextStream(self._pieces(job, row), [row])

    async def _pieces(self, job: _Job, row: StreamRow) -> AsyncIterator[str]:
        try:
            while row.finish is None:
                kind, value = await job.queue.get()
                if kind == "error":
                    raise value
                if piece := row.take(value):
                    yield piece
        finally:
            if row.finish is None or not job.seq.done:  # left early, a stop string, or cancelled: free the slot
                with self._cond:
                    job.cancelled = True
                compute.wake()

    # -- the worker ---------------------------------------------------------------------------------
    def tick(self) -> bool:
        """One step of the batch, with waiting requests admitted first; whether there was work (compute.Resident)."""
        try:
            return self._tick()
        except BaseException as e:  # a bug: fail every request rather than hang them
            log.exception("the engine failed; every request fails with it")
            self._error = e
            with self._cond:
                self._fail_all(e)
            self._end()
            return False

    def _end(self) -> None:
        compute.detach(self)
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)

    def _tick(self) -> bool:
        with self._cond:
            if self._stopping and (not self._drain or (not self._waiting and not self.batcher.running)):
                self._fail_all(QueueFullError("the server is shutting down", retry_after=5.0))
                self._end()
                return False
            if not self._waiting and not self.batcher.running:
                return False
        # The weights may be busy (the app training on its own thread): then the compute thread's other jobs
        # (another app's requests) go first, and the engine tries again.
        if not self.lock.acquire(timeout=LOCK_WAIT_S):
            return True
        try:
            with self._cond:
                joining = []
                while self._waiting and len(joining) < self.batcher.free:
                    job = self._waiting.popleft()
                    if job.cancelled:
                        self.stats["cancelled"] += 1
                    else:
                        joining.append(job)
                        self._jobs[id(job.seq)] = job
                dropped = [j for j in self._jobs.values() if j.cancelled and j not in joining]
            for job in dropped:
                self._finish(job, cancelled=True)
            self._admit(joining)
            if joining:  # their first tokens go out now, not after the next step
                self._flush()
            try:
                results = self.batcher.step()
            except Exception as e:  # the batch is lost, the engine is not
                for job in list(self._jobs.values()):
                    self._fail(job, e)
                results = []
            for r in results:
                self._deliver(self._jobs[id(r.seq)], r)
            self.batcher.release()  # the model is free for others between steps
        finally:
            self.lock.release()
        self._flush()
        if results:
            with self._cond:
                n = len({id(r.seq) for r in results})  # rows: a graph replay gives each several tokens
                self.stats["steps"] += 1
                self.stats["batch_size_hist"][n] += 1
                self.stats["batch_size_max"] = max(self.stats["batch_size_max"], n)
        return True

    def _admit(self, jobs: list[_Job]) -> None:
        """Prefill the joining jobs together, in chunks of bounded size; a failing job fails alone. Each chunk's
        first tokens go out as soon as it is prefilled, not after the chunks behind it."""
        if len(jobs) == 1:  # nothing to split: no peek at the prefix cache
            self._prefill(jobs)
            return
        chunk: list[_Job] = []
        widest = 0  # the most tokens a prompt of the chunk computes: the batch's prompts are padded to it
        for job in jobs:
            if chunk and self._shares(chunk, job):  # first the prefill that stores the prefix job starts with
                chunk, widest = self._prefill_now(chunk), 0
            tokens = self._to_compute(job)
            if chunk and (len(chunk) + 1) * max(widest, tokens) > PREFILL_TOKENS:
                chunk, widest = self._prefill_now(chunk), 0
            chunk.append(job)
            widest = max(widest, tokens)
        if chunk:
            self._prefill(chunk)

    def _prefill_now(self, chunk: list[_Job]) -> list[_Job]:
        """Prefill ``chunk`` and send its first tokens; the next chunk, empty."""
        self._prefill(chunk)
        self._flush()
        return []

    def _to_compute(self, job: _Job) -> int:
        """The prompt tokens ``job``'s prefill computes: those after its stored prefix (a peek at the cache)."""
        n = len(job.seq.prompt)
        if self.prefix_cache is None or n <= BLOCK:
            return n
        return n - self.prefix_cache.reusable(job.seq.prompt)

    def _shares(self, chunk: list[_Job], job: _Job) -> bool:
        """Whether ``job`` starts like one of ``chunk`` with a block not cached yet: it waits for that prefill.

        Requests arriving together with one new system prompt: the first computes it, the rest reuse it.
        """
        if self.prefix_cache is None or len(job.seq.prompt) <= BLOCK:
            return False
        head = job.seq.prompt[:BLOCK]
        return self.prefix_cache.cached_blocks(head) == 0 and any(j.seq.prompt[:BLOCK] == head for j in chunk)

    def _prefill(self, chunk: list[_Job]) -> None:
        try:
            firsts = self.batcher.add_many([j.seq for j in chunk])
        except Exception:  # find the culprit: one at a time
            for j in chunk:
                self.batcher.remove(j.seq)
            firsts = []
            for j in chunk:
                try:
                    firsts.append(self.batcher.add(j.seq))
                except Exception as e:  # this request only: the others go on
                    self._fail(j, e)
            chunk = [j for j in chunk if not j.seq.done and j.seq.row >= 0]
        for j, first in zip(chunk, firsts, strict=True):
            self._deliver(j, first)

    def _deliver(self, job: _Job, r: StepResult) -> None:
        self.stats["tokens"] += 1
        if r.finished:  # before the caller can see the last token, so its slot is already free
            self._finish(job, cancelled=False)
        self._outbox.setdefault(job.loop, []).append((job.queue, r))

    def _flush(self) -> None:
        """Hand the step's tokens over: one wake-up per event loop, not one per token."""
        for loop, items in self._outbox.items():
            loop.call_soon_threadsafe(_put_all, items)
        self._outbox = {}

    def _finish(self, job: _Job, *, cancelled: bool) -> None:
        spec = job.seq.spec
        if spec is not None:
            self.stats["speculative_proposed"] += spec.proposed
            self.stats["speculative_accepted"] += spec.accepted
            self.stats["speculative_steps"] += spec.steps
        with self._cond:
            self.batcher.remove(job.seq)
            self._jobs.pop(id(job.seq), None)
            self.stats["cancelled" if cancelled else "completed"] += 1

    def _fail(self, job: _Job, error: Exception) -> None:
        """Fail one job and free its row; the error's status says whose fault it was (a bare exception: 500)."""
        if isinstance(error, ForgeError) and error.http_status < 500:  # the request's fault (e.g. its grammar)
            log.warning("generation %s failed: %s", id(job.seq), error)
        else:
            log.exception("generation %s failed", id(job.seq), exc_info=error)
        wrapped = (
            error if isinstance(error, ForgeError) else ForgeError(f"generation failed inside the engine: {error!r}")
        )
        with self._cond:
            self.batcher.remove(job.seq)
            self._jobs.pop(id(job.seq), None)
            self.stats["failed"] = self.stats.get("failed", 0) + 1
        job.loop.call_soon_threadsafe(job.queue.put_nowait, ("error", wrapped))

    def _fail_all(self, error: BaseException) -> None:
        for job in [*self._waiting, *self._jobs.values()]:
            job.loop.call_soon_threadsafe(job.queue.put_nowait, ("error", error))
            self.batcher.remove(job.seq)
        self._waiting.clear()
        self._jobs.clear()


def _prefix_cache(enabled: bool, nbytes: int | None, cache_bytes: int) -> PrefixCache | None:
    """The engine's prefix cache: ``nbytes``, or by default a share of the batch's KV cache; None when off.

    It keeps the keys and values of prompts already seen (a shared system prompt): a joining request
    prefills only the rest.
    """
    if nbytes is not None and (not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0):
        raise ConfigError(f"prefix_cache_bytes={nbytes!r} must be a byte count >= 0")
    bound = nbytes if nbytes is not None else max(16 << 20, int(cache_bytes * PREFIX_CACHE_FRACTION))
    return PrefixCache(bound) if enabled and bound > 0 else None


def _put_all(items: list[tuple[asyncio.Queue[tuple[str, Any]], StepResult]]) -> None:
    for queue, r in items:
        queue.put_nowait(("token", r))
