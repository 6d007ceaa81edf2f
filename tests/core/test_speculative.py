"""Speculative decoding by n-gram lookup: the same tokens as plain decoding, and the same distribution sampled."""

from __future__ import annotations

import asyncio
import copy
import itertools
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from forge.app import Forge
from forge.cli import main
from forge.config import ModelConfig
from forge.core.decode import Batcher, Sequence
from forge.core.sampling import SamplingParams, probabilities
from forge.core.speculative import DRAFT_MAX, DRAFT_TOKENS, MIN_ACCEPTANCE, PAUSE, WINDOW, NgramProposer, Speculation
from forge.core.transformer import Transformer
from forge.errors import ConfigError
from forge.models import padded_vocab, save
from forge.tokenizer import Tokenizer
from helpers import generate

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(params=["gpt2", "llama"])
def model(
    request: pytest.FixtureRequest, small_config: Callable[..., ModelConfig], peaked_model: Callable[..., Transformer]
) -> Transformer:
    return peaked_model(small_config(request.param, context_length=256))


def run(
    model: Transformer,
    seqs: list[Sequence],
    join_at: dict[int, int] | None = None,
    max_batch: int = 4,
    draft: Transformer | None = None,
) -> list[list[int]]:
    """Drive a batcher (speculating rows take ``draft``'s proposals if given); sequence i joins at step
    join_at[i]. Tokens per sequence."""
    batcher = Batcher(model, max_batch=max_batch, max_len=250, draft=draft)
    out: dict[int, list[int]] = {id(s): [] for s in seqs}
    pending, step, join_at = list(seqs), 0, join_at or {}
    while pending or batcher.running:
        joining = [s for s in pending if join_at.get(seqs.index(s), 0) <= step][: batcher.free]
        results = batcher.add_many(joining) if joining else []
        pending = [s for s in pending if s not in joining]
        for r in results + batcher.step():
            out[id(r.seq)].append(r.token)
            if r.finished:
                batcher.remove(r.seq)
        step += 1
    return [out[id(s)] for s in seqs]


def grounded(model: Transformer, n: int, seed: int) -> list[int]:
    """A prompt that quotes what the model goes on to say: its own continuation, then the start again."""
    head = torch.randint(1, 96, (12,), generator=torch.Generator().manual_seed(seed)).tolist()
    (said,) = run(model, [Sequence(head, n, GREEDY)])
    return head + said + [5] + head


def test_the_proposer_continues_the_latest_longest_match() -> None:
    p = NgramProposer([1, 2, 3, 9, 2, 3, 4, 5, 1, 2, 3])
    assert p.propose(2) == [9, 2]  # "2 3" last came before "4 5", but the longer "1 2 3" wins
    p = NgramProposer([7, 1, 2, 3, 9, 8, 1, 2])
    assert p.propose(3) == [3, 9, 8]
    p.extend([3, 9])
    assert p.propose(4) == [8, 1, 2, 3]
    assert NgramProposer([1, 2, 3]).propose(4) == [] and NgramProposer([4, 4, 4]).propose(0) == []


def test_greedy_speculation_gives_the_plain_tokens_in_a_batch(model: Transformer) -> None:
    prompts = [grounded(model, 40, seed) for seed in range(3)] + [[3, 1, 4, 1, 5, 9, 2, 6]]
    budgets = [40, 30, 45, 35]
    plain = run(model, [Sequence(p, n, GREEDY) for p, n in zip(prompts, budgets, strict=True)])
    seqs = [Sequence(p, n, GREEDY, speculate=True) for p, n in zip(prompts, budgets, strict=True)]
    assert run(model, seqs, join_at={1: 3, 3: 7}, max_batch=3) == plain
    proposed = sum(s.spec.proposed for s in seqs if s.spec is not None)
    accepted = sum(s.spec.accepted for s in seqs if s.spec is not None)
    assert 0 < accepted < proposed  # verify steps ran, and kept only what the model agreed with


