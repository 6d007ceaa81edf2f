"""Continuous batching: many sequences share one KV cache and decode together, one forward per step.

Each running sequence owns a row of the cache. A sequence joins between
steps with its own prefill (a forward over its prompt, written into a free
row); every step then feeds one token per running sequence in a single
batched forward, each at its own position, with a mask that hides the rest
of the row. A sequence that finishes leaves between steps: the last row is
copied into its place, so the running rows are always 0..n-1 and every
step works on a contiguous slice of the cache.

This module is torch only and single-threaded; ``forge.engine`` runs it in
a worker thread and feeds it requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from forge.core.kv_cache import CacheWrite, KVCache
from forge.core.sampling import (
    SamplingParams,
    TokenConstraint,
    apply_token_bitmask,
    constraint_mask,
    process_logits,
    sample,
    top_logprobs,
)
from forge.core.transformer import Transformer

__all__ = ["Batcher", "Sequence", "StepResult"]


@dataclass(eq=False)
class Sequence:
    """One request inside the batcher."""

    prompt: list[int]
    max_new_tokens: int
    params: SamplingParams
    generator: torch.Generator | None = None
    stop_ids: frozenset[int] = frozenset()
    logprobs: int | None = None  # None: none; k: the chosen token's and the top k
    constraint: TokenConstraint | None = None  # e.g. a JSON schema: masks what may come next
    # state, owned by the batcher
    row: int = -1
    length: int = 0  # tokens in the cache
    generated: int = 0
    last: int = 0  # the token to feed next
    counts: torch.Tensor | None = field(default=None, repr=False)  # (V,) for presence/frequency penalties
    seen: torch.Tensor | None = field(default=None, repr=False)  # (V,) for the repetition penalty
    done: bool = False


@dataclass(frozen=True, slots=True)
class StepResult:
    """A token for a sequence; ``finished`` when it was the sequence's last (a stop token or the budget)."""

    seq: Sequence
    token: int
    finished: bool
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


