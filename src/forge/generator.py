"""Prompt in, text out: full text, a sync stream, or an async stream.

Stop sequences are matched on the decoded text, so a stop string that spans
token boundaries is found, and text that might be the start of a stop string
is held back until it is known not to be.

>>> import forge.models as models
>>> from forge.tokenizer import Tokenizer
>>> tok = Tokenizer.train(["abc"], kind="char")
>>> gen = Generator(models.create_model("tiny", vocab_size=320), tok)
>>> isinstance(gen.generate("ab", max_tokens=3, seed=0), str)
True
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from forge import compute
from forge.config import bounded, check_specs, choice, documented, same_as
from forge.core.decode import Sequence as DecodeSequence
from forge.core.decode import StepResult, fixed_batcher
from forge.core.device import resolve_device
from forge.core.prefix_cache import PrefixCache
from forge.core.sampling import SamplingParams
from forge.core.speculative import SPECULATE_MODES
from forge.core.transformer import Transformer
from forge.errors import ConfigError, ContextLengthError, GenerationError
from forge.structured import Constraint, Grammar
from forge.textstream import held_back
from forge.tokenizer import Tokenizer

__all__ = [
    "Admitted",
    "AsyncTextStream",
    "Completion",
    "GenerationConfig",
    "Generator",
    "StreamRow",
    "TextStream",
    "TokenLogprob",
    "admit",
]

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationConfig:
    """Generation options. ``temperature=0`` is greedy; ``seed`` makes sampling reproducible.

    The sampling fields are ``SamplingParams``'s own (same bounds, same help); only defaults differ.
    """

    max_tokens: int = bounded(128, integer=True, ge=1, doc="Most tokens to generate.")
    temperature: float = same_as(SamplingParams, "temperature", 0.8)
    top_k: int | None = same_as(SamplingParams, "top_k", None)
    top_p: float | None = same_as(SamplingParams, "top_p", None)
    min_p: float | None = same_as(SamplingParams, "min_p", None)
    repetition_penalty: float = same_as(SamplingParams, "repetition_penalty", 1.0)
    presence_penalty: float = same_as(SamplingParams, "presence_penalty", 0.0)
    frequency_penalty: float = same_as(SamplingParams, "frequency_penalty", 0.0)
    stop: tuple[str, ...] = documented((), doc="Stop sequences: text ends before the first one generated.")
    #: torch seeds are 64-bit.
    seed: int | None = bounded(None, integer=True, ge=-(2**63), le=2**63 - 1, doc="Makes sampling reproducible.")
    stop_at_eos: bool = documented(True, doc="End at the model's end-of-sequence token.")
    logprobs: int | None = bounded(
        None, integer=True, ge=0, le=20, doc="Each token's logprob and this many most likely alternatives."
    )
    grammar: Grammar | None = documented(None, doc="Only text in this grammar can be generated (forge.structured).")
    speculate: str = choice(
        "off",
        SPECULATE_MODES,
        doc="Speculative decoding: ngram proposes tokens from the prompt, draft from the app's draft model; "
        "verified in one forward (same output).",
    )

    def __post_init__(self) -> None:
        check_specs(self)
        if self.stop is None:  # OpenAI-style requests send "stop": null
            object.__setattr__(self, "stop", ())
        if isinstance(self.stop, str):  # a bare string is one stop sequence, not its characters
            object.__setattr__(self, "stop", (self.stop,))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ConfigError.for_field(
                "GenerationConfig", "stop", self.stop, "stop sequences must be non-empty strings"
            )
        if self.grammar is not None and not isinstance(self.grammar, Grammar):
            raise ConfigError.for_field(
                "GenerationConfig",
                "grammar",
                self.grammar,
                "must be a forge.structured.Grammar; for app.generate pass schema=PydanticModel | dict | regex instead",
            )

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
        )

    def replace(self, **changes: Any) -> GenerationConfig:
        known = {f.name for f in dataclasses.fields(self)}
        if unknown := sorted(set(changes) - known):
            raise ConfigError(f"unknown generation options {unknown}; options are {sorted(known)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One generated token: its text, id and log-probability, and the most likely alternatives."""

    token: str
    id: int
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass
class Completion:
    """One prompt's result."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list, repr=False)
    #: Per generated token, when ``GenerationConfig.logprobs`` asked for them.
    logprobs: list[TokenLogprob] | None = field(default=None, repr=False)


class StreamRow:
    """Incremental detokenization and stop matching for one sequence."""

    def __init__(
        self, tokenizer: Tokenizer, stops: Sequence[str], stop_ids: frozenset[int], prompt_tokens: int
    ) -> None:
        self.tokenizer, self.stops, self.stop_ids = tokenizer, stops, stop_ids
        self.prompt_tokens = prompt_tokens
        self.logprobs: list[TokenLogprob] | None = None  # set to [] to collect them
        self.pending: TokenLogprob | None = None  # the logprob of the token about to be pushed
        self.ids: list[int] = []
        self.text = ""  # the completion so far, cut at a stop sequence
        self.emitted = 0  # characters already handed out
        self.finish: FinishReason | None = None

    def push(self, token: int) -> str:
        """Add a token; return the text that is now safe to emit."""
        if token in self.stop_ids:
            return self.end("stop")
        self.ids.append(token)
        if self.logprobs is not None and self.pending is not None:
            self.logprobs.append(self.pending)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next byte
            return ""
        return self._advance(text, final=False)

    def take(self, r: StepResult) -> str:
        """Add a step's token, with its logprobs if they are collected; the text now safe to emit.

        The held-back rest comes with it when the token was the sequence's last.
        """
        if r.logprob is not None and self.logprobs is not None:
            decode = self.tokenizer.decode
            top = tuple((decode([t]), v) for t, v in r.top)
            self.pending = TokenLogprob(decode([r.token]), r.token, r.logprob, top)
        piece = self.push(r.token)
        if r.finished and self.finish is None:
            piece += self.end("length")
        return piece

    def end(self, reason: FinishReason) -> str:
        """Finish the row; return whatever was held back."""
        self.finish = reason
        return self._advance(self.tokenizer.decode(self.ids), final=True)

    def _advance(self, text: str, *, final: bool) -> str:
        # Held-back text guarantees no stop can start before `emitted`.
        hits = [i for s in self.stops if (i := text.find(s, self.emitted)) >= 0]
        if hits:
            text, final = text[: min(hits)], True
            self.finish = "stop"
        self.text = text
        safe = len(text) if final else len(text) - held_back(text, self.stops)
        out = text[self.emitted : safe]
        self.emitted = max(self.emitted, safe)
        return out


def _completion(row: StreamRow) -> Completion:
    return Completion(
        text=row.text,
        finish_reason=row.finish or "length",
        prompt_tokens=row.prompt_tokens,
        completion_tokens=len(row.ids),
        token_ids=list(row.ids),
        logprobs=list(row.logprobs) if row.logprobs is not None else None,
    )


@dataclass(frozen=True, slots=True)
class Admitted:
    """A request ready for the token loop: its core sequence, the row that turns its tokens into text."""

    seq: DecodeSequence
    row: StreamRow
    prompt_tokens: int


def admit(
    tokenizer: Tokenizer,
    cfg: GenerationConfig,
    *,
    context: int,
    vocab_size: int,
    device: torch.device | str,
    prompt: str | None = None,
    ids: list[int] | None = None,
    strict: bool = False,
    remember: bool = True,
) -> Admitted:
    """Turn a prompt (or its ``ids``, already encoded: then they are used) into a sequence for the token loop.

    The one admission, for the plain generator and the serving engine alike.

    The prompt must leave room in ``context`` for a token (else :class:`ContextLengthError`); an empty one
    starts from BOS (or EOS). The budget is ``cfg.max_tokens``, cut to what the context leaves, or with
    ``strict`` refused when it does not fit. Seeded from ``cfg.seed`` (or the OS); the grammar becomes a
    constraint over the model's ``vocab_size`` ids.
    ``remember``: a long prompt is tokenized only past what it shares with a recent one (``forge.prompt_memory``).

    >>> tok = Tokenizer.train(["abc"], kind="char")
    >>> a = admit(tok, GenerationConfig(max_tokens=50), context=16, vocab_size=320, device="cpu", prompt="ab")
    >>> (a.prompt_tokens, a.seq.max_new_tokens)
    (2, 14)
    """
    if ids is None:
        assert prompt is not None, "pass the prompt or its ids"
        ids = tokenizer.encode_prompt(prompt, remember=remember)
    ids = list(ids)
    prompt_tokens = len(ids)
    if prompt_tokens >= context:
        raise ContextLengthError(field="prompt", prompt_tokens=prompt_tokens, context=context)
    # An empty prompt starts from BOS, or else EOS: the document boundary the model saw in training.
    ids = ids or [next((i for i in (tokenizer.bos_id, tokenizer.eos_id) if i is not None), 0)]
    if strict and len(ids) + cfg.max_tokens > context:
        raise ContextLengthError(field="max_tokens", prompt_tokens=len(ids), context=context, requested=cfg.max_tokens)
    budget = min(cfg.max_tokens, context - len(ids))  # not strict: stop at the context, finish_reason "length"
    stop_ids = tokenizer.stop_ids if cfg.stop_at_eos else frozenset()
    generator = torch.Generator(device)
    generator.manual_seed(cfg.seed if cfg.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    # The grammar knows the budget: it steers the text to a valid end before the budget runs out.
    constraint = Constraint(cfg.grammar, tokenizer, vocab_size, budget) if cfg.grammar is not None else None
    seq = DecodeSequence(ids, budget, cfg.sampling(), generator, stop_ids, cfg.logprobs, constraint)
    seq.speculate = cfg.speculate != "off"
    row = StreamRow(tokenizer, cfg.stop, stop_ids, prompt_tokens)
    if cfg.logprobs is not None:
        row.logprobs = []
    return Admitted(seq, row, prompt_tokens)


class TextStream(Iterator[str]):
    """Text pieces as they are generated; ``completion`` is set once the stream is exhausted."""

    def __init__(self, pieces: Iterator[str], rows: list[StreamRow]) -> None:
        self._pieces, self._rows = pieces, rows

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        close = getattr(self._pieces, "close", None)
        if close:
            close()

    @property
    def completion(self) -> Completion | None:
        """Text, finish reason and token counts; None until generation has finished."""
        return _completion(self._rows[0]) if self._rows and self._rows[0].finish else None


class AsyncTextStream(AsyncIterator[str]):
    """Async twin of :class:`TextStream`."""

    def __init__(self, pieces: AsyncIterator[str], rows: list[StreamRow]) -> None:
        self._pieces, self._rows = pieces, rows

    def __aiter__(self) -> AsyncTextStream:
        return self

    async def __anext__(self) -> str:
        return await self._pieces.__anext__()

    async def aclose(self) -> None:
        aclose = getattr(self._pieces, "aclose", None)
        if aclose:
            await aclose()

    @property
    def completion(self) -> Completion | None:
        return _completion(self._rows[0]) if self._rows and self._rows[0].finish else None

    @property
    def partial_logprobs(self) -> list[TokenLogprob]:
        """The logprobs of the tokens generated so far (when asked for), while the stream runs."""
        return list(self._rows[0].logprobs or []) if self._rows else []


class Generator:
    """Generates text from a model and its tokenizer.

    ``dtype`` casts the model for inference (e.g. ``torch.bfloat16`` on a GPU);
    by default the weights stay as they are. ``compile``: compile the decode step
    (see :func:`forge.core.decode.compiled_step`; on CUDA, the graphed step), paid once
    on the first generation.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        compile: bool = False,
        prefix_cache: int = 0,
        draft: Transformer | None = None,
    ) -> None:
        self.compile = compile
        #: ``speculate="draft"`` takes this model's proposals (same tokenizer; see forge.core.draft).
        self.draft = draft.eval() if draft is not None else None
        #: ``prefix_cache`` bytes of prompts' keys and values kept between generations (0: none), e.g. a
        #: chat's earlier turns: the next turn prefills only what is new (see forge.core.prefix_cache).
        self.prefix_cache = PrefixCache(prefix_cache) if prefix_cache > 0 else None
        if device is not None:
            model = model.to(resolve_device(str(device)) if isinstance(device, str) else device)
        if dtype is not None:
            model = model.to(dtype)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.device = model.tok_emb.weight.device
        #: Held while a token loop runs (the KV cache lives in the model); hold it to keep the model still.
        self.lock = threading.Lock()

    # -- the one place requests turn into token loops -------------------------
    def _config(self, config: GenerationConfig | None, options: dict[str, Any]) -> GenerationConfig:
        if "stop" in options and options["stop"] is not None and not isinstance(options["stop"], str):
            options["stop"] = tuple(options["stop"])
        return config.replace(**options) if config else GenerationConfig(**options)

    def _stream_rows(
        self,
        prompts: Sequence[str],
        cfg: GenerationConfig,
        rows: list[StreamRow],
        ids: Sequence[list[int]] | None = None,
        strict: bool = False,
    ) -> Iterator[tuple[int, str]]:
        """Yield (row index, new text) as tokens arrive; ``rows`` receives each row's state.

        The prompts are one fixed batch of the token loop, each row at its own positions, admitted as
        the engine admits a request (:func:`admit`); a row that finishes leaves the batch.
        """
        if cfg.speculate == "draft" and self.draft is None:
            raise ConfigError(
                "speculate='draft' needs a draft model: load one with the same tokenizer "
                "(Forge.load(model, draft='small-model') or `forge generate MODEL --draft DRAFT`), "
                "or use speculate='ngram'",
                field="speculate",
            )
        encoded = list(ids) if ids is not None else self.tokenizer.encode_prompts(list(prompts))
        config = self.model.config
        admitted = [
            admit(
                self.tokenizer,
                cfg,
                context=config.context_length,
                vocab_size=config.vocab_size,
                device=self.device,
                ids=p,
                strict=strict,
            )
            for p in encoded
        ]
        rows.extend(a.row for a in admitted)
        seqs = [a.seq for a in admitted]
        for seq in seqs[1:]:  # one request, one seed: the rows sample together (one call) and differ
            seq.params, seq.generator = seqs[0].params, seqs[0].generator
        index = {id(seq): i for i, seq in enumerate(seqs)}
        with self.lock:  # one token loop at a time: its KV caches go into the model
            draft = self.draft if cfg.speculate == "draft" else None
            batcher = fixed_batcher(
                self.model, seqs, vocab_limit=self.tokenizer.vocab_size, compile=self.compile, draft=draft
            )
            batcher.prefix_cache = self.prefix_cache
            try:
                results = batcher.add_many(seqs)
                while results:
                    for r in results:
                        i = index[id(r.seq)]
                        if rows[i].finish is None and (piece := rows[i].take(r)):
                            yield i, piece
                        if rows[i].finish is not None:  # a stop token, a stop string or the budget
                            batcher.remove(r.seq)
                    results = batcher.step()
            finally:
                batcher.clear()

    # -- public API --------------------------------------------------------------
    def complete(
        self,
        prompts: str | Sequence[str],
        config: GenerationConfig | None = None,
        *,
        ids: Sequence[int] | Sequence[list[int]] | None = None,
        strict: bool = False,
        **options: Any,
    ) -> list[Completion]:
        """Generate for one prompt or a batch; a :class:`Completion` per prompt.

        ``ids``: the prompt already encoded (``tokenizer.encode_prompt``; for a batch, a list per prompt).
        ``strict``: a ``max_tokens`` that does not fit after a prompt raises ``ContextLengthError`` instead
        of being cut to the context (see :func:`admit`).
        """
        batch = [prompts] if isinstance(prompts, str) else list(prompts)
        if not batch:
            raise GenerationError("no prompts given; pass a string or a non-empty list of strings")
        encoded = None
        if ids is not None:
            encoded = [list(ids)] if isinstance(prompts, str) else [list(p) for p in ids]  # type: ignore[arg-type]
            if len(encoded) != len(batch):
                raise GenerationError(f"ids holds {len(encoded)} prompts for {len(batch)}; pass one list per prompt")
        cfg = self._config(config, options)
        rows: list[StreamRow] = []
        for _ in self._stream_rows(batch, cfg, rows, encoded, strict):
            pass
        return [_completion(row) for row in rows]

    def generate(
        self, prompts: str | Sequence[str], config: GenerationConfig | None = None, **options: Any
    ) -> str | list[str]:
        """The generated text: a string for one prompt, a list for a batch."""
        results = [c.text for c in self.complete(prompts, config, **options)]
        return results[0] if isinstance(prompts, str) else results

    def stream(
        self,
        prompt: str,
        config: GenerationConfig | None = None,
        *,
        ids: list[int] | None = None,
        strict: bool = False,
        **options: Any,
    ) -> TextStream:
        """Text pieces as they are generated; ``.completion`` once exhausted. ``ids``, ``strict``: see ``complete``."""
        cfg = self._config(config, options)
        rows: list[StreamRow] = []
        encoded = [list(ids)] if ids is not None else None
        return TextStream((piece for _, piece in self._stream_rows([prompt], cfg, rows, encoded, strict)), rows)

    def astream(
        self,
        prompt: str,
        config: GenerationConfig | None = None,
        *,
        ids: list[int] | None = None,
        strict: bool = False,
        **options: Any,
    ) -> AsyncTextStream:
        """Async twin of :meth:`stream`: compute runs in a worker thread, the event loop stays free."""
        cfg = self._config(config, options)
        rows: list[StreamRow] = []
        encoded = [list(ids)] if ids is not None else None
        return AsyncTextStream(self._apieces(prompt, cfg, rows, encoded, strict), rows)

    async def _apieces(
        self,
        prompt: str,
        cfg: GenerationConfig,
        rows: list[StreamRow],
        ids: list[list[int]] | None,
        strict: bool,
    ) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, object]] = asyncio.Queue()
        cancelled = threading.Event()

        def work() -> None:
            try:
                for _, piece in self._stream_rows([prompt], cfg, rows, ids, strict):
                    if cancelled.is_set():
                        return
                    loop.call_soon_threadsafe(queue.put_nowait, ("piece", piece))
                loop.call_soon_threadsafe(queue.put_nowait, ("done", None))
            except BaseException as e:  # hand every failure to the awaiting side
                loop.call_soon_threadsafe(queue.put_nowait, ("error", e))

        worker = asyncio.wrap_future(compute.submit(work))  # on the compute thread, see forge.compute
        try:
            while True:
                kind, value = await queue.get()
                if kind == "piece":
                    yield str(value)
                elif kind == "error":
                    raise value  # type: ignore[misc]
                else:
                    break
        finally:
            cancelled.set()
            await asyncio.shield(worker)

    async def agenerate(
        self, prompts: str | Sequence[str], config: GenerationConfig | None = None, **options: Any
    ) -> str | list[str]:
        """Async twin of :meth:`generate`."""
        return await compute.run(self.generate, prompts, config, **options)


def likelihoods(model: Transformer, tokenizer: Tokenizer, contexts: Sequence[str], continuation: str) -> list[float]:
    """How well ``continuation`` follows each of ``contexts``: the mean log-probability of its tokens.

    One batched forward pass, no sampling: the model's own judgement of which context a text belongs to
    (a passage a question asks about, the tool a task needs; UPR, Sachan et al. 2022). Reads no KV cache,
    so it may run while the model generates elsewhere.
    """
    if not contexts:
        return []
    asked = tokenizer.encode(continuation)
    rows = [tokenizer.encode(c) for c in contexts]
    longest = max(len(r) for r in rows) + len(asked)
    device = next(model.parameters()).device
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, row in enumerate(rows):  # right-padded: causal attention never reads the padding
        ids[i, : len(row) + len(asked)] = torch.tensor(row + asked)
    with torch.inference_mode():
        logits = model(ids.to(device)).float().log_softmax(-1)
    target = torch.tensor(asked, device=device)[:, None]
    return [
        logits[i, len(r) - 1 : len(r) - 1 + len(asked)].gather(-1, target).mean().item() for i, r in enumerate(rows)
    ]