@pytest.mark.parametrize("same_weights", [True, False])
def test_greedy_speculation_with_a_draft_model_gives_the_plain_tokens(
    model: Transformer, peaked_model: Callable[..., Transformer], same_weights: bool
) -> None:
    # A draft with the model's own weights agrees with it everywhere; one of other weights rarely does.
    draft = copy.deepcopy(model) if same_weights else peaked_model(model.config, seed=7)
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8], [1, 6, 1, 8, 0, 3, 3]]
    budgets = [40, 33, 47]
    plain = run(model, [Sequence(p, n, GREEDY) for p, n in zip(prompts, budgets, strict=True)])
    seqs = [Sequence(p, n, GREEDY, speculate=True) for p, n in zip(prompts, budgets, strict=True)]
    assert run(model, seqs, join_at={1: 2, 2: 5}, max_batch=2, draft=draft) == plain
    proposed = sum(s.spec.proposed for s in seqs if s.spec is not None)
    accepted = sum(s.spec.accepted for s in seqs if s.spec is not None)
    assert proposed > 0
    if same_weights:
        assert accepted == proposed  # every proposal is the model's own next token
        assert sum(s.spec.steps for s in seqs if s.spec is not None) < sum(budgets) / 3
    else:
        assert accepted < proposed


def test_a_text_that_repeats_its_prompt_takes_several_tokens_a_forward(
    char_tokenizer: Tokenizer, bigram_model: Callable[..., Transformer]
) -> None:
    table = {c: "abcdefgh"[(i + 1) % 8] for i, c in enumerate("abcdefgh")}
    model = bigram_model(char_tokenizer, table, context_length=256)
    prompt = char_tokenizer.encode("abcdefghabc")
    (plain,) = run(model, [Sequence(prompt, 60, GREEDY)])
    seq = Sequence(prompt, 60, GREEDY, speculate=True)
    assert run(model, [seq]) == [plain]
    assert seq.spec is not None and seq.spec.accepted == seq.spec.proposed  # the prompt predicts every token
    # Each forward gives its proposals and one more; proposals grow from DRAFT_TOKENS by 2 a step to DRAFT_MAX.
    assert seq.spec.steps <= 60 // (DRAFT_MAX + 1) + (DRAFT_MAX - DRAFT_TOKENS) // 2 + 1
    assert seq.spec.k == DRAFT_MAX


def test_speculation_stops_at_a_stop_token_inside_the_accepted_ones(model: Transformer) -> None:
    prompt = grounded(model, 40, seed=4)
    (plain,) = run(model, [Sequence(prompt, 40, GREEDY)])
    stop = plain[20]
    (want,) = run(model, [Sequence(prompt, 40, GREEDY, stop_ids=frozenset({stop}))])
    seq = Sequence(prompt, 40, GREEDY, stop_ids=frozenset({stop}), speculate=True)
    (got,) = run(model, [seq])
    assert got == want and got[-1] == stop and len(got) < 40 and len(seq.output) == len(got)


def test_speculation_gives_the_plain_logprobs(model: Transformer) -> None:
    prompt = grounded(model, 30, seed=5)

    def logprobs(speculate: bool) -> list[tuple[int, float, tuple[int, ...]]]:
        batcher = Batcher(model, max_batch=1, max_len=250)
        seq = Sequence(prompt, 30, GREEDY, logprobs=3, speculate=speculate)
        out, results = [], [batcher.add(seq)]
        while results:
            for r in results:
                assert r.logprob is not None and len(r.top) == 3
                out.append((r.token, r.logprob, tuple(t for t, _ in r.top)))
            results = batcher.step() if not results[-1].finished else []
        return out

    plain, spec = logprobs(False), logprobs(True)
    assert [(t, top) for t, _, top in spec] == [(t, top) for t, _, top in plain]
    assert [lp for _, lp, _ in spec] == pytest.approx([lp for _, lp, _ in plain], abs=1e-4)


