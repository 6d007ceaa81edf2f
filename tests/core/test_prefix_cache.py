"""Prefix caching: a prompt that starts like an earlier one reuses its keys and values, and the output is the same."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from forge.config import ModelConfig
from forge.core import ops
from forge.core.decode import Batcher, Sequence
from forge.core.prefix_cache import BLOCK, PrefixCache
from forge.core.sampling import SamplingParams
from forge.core.transformer import Transformer
from forge.generator import GenerationConfig, Generator
from forge.tokenizer import Tokenizer

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(params=["gpt2", "llama"])
def model(
    request: pytest.FixtureRequest, small_config: Callable[..., ModelConfig], peaked_model: Callable[..., Transformer]
) -> Transformer:
    return peaked_model(small_config(request.param, context_length=256))


def shared_prompts(lengths: list[int], shared: int = 50, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(1, 96, (shared,), generator=g).tolist()
    return [head + torch.randint(1, 96, (n,), generator=g).tolist() for n in lengths]


def drive(batcher: Batcher, seqs: list[Sequence], *, together: bool) -> list[list[int]]:
    """Each sequence's tokens: all joining at once (one prefill), or one after another."""
    out: dict[int, list[int]] = {id(s): [] for s in seqs}

    def loop(results: list) -> None:
        while results:
            for r in results:
                out[id(r.seq)].append(r.token)
                if r.finished:
                    batcher.remove(r.seq)
            results = batcher.step()

    if together:
        loop(batcher.add_many(seqs))
    else:
        for seq in seqs:
            loop([batcher.add(seq)])
    return [out[id(s)] for s in seqs]


def generate(model: Transformer, prompts: list[list[int]], cache: PrefixCache | None, together: bool = False):
    seqs = [Sequence(list(p), 24, GREEDY) for p in prompts]
    batcher = Batcher(model, max_batch=len(prompts), max_len=200, prefix_cache=cache)
    return drive(batcher, seqs, together=together), seqs


def test_a_shared_prefix_is_reused_and_the_output_is_the_same(model: Transformer) -> None:
    prompts = shared_prompts([3, 10, 20])
    plain, _ = generate(model, prompts, None)
    cache = PrefixCache(1 << 30)
    cached, seqs = generate(model, prompts, cache)
    assert cached == plain
    assert [s.cached for s in seqs] == [0, 48, 48]  # the 50 shared tokens hold 3 full blocks
    stats = cache.snapshot()
    assert stats["lookups"] == 3 and stats["hits"] == 2 and stats["tokens_reused"] == 96
    # Again, together in one prefill: rows continue from different cached lengths (the last also finds
    # the blocks the second request's generated tokens left behind).
    again, seqs = generate(model, prompts, cache, together=True)
    assert again == plain
    assert all(s.cached >= 48 for s in seqs)


def test_rows_joining_after_one_cached_prefix_match_the_plain_output(model: Transformer) -> None:
    # Rows that find the same cached prefix and differ after it join in one unmasked causal prefill,
    # right-padded to the longest rest: the padding never reaches a row's own tokens.
    prompts = shared_prompts([3, 10, 20], seed=1)
    plain, _ = generate(model, prompts, None)
    cache = PrefixCache(1 << 30)
    generate(model, [[*prompts[0][:50], 7]], cache)  # stores the 3 full blocks of the shared head
    cached, seqs = generate(model, prompts, cache, together=True)
    assert [s.cached for s in seqs] == [48, 48, 48]
    assert cached == plain


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_causal_attention_after_a_prefix_sees_each_query_s_keys_up_to_itself(device: str) -> None:
    # Queries that continue a prefix: the last query sees every key, the first sees the prefix and itself.
    # Grouped heads (4 query heads over 2), as Llama's; on CUDA in bf16 through the lower-right causal bias.
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = (torch.randn(2, h, n, 64, generator=g).to(device, dtype) for h, n in ((4, 3), (2, 7), (2, 7)))
    mask = torch.arange(7, device=device) <= (torch.arange(3, device=device) + 4)[:, None]  # query i at 4 + i
    want = ops.attention(q.float(), k.float(), v.float(), causal=False, mask=mask[None, None])
    got = ops.attention(q, k, v, causal=True)
    assert got.dtype == dtype
    if device == "cuda":  # bf16
        torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
    else:
        torch.testing.assert_close(got, want)


def test_a_prompt_stored_whole_leaves_its_last_token_to_compute(model: Transformer) -> None:
    prompt = shared_prompts([14])[0]  # 64 tokens: exactly 4 blocks
    plain, _ = generate(model, [prompt], None)
    cache = PrefixCache(1 << 30)
    generate(model, [prompt], cache)
    again, seqs = generate(model, [prompt], cache)
    assert again == plain and seqs[0].cached == len(prompt) - 1


