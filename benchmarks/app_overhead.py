"""What the layers above the token loop cost: SmolLM2 decoding through the core loop, the Generator,
``app.generate``, ``app.chat`` and ``app.sync.chat_stream`` (what ``forge chat`` runs), interleaved in
one run. The chat paths are compared with the core loop on the same rendered chat prompt.

Every path decodes the same prompt greedily for the same number of tokens (``stop_at_eos`` off, so
each run is exactly ``--new-tokens`` long); only the layers around the loop differ. Prints JSON with
tokens/s per path and each path's ratio to the core loop.

    python benchmarks/app_overhead.py [--dtype bfloat16] [--new-tokens 96] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment
from forge import Forge
from forge.core.generate import generate_tokens
from forge.core.sampling import SamplingParams

PROMPT = "The history of the city of London begins with a Roman settlement on the north bank"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy; >0 samples (seeded).")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    app = Forge.load(args.model, dtype=args.dtype)
    model, tokenizer = app.model, app.tokenizer
    assert model is not None and tokenizer is not None
    ids = tokenizer.encode_prompt(PROMPT)
    messages = [{"role": "user", "content": PROMPT}]
    chat_ids = tokenizer.encode_prompt(app.render(messages))
    options = dict(max_tokens=args.new_tokens, temperature=args.temperature, seed=0, stop_at_eos=False)
    params = SamplingParams(temperature=args.temperature)

    def loop(prompt: list[int]) -> int:
        rng = torch.Generator().manual_seed(0)
        steps = generate_tokens(
            model,
            [prompt],
            max_new_tokens=args.new_tokens,
            params=params,
            generator=rng,
            vocab_limit=tokenizer.vocab_size,
        )
        return sum(1 for _ in steps)

    def generator() -> int:
        return app._generator.complete(PROMPT, **options)[0].completion_tokens  # type: ignore[union-attr]

    def app_generate() -> int:
        app.sync.generate(PROMPT, **options)
        return args.new_tokens

    def app_chat() -> int:
        app.sync.chat(messages, **options)
        return args.new_tokens

    def chat_stream() -> int:  # what `forge chat` runs for each reply
        for _ in app.sync.chat_stream(messages, **options):
            pass
        return args.new_tokens

    paths: dict[str, Callable[[], int]] = {
        "core_loop": lambda: loop(ids),
        "generator": generator,
        "app_generate": app_generate,
        "core_loop_chat_prompt": lambda: loop(chat_ids),
        "app_chat": app_chat,
        "app_chat_stream": chat_stream,
    }
    for fn in paths.values():  # warm up every path (allocator, first-call costs)
        fn()
    runs: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.repeats):  # interleaved: drift on a noisy machine hits every path alike
        for name, fn in paths.items():
            t0 = time.perf_counter()
            n = fn()
            runs[name].append(n / (time.perf_counter() - t0))
    median = {name: round(statistics.median(v), 2) for name, v in runs.items()}
    out = {
        "benchmark": "app_overhead",
        "model": args.model,
        "dtype": args.dtype,
        "prompt_tokens": len(ids),
        "new_tokens": args.new_tokens,
        "tokens_per_sec": median,
        "temperature": args.temperature,
        "ratio_to_core_loop": {
            "generator": round(median["generator"] / median["core_loop"], 3),
            "app_generate": round(median["app_generate"] / median["core_loop"], 3),
            "app_chat": round(median["app_chat"] / median["core_loop_chat_prompt"], 3),
            "app_chat_stream": round(median["app_chat_stream"] / median["core_loop_chat_prompt"], 3),
        },
        "runs": {name: [round(x, 2) for x in v] for name, v in runs.items()},
        "environment": environment(torch.device("cpu")),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
