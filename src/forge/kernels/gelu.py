"""GELU (tanh approximation, GPT-2's) forward and backward, computed in fp32 in registers.

PyTorch's eager GELU is already one kernel each way; this one exists to be
measured against it (see benchmarks/kernels_gpu.py) and is used only where it wins.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

__all__ = ["gelu"]

BLOCK = 1024


@triton.jit
def _tanh(u):
    # tanh from exp: libdevice's tanh is not available in Triton's interpreter. Past |u| = 15
    # tanh is 1 to fp32 precision, and the clamp keeps exp finite.
    u = tl.minimum(tl.maximum(u, -15.0), 15.0)
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def _fwd(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    x = tl.load(X + offs, mask=inside, other=0.0).to(tl.float32)
    t = _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))  # sqrt(2/pi)
    tl.store(Y + offs, (0.5 * x * (1.0 + t)).to(Y.dtype.element_ty), mask=inside)


@triton.jit
def _bwd(X, DY, DX, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    x = tl.load(X + offs, mask=inside, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=inside, other=0.0).to(tl.float32)
    t = _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))
    dt = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
    grad = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * dt
    tl.store(DX + offs, (dy * grad).to(DX.dtype.element_ty), mask=inside)


class _Gelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        y = torch.empty_like(x)
        n = x.numel()
        _fwd[(triton.cdiv(n, BLOCK),)](x, y, n, BLOCK=BLOCK, num_warps=4)
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        n = x.numel()
        _bwd[(triton.cdiv(n, BLOCK),)](x, dy, dx, n, BLOCK=BLOCK, num_warps=4)
        return dx


def gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation; any shape, same dtype."""
    return _Gelu.apply(x)
