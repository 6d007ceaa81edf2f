"""Group-wise int8 (GGUF Q8_0) matmuls on the CPU, and one decode token through all of SmolLM2's linears.

Prints JSON (and saves benchmarks/results/int8_group_cpu.json). Part 1: for SmolLM2's tied head (49152 x 576)
and an ffn matrix (1536 x 576), groups of 32, bf16 activations, batch 1 and 64, the ways a group-wise int8
weight can be multiplied on a CPU with PyTorch's ops, each timed against the others in the same run:

- ``int4_kernel``: what ``Int8GroupWeight.linear`` does: two nibbles, one ``_weight_int4pack_mm_for_cpu`` call;
- ``bf16_linear``: ``F.linear`` on a dequantized bf16 copy (twice the memory: the baseline to beat);
- ``dequant_linear``: dequantize to bf16 at every call, then ``F.linear``;
- ``int8_group_loop``: ``_weight_int8pack_mm`` once per group of a (G, out, g) layout, summed;
- ``int8_per_channel``: ``_weight_int8pack_mm`` with one scale a row: not exact for group scales, a lower bound.

Part 2: SmolLM2 from its GGUF kept quantized (bf16 activations), one token (batch 1) through every linear
once, eager, against the same model dequantized to bf16. Times are the best of interleaved repeats: a
shared machine's noise only ever adds time.

    python benchmarks/int8_group_cpu.py [--threads 2] [--repeats 15]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, save_result
from forge.core.quantize import Int8GroupWeight, QuantizedWeight, weight_bytes
from forge.models import load, locate

SHAPES = {"head_49152x576": (49152, 576), "ffn_1536x576": (1536, 576)}


def best_ms(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    best = dict.fromkeys(fns, float("inf"))
    for f in fns.values():
        f()  # warm up
    for _ in range(repeats):
        for name, f in fns.items():  # interleaved: load on the machine hits every candidate alike
            t0 = time.perf_counter()
            f()
            best[name] = min(best[name], time.perf_counter() - t0)
    return {k: round(v * 1e3, 3) for k, v in best.items()}


def matmuls(out: int, width: int, batch: int, repeats: int) -> dict[str, float]:
    g, groups = 32, width // 32
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-128, 128, (out, width), generator=gen, dtype=torch.int8)
    scale = (torch.rand(out, groups, generator=gen) * 0.01 + 1e-3).half()
    w = Int8GroupWeight(q, scale, None, torch.bfloat16)
    dense = w.dequantize(torch.bfloat16)
    sb = scale.to(torch.bfloat16)
    q_groups = q.reshape(out, groups, g).transpose(0, 1).contiguous()  # (G, out, g)
    s_groups = sb.t().contiguous()  # (G, out)
    ones = torch.ones(out, dtype=torch.bfloat16)
    x = torch.randn(batch, width, generator=gen).to(torch.bfloat16)
    mm8 = torch.ops.aten._weight_int8pack_mm

    def loop() -> torch.Tensor:
        y = mm8(x[:, :g].contiguous(), q_groups[0], s_groups[0]).float()
        for j in range(1, groups):
            y += mm8(x[:, j * g : (j + 1) * g].contiguous(), q_groups[j], s_groups[j])
        return y.to(torch.bfloat16)

    fns = {
        "int4_kernel": lambda: w.linear(x),
        "bf16_linear": lambda: F.linear(x, dense),
        "dequant_linear": lambda: F.linear(x, (q.reshape(out, groups, g) * sb[..., None]).reshape(out, width)),
        "int8_group_loop": loop,
        "int8_per_channel": lambda: mm8(x, q, ones),
    }
    ref = F.linear(x.float(), w.dequantize(torch.float32))
    err = float((w.linear(x).float() - ref).abs().max() / ref.abs().max())
    return {**best_ms(fns, repeats if out < 10000 or batch == 1 else max(3, repeats // 3)), "int4_kernel_rel_err": err}


def linears(model: torch.nn.Module) -> list[tuple[torch.nn.Module, torch.Tensor | QuantizedWeight]]:
    seen: set[int] = set()
    out = []
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            out.append((m, m.weight))
    return out


def decode_token(repeats: int) -> dict[str, object]:
    path = locate("smollm2")
    kept = load(path).model
    plain = load(path, quantized=False).model.to(torch.bfloat16)

    def step(model: torch.nn.Module) -> Callable[[], None]:
        xs = [(w, torch.randn(1, m.in_features).to(torch.bfloat16)) for m, w in linears(model)]

        def run() -> None:
            for w, x in xs:
                w.linear(x) if isinstance(w, QuantizedWeight) else F.linear(x, w)

        return run

    with torch.no_grad():
        times = best_ms({"kept_quantized": step(kept), "bf16": step(plain)}, repeats)
    return {
        "ms_per_token_all_linears": times,
        "weight_bytes": {"kept_quantized": weight_bytes(kept), "bf16": weight_bytes(plain)},
        "file_bytes": path.stat().st_size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results: dict[str, object] = {"environment": environment(torch.device("cpu"))}
    with torch.no_grad():
        for name, (out, width) in SHAPES.items():
            for batch in (1, 64):
                results[f"{name}_batch{batch}_ms"] = matmuls(out, width, batch, args.repeats)
    try:
        results["smollm2"] = decode_token(args.repeats)
    except Exception as e:  # the model is an optional package
        results["smollm2"] = f"skipped: {e}"
    save_result("int8_group_cpu", results)


if __name__ == "__main__":
    main()
