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

__all__ = ["rope", "rope_cache"]


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


def _tables(cos: torch.Tensor, sin: torch.Tensor, B: int, T: int, D: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (B or 1, 1, T, D) as (B, 1, T, D) views with unit last stride and equal strides."""
    cos = cos.expand(B, 1, T, D) if cos.shape[0] == 1 else cos
    sin = sin.expand(B, 1, T, D) if sin.shape[0] == 1 else sin
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    B, HX, T, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = _tables(cos, sin, B, T, D)
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


@triton.jit
def _rope_cache(
    X, V, COS, SIN, Y, KC, VC, IDX, T, H, HKV, sxb, sxh, sxt, svb, svh, svt, scb, sct,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """:func:`_rope` of (row, position) ``program_id(0)`` with the keys and values written into the cache: query
    heads to Y, rotated key heads and value heads (V) to rows IDX[(b * HKV + h) * T + t] of the flat caches."""
    bt = tl.program_id(0)
    b = (bt // T).to(tl.int64)
    t = (bt % T).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)[:, None]  # the H query heads, then the HKV key heads
    d = tl.arange(0, BLOCK_D)[None, :]
    inside = (heads < H + HKV) & (d < HALF)
    c1 = tl.load(COS + b * scb + t * sct + d, mask=d < HALF, other=0.0)
    c2 = tl.load(COS + b * scb + t * sct + HALF + d, mask=d < HALF, other=0.0)
    s1 = tl.load(SIN + b * scb + t * sct + d, mask=d < HALF, other=0.0)
    s2 = tl.load(SIN + b * scb + t * sct + HALF + d, mask=d < HALF, other=0.0)
    src = X + b * sxb + heads * sxh + t * sxt + d
    x1 = tl.load(src, mask=inside, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=inside, other=0.0).to(tl.float32)
    r1, r2 = x1 * c1 - x2 * s1, x2 * c2 + x1 * s2
    q = inside & (heads < H)
    dst = Y + ((b * H + heads) * T + t) * (2 * HALF) + d  # contiguous (B, H, T, D)
    tl.store(dst, r1.to(Y.dtype.element_ty), mask=q)
    tl.store(dst + HALF, r2.to(Y.dtype.element_ty), mask=q)
    key = inside & (heads >= H)
    slot = tl.load(IDX + (b * HKV + heads - H) * T + t, mask=(heads >= H) & (heads < H + HKV), other=0)
    kdst = KC + slot * (2 * HALF) + d
    tl.store(kdst, r1.to(KC.dtype.element_ty), mask=key)
    tl.store(kdst + HALF, r2.to(KC.dtype.element_ty), mask=key)
    vh = tl.arange(0, BLOCK_KV)[:, None]
    dv = tl.arange(0, 2 * BLOCK_D)[None, :]
    vin = (vh < HKV) & (dv < 2 * HALF)
    vslot = tl.load(IDX + (b * HKV + vh) * T + t, mask=vh < HKV, other=0)
    vals = tl.load(V + b * svb + vh * svh + t * svt + dv, mask=vin, other=0.0)
    tl.store(VC + vslot * (2 * HALF) + dv, vals.to(VC.dtype.element_ty), mask=vin)


def rope_cache(
    qk: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    index: torch.Tensor,
) -> torch.Tensor:
    """RoPE of the query and key heads ``qk`` (B, H + Hkv, T, D) with the keys and values ``v`` (B, Hkv, T, D)
    written straight into a KV cache: one launch where :func:`rope` and two ``index_copy_`` took three.

    ``keys`` and ``values``: the cache's contiguous (..., D) buffers; ``index`` (B * Hkv * T,): each (row, head,
    position)'s slot in their flat (-1, D) view, as ``KVCache.flat_index`` gives it. Returns the rotated queries
    (B, H, T, D), contiguous. Inference only: no gradient.
    """
    B, HX, T, D = qk.shape
    hkv = v.shape[1]
    if D % 2 or v.shape != (B, hkv, T, D) or index.numel() != B * hkv * T or not keys.is_contiguous():
        raise ValueError(
            f"rope_cache: qk {tuple(qk.shape)}, v {tuple(v.shape)}, {index.numel()} slots and a contiguous cache "
            "must agree (an even head size)"
        )
    if qk.stride(-1) != 1:
        qk = qk.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    cos, sin = _tables(cos, sin, B, T, D)
    h = HX - hkv
    y = torch.empty((B, h, T, D), dtype=qk.dtype, device=qk.device)
    half = D // 2
    _rope_cache[(B * T,)](
        qk, v, cos, sin, y, keys, values, index, T, h, hkv, *qk.stride()[:3], *v.stride()[:3], cos.stride(0),
        cos.stride(2), HALF=half, BLOCK_H=triton.next_power_of_2(HX), BLOCK_KV=triton.next_power_of_2(hkv),
        BLOCK_D=triton.next_power_of_2(half), num_warps=4 if HX * D >= 2048 else 1,
    )  # fmt: skip
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
