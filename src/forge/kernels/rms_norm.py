"""RMSNorm fused with the residual add before it: one read of each input, one write of each output.

A transformer block ends ``x = x + branch(x)`` and the next one starts with
``norm(x)``: unfused that is an add kernel, then a norm kernel that reads the
sum back. Here one kernel writes both the sum (the new residual stream) and
its normalised copy. Statistics are in fp32 whatever the input dtype.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from forge.kernels.rows import as_rows, block_for, reduction_programs, warps_for

__all__ = ["add_rms_norm"]


@triton.jit
def _fwd(X, DELTA, W, Y, S, RSTD, N, eps, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < N
    s = tl.load(X + row * N + cols, mask=inside, other=0.0)
    if HAS_DELTA:
        d = tl.load(DELTA + row * N + cols, mask=inside, other=0.0)
        # Round the sum to the stream's dtype before normalising it, as the unfused ops do.
        s = (s.to(tl.float32) + d.to(tl.float32)).to(S.dtype.element_ty)
        tl.store(S + row * N + cols, s, mask=inside)
    sf = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(sf * sf, axis=0) / N + eps)
    tl.store(RSTD + row, rstd)
    w = tl.load(W + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(Y + row * N + cols, (sf * rstd * w).to(Y.dtype.element_ty), mask=inside)


@triton.jit
def _bwd(DY, DS, S, W, RSTD, DX, DW, M, N, programs, HAS_DS: tl.constexpr, BLOCK: tl.constexpr):
    # Each program walks rows pid, pid + P, ... and keeps its share of dW in registers.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < N
    w = tl.load(W + cols, mask=inside, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    for row in range(pid, M, programs):  # 32-bit offsets: as_rows() caps the element count
        s = tl.load(S + row * N + cols, mask=inside, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * N + cols, mask=inside, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        s_hat = s * rstd
        dyw = dy * w
        ds = rstd * (dyw - s_hat * (tl.sum(dyw * s_hat, axis=0) / N))
        if HAS_DS:  # the sum was also used downstream (it is the residual stream)
            ds += tl.load(DS + row * N + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(DX + row * N + cols, ds.to(DX.dtype.element_ty), mask=inside)
        dw += dy * s_hat
    tl.store(DW + pid * N + cols, dw, mask=inside)


class _AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> Any:
        shape, N = x.shape, x.shape[-1]
        x2 = as_rows(x)
        d2 = as_rows(delta) if delta is not None else None
        dtype = torch.promote_types(x.dtype, delta.dtype) if delta is not None else x.dtype
        M = x2.shape[0]
        s = torch.empty((M, N), dtype=dtype, device=x.device) if d2 is not None else x2
        y = torch.empty((M, N), dtype=dtype, device=x.device)
        rstd = torch.empty(M, dtype=torch.float32, device=x.device)
        block = block_for(N)
        _fwd[(M,)](
            x2,
            d2 if d2 is not None else x2,
            weight,
            y,
            s,
            rstd,
            N,
            eps,
            HAS_DELTA=d2 is not None,
            BLOCK=block,
            num_warps=warps_for(block),
        )
        ctx.save_for_backward(s, weight, rstd)
        ctx.has_delta = delta is not None
        ctx.dtypes = (x.dtype, None if delta is None else delta.dtype)
        if delta is None:
            return y.view(shape)
        return y.view(shape), s.view(shape)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor, ds: torch.Tensor | None = None) -> Any:
        s, weight, rstd = ctx.saved_tensors
        M, N = s.shape
        dy2 = as_rows(dy)
        ds2 = as_rows(ds) if ds is not None else None
        dx = torch.empty((M, N), dtype=s.dtype, device=s.device)
        programs = reduction_programs(s.device, M)
        dw = torch.empty((programs, N), dtype=torch.float32, device=s.device)
        block = block_for(N)
        _bwd[(programs,)](
            dy2,
            ds2 if ds2 is not None else dy2,
            s,
            weight,
            rstd,
            dx,
            dw,
            M,
            N,
            programs,
            HAS_DS=ds2 is not None,
            BLOCK=block,
            num_warps=warps_for(block),
        )
        shape = dy.shape
        x_dtype, delta_dtype = ctx.dtypes
        dx = dx.view(shape)
        grad_delta = dx.to(delta_dtype) if ctx.has_delta else None
        return dx.to(x_dtype), grad_delta, dw.sum(0).to(weight.dtype), None


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + delta) * weight, x + delta); with no ``delta``, (rms_norm(x) * weight, x).

    x and delta (..., N) with N up to 65536; the sum takes their promoted dtype.
    """
    if delta is None:
        return _AddRMSNorm.apply(x, None, weight, eps), x
    y, s = _AddRMSNorm.apply(x, delta, weight, eps)
    return y, s
