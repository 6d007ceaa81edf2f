"""Cached against uncached generation: tokens/s of the same greedy decode, same run.

Prints JSON. Both paths produce the same tokens (asserted); only the KV cache
differs: the cached path prefills once and feeds one token per step, the
uncached path recomputes the whole sequence every step.

    python benchmarks/generate_cpu.py [--preset small] [--prompt-tokens 64] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, sync
from forge.core.device import resolve_device
from forge.core.generate import generate_tokens
from forge.core.sampling import SamplingParams
from forge.models import create_model


def run(model, prompts, new_tokens: int, use_cache: bool, dev: torch.device) -> tuple[float, torch.Tensor]:
    sync(dev)
    t0 = time.perf_counter()
    out = torch.stack(
        list(
            generate_tokens(
                model, prompts, max_new_tokens=new_tokens, params=SamplingParams(temperature=0), use_cache=use_cache
            )
        ),
        dim=1,
    )
    sync(dev)
    return out.numel() / (time.perf_counter() - t0), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = p.parse_args()
    dev = resolve_device(args.device)
    torch.manual_seed(0)
    model = create_model(args.preset).to(dev, getattr(torch, args.dtype)).eval()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt_tokens), generator=g).tolist()

    run(model, prompts, 4, True, dev)  # warm up both paths
    run(model, prompts, 4, False, dev)
    cached, uncached = [], []
    for _ in range(args.repeats):
        tps, a = run(model, prompts, args.new_tokens, True, dev)
        cached.append(tps)
        tps, b = run(model, prompts, args.new_tokens, False, dev)
        uncached.append(tps)
        if args.dtype == "float32":
            assert torch.equal(a, b), "cached and uncached greedy outputs differ"
    c, u = statistics.median(cached), statistics.median(uncached)
    print(
        json.dumps(
            {
                "benchmark": "generate_cpu",
                "preset": args.preset,
                "dtype": args.dtype,
                "batch": args.batch,
                "prompt_tokens": args.prompt_tokens,
                "new_tokens": args.new_tokens,
                "tokens_per_sec": {"cached": round(c, 1), "uncached": round(u, 1)},
                "runs": {"cached": [round(x, 1) for x in cached], "uncached": [round(x, 1) for x in uncached]},
                "speedup_cached_vs_uncached": round(c / u, 2),
                "environment": environment(dev),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
