"""A long prompt's prefill on the CPU with quantized weights: the CPU kernels against dequantize + float matmul.

SmolLM2-135M from its shipped Q4_1 GGUF (int4 weights, the Q8_0 embedding as int8), 2 threads. For each
prompt length, one forward over the prompt (the logits of its last token, as a prefill computes them), timed
both ways in the same process, alternating, best of --repeats:

- ``kernels``: every matmul through Forge's CPU quantized kernels (the behaviour before ``CPU_DEQUANT_ROWS``:
  the baseline);
- ``dequant``: Forge's default: matmuls of ``CPU_DEQUANT_ROWS`` rows or more dequantize the weight first.

Prints JSON and writes benchmarks/results/quant_prefill_cpu.json.

    python benchmarks/quant_prefill_cpu.py [--lengths 64 256 1000 2000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import SHAKESPEARE, environment, save_result
from forge.app import Forge
from forge.core.quantize import base

THREADS = 2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="*", default=[64, 256, 1000, 2000])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(THREADS)
    app = Forge.load("smollm2", device="cpu")
    assert app.model is not None and app.tokenizer is not None
    model = app.model.eval()
    ids = app.tokenizer.encode((SHAKESPEARE / "hamlet.txt").read_text(encoding="utf-8")[:40000])
    default = base.CPU_DEQUANT_ROWS
    rows = []
    for n in args.lengths:
        x = torch.tensor([ids[:n]])
        best: dict[str, float] = {}
        logits: dict[str, torch.Tensor] = {}
        for _ in range(args.repeats + 1):  # the first round warms up
            for name, threshold in (("kernels", 1 << 30), ("dequant", default)):
                base.CPU_DEQUANT_ROWS = threshold
                with torch.inference_mode():
                    t = time.perf_counter()
                    logits[name] = model(x, last_only=True)[0, -1].float()
                    took = time.perf_counter() - t
                best[name] = min(best.get(name, float("inf")), took)
        base.CPU_DEQUANT_ROWS = default
        diff = (logits["kernels"] - logits["dequant"]).abs().max().item()
        rows.append(
            {
                "prompt_tokens": n,
                "kernels_s": round(best["kernels"], 4),
                "dequant_s": round(best["dequant"], 4),
                "speedup": round(best["kernels"] / best["dequant"], 3),
                "dequant_tok_s": round(n / best["dequant"], 1),
                "same_argmax": bool(logits["kernels"].argmax() == logits["dequant"].argmax()),
                "max_abs_logit_diff": round(diff, 5),
            }
        )
        print(rows[-1], flush=True)
    save_result(
        "quant_prefill_cpu",
        {
            "benchmark": "quant_prefill_cpu",
            "model": "SmolLM2-135M-Instruct.Q4_1.gguf",
            "threads": THREADS,
            "cpu_dequant_rows": default,
            "repeats": args.repeats,
            "rows": rows,
            "env": environment(torch.device("cpu")),
        },
    )


if __name__ == "__main__":
    main()