def test_a_row_whose_proposals_fail_pauses() -> None:
    spec = Speculation(NgramProposer([1, 2, 1, 2]))
    for _ in range(WINDOW // 4):
        spec.record(4, 0, 1)  # every proposal rejected
    assert spec.paused == PAUSE and spec.draft(8) == []
    for _ in range(PAUSE):
        spec.record(0, 0, 1)
    assert spec.paused == 0 and spec.draft(8) != []
    good = Speculation(NgramProposer([1, 2, 1, 2]))
    for _ in range(WINDOW):
        good.record(4, math.ceil(4 * MIN_ACCEPTANCE), 2)
    assert good.paused == 0


def test_sampled_speculation_keeps_the_model_distribution(
    small_config: Callable[..., ModelConfig], peaked_model: Callable[..., Transformer]
) -> None:
    """The first three tokens' joint distribution, sampled with speculation, against the exact one (chi-square)."""
    V, n = 5, 3
    model = peaked_model(small_config("llama", vocab_size=V), seed=3)
    params = SamplingParams(temperature=2.0, top_k=4)
    prompt = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 0, 1, 2]  # most continuations have an earlier match to propose
    with torch.inference_mode():
        exact = {}
        for path in itertools.product(range(V), repeat=n):
            p = 1.0
            for i in range(n):
                logits = model(torch.tensor([prompt + list(path[:i])]))[0, -1:]
                p *= float(probabilities(logits.float(), params)[0, path[i]])
            exact[path] = p
    generator, counts, proposed, accepted = torch.Generator().manual_seed(0), Counter(), 0, 0
    batcher = Batcher(model, max_batch=200, max_len=32)
    for _ in range(10):
        seqs = [Sequence(prompt, n, params, generator, speculate=True) for _ in range(200)]
        out = {id(s): [] for s in seqs}
        results = batcher.add_many(seqs)
        while results:
            for r in results:
                out[id(r.seq)].append(r.token)
                if r.finished:
                    batcher.remove(r.seq)
            results = batcher.step()
        counts.update(tuple(t) for t in out.values())
        proposed += sum(s.spec.proposed for s in seqs if s.spec is not None)
        accepted += sum(s.spec.accepted for s in seqs if s.spec is not None)
    assert 0 < accepted < proposed  # proposals were made, and both accepted and rejected
    total = sum(counts.values())
    assert set(counts) <= {k for k, p in exact.items() if p > 0}
    cells = [(counts[k], total * p) for k, p in exact.items() if total * p >= 5]  # the sparse cells merged
    rest = (total - sum(c for c, _ in cells), total - sum(e for _, e in cells))
    chi2 = sum((c - e) ** 2 / e for c, e in [*cells, rest] if e > 0)
    dof = len(cells)
    # The 99.9% quantile of chi-square (Wilson-Hilferty): a fixed seed, so the test is deterministic.
    z = 3.09
    assert chi2 < dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


#: A prompt whose greedy continuation has no near-tie (the smallest top-2 logprob gap over 40 tokens is
#: 0.025): SmolLM2's fp32 logits differ by up to ~0.003 between a one-token step, a verify step and a full
#: prefill (rounding in other shapes), so a closer tie could go either way, as between batch sizes.
GROUNDED = (
    "Copy the text exactly.\nText: The Forge framework trains small language models on a laptop and serves them "
    "over an OpenAI-compatible API. It batches requests continuously and reuses the keys and values of shared "
    "prompts.\nCopy: The Forge"
)


def test_smollm2_gives_the_same_text_with_speculation_and_the_prefix_cache(smollm2_app: Forge) -> None:
    """SmolLM2, greedy: the plain generator with and without speculation, then the engine with both on."""
    plain = generate(smollm2_app, GROUNDED, max_tokens=40, temperature=0)
    assert generate(smollm2_app, GROUNDED, max_tokens=40, temperature=0, speculate="ngram") == plain

    async def served() -> tuple[list[str], dict]:
        await smollm2_app.start_batching(max_batch=2, context=512, speculate="ngram")
        try:
            texts = [await smollm2_app.generate(GROUNDED, max_tokens=40, temperature=0) for _ in range(2)]
            return texts, smollm2_app.batching_stats() or {}
        finally:
            await smollm2_app.stop_batching()

    texts, stats = asyncio.run(served())
    assert texts == [plain, plain]
    assert stats["prefix_cache"]["hits"] == 1 and stats["prefix_cache"]["tokens_reused"] >= 48
    assert 0 < stats["speculative_accepted"] <= stats["speculative_proposed"]


