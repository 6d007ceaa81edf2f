"""Batch-1 greedy decoding on a GPU: Forge (CUDA-graph decode, fused kernels) against HF `generate`, same run.

Prints JSON and saves it under benchmarks/results/. Random weights, bf16, for
the SmolLM2-135M shape and a 1B Llama shape; also a batch-64 run. Reports
tokens/s and the share of the HBM roofline: bytes read per decode step
(weights plus the KV cache so far) / bandwidth.

    python benchmarks/decode_gpu.py [--new-tokens 256] [--bandwidth 3.35e12]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, save_gpu_result
from forge import kernels
from forge.config import ModelConfig
from forge.core.generate import generate_tokens
from forge.core.sampling import SamplingParams
from forge.core.transformer import Transformer

SHAPES = {
    "smollm2-135m": dict(d_model=576, n_layer=30, n_head=9, n_kv_head=3, d_ff=1536, vocab_size=49152, tie=True),
    "llama-1b": dict(d_model=2048, n_layer=16, n_head=32, n_kv_head=8, d_ff=8192, vocab_size=128256, tie=True),
}


def shape_config(shape: dict, context: int) -> ModelConfig:
    """The Llama-style config of one of SHAPES."""
    return ModelConfig(
        vocab_size=shape["vocab_size"],
        context_length=context,
        n_layer=shape["n_layer"],
        n_head=shape["n_head"],
        n_kv_head=shape["n_kv_head"],
        d_model=shape["d_model"],
        d_ff=shape["d_ff"],
        norm="rmsnorm",
        activation="swiglu",
        position="rope",
        bias=False,
        tie_embeddings=shape["tie"],
    )


def forge_model(shape: dict, context: int) -> Transformer:
    torch.manual_seed(0)
    return Transformer(shape_config(shape, context)).cuda().to(torch.bfloat16).eval()


def hf_model(shape: dict, context: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["d_model"],
        intermediate_size=shape["d_ff"],
        num_hidden_layers=shape["n_layer"],
        num_attention_heads=shape["n_head"],
        num_key_value_heads=shape["n_kv_head"],
        max_position_embeddings=context,
        tie_word_embeddings=shape["tie"],
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).cuda().to(torch.bfloat16).eval()


def timed(fn) -> float:
    fn()  # warm-up (allocations, graph capture, kernel selection)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def roofline(model: Transformer, batch: int, prompt: int, new: int, seconds: float, bandwidth: float) -> float:
    """Achieved bytes/s over the bandwidth: weights once per step, plus the KV cache read so far."""
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_per_token = 2 * cfg.n_layer * cfg.kv_heads * cfg.head_dim * 2  # k and v, bf16
    mean_len = prompt + new / 2
    per_step = weights + batch * kv_per_token * mean_len
    return per_step * new / seconds / bandwidth


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--bandwidth", type=float, default=3.35e12, help="HBM bytes/s (H100 SXM: 3.35e12)")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--compile", action="store_true", help="also torch.compile the graphed decode step")
    args = p.parse_args()
    context = args.prompt_tokens + args.new_tokens + 8
    results = []
    greedy = SamplingParams(temperature=0)
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        for batch in (1, 64):
            prompts = torch.randint(
                0, shape["vocab_size"], (batch, args.prompt_tokens), generator=torch.Generator().manual_seed(1)
            )
            model = forge_model(shape, context)
            row: dict[str, object] = {"shape": name, "batch": batch, "new_tokens": args.new_tokens}
            ids = prompts.tolist()

            def forge_run(
                graphs: bool, compiled: bool, fused: bool, model: Transformer = model, ids: list = ids
            ) -> None:
                steps = generate_tokens(
                    model, ids, max_new_tokens=args.new_tokens, params=greedy, cuda_graphs=graphs, compile=compiled
                )
                if fused:
                    for _ in steps:
                        pass
                    return
                with kernels.disabled():  # PyTorch's ops only: what the kernels add
                    for _ in steps:
                        pass

            # (label, CUDA graphs, torch.compile, Forge's kernels)
            variants = [
                ("forge_graphs", True, False, True),
                ("forge_graphs_no_kernels", True, False, False),
                ("forge_eager", False, False, True),
            ]
            if args.compile:
                variants.insert(0, ("forge_graphs_compiled", True, True, False))
            for label, graphs, compiled, fused in variants:
                s = timed(lambda g=graphs, c=compiled, f=fused: forge_run(g, c, f))
                row[label] = {
                    "tokens_per_s": batch * args.new_tokens / s,
                    "roofline": roofline(model, batch, args.prompt_tokens, args.new_tokens, s, args.bandwidth),
                }
            del model
            hf = hf_model(shape, context)
            x = prompts.cuda()

            def hf_run(hf=hf, x=x) -> None:
                with torch.no_grad():
                    hf.generate(x, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)

            s = timed(hf_run)
            row["transformers"] = {"tokens_per_s": batch * args.new_tokens / s}
            best = max(v["tokens_per_s"] for k, v in row.items() if k.startswith("forge_"))  # type: ignore[union-attr]
            row["speedup_vs_transformers"] = best / row["transformers"]["tokens_per_s"]  # type: ignore[index]
            del hf
            torch.cuda.empty_cache()
            results.append(row)
            print(json.dumps(row), file=sys.stderr)
    out = {"benchmark": "decode_gpu", "results": results, "env": environment(torch.device("cuda"))}
    save_gpu_result("decode_gpu", out)


if __name__ == "__main__":
    main()