class Batcher:
    """Runs up to ``max_batch`` sequences of at most ``max_len`` tokens each on ``model``."""

    def __init__(
        self,
        model: Transformer,
        *,
        max_batch: int,
        max_len: int,
        vocab_limit: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.model, self.max_batch, self.max_len, self.vocab_limit = model, max_batch, max_len, vocab_limit
        self.caches: list[KVCache] = model.make_caches(max_batch, max_len, dtype=dtype)
        self.running: list[Sequence] = []  # running[i].row == i
        self.device = model.tok_emb.weight.device

    @property
    def free(self) -> int:
        return self.max_batch - len(self.running)

    @torch.inference_mode()
    def add(self, seq: Sequence) -> StepResult:
        """Prefill ``seq`` into a free row and sample its first token."""
        return self.add_many([seq])[0]

    @torch.inference_mode()
    def add_many(self, seqs: list[Sequence]) -> list[StepResult]:
        """Prefill several sequences in one forward (right-padded to the longest) and sample their first tokens.

        Padding is written into the cache past each prompt's end, where the
        decode mask never looks and the row's next tokens overwrite it.
        """
        assert 0 < len(seqs) <= self.free, "not enough free rows: check Batcher.free first"
        first = len(self.running)
        vocab = self.model.config.vocab_size
        for seq in seqs:
            T = len(seq.prompt)
            assert T > 0 and T + seq.max_new_tokens <= self.max_len, "the caller checks prompt and budget"
            seq.row, seq.length, seq.done = len(self.running), T, False
            if seq.params.penalised:
                seq.counts = torch.zeros(vocab, device=self.device)
            if seq.params.repetition_penalty != 1.0:
                seq.seen = torch.zeros(vocab, dtype=torch.bool, device=self.device)
                seq.seen[torch.tensor(seq.prompt, device=self.device)] = True
            self.running.append(seq)
        sizes = [len(s.prompt) for s in seqs]
        lengths = torch.tensor(sizes, device=self.device)  # (k,)
        T = max(sizes)
        tokens = torch.zeros(len(seqs), T, dtype=torch.long, device=self.device)  # (k, T), right-padded
        for i, seq in enumerate(seqs):
            tokens[i, : len(seq.prompt)] = torch.tensor(seq.prompt, device=self.device)
        mask = None
        if min(sizes) != T:
            q = torch.arange(T, device=self.device)[:, None]  # (T, 1)
            k = torch.arange(T, device=self.device)[None, :]  # (1, T)
            valid = k[None] < lengths[:, None, None]  # (k, 1, T): real keys of each row
            mask = ((k <= q)[None] & (valid | (k == q)[None]))[:, None]  # (k, 1, T, T); a pad query sees itself
        write = CacheWrite(rows=slice(first, first + len(seqs)), pos=0, length=T)
        logits = self._forward(tokens, None, mask, write, select=lengths - 1)  # (k, V)
        return self._pick(seqs, logits)

    @torch.inference_mode()
    def step(self) -> list[StepResult]:
        """One batched forward: the next token of every running sequence."""
        n = len(self.running)
        if n == 0:
            return []
        tokens = torch.tensor([[s.last] for s in self.running], device=self.device)  # (n, 1)
        lengths = [s.length for s in self.running]
        pos = torch.tensor(lengths, device=self.device)  # (n,)
        length = max(lengths) + 1  # from the host: no device sync
        mask = torch.arange(length, device=self.device)[None, :] <= pos[:, None]  # (n, length)
        rows = slice(0, n)
        write = CacheWrite(rows=rows, pos=pos, length=length, flat_index=self.caches[0].flat_index(rows, pos))
        logits = self._forward(tokens, pos[:, None], mask[:, None, None, :], write)  # (n, V)
        for s in self.running:
            s.length += 1
        return self._pick(list(self.running), logits)

    def remove(self, seq: Sequence) -> None:
        """Free ``seq``'s row (the last running row moves into it)."""
        if seq.row < 0 or seq.row >= len(self.running) or self.running[seq.row] is not seq:
            return
        last = self.running.pop()
        if last is not seq:
            for cache in self.caches:
                cache.move_row(last.row, seq.row)
            last.row = seq.row
            self.running[seq.row] = last
        seq.row, seq.done = -1, True

    # -- internals --------------------------------------------------------------------
    def _forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None,
        mask: torch.Tensor | None,
        write: CacheWrite,
        select: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self.model.use_caches(self.caches)
        try:
            out = self.model(
                tokens, positions=positions, mask=mask, cache_pos=write, last_only=select is None, select=select
            )
            return out[:, -1]
        finally:
            self.model.use_caches(None)

    def _pick(self, seqs: list[Sequence], logits: torch.Tensor) -> list[StepResult]:
        """Sample each sequence's next token from its row of ``logits`` (n, V) and update its state.

        Plain greedy rows share one argmax; the others sample one by one (each
        with its own seed and penalties). Token ids come back to the host in one
        transfer, so a GPU step synchronises once, not once per row.
        """
        # The CPU computes grammar masks while a GPU still runs the forward that made `logits`.
        words = constraint_mask([s.constraint for s in seqs], logits.shape[-1])
        logits = logits.float()  # (n, V)
        if self.vocab_limit is not None and self.vocab_limit < logits.shape[-1]:
            logits[:, self.vocab_limit :] = float("-inf")
        if words is not None:
            logits = apply_token_bitmask(logits, words)
        plain = {i for i, s in enumerate(seqs) if s.params.greedy and s.counts is None and s.seen is None}
        tokens = torch.empty(len(seqs), dtype=torch.long, device=logits.device)  # (n,)
        if plain:
            index = torch.tensor(sorted(plain), device=logits.device)
            tokens[index] = logits[index].argmax(dim=-1)
        wanted: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for i, seq in enumerate(seqs):
            counts = seq.counts[None] if seq.counts is not None else None
            seen = seq.seen[None] if seq.seen is not None else None
            if i not in plain:
                tokens[i : i + 1] = sample(logits[i : i + 1], seq.params, seq.generator, seen, counts)
            if seq.logprobs is not None:
                processed = process_logits(logits[i : i + 1], seq.params, seen, counts)
                wanted.append((i, *top_logprobs(processed, tokens[i : i + 1], seq.logprobs)))
        ids = tokens.tolist()  # the one host sync of the step
        logprobs: dict[int, tuple[float, tuple[tuple[int, float], ...]]] = {}
        for i, own, top_ids, top_values in wanted:
            pairs = zip(top_ids[0].tolist(), top_values[0].tolist(), strict=True)
            logprobs[i] = (float(own[0]), tuple(pairs))
        results = []
        for i, (seq, t) in enumerate(zip(seqs, ids, strict=True)):
            seq.last, seq.generated = t, seq.generated + 1
            if seq.constraint is not None:
                seq.constraint.accept(t)
            if seq.counts is not None:
                seq.counts[t] += 1
            if seq.seen is not None:
                seq.seen[t] = True
            finished = t in seq.stop_ids or seq.generated >= seq.max_new_tokens
            logprob, top = logprobs.get(i, (None, ()))
            results.append(StepResult(seq, t, finished, logprob, top))
        return results
