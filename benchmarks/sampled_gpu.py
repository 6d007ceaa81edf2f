"""Sampled and constrained decoding on a GPU: the forward replayed from a CUDA graph against eager, same run.

Prints JSON. SmolLM2-135M's shape with random weights, bf16; temperature 0.8
and top-p 0.95, seeded, so both paths sample the same tokens (asserted). The
constrained rows run under a JSON-schema grammar with SmolLM2's tokenizer
(``--tokenizer``, written by ``benchmarks/constrained.py --save-tokenizer``).

    python benchmarks/sampled_gpu.py --tokenizer T.json [--new-tokens 256] [--batches 1,8]
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
from _common import environment, save_gpu_result, sync
from forge.core.generate import generate_tokens
from forge.core.sampling import SamplingParams
from forge.models import create_model
from forge.structured import Constraint, Grammar
from forge.tokenizer import Tokenizer

SCHEMA = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999}, "tag": {"enum": ["a", "b", "c"]}},
        "required": ["id", "tag"],
    },
}


def run(model, prompts, new: int, graphs: bool, seed: int, grammar, tokenizer) -> tuple[float, torch.Tensor]:
    params = SamplingParams(temperature=0.8, top_p=0.95)
    constraints = None
    if grammar is not None:
        constraints = [Constraint(grammar, tokenizer, model.config.vocab_size) for _ in prompts]
    generator = torch.Generator("cuda").manual_seed(seed)
    sync(torch.device("cuda"))
    t0 = time.perf_counter()
    steps = generate_tokens(
        model,
        prompts,
        max_new_tokens=new,
        params=params,
        generator=generator,
        cuda_graphs=graphs,
        vocab_limit=tokenizer.vocab_size,
        constraints=constraints,
    )
    tokens = torch.stack(list(steps), 1)
    sync(torch.device("cuda"))
    return tokens.numel() / (time.perf_counter() - t0), tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", type=Path, required=True)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    saved = json.loads(args.tokenizer.read_text())
    tokenizer = Tokenizer.from_str(saved["tokenizer"], saved["config"])
    torch.manual_seed(0)
    model = create_model("smollm2-135m").to("cuda", torch.bfloat16).eval()
    grammar = Grammar.json_schema(SCHEMA)
    prompt = tokenizer.encode("<|im_start|>user\nList some items as JSON.<|im_end|>\n<|im_start|>assistant\n")
    results = {}
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = [prompt] * batch
        for name, g in (("sampled", None), ("constrained", grammar)):
            run(model, prompts, 40, True, 0, g, tokenizer)  # capture and warm up
            run(model, prompts, 40, False, 0, g, tokenizer)
            graphed, eager, same = [], [], True
            for seed in range(args.repeats):
                rate_g, tok_g = run(model, prompts, args.new_tokens, True, seed, g, tokenizer)
                rate_e, tok_e = run(model, prompts, args.new_tokens, False, seed, g, tokenizer)
                graphed.append(rate_g)
                eager.append(rate_e)
                same = same and torch.equal(tok_g, tok_e)
            results[f"{name}/batch{batch}"] = {
                "graphed_tok_s": round(statistics.median(graphed), 1),
                "eager_tok_s": round(statistics.median(eager), 1),
                "speedup": round(statistics.median(graphed) / statistics.median(eager), 2),
                "same_tokens": same,
            }
    out = {
        "benchmark": "sampled_gpu",
        "model": "SmolLM2-135M shape, random weights, bf16",
        "new_tokens": args.new_tokens,
        "sampling": "temperature 0.8, top_p 0.95, seeded; constrained: a JSON-schema grammar (EOS ignored)",
        "environment": environment(torch.device("cuda")),
        "results": results,
    }
    save_gpu_result("sampled_gpu", out)


if __name__ == "__main__":
    main()