def test_a_finished_exchange_is_kept_for_the_next_turn(model: Transformer) -> None:
    prompt = shared_prompts([6])[0]
    cache = PrefixCache(1 << 30)
    (first,), _ = generate(model, [prompt], cache)
    turn = prompt + first + [7, 8, 9]  # the next turn starts with the whole exchange
    plain, _ = generate(model, [turn], None)
    again, seqs = generate(model, [turn], cache)
    assert again == plain
    assert seqs[0].cached == (len(prompt) + len(first) - 1) // BLOCK * BLOCK  # more than the prompt alone


def test_least_recently_used_blocks_are_evicted_tail_first(model: Transformer) -> None:
    # 40 prompt tokens + 23 generated ones in the cache: 3 blocks per exchange, 2 of them the prompt's.
    a, b = shared_prompts([0], shared=40, seed=1)[0], shared_prompts([0], shared=40, seed=2)[0]
    probe = PrefixCache(1 << 30)
    generate(model, [a], probe)
    block_bytes = probe.bytes // len(probe)
    cache = PrefixCache(4 * block_bytes)  # room for 4 blocks
    generate(model, [a], cache)
    assert len(cache) == 3 and cache.cached_blocks(a) == 2
    generate(model, [b], cache)  # 3 more blocks: a's 2 least recently used go, from its tail
    assert cache.stats.evictions == 2 and len(cache) == 4 and cache.bytes <= cache.max_bytes
    assert cache.cached_blocks(b) == 2 and cache.cached_blocks(a) == 1
    plain, _ = generate(model, [a], None)
    again, seqs = generate(model, [a], cache)  # a partial hit still gives the same output
    assert again == plain and seqs[0].cached == BLOCK
    assert cache.evict(1) == 1  # memory pressure: the least recently used block goes


def test_a_cache_too_small_for_a_block_stores_nothing(model: Transformer) -> None:
    cache = PrefixCache(16)
    prompts = shared_prompts([5, 5])
    plain, _ = generate(model, prompts, None)
    cached, seqs = generate(model, prompts, cache)
    assert cached == plain and len(cache) == 0 and [s.cached for s in seqs] == [0, 0]


def test_a_hash_collision_is_not_a_hit(model: Transformer) -> None:
    cache = PrefixCache(1 << 30)
    prompt = shared_prompts([0], shared=40)[0]
    generate(model, [prompt], cache)
    for block in cache._blocks.values():  # a stored block whose tokens differ from its name's
        object.__setattr__(block, "tokens", tuple(t + 1 for t in block.tokens))
    plain, _ = generate(model, [prompt], None)
    again, seqs = generate(model, [prompt], cache)
    assert again == plain and seqs[0].cached == 0


def test_the_plain_generator_keeps_a_chat_s_earlier_turns(
    char_tokenizer: Tokenizer, bigram_model: Callable[..., Transformer]
) -> None:
    model = bigram_model(char_tokenizer, {c: "abcdefgh"[(i + 1) % 8] for i, c in enumerate("abcdefgh")})
    plain = Generator(model, char_tokenizer)
    cached = Generator(model, char_tokenizer, prefix_cache=1 << 24)
    cfg = GenerationConfig(temperature=0, max_tokens=10)
    turn = "hgfedcba" * 3 + "a"
    first = cached.generate(turn, cfg)
    assert first == plain.generate(turn, cfg)
    follow = turn + first + "cde"  # the next turn starts with the whole exchange
    assert cached.generate(follow, cfg) == plain.generate(follow, cfg)
    assert cached.prefix_cache is not None and cached.prefix_cache.stats.hits == 1
    assert cached.prefix_cache.stats.tokens_reused == 32  # 34 tokens of the first exchange in the cache: 2 blocks


