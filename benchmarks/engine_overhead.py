"""Where a served request's time goes: host time against device time of the engine's forwards.

Prints JSON and saves it under benchmarks/results/. A ~2,000-token system prompt plus a question, one request
at a time, through ``forge.core.decode.Batcher`` (the engine's loop) with a prefix cache, all in one run:

* ``prefill_uncached``: the whole prompt in one forward (the baseline);
* ``prefill_cached``: the same prompt after its system prompt was stored: ~25 tokens computed;
* ``decode_step``: one eager step of one running row;
* ``engine_decode`` (CUDA): ms per generated token through ``forge.engine.Engine`` (128 greedy tokens after a
  ~500-token prompt), one request alone and 4 at once, with the engine's CUDA graphs (replayed for the whole
  batch however many rows run) against eager steps (``cuda_graphs=False``, the baseline).

The requests cycle through 8 questions; the warm-up sees 3 of them, so, as in live traffic, some measured calls
compute a suffix length not seen before.

For each: wall seconds per call (synchronised), and the device's busy time in it from torch.profiler, so that
``host_bound_share`` = 1 - device / wall says how much of the call only the host's launching costs. On the
H200 this is what bounds the prefix cache's TTFT gain (benchmarks/serve_prefix.py): a cached prefill computes
1% of the tokens but still launches every layer's kernels, eagerly.

    python benchmarks/engine_overhead.py --device cuda --tokenizer TOKENIZER   # a random 1B Llama on a GPU
    python benchmarks/engine_overhead.py                                       # SmolLM2 on the CPU
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from _common import environment, save_result, sync
from forge.core.decode import Batcher, Sequence
from forge.core.prefix_cache import PrefixCache
from forge.core.sampling import SamplingParams
from forge.engine import Engine
from forge.generator import GenerationConfig
from serve_prefix import QUESTIONS, load, system_prompt


def device_seconds(prof: profile) -> float:
    """Seconds the device was busy in ``prof`` (sum of its kernels' self time), 0 on the CPU."""
    return sum(getattr(e, "self_device_time_total", 0.0) for e in prof.key_averages()) / 1e6


def measure(fn, device: torch.device, repeats: int) -> dict[str, float]:
    """Median wall seconds of ``fn()`` over ``repeats`` calls, and the device's busy share of one more."""
    walls = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        walls.append(time.perf_counter() - start)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    wall = statistics.median(walls)
    busy = device_seconds(prof) if device.type == "cuda" else wall
    return {"wall_s": wall, "device_s": busy, "host_bound_share": max(0.0, 1 - busy / wall)}


def engine_decode(model: torch.nn.Module, tokenizer: object, new_tokens: int = 128) -> dict[str, dict[str, float]]:
    """Milliseconds per generated token through the serving engine, graphs on and off, 1 and 4 requests."""
    prompt = system_prompt(tokenizer, 500) + "Question: who speaks first?\nAnswer:"
    cfg = GenerationConfig(max_tokens=new_tokens, temperature=0, stop_at_eos=False)

    async def one(engine: Engine) -> None:
        async for _ in engine.stream(prompt, cfg):
            pass

    async def timed(engine: Engine, n: int) -> float:
        await asyncio.gather(*(one(engine) for _ in range(n)))  # warm: graphs captured, kernels planned
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            await asyncio.gather(*(one(engine) for _ in range(n)))
            best = min(best, time.perf_counter() - start)
        return best / new_tokens * 1e3  # ms per step: the n requests decode together

    async def arm(graphs: bool) -> dict[str, float]:
        engine = Engine(model, tokenizer, max_batch=8, max_len=1024, cuda_graphs=graphs).start()
        try:
            return {"1_request_ms_per_token": await timed(engine, 1), "4_requests_ms_per_step": await timed(engine, 4)}
        finally:
            await engine.stop()

    out = {"eager": asyncio.run(arm(False)), "graphs": asyncio.run(arm(True))}
    out["speedup"] = {k: out["eager"][k] / out["graphs"][k] for k in out["eager"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", choices=["smollm2", "1b"], default=None, help="default: 1b on CUDA, else smollm2")
    parser.add_argument("--tokenizer", type=Path, default=None, help="a saved tokenizer, for --shape 1b")
    parser.add_argument("--system-tokens", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    args.shape = args.shape or ("1b" if args.device.startswith("cuda") else "smollm2")
    device = torch.device(args.device)
    model, tokenizer = load(args)
    system = system_prompt(tokenizer, args.system_tokens)
    prompts = [tokenizer.encode(system + f"Question {i + 1}: {q}\nAnswer:") for i, q in enumerate(QUESTIONS)]
    cache = PrefixCache(max_bytes=2 << 30)
    batcher = Batcher(model, max_batch=1, max_len=len(max(prompts, key=len)) + 64, prefix_cache=cache)
    turn = iter(range(10**9))

    def seq() -> Sequence:
        return Sequence(prompts[next(turn) % len(prompts)], max_new_tokens=32, params=SamplingParams(temperature=0))

    def prefill_cold() -> None:
        cache.clear()
        s = seq()
        batcher.add(s)
        batcher.remove(s)

    def prefill_warm() -> None:
        s = seq()
        batcher.add(s)
        batcher.remove(s)

    with torch.inference_mode():
        for _ in range(3):  # kernels compiled and planned for these shapes first
            prefill_cold()
            prefill_warm()
        uncached = measure(prefill_cold, device, args.repeats)
        prefill_warm()
        cached = measure(prefill_warm, device, args.repeats)
        running = seq()
        batcher.add(running)
        step = measure(batcher.step, device, args.repeats)
        batcher.remove(running)
    engine = engine_decode(model, tokenizer) if device.type == "cuda" else None
    result = {
        "benchmark": "engine_overhead",
        "shape": args.shape,
        "prompt_tokens": len(prompts[0]),
        "cached_tokens": cache.snapshot()["tokens_reused"] // max(1, cache.snapshot()["hits"]),
        "prefill_uncached": uncached,
        "prefill_cached": cached,
        "decode_step": step,
        "cached_over_uncached_wall": cached["wall_s"] / uncached["wall_s"],
        "cached_over_uncached_device": cached["device_s"] / max(uncached["device_s"], 1e-12),
        "engine_decode": engine,
        "environment": environment(device),
    }
    suffix = "cpu" if device.type == "cpu" else f"{args.shape}_{torch.cuda.get_device_name().replace(' ', '_')}"
    save_result(f"engine_overhead_{suffix}", result)


if __name__ == "__main__":
    main()
