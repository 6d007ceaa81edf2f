"""Token generation: the KV-cached path against full recomputation, per-row positions, seeding, the pick."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

from forge.config import ModelConfig
from forge.core import decode, steps
from forge.core.decode import Sequence as Row
from forge.core.decode import decode_step, pick, prefill
from forge.core.generate import generate_tokens
from forge.core.kv_cache import CacheWrite
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
    """A short prompt is padded with id 0 in a batched prefill; it must not count as a seen token for its row."""
    huge = SamplingParams(temperature=0, repetition_penalty=1e6)
    alone = _generate(model, [[7]], use_cache=True, n=6, params=huge)[0]
    batch = _generate(model, [[7], list(range(10, 20))], use_cache=True, n=6, params=huge)
    assert batch[0] == alone


def test_cached_logits_match_full_recomputation(model: Transformer) -> None:
    """A right-padded prefill + one-token decodes, each row at its own position, give each row's full recomputation."""
    continuation = [[11, 12, 13], [21, 22, 23], [31, 32, 33], [41, 42, 43]]
    sizes = torch.tensor([len(p) for p in PROMPTS])
    T, n, rows = int(sizes.max()), 3, slice(0, len(PROMPTS))
    padded = torch.tensor([p + [0] * (T - len(p)) for p in PROMPTS])
    with torch.no_grad():
        model.setup_cache(len(PROMPTS), T + n)
        try:
            cached = [prefill(model, padded, CacheWrite(rows=rows, pos=0, length=T), sizes - 1)]
            for i in range(n - 1):
                pos = sizes + i  # (B,): where each row's i-th continuation token goes
                write = CacheWrite(rows=rows, pos=pos, length=int(pos.max()) + 1)
                cached.append(decode_step(model, torch.tensor(continuation)[:, i : i + 1], write, pos))
        finally:
            model.clear_cache()
        full = [
            torch.stack([model(torch.tensor([p + c[:i]]))[0, -1] for p, c in zip(PROMPTS, continuation, strict=True)])
            for i in range(n)
        ]
    for step, (a, b) in enumerate(zip(cached, full, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"step {step}")


def test_padding_after_a_prompt_is_invisible_to_it(model: Transformer) -> None:
    """Right padding needs no mask: whatever the pad ids, the prompt's logits are those of the prompt alone."""
    with torch.no_grad():
        alone = model(torch.tensor([[5, 6, 7]]))[0, -1]
        for pad in (0, 9):
            padded = torch.tensor([[5, 6, 7, pad, pad], [1, 2, 3, 4, 5]])
            got = prefill(model, padded, None, torch.tensor([2, 4]))
            torch.testing.assert_close(got[0], alone, rtol=1e-4, atol=1e-4)


def test_a_decode_step_at_one_position_needs_no_mask(model: Transformer) -> None:
    """Rows all at one position (every batch-1 step): the unmasked step equals the per-row masked one."""
    prompts = torch.tensor([[1, 2, 3], [4, 5, 6]])
    rows, nxt = slice(0, 2), torch.tensor([[7], [8]])
    out = []
    with torch.no_grad():
        for per_row in (False, True):
            model.setup_cache(2, 8)
            try:
                prefill(model, prompts, CacheWrite(rows=rows, pos=0, length=3))
                pos = torch.tensor([3, 3]) if per_row else None
                out.append(decode_step(model, nxt, CacheWrite(rows=rows, pos=pos if per_row else 3, length=4), pos))
            finally:
                model.clear_cache()
    torch.testing.assert_close(out[0], out[1], rtol=1e-5, atol=1e-5)


def test_pick_masks_limits_and_counts() -> None:
    """One pick: the vocabulary limit, penalties from the rows' state, and the state updated for the next step."""
    logits = torch.tensor([[0.0, 3.0, 2.0, 9.0], [0.0, 1.0, 5.0, 9.0]])
    penalised = SamplingParams(temperature=0, presence_penalty=2.0, frequency_penalty=2.0)
    rows = [Row([1], 4, GREEDY), Row([1], 4, penalised)]
    rows[0].group, rows[1].group = None, ("penalised",)
    seen, counts = torch.zeros(2, 4, dtype=torch.bool), torch.tensor([[0.0, 0, 0, 0], [0, 0, 2, 0]])
    picked = pick(logits.clone(), rows, vocab_limit=3, seen=seen, counts=counts)
    assert picked.tokens[:, 0].tolist() == [1, 1]  # id 3 is past the limit; row 1 generated its 2 twice already
    assert counts.tolist() == [[0, 1, 0, 0], [0, 1, 2, 0]] and seen[:, 1].all() and not seen[:, 2].any()


class _Replay:
    """A stand-in for a CUDA graph on the CPU: replaying runs the captured steps again."""

    def __init__(self, steps: Callable[[], None], restore: Sequence[torch.Tensor]) -> None:
        saved = [t.clone() for t in restore]
        steps()  # the warm-up, as capture() runs it
        for t, s in zip(restore, saved, strict=True):
            t.copy_(s)
        self.steps, self.replays = steps, 0

    def replay(self) -> None:
        self.replays += 1
        self.steps()


@pytest.mark.parametrize("params", [GREEDY, SamplingParams(temperature=1.0, top_k=20, repetition_penalty=1.3)])
def test_graph_replay_equals_eager_on_a_fixed_batch(
    model: Transformer, params: SamplingParams, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The graphed loop's bookkeeping (static positions, greedy chunks, the logits step, reuse), off CUDA.

    Rows of different lengths leave one by one, so the loop goes from replays back to eager steps.
    """
    monkeypatch.setattr(steps, "capture", _Replay)  # the graphed step lives in forge.core.steps
    prompts, budgets = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [5, 5, 5, 1]], [30, 50, 40]

    def run(graphs: object) -> list[list[int]]:
        pairs = zip(prompts, budgets, strict=True)
        rows = [decode.Sequence(p, n, params, torch.Generator().manual_seed(7)) for p, n in pairs]
        batcher = decode.Batcher(model, max_batch=3, max_len=64, graphs=graphs)
        out = {id(r): [] for r in rows}
        results = batcher.add_many(rows)
        while results:
            for r in results:
                out[id(r.seq)].append(r.token)
                if r.finished:
                    batcher.remove(r.seq)
            results = batcher.step()
        batcher.clear()
        assert (batcher.graphs is None) == (graphs is None)
        if batcher.graphs is not None:  # the mode this decoding needs was captured, and only it, and replayed
            graph = batcher.graphs.greedy if params.greedy else batcher.graphs.sampled
            other = batcher.graphs.sampled if params.greedy else batcher.graphs.greedy
            assert isinstance(graph, _Replay) and graph.replays > 2 and other is None
        return [out[id(r)] for r in rows]

    eager = run(None)
    assert [len(t) for t in eager] == budgets
    assert run("key") == eager
    assert list(model.__dict__["_decode_graphs"]) == ["key"]  # kept for the next generation
