"""Speculative decoding with a draft model: a smaller model with the same tokenizer proposes, the target verifies.

gpt-fast's and llama.cpp's ``--draft``: for each row, the draft model greedily decodes the next k
tokens from its own KV cache; the target checks them all in one forward (``forge.core.speculative.
verify``), as it checks n-gram proposals. A greedy draft is a deterministic proposal, so the same
acceptance rule keeps the target's output: token for token its greedy decode, or exactly its sampling
distribution (Leviathan et al., 2023, with a point-mass proposal).

Each row's draft keeps a one-row cache of its own, sized to the row's prompt and budget. After a
verify step, the cache keeps the proposals the target accepted (their keys and values are already
there) and recomputes from the first token that differs, so a step costs the draft k small forwards.

Torch only.
"""

from __future__ import annotations

import torch

from forge.core.kv_cache import CacheWrite, KVCache
from forge.core.steps import decode_step, prefill
from forge.core.transformer import Transformer

__all__ = ["DraftProposer"]


class DraftProposer:
    """Proposes the draft model's greedy continuation of a row's tokens (the ``NgramProposer`` interface).

    ``room``: the most tokens this row will hold (prompt, budget and the proposals past it).
    ``vocab_limit``: ids at or above it are never proposed (the target's padded vocabulary).
    """

    def __init__(self, model: Transformer, tokens: list[int], room: int, vocab_limit: int | None = None) -> None:
        self.model, self.vocab_limit = model, vocab_limit
        self.tokens: list[int] = list(tokens)
        self.max_len = min(room, model.config.context_length)
        self.caches: list[KVCache] | None = None  # allocated at the first proposal
        self.cached = 0  # leading tokens whose keys and values in the cache are right
        self._fed: list[int] = []  # proposals fed to the draft after ``cached`` at the last proposal

    def extend(self, tokens: list[int]) -> None:
        """Append tokens the target emitted."""
        self.tokens.extend(tokens)

    @torch.inference_mode()
    def propose(self, k: int) -> list[int]:
        """The draft's next ``k`` greedy tokens (fewer, or none, near the end of its cache)."""
        k = min(k, self.max_len - len(self.tokens))
        if k <= 0:
            return []
        if self.caches is None:
            weight = self.model.tok_emb.weight
            self.caches = self.model.make_caches(1, self.max_len, dtype=weight.dtype)
        self.model.use_caches(self.caches)
        # The proposals the target accepted are already in the cache; recompute from the first that differs.
        kept = self.cached
        for fed, token in zip(self._fed, self.tokens[self.cached :], strict=False):
            if fed != token:
                break
            kept += 1
        self.cached = min(kept, len(self.tokens) - 1)  # the last token's logits start the proposal
        logits = self._feed(self.tokens[self.cached :], self.cached)
        self.cached = len(self.tokens)
        proposed: list[int] = []
        while True:
            proposed.append(self._greedy(logits))
            if len(proposed) == k:
                break
            logits = self._feed(proposed[-1:], self.cached + len(proposed) - 1)
        self._fed = proposed[:-1]  # the last proposal was never fed
        return proposed

    def _feed(self, tokens: list[int], pos: int) -> torch.Tensor:
        """Run ``tokens`` from position ``pos``, writing the cache; the logits after the last one (V,)."""
        device = self.model.tok_emb.weight.device
        ids = torch.tensor([tokens], device=device)
        rows = slice(0, 1)
        if len(tokens) == 1:
            return decode_step(self.model, ids, CacheWrite(rows=rows, pos=pos, length=pos + 1))[0]
        if pos == 0:
            return prefill(self.model, ids, CacheWrite(rows=rows, pos=0, length=len(tokens)))[0]
        starts = torch.tensor([pos], device=device)
        write = CacheWrite(rows=rows, pos=starts, length=pos + len(tokens))
        return prefill(self.model, ids, write, None, starts)[0]

    def _greedy(self, logits: torch.Tensor) -> int:
        if self.vocab_limit is not None and self.vocab_limit < logits.shape[-1]:
            logits = logits[: self.vocab_limit]
        return int(logits.argmax())
