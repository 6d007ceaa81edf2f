"""What the two attention ops share: input checks, tile loads and dots, and the launch-config tuple.

``forge.kernels.attention`` (training and prefill) and ``forge.kernels.decode_attention`` (one query per
row over a KV cache) both use these, so both ops accept the same inputs and multiply tiles the same way.
The quantized matmuls use the dots and :func:`sm_count` too.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

__all__ = [
    "DTYPES",
    "HEAD_DIMS",
    "INTERPRET",
    "LOG2E",
    "TileConfig",
    "check_inputs",
    "dot",
    "dot_precision",
    "load_rows",
    "sm_count",
    "upcast",
]

LOG2E = 1.4426950408889634
#: Head dims the kernels are built for: a power of two that tl.dot can tile.
HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Triton's interpreter (the CPU test path); read when the kernels are decorated, as Triton itself does.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (which split-K launches fill); 4 elsewhere (Triton's interpreter, where
    it only sets the splits)."""
    return _sm_count(device.index) if device.type == "cuda" else 4


@triton.jit
def dot(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    # Triton's interpreter multiplies bf16 tiles as their raw 16-bit integers; UPCAST is set only there.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def load_rows(
    ptrs, desc, b, h, start, stride_t, limit,
    ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, CHECK: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """Rows [start, start + ROWS) of one head: ``ptrs`` points at row 0, ``desc`` is its tensor descriptor."""
    if TMA:  # Hopper's copy engine, which zero-fills rows past the end by itself
        return desc.load([b, h, start, 0]).reshape(ROWS, HEAD_DIM)
    elif CHECK:
        rows = start + tl.arange(0, ROWS)
        return tl.load(ptrs + start * stride_t, mask=(rows < limit)[:, None], other=0.0)
    else:
        return tl.load(ptrs + start * stride_t)


class TileConfig(NamedTuple):
    """One kernel launch: the query and key tile sizes, warps and pipeline stages."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs ask for fp32 results; plain tf32 would be ~1e-3 off. 3xTF32 is close to fp32 at a
    # fraction of the cost of true fp32 FMAs. For 16-bit inputs the setting is ignored.
    return "tf32x3" if dtype == torch.float32 else "tf32"


def upcast(dtype: torch.dtype) -> bool:
    return INTERPRET and dtype == torch.bfloat16


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, what: str) -> tuple[int, int, int, int, int, int]:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{what}: q, k and v must be 4-d (B, H, T, D); got {tuple(q.shape)}, {tuple(k.shape)}")
    B, H, Tq, D = q.shape
    Bk, Hkv, Tk, Dk = k.shape
    if k.shape != v.shape or Bk != B or Dk != D:
        raise ValueError(
            f"{what}: k and v must be (B, Hkv, Tk, D) matching q {tuple(q.shape)}; "
            f"got k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"{what}: the query heads ({H}) must be a multiple of the kv heads ({Hkv})")
    if D not in HEAD_DIMS:
        raise ValueError(
            f"{what}: head dim {D} is not supported by the Triton kernel; "
            f"use a power of two from 16 to 128 ({', '.join(map(str, HEAD_DIMS))})"
        )
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"{what}: q, k and v must share one of float16, bfloat16, float32; got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if Tk == 0:
        raise ValueError(f"{what}: there must be at least one key")
    return B, H, Hkv, Tq, Tk, D
