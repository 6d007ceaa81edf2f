"""Attention of a few queries a row over a KV cache (a speculative verify, a prompt's tail after a cached prefix):
Forge's decoding kernel (``forge.kernels.decode_attention``, all of a row's queries in one program) against
PyTorch's SDPA with the same boolean mask (cuDNN's path), in the same run.

Times are CUDA-graph replays (no launch overhead), microseconds, bf16, each row's queries causal after a prefix
of 1,000-2,000 tokens in a 2,304-slot cache. ``forge.core.ops``'s DECODE_* routing is set from these figures.

    PYTHONPATH=$PWD/src python benchmarks/decode_attention_gpu.py       # NVIDIA GPU; JSON to stdout and results/
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from _common import environment, save_result
from forge.kernels.decode_attention import decode_attention
from quant_gpu import graph_us  # how Forge's kernel benchmarks time a call

# (B, H, Hkv, W, Tk): Llama-1B's heads with a 32-token tail (one row to eight) and a 5-token verify (8, 64 rows);
# SmolLM2's heads with a tail.
CASES = [
    (1, 32, 8, 32, 2304),
    (2, 32, 8, 32, 2304),
    (4, 32, 8, 32, 2304),
    (8, 32, 8, 32, 2304),
    (8, 32, 8, 5, 2304),
    (1, 9, 3, 32, 2304),
    (64, 32, 8, 5, 2304),
]


def _kernel(p: tuple) -> torch.Tensor:
    return decode_attention(*p)


def _sdpa(p: tuple) -> torch.Tensor:
    q, k, v, mask = p
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True)


def main() -> None:
    rows = {}
    for B, H, Hkv, W, Tk in CASES:
        q = torch.randn(B, H, W, 64, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(B, Hkv, Tk, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        positions = torch.randint(1000, 2000, (B, 1), device="cuda") + torch.arange(W, device="cuda")
        mask = torch.arange(Tk, device="cuda") <= positions[:, :, None]  # (B, W, Tk)
        err = (_kernel((q, k, v, mask)).float() - _sdpa((q, k, v, mask)).float()).abs().max().item()
        rows[f"B{B}H{H}kv{Hkv}W{W}T{Tk}"] = {
            "rows_a_program": W * H // Hkv,
            "kernel_us": round(graph_us(_kernel, [(q, k, v, mask)], 200), 2),
            "sdpa_us": round(graph_us(_sdpa, [(q, k, v, mask)], 200), 2),
            "max_abs_diff": err,
        }
    result = {"benchmark": "decode_attention_gpu", "cases": rows, "environment": environment(torch.device("cuda"))}
    print(json.dumps(result, indent=1))
    save_result(f"decode_attention_gpu_{torch.cuda.get_device_name().replace(' ', '_')}", result)


if __name__ == "__main__":
    main()
