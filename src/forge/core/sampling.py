"""Sampling: logits in, token ids out. Pure functions driven by a seeded generator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from forge.config import bounded, check_specs
from forge.core import ops

__all__ = [
    "SamplingParams",
    "TokenConstraint",
    "apply_penalties",
    "apply_repetition_penalty",
    "apply_token_bitmask",
    "constraint_mask",
    "probabilities",
    "process_logits",
    "sample",
    "top_logprobs",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class SamplingParams:
    """How to pick the next token. ``temperature=0`` is greedy decoding.

    Each field's bounds are data (``forge.config.bounded``): ``GenerationConfig`` shares them, the CLI's flags
    and the server's schema are built from them.

    >>> SamplingParams(temperature=0).greedy
    True
    """

    temperature: float = bounded(1.0, ge=0, doc="Divides the logits; 0 is greedy.")
    top_k: int | None = bounded(None, integer=True, ge=1, doc="Sample only from the k most likely tokens.")
    top_p: float | None = bounded(None, gt=0, le=1, doc="Sample only from the smallest set with this much mass.")
    min_p: float | None = bounded(None, ge=0, le=1, doc="Drop tokens less than min_p times as likely as the best.")
    repetition_penalty: float = bounded(1.0, gt=0, doc="Divides the logits of tokens already seen; 1 disables it.")
    presence_penalty: float = bounded(0.0, ge=-2, le=2, doc="Subtracted from seen tokens' logits (OpenAI's).")
    frequency_penalty: float = bounded(0.0, ge=-2, le=2, doc="Subtracted per occurrence (OpenAI's).")

    def __post_init__(self) -> None:
        check_specs(self)

    @property
    def penalised(self) -> bool:
        """Whether presence or frequency penalties apply (they need counts of the generated tokens)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def greedy(self) -> bool:
        # Below 1e-5, logits / temperature overflows float32: the limit is greedy decoding anyway.
        return self.temperature < 1e-5


class TokenConstraint(Protocol):
    """What one sequence may generate next, e.g. a JSON schema compiled by ``forge.structured``.

    Each step, the sampler asks for the allowed tokens as a packed bitmask
    (bit ``t % 32`` of word ``t // 32`` is set when token ``t`` is allowed),
    samples, and reports the chosen token back.
    """

    def fill_mask(self, words: torch.Tensor) -> None:
        """Write the allowed next tokens into ``words``: a contiguous int32 CPU row of ceil(V / 32)."""
        ...

    def accept(self, token: int) -> None:
        """The token that was sampled (always one the last mask allowed)."""
        ...


def constraint_mask(constraints: list[TokenConstraint | None], vocab: int) -> torch.Tensor | None:
    """The packed masks (B, ceil(V / 32)) int32 of a batch's constraints (all ones for a row without); None if none.

    Computed on the CPU: on a GPU this runs while the step's forward is still in flight.
    """
    if all(c is None for c in constraints):
        return None
    words = torch.full((len(constraints), (vocab + 31) // 32), -1, dtype=torch.int32)
    for row, constraint in enumerate(constraints):
        # One row after another: llguidance's thread pool measured slower at batch 8 and 32
        # (benchmarks/constrained.py, H200 host and this CPU), as its threads contend with torch's.
        if constraint is not None:
            constraint.fill_mask(words[row])
    return words


def apply_token_bitmask(logits: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """``logits`` (B, V) with every token whose bit is clear in ``words`` (B, ceil(V / 32)) set to -inf."""
    words = words.to(logits.device, non_blocking=True)
    bits = torch.arange(32, device=logits.device, dtype=torch.int32)
    allowed = ((words[:, :, None] >> bits) & 1).bool().flatten(1)[:, : logits.shape[-1]]  # (B, V)
    return logits.masked_fill(~allowed, float("-inf"))


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty (Keskar et al., 2019) on tokens already in the sequence.

    logits (B, V); seen (B, V) bool. Positive logits are divided by the penalty
    and negative ones multiplied, so a seen token always becomes less likely.
    """
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's presence and frequency penalties: ``logit -= presence * [count > 0] + frequency * count``.

    logits (B, V); counts (B, V), how often each token was generated so far.
    """
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts.to(logits.dtype)


def top_logprobs(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities under ``logits`` (B, V).

    Returns those of the ``chosen`` tokens (B,), and the ids and values of the top ``k`` (B, k).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    values, ids = logp.topk(max(k, 1), dim=-1)
    return logp.gather(-1, chosen[:, None]).squeeze(-1), ids[:, :k], values[:, :k]


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    seen: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick one token per row of ``logits`` (B, V); returns (B,) int64.

    ``seen`` (B, V) bool drives the repetition penalty, ``counts`` (B, V) the
    presence and frequency penalties.

    >>> sample(torch.tensor([[0.0, 5.0, 1.0]]), SamplingParams(temperature=0)).tolist()
    [1]
    """
    logits = process_logits(logits, params, seen, counts)
    if params.greedy:
        return logits.argmax(dim=-1)
    return torch.multinomial(probabilities(logits, params), 1, generator=generator).squeeze(-1)


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution (B, V) that :func:`sample` draws from, given penalised logits (B, V) and non-greedy params.

    Temperature, then top-k, min-p and top-p; speculative decoding's rejection sampling needs it whole.
    """
    logits = logits / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = ops.softmax(logits, dim=-1)
    if params.min_p is not None and params.min_p > 0:
        # Keep tokens at least min_p times as likely as the most likely one.
        floor = probs.max(dim=-1, keepdim=True).values * params.min_p
        probs = probs.masked_fill(probs < floor, 0.0)
    if params.top_p is not None and params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token once the mass before it already reaches top_p; the first always stays.
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= params.top_p
        drop[..., 0] = False  # a top_p that rounds to 0 in float32 must still keep the most likely token
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return probs


def process_logits(
    logits: torch.Tensor,
    params: SamplingParams,
    seen: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """The penalties of ``params`` applied to ``logits`` (B, V), in fp32: what sampling and logprobs see."""
    logits = logits.float()
    if seen is not None and params.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if counts is not None and params.penalised:
        logits = apply_penalties(logits, counts, params.presence_penalty, params.frequency_penalty)
    return logits