class _Eager:
    """A stand-in for a captured CUDA graph on the CPU: replaying runs the captured steps again, eagerly."""

    def __init__(self, steps: Callable[[], None], restore: list[torch.Tensor]) -> None:
        self.steps = steps
        saved = [t.clone() for t in restore]
        steps()  # the warm-up run, as forge.core.cuda_graphs.capture does, then the inputs restored
        for t, v in zip(restore, saved, strict=True):
            t.copy_(v)

    def replay(self) -> None:
        self.steps()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_a_short_rest_after_a_cached_prefix_replays_the_tail_graph(
    device: str, model: Transformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows joining a batch that replays graphs, each a few tokens past a cached prefix, take their first tokens
    from one replay of the tail graph while another row is mid-generation; every token equals the plain batch's."""
    if device == "cpu":
        import forge.core.steps as steps

        monkeypatch.setattr(steps, "capture", _Eager)
    model = model.to(device)
    prompts = shared_prompts([5, 9, 30, 40], shared=64, seed=3)  # 30 and 40 tokens: past TAIL_TOKENS (32)

    def run(graphs: bool) -> tuple[list[list[int]], Batcher]:
        cache = PrefixCache(1 << 30)
        batcher = Batcher(
            model, max_batch=4, max_len=200, prefix_cache=cache, graphs=("tail", device) if graphs else None,
            partial_graphs=True,
        )  # fmt: skip
        out: dict[int, list[int]] = {}
        first = Sequence(list(prompts[0]), 40, GREEDY)  # stores the head, then runs on while the others join
        out[id(first)] = [batcher.add(first).token]
        seqs = [first] + [Sequence(list(p), 24, GREEDY) for p in prompts[1:]]
        for r in batcher.step() + batcher.step():
            out[id(r.seq)].append(r.token)
        for r in batcher.add_many(seqs[1:3]) + batcher.add_many(seqs[3:]):
            out[id(r.seq)] = [r.token]
        while batcher.running:
            for r in batcher.step():
                out[id(r.seq)].append(r.token)
                if r.finished:
                    batcher.remove(r.seq)
        assert [s.cached for s in seqs[1:]] == [64, 64, 64]
        return [out[id(s)] for s in seqs], batcher

    plain, _ = run(False)
    graphed, batcher = run(True)
    assert graphed == plain
    assert batcher.graphs is not None and set(batcher.graphs.tailers) == {4}  # the rest of rows 1 and 2: a replay
    import forge.core.decode as decode

    monkeypatch.setattr(decode, "TAIL_MAX_BATCH", 3)  # a batch wider than that: its padding would cost too much
    graphed, batcher = run(True)
    assert graphed == plain
    assert batcher.graphs is not None and not batcher.graphs.tailers


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_the_tail_graph_computes_only_the_rows_up_to_the_joining_ones(
    device: str, model: Transformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One request after another (a chat user's turns) joins row 0 of an empty batch: its tail replays a graph of
    one row, not the batch's eight; a second joining beside it takes the two-row graph. Tokens as the plain batch's."""
    if device == "cpu":
        import forge.core.steps as steps

        monkeypatch.setattr(steps, "capture", _Eager)
    model = model.to(device)
    prompts = shared_prompts([7, 12, 3], shared=48, seed=5)

    def run(graphs: bool) -> tuple[list[list[int]], Batcher]:
        batcher = Batcher(
            model, max_batch=8, max_len=160, prefix_cache=PrefixCache(1 << 30),
            graphs=("rows", device) if graphs else None, partial_graphs=True,
        )  # fmt: skip
        outs = []
        for prompt in prompts[:2]:  # one at a time: each alone in row 0
            seq = Sequence(list(prompt), 12, GREEDY)
            outs.append([batcher.add(seq).token])
            while batcher.running:
                for r in batcher.step():
                    outs[-1].append(r.token)
                    if r.finished:
                        batcher.remove(r.seq)
        first, second = Sequence(list(prompts[0]), 12, GREEDY), Sequence(list(prompts[2]), 12, GREEDY)
        outs += [[batcher.add(first).token], [batcher.add(second).token]]  # row 1 joins while row 0 runs
        while batcher.running:
            for r in batcher.step():
                outs[-2 if r.seq is first else -1].append(r.token)
                if r.finished:
                    batcher.remove(r.seq)
        return outs, batcher

    plain, _ = run(False)
    graphed, batcher = run(True)
    assert graphed == plain
    assert batcher.graphs is not None and set(batcher.graphs.tailers) == {1, 2}


def test_every_layers_cache_is_one_buffer_and_a_prefix_moves_the_same_either_way(model: Transformer) -> None:
    # The caches a model makes are views of one (layers, 2, rows, heads, positions, dim) buffer, so that a
    # prefix is loaded (and a row moved) in one copy; caches whose buffers were replaced since (Module.to)
    # take the copy a layer, with the same result.
    from forge.core.kv_cache import stacked

    caches = model.make_caches(3, 64)
    whole = stacked(caches)
    assert whole is not None and whole.shape == (len(caches), 2, 3, *caches[0].k.shape[1:])
    g = torch.Generator().manual_seed(0)
    whole.copy_(torch.randn(whole.shape, generator=g))
    tokens = list(range(40))
    cache = PrefixCache(1 << 30)
    assert cache.store(tokens, caches, row=0, length=40) == 40 // BLOCK
    separate = torch.nn.ModuleList(model.make_caches(3, 64)).to(torch.float64).to(whole.dtype)
    assert stacked(list(separate)) is None  # .to made new buffers: no longer views of one
    for target in (caches, list(separate)):
        assert cache.load(tokens, target, row=2) == 32
        for layer, c in enumerate(target):
            assert torch.equal(c.k[2, :, :32], whole[layer, 0, 0, :, :32])
            assert torch.equal(c.v[2, :, :32], whole[layer, 1, 0, :, :32])
    # The separate caches store blocks equal to the stacked ones'.
    other = PrefixCache(1 << 30)
    other.store(tokens, list(separate), row=2, length=32)
    mine = {k: b.kv for k, b in cache._blocks.items()}
    assert other._blocks and all(torch.equal(b.kv, mine[k]) for k, b in other._blocks.items())
