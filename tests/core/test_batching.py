"""Continuous batching: sequences that share a batch produce exactly what each produces alone."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest
import torch

from forge.config import ModelConfig
from forge.core.decode import Batcher, Sequence
from forge.core.generate import generate_tokens
from forge.core.sampling import SamplingParams
from forge.core.transformer import ROPE_INITIAL_LEN, Transformer

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(params=["gpt2", "llama"])
def model(
    request: pytest.FixtureRequest, small_config: Callable[..., ModelConfig], peaked_model: Callable[..., Transformer]
) -> Transformer:
    return peaked_model(small_config(request.param))


def prompts(cfg: ModelConfig, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]


def alone(
    model: Transformer, prompt: list[int], n: int, params: SamplingParams = GREEDY, seed: int | None = None
) -> list[int]:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return [int(t[0]) for t in generate_tokens(model, [prompt], max_new_tokens=n, params=params, generator=gen)]


def run(batcher: Batcher, seqs: list[Sequence], join_at: dict[int, int] | None = None) -> dict[int, list[int]]:
    """Drive the batcher: sequence i joins at step join_at[i] (default 0); returns tokens per sequence."""
    join_at = join_at or {}
    out: dict[int, list[int]] = {i: [] for i in range(len(seqs))}
    index = {id(s): i for i, s in enumerate(seqs)}
    pending = sorted(range(len(seqs)), key=lambda i: join_at.get(i, 0))
    step = 0
    while pending or batcher.running:
        while pending and join_at.get(pending[0], 0) <= step and batcher.free:
            seq = seqs[pending.pop(0)]
            r = batcher.add(seq)
            out[index[id(seq)]].append(r.token)
            if r.finished:
                batcher.remove(seq)
        for r in batcher.step():
            out[index[id(r.seq)]].append(r.token)
            if r.finished:
                batcher.remove(r.seq)
        step += 1
    return out


def test_a_batch_of_different_lengths_equals_each_alone(model: Transformer) -> None:
    ps = prompts(model.config, [3, 9, 1, 6])
    batcher = Batcher(model, max_batch=4, max_len=32)
    got = run(batcher, [Sequence(p, 8, GREEDY) for p in ps])
    for i, p in enumerate(ps):
        assert got[i] == alone(model, p, 8), f"sequence {i}"


def test_sequences_join_and_leave_between_steps(model: Transformer) -> None:
    ps = prompts(model.config, [4, 7, 2, 5, 3], seed=1)
    budgets = [3, 10, 6, 2, 8]
    batcher = Batcher(model, max_batch=3, max_len=32)  # fewer rows than sequences: rows are reused
    seqs = [Sequence(p, n, GREEDY) for p, n in zip(ps, budgets, strict=True)]
    got = run(batcher, seqs, join_at={1: 2, 3: 4, 4: 5})
    for i, (p, n) in enumerate(zip(ps, budgets, strict=True)):
        assert got[i] == alone(model, p, n), f"sequence {i}"
    assert batcher.running == [] and batcher.free == 3


def test_seeded_sampling_in_a_batch_equals_alone(model: Transformer) -> None:
    params = SamplingParams(temperature=1.0, top_k=20)
    ps = prompts(model.config, [5, 2, 8], seed=2)
    seqs = [Sequence(p, 6, params, generator=torch.Generator().manual_seed(10 + i)) for i, p in enumerate(ps)]
    got = run(Batcher(model, max_batch=3, max_len=32), seqs)
    for i, p in enumerate(ps):
        assert got[i] == alone(model, p, 6, params, seed=10 + i)


def test_penalties_in_a_batch_equal_alone(model: Transformer) -> None:
    params = SamplingParams(temperature=0, presence_penalty=1.5, frequency_penalty=0.7, repetition_penalty=1.3)
    ps = prompts(model.config, [4, 6], seed=3)
    got = run(Batcher(model, max_batch=2, max_len=32), [Sequence(p, 10, params) for p in ps])
    for i, p in enumerate(ps):
        assert got[i] == alone(model, p, 10, params)


def test_a_stop_token_finishes_a_sequence(model: Transformer) -> None:
    [p] = prompts(model.config, [4])
    first = alone(model, p, 5)
    seq = Sequence(p, 5, GREEDY, stop_ids=frozenset({first[2]}))
    got = run(Batcher(model, max_batch=1, max_len=32), [seq])
    assert got[0] == first[: first.index(first[2]) + 1]


def test_logprobs_come_with_each_token(model: Transformer) -> None:
    [p] = prompts(model.config, [4])
    batcher = Batcher(model, max_batch=1, max_len=16)
    seq = Sequence(p, 2, GREEDY, logprobs=3)
    r = batcher.add(seq)
    assert r.logprob is not None and r.logprob <= 0 and len(r.top) == 3
    assert r.top[0][0] == r.token  # greedy picks the most likely token
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([p]))[0, -1].float(), -1)[r.token]
    assert r.logprob == pytest.approx(float(expected), abs=1e-4)


def test_joining_together_in_one_prefill_equals_each_alone(model: Transformer) -> None:
    ps = prompts(model.config, [6, 1, 9, 3], seed=4)
    batcher = Batcher(model, max_batch=4, max_len=32)
    seqs = [Sequence(p, 7, GREEDY, logprobs=2) for p in ps]
    firsts = batcher.add_many(seqs)
    out = {id(s): [r.token] for s, r in zip(seqs, firsts, strict=True)}
    while batcher.running:
        for r in batcher.step():
            out[id(r.seq)].append(r.token)
            if r.finished:
                batcher.remove(r.seq)
    for seq, p in zip(seqs, ps, strict=True):
        assert out[id(seq)] == alone(model, p, 7)
    with torch.no_grad():  # the first token's logprob is the padded prefill's, and equals the unpadded one
        expected = torch.log_softmax(model(torch.tensor([ps[1]]))[0, -1].float(), -1)[firsts[1].token]
    assert firsts[1].logprob == pytest.approx(float(expected), abs=1e-4)


def test_weights_at_sees_every_way_weights_are_replaced() -> None:
    """A captured graph is keyed by where the weights live (cuda_graphs.weights_at, which walks the parameters
    once per module structure): a replaced parameter, a replaced submodule, new data in place of a parameter's
    each give a new key; nothing changed gives the same one. So do new RoPE tables, which it reads every time."""
    from forge.core.cuda_graphs import weights_at
    from forge.models import create_model

    model = create_model("tiny", vocab_size=64)
    key = weights_at(model)
    assert weights_at(model) == key
    changes = [
        lambda: setattr(model.blocks[0].attn, "qkv", torch.nn.Linear(*model.blocks[0].attn.qkv.weight.shape[::-1])),
        lambda: setattr(model.lm_head, "weight", torch.nn.Parameter(model.lm_head.weight.detach().clone())),
        lambda: setattr(model.blocks[1].mlp.up.weight, "data", model.blocks[1].mlp.up.weight.detach().clone()),
    ]
    for change in changes:
        change()
        assert weights_at(model) != key
        key = weights_at(model)
    config = ModelConfig(vocab_size=64, context_length=ROPE_INITIAL_LEN * 4, n_layer=1, n_head=2, d_model=16)
    llama = Transformer(replace(config, position="rope"))
    key = weights_at(llama)
    llama.ensure_positions(ROPE_INITIAL_LEN * 2)  # tables regrown, in new memory
    assert weights_at(llama) != key
