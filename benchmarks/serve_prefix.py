"""Prefix caching in the serving engine: requests sharing a long system prompt, cache on against off.

Prints JSON and saves it under benchmarks/results/. The same --requests requests (16), each a
~--system-tokens (2,000) token system prompt of Shakespeare followed by its own question, go
through ``forge.engine.Engine`` twice: with the prefix cache off (the baseline) and on. Reported:
time to first token (median, mean, each request's), total seconds, the prefix cache's hit rate and
tokens reused, and whether the greedy outputs are identical. Before the clock runs, each side serves the
same requests with another play as the system prompt (a warm server: kernels compiled for these shapes).

* sequential: one request after another, as one chat user after another (the headline figure);
* concurrent (``--concurrent``): all at once; the engine prefills the first, the rest join on it.

    python benchmarks/serve_prefix.py                                   # SmolLM2 on the CPU
    python benchmarks/serve_prefix.py --device cuda --shape 1b --concurrent   # a random 1B Llama on a GPU
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from _common import SHAKESPEARE, environment, save_result, sync
from decode_gpu import SHAPES, shape_config
from forge.app import Forge
from forge.core.transformer import Transformer
from forge.engine import Engine
from forge.generator import GenerationConfig
from forge.tokenizer import Tokenizer

QUESTIONS = [
    "Who speaks first in this scene?",
    "Summarise the passage in one sentence.",
    "Which characters are named?",
    "What is the mood of the scene?",
    "Quote the first line.",
    "Where does the scene take place?",
    "What does Hamlet want?",
    "Name one image the verse uses.",
]


def system_prompt(tokenizer: Any, n_tokens: int, play: str = "hamlet") -> str:
    """About ``n_tokens`` of a play (Hamlet) as a reference text, cut on a token boundary."""
    text = (SHAKESPEARE / f"{play}.txt").read_text(encoding="utf-8")
    ids = tokenizer.encode(text[: n_tokens * 8])[:n_tokens]
    return "You answer questions about this text.\n\n" + tokenizer.decode(ids) + "\n\n"


async def one(engine: Engine, prompt: str, cfg: GenerationConfig) -> tuple[float, str]:
    """(seconds to the first token, the text)."""
    start, first, pieces = time.perf_counter(), None, []
    async for piece in engine.stream(prompt, cfg):
        if first is None:
            first = time.perf_counter() - start
        pieces.append(piece)
    return (first if first is not None else time.perf_counter() - start), "".join(pieces)


async def send(engine: Engine, prompts: list[str], cfg: GenerationConfig, concurrent: bool) -> list[tuple[float, str]]:
    if concurrent:
        return list(await asyncio.gather(*(one(engine, p, cfg) for p in prompts)))
    return [await one(engine, p, cfg) for p in prompts]


async def run(
    model: Transformer, tokenizer: Any, prompts: list[str], warmup: list[str], cache: bool, args: argparse.Namespace
) -> dict:
    engine = Engine(model, tokenizer, max_batch=args.max_batch, max_len=args.context, prefix_cache=cache).start()
    cfg = GenerationConfig(max_tokens=args.max_tokens, temperature=0, stop_at_eos=False)
    try:
        # A server in its steady state: the same traffic with another system prompt first, so that the
        # kernels these shapes need are compiled (Triton, cuDNN plans) before the clock runs, on both sides.
        await send(engine, warmup, cfg, args.concurrent)
        if engine.prefix_cache is not None:
            engine.prefix_cache.clear()
            engine.prefix_cache.stats = type(engine.prefix_cache.stats)()
        sync(model.tok_emb.weight.device)
        start = time.perf_counter()
        done = await send(engine, prompts, cfg, args.concurrent)
        total = time.perf_counter() - start
        stats = engine.snapshot()["prefix_cache"]
    finally:
        await engine.stop()
    ttft = [t for t, _ in done]
    out = {
        "ttft_median_s": statistics.median(ttft),
        "ttft_mean_s": statistics.mean(ttft),
        "ttft_first_s": ttft[0],
        "ttft_rest_median_s": statistics.median(ttft[1:]) if len(ttft) > 1 else ttft[0],
        "ttft_s": [round(t, 4) for t in ttft],
        "total_s": total,
        "texts": [text for _, text in done],
    }
    if stats is not None:
        out["prefix_cache"] = stats
        out["hit_rate"] = stats["hits"] / max(1, stats["lookups"])
        out["token_reuse_rate"] = stats["tokens_reused"] / max(1, stats["tokens_looked_up"])
    return out


def _parting(a: str, b: str) -> dict[str, object]:
    """Where two replies part: the character index and a few characters of each from there."""
    i = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return {"at": i, "off": a[i : i + 12], "on": b[i : i + 12]}


def load(args: argparse.Namespace) -> tuple[Transformer, Any]:
    if args.shape == "1b" and args.tokenizer is not None:  # a GPU machine without SmolLM2's GGUF
        shape = {**SHAPES["llama-1b"], "vocab_size": 49152}
        torch.manual_seed(0)
        model = Transformer(shape_config(shape, 4096)).to(args.device).to(torch.bfloat16).eval()
        return model, Tokenizer.load(args.tokenizer)
    app = Forge.load("smollm2", device="cpu")
    assert app.model is not None and app.tokenizer is not None
    if args.shape == "smollm2":
        return app.model.to(args.device).eval(), app.tokenizer
    shape = {**SHAPES["llama-1b"], "vocab_size": app.model.config.vocab_size}  # SmolLM2's tokenizer, random weights
    torch.manual_seed(0)
    model = Transformer(shape_config(shape, 4096)).to(args.device).to(torch.bfloat16).eval()
    return model, app.tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", choices=["smollm2", "1b"], default="smollm2")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--system-tokens", type=int, default=2000)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=2304)
    parser.add_argument("--tokenizer", type=Path, default=None, help="a saved tokenizer, for --shape 1b")
    parser.add_argument("--concurrent", action="store_true", help="send every request at once")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load(args)
    prompts, warmup = (
        [system + f"Question {i + 1}: {QUESTIONS[i % len(QUESTIONS)]}\nAnswer:" for i in range(args.requests)]
        for system in (
            system_prompt(tokenizer, args.system_tokens),
            system_prompt(tokenizer, args.system_tokens, "macbeth"),
        )
    )
    off = asyncio.run(run(model, tokenizer, prompts, warmup, False, args))
    on = asyncio.run(run(model, tokenizer, prompts, warmup, True, args))
    result = {
        "benchmark": "serve_prefix",
        "mode": "concurrent" if args.concurrent else "sequential",
        "shape": args.shape,
        "requests": args.requests,
        "prompt_tokens": len(tokenizer.encode(prompts[0])),
        "max_tokens": args.max_tokens,
        "identical_outputs": off["texts"] == on["texts"],
        # A random-weight model's logits are near ties: where the cached path's kernels round differently from a
        # whole prefill's (bf16 on a GPU), a reply can part from the baseline's; how many did, and where.
        "identical_requests": sum(a == b for a, b in zip(off["texts"], on["texts"], strict=True)),
        "first_difference": [_parting(a, b) for a, b in zip(off["texts"], on["texts"], strict=True) if a != b],
        "ttft_speedup_median": off["ttft_median_s"] / on["ttft_median_s"],
        "ttft_speedup_mean": off["ttft_mean_s"] / on["ttft_mean_s"],
        "total_speedup": off["total_s"] / on["total_s"],
        "cache_off": {k: v for k, v in off.items() if k != "texts"},
        "cache_on": {k: v for k, v in on.items() if k != "texts"},
        "environment": environment(torch.device(args.device)),
    }
    mode = "concurrent" if args.concurrent else "sequential"
    suffix = "cpu" if args.device == "cpu" else f"{args.shape}_{torch.cuda.get_device_name().replace(' ', '_')}"
    save_result(f"serve_prefix_{mode}_{suffix}", result)


if __name__ == "__main__":
    main()