def test_a_draft_model_through_the_app_the_engine_and_the_cli(
    bigram_dir: Path,
    tmp_path: Path,
    bpe_tokenizer: Tokenizer,
    small_config: Callable[..., ModelConfig],
    peaked_model: Callable[..., Transformer],
    capsys: pytest.CaptureFixture[str],
) -> None:
    plain_app = Forge.load(bigram_dir)
    plain = generate(plain_app, "a", max_tokens=20, temperature=0)
    assert plain.startswith("bcdefgh")
    app = Forge.load(bigram_dir, draft=bigram_dir)  # the same tokenizer: its own checkpoint
    assert generate(app, "a", max_tokens=20, temperature=0, speculate="draft") == plain

    async def batched() -> str:
        await app.start_batching(max_batch=2, speculate="draft")
        try:
            result = await app.generate("a", max_tokens=20, temperature=0)
        finally:
            await app.stop_batching()
        assert isinstance(result, str)
        return result

    assert asyncio.run(batched()) == plain
    with pytest.raises(ConfigError, match="needs a draft model"):
        generate(plain_app, "a", max_tokens=4, speculate="draft")
    other = tmp_path / "other-tokenizer"
    save(other, peaked_model(small_config("gpt2", vocab_size=padded_vocab(bpe_tokenizer.vocab_size))), bpe_tokenizer)
    with pytest.raises(ConfigError, match=rf"vocabulary of {bpe_tokenizer.vocab_size} tokens, the model \d+: a draft"):
        Forge.load(bigram_dir, draft=other)
    # The CLI: --draft implies --speculate draft; --speculate draft alone is refused in one line.
    assert main(["generate", str(bigram_dir), "--prompt", "a", "--max-tokens", "20", "--draft", str(bigram_dir)]) == 0
    assert capsys.readouterr().out.strip() == "a" + plain
    with pytest.raises(SystemExit) as refused:
        main(["generate", str(bigram_dir), "--prompt", "a", "--speculate", "draft"])
    err = capsys.readouterr().err
    assert refused.value.code != 0
    assert "--draft MODEL" in err and "Traceback" not in err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_graphed_verify_on_cuda_gives_the_plain_tokens(
    char_tokenizer: Tokenizer, bigram_model: Callable[..., Transformer]
) -> None:
    """A batcher that replays CUDA graphs verifies from a captured graph too; the tokens are the eager plain ones."""
    table = {c: "abcdefgh"[(i + 1) % 8] for i, c in enumerate("abcdefgh")}
    model = bigram_model(char_tokenizer, table, context_length=256).cuda().eval()
    prompts = [char_tokenizer.encode(t) for t in ("abcdefghabc", "cdefghabcdefg", "fghabcdefgh")]
    plain = run(model, [Sequence(p, 60, GREEDY) for p in prompts], max_batch=3)
    batcher = Batcher(model, max_batch=3, max_len=256, graphs=("test", "verify"))
    seqs = [Sequence(p, 60, GREEDY, speculate=True) for p in prompts]
    out: dict[int, list[int]] = {id(s): [] for s in seqs}
    for r in batcher.add_many(seqs):
        out[id(r.seq)].append(r.token)
    while batcher.running:
        for r in batcher.step():
            out[id(r.seq)].append(r.token)
            if r.finished:
                batcher.remove(r.seq)
    assert [out[id(s)] for s in seqs] == plain
    assert batcher.graphs is not None and batcher.graphs.verifier is not None  # the verify step was a replay
    assert batcher.graphs.verify_width == DRAFT_MAX + 1
    for seq in seqs:  # the prompt predicts every token: every proposal accepted, several tokens a replay
        assert seq.spec is not None and 0 < seq.spec.accepted == seq.spec.proposed
        assert seq.spec.steps <= 60 // 3
