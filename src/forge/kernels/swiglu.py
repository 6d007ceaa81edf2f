"""SwiGLU, ``silu(gate) * up``, straight from the fused gate|up projection.

The MLP's up projection writes [gate | up] side by side (one matmul). Unfused,
chunking, SiLU and the product are two kernels and an extra round trip of the
gate through memory; here one kernel reads both halves and writes the product,
and one kernel writes both halves of the gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from forge.kernels.rows import as_rows

__all__ = ["swiglu"]

BLOCK = 1024


@triton.jit
def _fwd(H, Y, F, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < F
    gate = tl.load(H + row * 2 * F + cols, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(H + row * 2 * F + F + cols, mask=inside, other=0.0).to(tl.float32)
    y = gate * tl.sigmoid(gate) * up
    tl.store(Y + row * F + cols, y.to(Y.dtype.element_ty), mask=inside)


@triton.jit
def _bwd(H, DY, DH, F, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < F
    gate = tl.load(H + row * 2 * F + cols, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(H + row * 2 * F + F + cols, mask=inside, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * F + cols, mask=inside, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    dgate = dy * up * sig * (1.0 + gate * (1.0 - sig))
    tl.store(DH + row * 2 * F + cols, dgate.to(DH.dtype.element_ty), mask=inside)
    tl.store(DH + row * 2 * F + F + cols, (dy * silu).to(DH.dtype.element_ty), mask=inside)


def _block(F: int) -> int:
    return min(BLOCK, triton.next_power_of_2(F))


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h: torch.Tensor) -> torch.Tensor:
        h2 = as_rows(h)
        M, F = h2.shape[0], h2.shape[1] // 2
        y = torch.empty((M, F), dtype=h.dtype, device=h.device)
        block = _block(F)
        _fwd[(M, triton.cdiv(F, block))](h2, y, F, BLOCK=block, num_warps=4)
        ctx.save_for_backward(h2)
        ctx.shape = h.shape
        return y.view(*h.shape[:-1], F)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> torch.Tensor:
        (h2,) = ctx.saved_tensors
        M, F = h2.shape[0], h2.shape[1] // 2
        dh = torch.empty_like(h2)
        block = _block(F)
        _bwd[(M, triton.cdiv(F, block))](h2, as_rows(dy), dh, F, BLOCK=block, num_warps=4)
        return dh.view(ctx.shape)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for h (..., 2F) holding [gate | up]; returns (..., F) in h's dtype."""
    if h.shape[-1] % 2:
        raise ValueError(f"swiglu needs an even last dimension ([gate | up]), got {h.shape[-1]}")
    return _SwiGLU.apply(h)
