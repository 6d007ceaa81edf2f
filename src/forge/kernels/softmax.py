"""Row softmax, forward and backward, in fp32 registers.

One program per row. A row that fits a block is read once; a longer row is
read twice (an online max/sum pass, then the normalised write).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from forge.kernels.rows import as_rows, warps_for

__all__ = ["softmax"]

MAX_BLOCK = 8192


@triton.jit
def _fwd(X, Y, N, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    if ONE_PASS:
        inside = cols < N
        x = tl.load(X + row * N + cols, mask=inside, other=-float("inf")).to(tl.float32)
        e = tl.exp(x - tl.max(x, axis=0))
        tl.store(Y + row * N + cols, (e / tl.sum(e, axis=0)).to(Y.dtype.element_ty), mask=inside)
    else:
        m = tl.full([BLOCK], -float("inf"), tl.float32)
        total = tl.zeros([BLOCK], tl.float32)
        for start in range(0, N, BLOCK):
            inside = start + cols < N
            x = tl.load(X + row * N + start + cols, mask=inside, other=-float("inf")).to(tl.float32)
            new_m = tl.maximum(m, x)
            # Lanes still at -inf contribute nothing (guard exp(-inf - -inf) = nan).
            total = tl.where(new_m == -float("inf"), 0.0, total * tl.exp(m - new_m) + tl.exp(x - new_m))
            m = new_m
        row_max = tl.max(m, axis=0)
        row_sum = tl.sum(tl.where(m == -float("inf"), 0.0, total * tl.exp(m - row_max)), axis=0)
        for start in range(0, N, BLOCK):
            inside = start + cols < N
            x = tl.load(X + row * N + start + cols, mask=inside, other=-float("inf")).to(tl.float32)
            y = tl.exp(x - row_max) / row_sum
            tl.store(Y + row * N + start + cols, y.to(Y.dtype.element_ty), mask=inside)


@triton.jit
def _bwd(Y, DY, DX, N, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    dot = tl.zeros([BLOCK], tl.float32)
    for start in range(0, N, BLOCK):
        inside = start + cols < N
        y = tl.load(Y + row * N + start + cols, mask=inside, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * N + start + cols, mask=inside, other=0.0).to(tl.float32)
        dot += y * dy
    total = tl.sum(dot, axis=0)
    for start in range(0, N, BLOCK):
        inside = start + cols < N
        y = tl.load(Y + row * N + start + cols, mask=inside, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * N + start + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(DX + row * N + start + cols, (y * (dy - total)).to(DX.dtype.element_ty), mask=inside)


def _block(N: int) -> int:
    return min(MAX_BLOCK, triton.next_power_of_2(N))


class _Softmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        x2 = as_rows(x)
        M, N = x2.shape
        y = torch.empty_like(x2)
        block = _block(N)
        _fwd[(M,)](x2, y, N, BLOCK=block, ONE_PASS=block >= N, num_warps=warps_for(block))
        ctx.save_for_backward(y)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        M, N = y.shape
        dx = torch.empty_like(y)
        block = _block(N)
        _bwd[(M,)](y, as_rows(dy), dx, N, BLOCK=block, num_warps=warps_for(block))
        return dx.view(dy.shape)


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax along ``dim``, in x's dtype (computed in fp32)."""
    if dim in (-1, x.dim() - 1):
        return _Softmax.apply(x)
    return _Softmax.apply(x.transpose(dim, -1)).transpose(dim, -1)
