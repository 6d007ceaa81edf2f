"""Rotary position embedding in one kernel for all heads (queries and keys together).

Unfused, RoPE is a slice, a negation, a concatenation, two products and a sum,
for queries and for keys: about ten kernels a layer, which dominate a
small model's decode step. Here one program per (row, position) loads the
cos/sin pair once and rotates every head; callers pass the query and key
heads as one (B, H + Hkv, T, D) view of the fused qkv projection, so one
launch covers both.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

__all__ = ["rope"]


@triton.jit
def _rope(
    X,
    COS,
    SIN,
    Y,
    T,
    HX,
    sxb,
    sxh,
    sxt,
    scb,
    sct,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SIGN: tl.constexpr,
):
    bt = tl.program_id(0)
    b = (bt // T).to(tl.int64)
    t = (bt % T).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)[:, None]  # (BLOCK_H, 1)
    d = tl.arange(0, BLOCK_D)[None, :]  # (1, BLOCK_D)
    inside = (heads < HX) & (d < HALF)
    c1 = tl.load(COS + b * scb + t * sct + d, mask=d < HALF, other=0.0)
    c2 = tl.load(COS + b * scb + t * sct + HALF + d, mask=d < HALF, other=0.0)
    s1 = SIGN * tl.load(SIN + b * scb + t * sct + d, mask=d < HALF, other=0.0)
    s2 = SIGN * tl.load(SIN + b * scb + t * sct + HALF + d, mask=d < HALF, other=0.0)
    src = X + b * sxb + heads * sxh + t * sxt + d
    x1 = tl.load(src, mask=inside, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=inside, other=0.0).to(tl.float32)
    dst = Y + ((b * HX + heads) * T + t) * (2 * HALF) + d  # contiguous (B, HX, T, D)
    tl.store(dst, (x1 * c1 - x2 * s1).to(Y.dtype.element_ty), mask=inside)
    tl.store(dst + HALF, (x2 * c2 + x1 * s2).to(Y.dtype.element_ty), mask=inside)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    B, HX, T, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos = cos.expand(B, 1, T, D) if cos.shape[0] == 1 else cos
    sin = sin.expand(B, 1, T, D) if sin.shape[0] == 1 else sin
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    y = torch.empty((B, HX, T, D), dtype=x.dtype, device=x.device)
    half = D // 2
    _rope[(B * T,)](
        x,
        cos,
        sin,
        y,
        T,
        HX,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        cos.stride(0),
        cos.stride(2),
        HALF=half,
        BLOCK_H=triton.next_power_of_2(HX),
        BLOCK_D=triton.next_power_of_2(half),
        SIGN=sign,
        num_warps=4 if HX * D >= 2048 else 1,
    )
    return y


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _launch(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> Any:
        cos, sin = ctx.saved_tensors
        # The rotation's transpose is the rotation by the opposite angle.
        return _launch(dy, cos, sin, -1.0), None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by cos/sin (B or 1, 1, T, D) ("rotate half" layout); contiguous result in x's dtype."""
    if x.shape[-1] % 2:
        raise ValueError(f"rope needs an even head dimension, got {x.shape[-1]}")
    return _Rope.apply(x, cos, sin)
