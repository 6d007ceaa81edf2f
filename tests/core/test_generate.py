"""Token generation: the KV-cached path against full recomputation, left padding, seeding."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

from forge.config import ModelConfig
from forge.core.generate import (
    _attention_mask,
    _forward_full,
    _positions,
    _prompt_batch,
    decode_one,
    generate_tokens,
    prefill,
)
from forge.core.sampling import SamplingParams
from forge.core.transformer import Transformer

GREEDY = SamplingParams(temperature=0)
PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [5, 5, 5, 1], [42]]


@pytest.fixture(params=["gpt2", "llama"])
def model(
    request: pytest.FixtureRequest,
    small_config: Callable[..., ModelConfig],
    peaked_model: Callable[..., Transformer],
) -> Transformer:
    """fp32 models of both families; the llama one has n_kv_head < n_head."""
    cfg = small_config(request.param)
    model = peaked_model(cfg)
    assert model.tok_emb.weight.dtype == torch.float32
    if request.param == "llama":
        assert cfg.kv_heads < cfg.n_head
    return model


def _generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    use_cache: bool,
    n: int = 16,
    params: SamplingParams = GREEDY,
    seed: int | None = None,
) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    steps = generate_tokens(model, prompts, max_new_tokens=n, params=params, generator=generator, use_cache=use_cache)
    return torch.stack(list(steps), dim=1).tolist()  # (B, n)


def _reference(model: Transformer, prompt: Sequence[int], n: int) -> list[int]:
    """Greedy decoding by hand: the plain forward pass on the growing sequence, no masks, no cache."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


def test_greedy_single_prompt_cache_equals_no_cache(model: Transformer) -> None:
    prompt = [PROMPTS[0]]
    assert _generate(model, prompt, use_cache=True) == _generate(model, prompt, use_cache=False)


def test_greedy_single_prompt_matches_a_hand_written_loop(model: Transformer) -> None:
    assert _generate(model, [PROMPTS[0]], use_cache=True)[0] == _reference(model, PROMPTS[0], 16)


def test_greedy_batch_cache_equals_no_cache(model: Transformer) -> None:
    assert _generate(model, PROMPTS, use_cache=True) == _generate(model, PROMPTS, use_cache=False)


@pytest.mark.parametrize("use_cache", [True, False])
def test_prompt_alone_equals_its_row_in_a_padded_batch(model: Transformer, use_cache: bool) -> None:
    batch = _generate(model, PROMPTS, use_cache=use_cache)
    for row, prompt in enumerate(PROMPTS):
        assert _generate(model, [prompt], use_cache=use_cache)[0] == batch[row], f"row {row}"
        assert batch[row] == _reference(model, prompt, 16), f"row {row}"


def test_seeded_sampling_cache_equals_no_cache(model: Transformer) -> None:
    params = SamplingParams(temperature=1.0, top_k=20)
    cached = _generate(model, PROMPTS, use_cache=True, params=params, seed=3)
    uncached = _generate(model, PROMPTS, use_cache=False, params=params, seed=3)
    assert cached == uncached
    assert cached != _generate(model, PROMPTS, use_cache=True, params=params, seed=4)


def test_yields_one_token_per_row_per_step(model: Transformer) -> None:
    steps = list(generate_tokens(model, PROMPTS, max_new_tokens=5, params=GREEDY))
    assert len(steps) == 5
    assert all(t.shape == (len(PROMPTS),) and t.dtype == torch.int64 for t in steps)
    assert all(int(t.min()) >= 0 and int(t.max()) < model.config.vocab_size for t in steps)


def test_leaves_the_model_as_it_found_it(model: Transformer) -> None:
    model.train()
    _generate(model, PROMPTS, use_cache=True, n=3)
    assert model.training
    assert all(block.attn.cache is None for block in model.blocks)
    model.eval()


def test_stopping_early_clears_the_cache(model: Transformer) -> None:
    steps = generate_tokens(model, PROMPTS, max_new_tokens=10, params=GREEDY)
    next(steps)
    assert model.blocks[0].attn.cache is not None
    steps.close()
    assert all(block.attn.cache is None for block in model.blocks)


def test_fills_the_whole_context(model: Transformer) -> None:
    context = model.config.context_length
    prompt = list(range(1, 11))
    out = _generate(model, [prompt], use_cache=True, n=context - len(prompt))
    assert len(out[0]) == context - len(prompt)
    assert out == _generate(model, [prompt], use_cache=False, n=context - len(prompt))


def test_repetition_penalty_covers_prompt_and_output(model: Transformer) -> None:
    prompt = list(range(1, 49))  # half the vocabulary
    plain = _generate(model, [prompt], use_cache=True, n=8)[0]
    assert set(plain) & set(prompt), "precondition: without a penalty the model repeats prompt tokens"
    huge = SamplingParams(temperature=0, repetition_penalty=1e6)
    penalised = _generate(model, [prompt], use_cache=True, n=8, params=huge)[0]
    # With a huge penalty no token is ever repeated: neither a prompt token nor an earlier output.
    assert not set(penalised) & set(prompt)
    assert len(set(penalised)) == len(penalised)
    assert penalised == _generate(model, [prompt], use_cache=False, n=8, params=huge)[0]


def test_repetition_penalty_ignores_padding(model: Transformer) -> None:
    """Left padding uses id 0; it must not count as a seen token for the padded row."""
    huge = SamplingParams(temperature=0, repetition_penalty=1e6)
    alone = _generate(model, [[7]], use_cache=True, n=6, params=huge)[0]
    batch = _generate(model, [[7], list(range(10, 20))], use_cache=True, n=6, params=huge)
    assert batch[0] == alone


def test_cached_logits_match_full_recomputation(model: Transformer) -> None:
    """Prefill + one-token decodes give the logits of recomputing the padded batch, step by step."""
    prompts = PROMPTS
    continuation = torch.tensor([[11, 12, 13], [21, 22, 23], [31, 32, 33], [41, 42, 43]])
    tokens, valid = _prompt_batch(prompts, torch.device("cpu"))
    T, n = tokens.shape[1], continuation.shape[1]
    valid = torch.cat([valid, torch.ones(len(prompts), n, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        model.setup_cache(len(prompts), T + n)
        try:
            cached = [prefill(model, tokens, valid[:, :T], True)]
            for i in range(n - 1):
                cached.append(decode_one(model, continuation[:, i : i + 1], T + i, valid, True))
        finally:
            model.clear_cache()
        full = [
            _forward_full(model, torch.cat([tokens, continuation[:, :i]], dim=1), valid[:, : T + i], True)
            for i in range(n)
        ]
    for step, (a, b) in enumerate(zip(cached, full, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"step {step}")


def test_prompt_batch_left_pads() -> None:
    tokens, valid = _prompt_batch([[1, 2, 3], [4]], torch.device("cpu"))
    assert tokens.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert valid.tolist() == [[True, True, True], [False, False, True]]


def test_positions_start_at_each_prompts_first_token() -> None:
    valid = torch.tensor([[True, True, True], [False, False, True]])
    assert _positions(valid).tolist() == [[0, 1, 2], [0, 0, 0]]


def test_attention_mask_is_causal_and_hides_padding() -> None:
    valid = torch.tensor([[False, True, True]])
    mask = _attention_mask(valid, 3)[0, 0]
    assert mask.tolist() == [
        [True, False, False],  # a pad query sees only itself, so no row is empty
        [False, True, False],
        [False, True, True],
    ]
