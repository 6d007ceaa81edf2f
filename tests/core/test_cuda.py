"""CUDA-only checks: fused AdamW, bf16 training, cached generation on the GPU."""

from __future__ import annotations

import contextlib

import pytest
import torch

from forge.config import get_preset
from forge.core.device import autocast_dtype
from forge.core.generate import generate_tokens
from forge.core.optim import build_adamw
from forge.core.sampling import SamplingParams
from forge.events import StartEvent
from forge.models import create_model
from forge.trainer import train

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

TEXT = ["to be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 80]


def test_adamw_is_fused_on_cuda() -> None:
    model = create_model("tiny", vocab_size=256).cuda()
    opt = build_adamw(model, lr=1e-3)
    assert opt.defaults["fused"] is True


def test_training_on_cuda_uses_bf16_compiles_and_learns() -> None:
    assert autocast_dtype(torch.device("cuda")) == torch.bfloat16
    starts: list[StartEvent] = []
    result = train(
        TEXT, preset="tiny", tokenizer="char", steps=40, batch_size=8, context=64, device="cuda", lr=3e-3,
        listeners=[lambda e: starts.append(e) if isinstance(e, StartEvent) else None],
    )  # fmt: skip
    assert starts[0].compiled and starts[0].precision == "bfloat16"  # the fast path is the default on CUDA
    assert next(result.model.parameters()).is_cuda
    first, last = result.evals[0][1], result.evals[-1][1]
    assert last < first - 1.0, result.evals


def test_cached_generation_matches_uncached_on_cuda() -> None:
    torch.manual_seed(0)
    model = create_model(get_preset("llama-tiny").replace(vocab_size=300)).cuda().float()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11]]
    params = SamplingParams(temperature=0)
    a = torch.stack(list(generate_tokens(model, prompts, max_new_tokens=24, params=params)), 1)
    b = torch.stack(list(generate_tokens(model, prompts, max_new_tokens=24, params=params, use_cache=False)), 1)
    assert torch.equal(a, b)


def _peaked_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(get_preset("llama-tiny").replace(vocab_size=300)).cuda().float().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    return model


def _continuous(batcher: object, seqs: list, first: int) -> dict[int, list[int]]:
    """Run ``seqs`` through ``batcher``: ``first`` of them at once, the rest joining as rows free up."""
    out = {id(s): [r.token] for s, r in zip(seqs[:first], batcher.add_many(seqs[:first]), strict=True)}
    waiting = list(seqs[first:])
    while batcher.running or waiting:
        for r in batcher.step():
            out[id(r.seq)].append(r.token)
            if r.finished:
                batcher.remove(r.seq)
        if waiting and batcher.free:
            seq = waiting.pop(0)
            out[id(seq)] = [batcher.add(seq).token]
    return out


def test_continuous_batching_on_cuda_equals_each_alone() -> None:
    from forge.core.decode import Batcher, Sequence

    model = _peaked_llama()
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15], [20]]
    params = SamplingParams(temperature=0)
    batcher = Batcher(model, max_batch=3, max_len=64)  # fewer rows than prompts: one joins later
    seqs = [Sequence(p, 12, params) for p in prompts]
    out = _continuous(batcher, seqs, first=3)
    for seq, prompt in zip(seqs, prompts, strict=True):
        alone = [int(t[0]) for t in generate_tokens(model, [prompt], max_new_tokens=12, params=params)]
        assert out[id(seq)] == alone


def test_the_serving_engine_runs_on_cuda(tmp_path: object) -> None:
    import asyncio

    from forge.app import Forge
    from forge.generator import GenerationConfig
    from forge.models import save
    from forge.tokenizer import Tokenizer

    tok = Tokenizer.train(TEXT, kind="char")
    torch.manual_seed(0)
    path = f"{tmp_path}/ckpt"
    save(path, create_model("tiny", vocab_size=320), tok)
    prompts = ["to be", "or not", "that is the question", "whether"]
    plain = Forge.load(path, device="cuda", defaults=GenerationConfig(temperature=0, max_tokens=16))
    expected = [plain.sync.generate(p) for p in prompts]

    async def main() -> tuple[list[str], int]:
        app = await Forge.load(
            path, device="cuda", defaults=GenerationConfig(temperature=0, max_tokens=16)
        ).start_batching(max_batch=4)
        texts = await asyncio.gather(*(app.generate(p) for p in prompts))
        seeded = await asyncio.gather(*(app.generate("to be", temperature=1.0, seed=s) for s in (1, 1)))
        stats = app.batching_stats() or {}
        await app.stop_batching()
        assert seeded[0] == seeded[1]
        return list(texts), int(stats["batch_size_max"])

    texts, widest = asyncio.run(main())
    assert texts == expected and widest > 1


