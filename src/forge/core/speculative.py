"""Speculative decoding without a draft model: n-gram prompt lookup, verified in one forward.

A row's last few tokens are looked up in its own prompt and output; where they occurred before, the
tokens that followed are proposed as the next ones (llama.cpp's and vLLM's "prompt lookup"). One
forward over the row's next input and the k proposals gives the model's distribution at each of
the k + 1 positions; proposals are accepted from the left as long as the model agrees, and the
first disagreement is replaced by the model's own token. A step thus yields between 1 and k + 1
tokens for the price of one forward, whose cost grows little with k while decoding is bound by
reading the weights.

Greedy rows accept a proposal when it is the argmax: the output is token for token the plain
decoder's. Sampled rows use the rejection rule of Leviathan et al. (2023) for a deterministic
proposal: accept token d with probability p(d), else sample from p with d removed; every emitted
token is distributed exactly as plain sampling would draw it.

Speculation turns itself off where it would slow decoding down: a row whose proposals were accepted
less than :data:`MIN_ACCEPTANCE` of the time over its last :data:`WINDOW` proposed tokens stops
proposing for :data:`PAUSE` tokens (open-ended text rarely repeats its prompt); rows with a grammar,
penalties or an observer never speculate (their picks depend on each token before), and a step
where no row has a proposal is a plain one-token step.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from forge.core.kv_cache import CacheWrite
from forge.core.sampling import SamplingParams, probabilities, process_logits, top_logprobs

if TYPE_CHECKING:
    from forge.core.steps import Batch

__all__ = [
    "DRAFT_MAX",
    "DRAFT_TOKENS",
    "MIN_ACCEPTANCE",
    "PAUSE",
    "SPECULATE_MODES",
    "WINDOW",
    "Accepted",
    "NgramProposer",
    "Proposer",
    "Speculation",
    "accept_row",
    "verify",
]

#: What ``speculate=`` accepts: ``draft`` takes a draft model's proposals (``forge.core.draft``).
SPECULATE_MODES = ("off", "ngram", "draft")
#: Proposed tokens per step: a row starts at DRAFT_TOKENS, goes up by 2 (to DRAFT_MAX) after a step that
#: accepted every proposal and halves after one that accepted none, so a miss costs a short verify.
DRAFT_TOKENS, DRAFT_MAX = 3, 8
#: Longest and shortest n-gram matched against the earlier tokens; the longest match wins.
NGRAM_MAX, NGRAM_MIN = 4, 2
#: Below this acceptance rate over the last WINDOW proposed tokens, a row pauses speculation.
MIN_ACCEPTANCE = 0.3
WINDOW = 8
#: Tokens a paused row decodes plainly before it proposes again.
PAUSE = 48


class Proposer(Protocol):
    """What proposes a row's next tokens: :class:`NgramProposer`, or ``forge.core.draft.DraftProposer``."""

    def extend(self, tokens: list[int]) -> None: ...

    def propose(self, k: int) -> list[int]: ...


class NgramProposer:
    """Proposes the tokens that followed the latest earlier occurrence of the last n tokens.

    An index maps each n-gram (n from :data:`NGRAM_MIN` to :data:`NGRAM_MAX`) to the position after
    its latest occurrence; it grows with each token, so a lookup costs the same at any length.

    >>> p = NgramProposer([5, 6, 7, 8, 9, 5, 6])
    >>> p.propose(3)
    [7, 8, 9]
    """

    def __init__(self, tokens: list[int]) -> None:
        self.tokens: list[int] = []
        self._index: dict[tuple[int, ...], int] = {}
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        """Append ``tokens``; index the n-grams that now have a token after them."""
        for token in tokens:
            end = len(self.tokens)  # the n-grams ending just before the new token are followed by it
            for n in range(NGRAM_MIN, NGRAM_MAX + 1):
                if end >= n:
                    self._index[tuple(self.tokens[end - n : end])] = end
            self.tokens.append(token)

    def propose(self, k: int) -> list[int]:
        """Up to ``k`` tokens that followed the longest n-gram matching the end, at its latest occurrence."""
        if k <= 0:
            return []
        for n in range(NGRAM_MAX, NGRAM_MIN - 1, -1):
            if len(self.tokens) < n:
                continue
            at = self._index.get(tuple(self.tokens[-n:]))
            if at is not None:
                return self.tokens[at : at + k]
        return []


