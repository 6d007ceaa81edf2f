"""Sampling: greedy, seeded draws, top-k, top-p, min-p, repetition penalty, validation."""

from __future__ import annotations

import math

import pytest
import torch

from forge.core.sampling import SamplingParams, apply_repetition_penalty, sample
from forge.errors import ConfigError

DRAWS = 2000


def _logits(seed: int = 0, batch: int = 4, vocab: int = 50) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def _draw_many(logits: torch.Tensor, params: SamplingParams, n: int = DRAWS, seed: int = 0) -> torch.Tensor:
    """(n, B) samples from one seeded generator: a row of logits repeated n times."""
    generator = torch.Generator().manual_seed(seed)
    repeated = logits.repeat(n, 1)  # (n*B, V)
    return sample(repeated, params, generator).view(n, logits.shape[0])


def test_greedy_is_argmax() -> None:
    logits = _logits()
    out = sample(logits, SamplingParams(temperature=0))
    assert out.dtype == torch.int64
    assert out.shape == (4,)
    for row, token in zip(logits, out.tolist(), strict=True):
        assert row[token] == row.max()


def test_greedy_ignores_the_generator() -> None:
    logits = _logits()
    a = sample(logits, SamplingParams(temperature=0), torch.Generator().manual_seed(1))
    b = sample(logits, SamplingParams(temperature=0), torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


def test_greedy_accepts_low_precision_logits() -> None:
    logits = _logits().to(torch.bfloat16)
    assert torch.equal(sample(logits, SamplingParams(temperature=0)), logits.float().argmax(-1))


def test_same_seed_same_tokens() -> None:
    logits = _logits()
    params = SamplingParams(temperature=1.0)
    assert torch.equal(_draw_many(logits, params, 200, seed=5), _draw_many(logits, params, 200, seed=5))


def test_different_seed_different_tokens() -> None:
    logits = torch.zeros(1, 50)  # uniform: collisions over 200 draws are astronomically unlikely
    params = SamplingParams(temperature=1.0)
    assert not torch.equal(_draw_many(logits, params, 200, seed=5), _draw_many(logits, params, 200, seed=6))


def test_sampling_follows_the_distribution() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    draws = _draw_many(probs.log()[None], SamplingParams(temperature=1.0), n=20_000).flatten()
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    torch.testing.assert_close(freq, probs, atol=0.02, rtol=0)


def test_temperature_sharpens_and_flattens() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    cold = _draw_many(logits, SamplingParams(temperature=0.2), n=5000).flatten()
    hot = _draw_many(logits, SamplingParams(temperature=5.0), n=5000).flatten()
    assert (cold == 0).float().mean() > 0.95
    assert (hot == 0).float().mean() < 0.5


def test_top_k_one_equals_greedy() -> None:
    logits = _logits(batch=8)
    greedy = sample(logits, SamplingParams(temperature=0))
    for seed in range(20):
        got = sample(logits, SamplingParams(temperature=1.5, top_k=1), torch.Generator().manual_seed(seed))
        assert torch.equal(got, greedy)


@pytest.mark.parametrize("k", [2, 5])
def test_top_k_restricts_support(k: int) -> None:
    logits = _logits(batch=3)
    draws = _draw_many(logits, SamplingParams(temperature=2.0, top_k=k))
    for row in range(3):
        allowed = set(torch.topk(logits[row], k).indices.tolist())
        seen = set(draws[:, row].tolist())
        assert seen <= allowed
        assert seen == allowed  # every one of the top k shows up at temperature 2 over 2000 draws


def test_top_k_larger_than_vocab_is_harmless() -> None:
    logits = _logits(vocab=5)
    draws = _draw_many(logits, SamplingParams(temperature=1.0, top_k=100), n=100)
    assert draws.max() < 5


def test_top_p_restricts_to_the_nucleus() -> None:
    probs = torch.tensor([0.4, 0.3, 0.2, 0.06, 0.04])
    # Cumulative mass 0.4, 0.7, 0.9: top_p=0.75 keeps the first three (the third crosses the threshold).
    draws = _draw_many(probs.log()[None], SamplingParams(temperature=1.0, top_p=0.75)).flatten()
    assert set(draws.tolist()) == {0, 1, 2}
    freq = torch.bincount(draws, minlength=5).float() / draws.numel()
    # Renormalised within the nucleus: 0.4/0.9, 0.3/0.9, 0.2/0.9.
    torch.testing.assert_close(freq[:3], probs[:3] / 0.9, atol=0.04, rtol=0)


def test_top_p_keeps_the_most_likely_token_alone() -> None:
    probs = torch.tensor([0.9, 0.05, 0.05])
    draws = _draw_many(probs.log()[None], SamplingParams(temperature=1.0, top_p=0.5), n=500)
    assert set(draws.flatten().tolist()) == {0}


def test_top_p_one_keeps_everything() -> None:
    logits = torch.zeros(1, 6)
    draws = _draw_many(logits, SamplingParams(temperature=1.0, top_p=1.0), n=1000)
    assert set(draws.flatten().tolist()) == set(range(6))


def test_min_p_drops_unlikely_tokens() -> None:
    probs = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04])
    # min_p=0.15: keep tokens with p >= 0.075, i.e. the first three.
    draws = _draw_many(probs.log()[None], SamplingParams(temperature=1.0, min_p=0.15)).flatten()
    assert set(draws.tolist()) == {0, 1, 2}


def test_min_p_zero_and_one() -> None:
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.5]])
    all_tokens = _draw_many(logits, SamplingParams(temperature=1.0, min_p=0.0), n=3000)
    assert set(all_tokens.flatten().tolist()) == {0, 1, 2, 3}
    only_best = _draw_many(logits, SamplingParams(temperature=1.0, min_p=1.0), n=300)
    assert set(only_best.flatten().tolist()) == {0}


def test_repetition_penalty_lowers_positive_and_negative_seen_logits() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5]])
    seen = torch.tensor([[True, True, False, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    torch.testing.assert_close(out, torch.tensor([[1.0, -4.0, 1.0, -1.0, 0.5]]))
    assert (out[seen] < logits[seen]).all()
    assert torch.equal(out[~seen], logits[~seen])


def test_repetition_penalty_changes_the_greedy_choice() -> None:
    logits = torch.tensor([[3.0, 2.0, -1.0]])
    seen = torch.tensor([[True, False, False]])
    params = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert sample(logits, params, seen=seen).item() == 1
    assert sample(logits, SamplingParams(temperature=0), seen=seen).item() == 0  # no penalty: argmax
    assert sample(logits, params).item() == 0  # nothing seen: argmax


def test_repetition_penalty_makes_negative_seen_tokens_rarer() -> None:
    logits = torch.tensor([[-1.0, -1.0]])
    seen = torch.tensor([[True, False]])
    generator = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=1.0, repetition_penalty=3.0)
    draws = torch.stack([sample(logits, params, generator, seen) for _ in range(2000)])
    # p(seen) = e^-3 / (e^-3 + e^-1) ~= 0.12
    expected = math.exp(-3) / (math.exp(-3) + math.exp(-1))
    assert abs((draws == 0).float().mean().item() - expected) < 0.03


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("top_k", 0),
        ("top_k", -3),
        ("top_k", 2.5),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", -0.2),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
    ],
)
def test_invalid_params_raise_config_error(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        SamplingParams(**{field: value})  # type: ignore[arg-type]


def test_greedy_property() -> None:
    assert SamplingParams(temperature=0).greedy
    assert not SamplingParams(temperature=0.5).greedy