def test_lora_fine_tune_on_cuda() -> None:
    result = train(
        TEXT,
        preset="llama-tiny",
        tokenizer="char",
        steps=20,
        batch_size=8,
        context=64,
        device="cuda",
        lr=3e-3,
        lora_rank=4,
    )
    from forge.core.lora import has_lora

    assert not has_lora(result.model) and next(result.model.parameters()).is_cuda
    assert result.evals[-1][1] < result.evals[0][1]


@pytest.mark.parametrize("new_tokens", [5, 17, 40])
def test_cuda_graph_decoding_equals_eager(new_tokens: int) -> None:
    model = _peaked_llama()
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11]]  # left padding, per-row positions
    params = SamplingParams(temperature=0)
    graphed = torch.stack(list(generate_tokens(model, prompts, max_new_tokens=new_tokens, params=params)), 1)
    eager = torch.stack(
        list(generate_tokens(model, prompts, max_new_tokens=new_tokens, params=params, cuda_graphs=False)), 1
    )
    assert torch.equal(graphed, eager)
    limited = list(generate_tokens(model, prompts, max_new_tokens=new_tokens, params=params, vocab_limit=100))
    assert max(int(t.max()) for t in limited) < 100


def test_compiled_cuda_graph_decoding_equals_eager() -> None:
    model = _peaked_llama()
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    params = SamplingParams(temperature=0)
    compiled = list(generate_tokens(model, prompts, max_new_tokens=40, params=params, compile=True))
    eager = list(generate_tokens(model, prompts, max_new_tokens=40, params=params, cuda_graphs=False))
    assert torch.equal(torch.stack(compiled, 1), torch.stack(eager, 1))


@pytest.mark.parametrize("fused", [True, False])
def test_decode_attention_equals_sdpa_on_cuda(fused: bool) -> None:
    """A decode step's attention, with Forge's kernel and with the plain-matmul path it replaced, against SDPA."""
    from forge import kernels
    from forge.core import ops

    torch.manual_seed(0)
    q = torch.randn(3, 8, 1, 16, device="cuda")
    k, v = torch.randn(3, 2, 10, 16, device="cuda"), torch.randn(3, 2, 10, 16, device="cuda")
    mask = torch.rand(3, 1, 1, 10, device="cuda") > 0.3
    mask[..., 0] = True
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    unmasked = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    with contextlib.nullcontext() if fused else kernels.disabled():
        assert (kernels.lookup("decode_attention", "cuda") is not None) == fused
        torch.testing.assert_close(ops.attention(q, k, v, causal=False, mask=mask), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ops.attention(q, k, v, causal=False), unmasked, rtol=1e-4, atol=1e-5)


def test_captured_decode_graph_is_reused_across_generations() -> None:
    """A second generation of the same batch size replays the first one's graph, with its own prompt."""
    model = _peaked_llama()
    params = SamplingParams(temperature=0)

    def both(prompts: list[list[int]], new: int) -> tuple[torch.Tensor, torch.Tensor]:
        graphed = torch.stack(list(generate_tokens(model, prompts, max_new_tokens=new, params=params)), 1)
        eager = torch.stack(list(generate_tokens(model, prompts, max_new_tokens=new, params=params, cuda_graphs=False)))
        return graphed, eager.T

    first, eager = both([[1, 2, 3, 4, 5], [7, 8]], 40)
    assert torch.equal(first, eager)
    kept = dict(model.__dict__["_decode_graphs"])
    second, eager = both([[9, 10], [11, 12, 13, 14, 15, 16, 17]], 33)  # other prompts, lengths and padding
    assert torch.equal(second, eager)
    assert dict(model.__dict__["_decode_graphs"]) == kept  # no new capture
    held = [p.data for p in model.parameters()]  # so that the allocator cannot put them back where they were
    model.cpu().cuda()  # the weights move to new memory: a new capture, never a stale replay
    third, eager = both([[1, 2, 3], [4]], 24)
    assert torch.equal(third, eager)
    assert len(model.__dict__["_decode_graphs"]) == 2 and dict(model.__dict__["_decode_graphs"]) != kept
    assert all(h.is_cuda for h in held)  # still where the first graph read them