@dataclass
class Speculation:
    """A row's speculation: its proposer and its recent acceptance, to pause where it does not pay."""

    proposer: Proposer
    k: int = DRAFT_TOKENS
    window: collections.deque[tuple[int, int]] = field(default_factory=lambda: collections.deque(maxlen=8))
    paused: int = 0  # tokens still to decode plainly
    proposed: int = 0
    accepted: int = 0
    steps: int = 0

    def draft(self, budget: int) -> list[int]:
        """The proposals for this step (``budget``: the most that may be used); none while paused."""
        if self.paused > 0:
            return []
        return self.proposer.propose(min(self.k, budget))

    def record(self, proposed: int, accepted: int, emitted: int) -> None:
        """Count a step's proposals and acceptances; pause when the window's acceptance rate is too low."""
        if self.paused > 0:
            self.paused = max(0, self.paused - emitted)
        if not proposed:
            return
        self.k = min(DRAFT_MAX, self.k + 2) if accepted == proposed else max(1, self.k // 2) if not accepted else self.k
        self.proposed, self.accepted, self.steps = self.proposed + proposed, self.accepted + accepted, self.steps + 1
        self.window.append((proposed, accepted))
        tried = sum(p for p, _ in self.window)
        if tried >= WINDOW and sum(a for _, a in self.window) < MIN_ACCEPTANCE * tried:
            self.paused, self.window = PAUSE, collections.deque(maxlen=self.window.maxlen)


@dataclass(frozen=True, slots=True)
class Accepted:
    """A row's tokens from one verify step, and their logprobs when asked for."""

    tokens: list[int]
    accepted: int  # how many of the proposals
    logprobs: list[tuple[float, tuple[tuple[int, float], ...]]] = field(default_factory=list)


def accept_row(
    logits: torch.Tensor,
    draft: list[int],
    params: SamplingParams,
    generator: torch.Generator | None,
    logprobs: int | None,
    targets: list[int] | None = None,
) -> Accepted:
    """The tokens a row emits from one verify step's ``logits`` (len(draft) + 1, V) over its proposals.

    ``targets``: the greedy argmax of each position, already on the host (computed for the whole batch).
    """
    if params.greedy:
        assert targets is not None, "greedy rows get their argmaxes from the batch"
        n = 0
        while n < len(draft) and draft[n] == targets[n]:
            n += 1
        tokens = [*draft[:n], targets[n]]
        processed = logits[: n + 1].float() if logprobs is not None else logits
    else:
        processed = process_logits(logits[: len(draft) + 1], params)
        probs = probabilities(processed, params)  # (len(draft) + 1, V)
        n, tokens = _rejection(probs, draft, generator)
    found: list[tuple[float, tuple[tuple[int, float], ...]]] = []
    if logprobs is not None:
        chosen = torch.tensor(tokens, device=logits.device)
        own, ids, values = top_logprobs(processed[: len(tokens)], chosen, logprobs)
        for lp, tids, tvalues in zip(own.tolist(), ids.tolist(), values.tolist(), strict=True):
            found.append((lp, tuple(zip(tids, tvalues, strict=True))))
    return Accepted(tokens, n, found)


def _rejection(probs: torch.Tensor, draft: list[int], generator: torch.Generator | None) -> tuple[int, list[int]]:
    """Accept each proposal d with probability p(d); at the first rejection sample p without d; else one more."""
    if draft:
        index = torch.tensor(draft, device=probs.device)
        p = probs[torch.arange(len(draft), device=probs.device), index].tolist()  # each proposal's probability
        u = torch.rand(len(draft), generator=generator, device=probs.device).tolist()
        for n, (pn, un) in enumerate(zip(p, u, strict=True)):
            if un >= pn:  # rejected: the residual max(p - 1[d], 0), renormalised, is p without d
                residual = probs[n].clone()
                residual[draft[n]] = 0.0
                token = int(torch.multinomial(residual, 1, generator=generator).item())
                return n, [*draft[:n], token]
    token = int(torch.multinomial(probs[len(draft)], 1, generator=generator).item())
    return len(draft), [*draft, token]


def _forward(b: Batch, inputs: torch.Tensor) -> torch.Tensor:
    """The eager verify forward: logits (n, W, V) of the running rows' ``inputs`` (n, W) from their lengths."""
    seqs, device, W = b.running, b.device, inputs.shape[1]
    rows = slice(0, len(seqs))
    starts = torch.tensor([s.length for s in seqs], device=device)  # (n,)
    length = min(b.max_len, max(s.length for s in seqs) + W)
    positions = (starts[:, None] + torch.arange(W, device=device)).clamp_(max=length - 1)  # (n, W)
    mask = torch.arange(length, device=device) <= positions[:, :, None]  # (n, W, length)
    write = CacheWrite(rows=rows, pos=starts, length=length, flat_index=b.caches[0].flat_index(rows, starts, W))
    b._install()
    logits = b.model(inputs, positions=positions, mask=mask[:, None], write=write)  # (n, W, V)
    if b.vocab_limit is not None and b.vocab_limit < logits.shape[-1]:
        logits[..., b.vocab_limit :] = float("-inf")
    return logits


def verify(b: Batch) -> list[Accepted] | None:
    """One speculative step of every running row of ``b``: their tokens, or None where no row has a proposal.

    The rows' next inputs and proposals (padded to the longest) go through one forward at each row's
    own positions; each row then keeps what :func:`accept_row` accepts, its cache length grows by as
    many tokens, and its last token becomes its next input. Keys written past a row's new length are
    never read: the row writes those slots again before its mask shows them. Where the batcher replays
    CUDA graphs and the whole batch runs, the forward is a captured graph's replay (padded to
    :data:`DRAFT_MAX` + 1 tokens a row), not hundreds of kernel launches.
    """
    seqs = b.running
    drafts = [s.spec.draft(s.max_new_tokens - s.generated - 1) if s.spec is not None else [] for s in seqs]
    K = max(map(len, drafts))
    if K == 0:
        for seq in seqs:
            if seq.spec is not None:
                seq.spec.record(0, 0, 1)  # a plain step follows: one token each
        return None
    n, device = len(seqs), b.device
    # The whole batch runs (or the graphs replay partial batches): replay a captured verify.
    graphed = b.graphs is not None and (n == b.max_batch or b.graphs.partial)
    width = DRAFT_MAX + 1 if graphed else K + 1
    inputs = torch.zeros(n, width, dtype=torch.long, device=device)
    inputs[:, 0] = b.tokens[:n, 0]
    inputs[:, 1 : K + 1] = torch.tensor([d + [0] * (K - len(d)) for d in drafts], device=device)
    if graphed:
        assert b.graphs is not None
        logits, argmax = b.graphs.verify(inputs, [s.length for s in seqs])
    else:
        logits = _forward(b, inputs)
        argmax = logits.argmax(dim=-1)
    greedy = [s.params.greedy for s in seqs]
    targets = argmax.tolist() if any(greedy) else None  # one transfer for every greedy row
    accepted = [
        accept_row(logits[i, : len(d) + 1], d, s.params, s.generator, s.logprobs, targets[i] if targets else None)
        for i, (s, d) in enumerate(zip(seqs, drafts, strict=True))
    ]
    for seq, d, a in zip(seqs, drafts, accepted, strict=True):
        seq.length += len(a.tokens)
        seq.generated += len(a.tokens)
        if seq.spec is not None:
            seq.spec.record(len(d), a.accepted, len(a.tokens))
    b.tokens[:n, 0] = torch.tensor([a.tokens[-1] for a in accepted], device=device)
    return accepted
