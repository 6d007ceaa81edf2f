"""Attention for the part of a prompt after a cached prefix (Tq new queries over Tk = prefix + Tq keys), on CUDA.

Prints JSON and saves it under benchmarks/results/. In one run, the same 20 suffix lengths (17..55 tokens after a
2,000-token prefix, a Llama-1B head layout: 32 query heads over 8 kv heads, head dim 64, bf16), each first seen
and then seen again, through:

* ``tril_mask`` (the baseline, Forge's path before): SDPA with a materialised lower-right boolean mask;
* ``lower_right_bias`` (Forge's path now, ``forge.core.ops.attention``): SDPA with
  ``torch.nn.attention.bias.causal_lower_right``, which runs the flash / memory-efficient kernels with no mask;
* ``triton``: Forge's own flash-attention kernel (``forge.kernels.attention``), bottom-right causal.

A mask sends SDPA to cuDNN, which plans each new (Tq, Tk) shape: that cost lands on the time to first token of
every request whose new part has a length not seen before.

    python benchmarks/attention_after_prefix.py
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from _common import environment, save_result
from forge.kernels.attention import attention as triton_attention

B, H, HKV, D, PREFIX = 1, 32, 8, 64, 2000
LENGTHS = list(range(17, 57, 2))


def tril_mask(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    Tq, Tk = q.shape[2], k.shape[2]
    mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril_(diagonal=Tk - Tq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def lower_right_bias(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    bias = causal_lower_right(q.shape[2], k.shape[2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)  # type: ignore[arg-type]


def triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return triton_attention(q, k, v, causal=True)


def run(fn) -> dict[str, float]:
    times, err = [], 0.0
    for Tq in LENGTHS * 2:  # every length first seen, then seen again
        q = torch.randn(B, H, Tq, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(B, HKV, PREFIX + Tq, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn(q, k, v)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        g = H // HKV
        ref = F.scaled_dot_product_attention(
            q.float(), k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1),
            attn_mask=torch.ones(Tq, PREFIX + Tq, dtype=torch.bool, device="cuda").tril_(diagonal=PREFIX),
        )  # fmt: skip
        err = max(err, (out.float() - ref).abs().max().item())
    first, again = times[: len(LENGTHS)], times[len(LENGTHS) :]
    return {
        "first_seen_median_s": statistics.median(first),
        "first_seen_max_s": max(first),
        "seen_median_s": statistics.median(again),
        "max_abs_error_vs_fp32": err,
    }


def main() -> None:
    torch.manual_seed(0)
    arms = {
        name: run(fn)
        for name, fn in (("tril_mask", tril_mask), ("lower_right_bias", lower_right_bias), ("triton", triton))
    }
    base = arms["tril_mask"]["first_seen_median_s"]
    result = {
        "benchmark": "attention_after_prefix",
        "prefix_tokens": PREFIX,
        "suffix_lengths": LENGTHS,
        "arms": arms,
        "first_seen_speedup_vs_tril_mask": {n: base / a["first_seen_median_s"] for n, a in arms.items()},
        "environment": environment(torch.device("cuda")),
    }
    save_result(f"attention_after_prefix_{torch.cuda.get_device_name().replace(' ', '_')}", result)


if __name__ == "__main__":
    main()