def test_sampled_decoding_replays_a_logits_graph_equal_to_eager() -> None:
    """Temperature, top-p, penalties and logprobs sample outside a graph of the forward: same tokens as eager."""
    model = _peaked_llama()
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    params = SamplingParams(temperature=0.9, top_p=0.95, repetition_penalty=1.2)

    def run(graphs: bool, seed: int, new: int = 48) -> torch.Tensor:
        generator = torch.Generator("cuda").manual_seed(seed)
        steps = generate_tokens(
            model, prompts, max_new_tokens=new, params=params, generator=generator, cuda_graphs=graphs
        )
        return torch.stack(list(steps), 1)

    assert torch.equal(run(True, 0), run(False, 0))
    kept = dict(model.__dict__["_decode_graphs"])
    assert any(batcher.graphs.sampled is not None for batcher in kept.values())  # a logits graph was captured, kept
    assert torch.equal(run(True, 1, 40), run(False, 1, 40))  # reused, with another seed and length
    assert dict(model.__dict__["_decode_graphs"]) == kept


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_partial_batches_replay_the_whole_batch_s_graph_equal_to_eager(temperature: float) -> None:
    """The serving engine's batcher replays its graphs while only some rows run (rows join and leave)."""
    from forge.core.decode import Batcher, Sequence

    model = _peaked_llama()
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15], [20], [30, 31]]
    budgets = [40, 56, 36, 48, 44]  # long enough to capture; rows finish at different steps

    def run(graphs: bool) -> list[list[int]]:
        params = SamplingParams(temperature=temperature)
        seqs = [
            Sequence(p, n, params, generator=torch.Generator("cuda").manual_seed(i) if temperature else None)
            for i, (p, n) in enumerate(zip(prompts, budgets, strict=True))
        ]
        batcher = Batcher(
            model, max_batch=4, max_len=128, graphs=("test", graphs) if graphs else None, partial_graphs=True
        )
        out = _continuous(batcher, seqs, first=2)  # two rows of four: a partial batch from the start
        if graphs:
            assert batcher.graphs is not None
            assert (batcher.graphs.greedy if temperature == 0 else batcher.graphs.sampled) is not None  # replayed
        return [out[id(s)] for s in seqs]

    assert run(True) == run(False)


def test_the_engine_replays_graphs_and_recaptures_when_weights_move(tmp_path: object) -> None:
    import asyncio

    from forge.engine import Engine
    from forge.generator import GenerationConfig
    from forge.tokenizer import Tokenizer

    tok = Tokenizer.train(TEXT, kind="char")
    model = _peaked_llama()
    cfg = GenerationConfig(temperature=0, max_tokens=40, stop_at_eos=False)
    prompts = ["to be", "or not", "that is the question"]

    async def serve(graphs: bool) -> tuple[list[str], Engine]:
        engine = Engine(model, tok, max_batch=4, max_len=128, cuda_graphs=graphs).start()
        try:
            together = await asyncio.gather(*(_text(engine.stream(p, cfg)) for p in prompts))
            alone = [await _text(engine.stream(p, cfg)) for p in prompts]  # one row of four
            if graphs:
                model.cpu().cuda()  # weights in new memory: the next replay must not read the old
                alone.append(await _text(engine.stream(prompts[0], cfg)))
            return [*together, *alone], engine
        finally:
            await engine.stop()

    graphed, engine = asyncio.run(serve(True))
    assert engine.batcher.graphs is not None and engine.batcher.graphs.greedy is not None
    assert ("engine", id(engine)) not in model.__dict__.get("_decode_graphs", {})  # stopped: not kept on the model
    eager, _ = asyncio.run(serve(False))
    assert graphed[: len(eager)] == eager and graphed[-1] == eager[0]
    assert len(set(eager)) > 1


def test_the_engine_replays_graphs_for_short_requests_too() -> None:
    """The serving engine's graphs outlive a request: it captures them for a 4-token reply too (a one-shot
    generation that short stays eager), and the replies are the eager ones."""
    import asyncio

    from forge.engine import Engine
    from forge.generator import GenerationConfig
    from forge.tokenizer import Tokenizer

    tok = Tokenizer.train(TEXT, kind="char")
    model = _peaked_llama()
    cfg = GenerationConfig(temperature=0, max_tokens=4, stop_at_eos=False)
    prompts = ["to be", "or not", "that is the question"]

    async def serve(graphs: bool) -> tuple[list[str], Engine]:
        engine = Engine(model, tok, max_batch=4, max_len=128, cuda_graphs=graphs, prefix_cache=False).start()
        try:
            return list(await asyncio.gather(*(_text(engine.stream(p, cfg)) for p in prompts))), engine
        finally:
            await engine.stop()

    graphed, engine = asyncio.run(serve(True))
    assert engine.batcher.graphs is not None and engine.batcher.graphs.greedy is not None
    assert graphed == asyncio.run(serve(False))[0]


async def _text(stream: object) -> str:
    return "".join([piece async for piece in stream])


def test_argmax_in_two_passes_equals_torch_s_first_maximum() -> None:
    """ops.argmax over a 128k vocabulary (chunked on CUDA) gives argmax's index, ties to the first."""
    from forge.core import ops

    g = torch.Generator(device="cuda").manual_seed(0)
    for vocab in (128256, 49152, 50257, 1000):
        x = torch.randn(4, vocab, device="cuda", generator=g).to(torch.bfloat16)
        x[1, vocab // 3] = x[1, vocab - 5] = 100.0  # a tie: the first one wins
        x[2] = 0.0
        assert torch.equal(ops.argmax(x), x.argmax(-1)), vocab
        assert ops.argmax(x)[1].item() == vocab // 3 and ops.argmax(x)[2].item() == 0
