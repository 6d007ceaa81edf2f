"""LayerNorm fused with the residual add before it (GPT-2's norm), forward and backward.

As in ``rms_norm``: one kernel writes the new residual stream and its
normalised copy; statistics in fp32 whatever the input dtype.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from forge.kernels.rows import as_rows, block_for, reduction_programs, warps_for

__all__ = ["add_layer_norm"]


@triton.jit
def _fwd(
    X, DELTA, W, B, Y, S, MEAN, RSTD, N, eps, HAS_DELTA: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < N
    s = tl.load(X + row * N + cols, mask=inside, other=0.0)
    if HAS_DELTA:
        d = tl.load(DELTA + row * N + cols, mask=inside, other=0.0)
        s = (s.to(tl.float32) + d.to(tl.float32)).to(S.dtype.element_ty)
        tl.store(S + row * N + cols, s, mask=inside)
    sf = s.to(tl.float32)
    mean = tl.sum(sf, axis=0) / N
    centred = tl.where(inside, sf - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / N + eps)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)
    y = centred * rstd * tl.load(W + cols, mask=inside, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(B + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(Y + row * N + cols, y.to(Y.dtype.element_ty), mask=inside)


@triton.jit
def _bwd(DY, DS, S, W, MEAN, RSTD, DX, DW, DB, M, N, programs, HAS_DS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < N
    w = tl.load(W + cols, mask=inside, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    db = tl.zeros([BLOCK], dtype=tl.float32)
    for row in range(pid, M, programs):  # 32-bit offsets: as_rows() caps the element count
        s = tl.load(S + row * N + cols, mask=inside, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * N + cols, mask=inside, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        s_hat = tl.where(inside, (s - mean) * rstd, 0.0)
        dyw = dy * w
        ds = rstd * (dyw - tl.sum(dyw, axis=0) / N - s_hat * (tl.sum(dyw * s_hat, axis=0) / N))
        if HAS_DS:
            ds += tl.load(DS + row * N + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(DX + row * N + cols, ds.to(DX.dtype.element_ty), mask=inside)
        dw += dy * s_hat
        db += dy
    tl.store(DW + pid * N + cols, dw, mask=inside)
    tl.store(DB + pid * N + cols, db, mask=inside)


class _AddLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        delta: torch.Tensor | None,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        eps: float,
    ) -> Any:
        shape, N = x.shape, x.shape[-1]
        x2 = as_rows(x)
        d2 = as_rows(delta) if delta is not None else None
        dtype = torch.promote_types(x.dtype, delta.dtype) if delta is not None else x.dtype
        M = x2.shape[0]
        s = torch.empty((M, N), dtype=dtype, device=x.device) if d2 is not None else x2
        y = torch.empty((M, N), dtype=dtype, device=x.device)
        mean = torch.empty(M, dtype=torch.float32, device=x.device)
        rstd = torch.empty(M, dtype=torch.float32, device=x.device)
        block = block_for(N)
        _fwd[(M,)](
            x2,
            d2 if d2 is not None else x2,
            weight,
            bias if bias is not None else weight,
            y,
            s,
            mean,
            rstd,
            N,
            eps,
            HAS_DELTA=d2 is not None,
            HAS_BIAS=bias is not None,
            BLOCK=block,
            num_warps=warps_for(block),
        )
        ctx.save_for_backward(s, weight, mean, rstd)
        ctx.has_delta, ctx.has_bias = delta is not None, bias is not None
        ctx.dtypes = (x.dtype, None if delta is None else delta.dtype, None if bias is None else bias.dtype)
        if delta is None:
            return y.view(shape)
        return y.view(shape), s.view(shape)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor, ds: torch.Tensor | None = None) -> Any:
        s, weight, mean, rstd = ctx.saved_tensors
        M, N = s.shape
        dy2 = as_rows(dy)
        ds2 = as_rows(ds) if ds is not None else None
        dx = torch.empty((M, N), dtype=s.dtype, device=s.device)
        programs = reduction_programs(s.device, M)
        dw = torch.empty((programs, N), dtype=torch.float32, device=s.device)
        db = torch.empty((programs, N), dtype=torch.float32, device=s.device)
        block = block_for(N)
        _bwd[(programs,)](
            dy2,
            ds2 if ds2 is not None else dy2,
            s,
            weight,
            mean,
            rstd,
            dx,
            dw,
            db,
            M,
            N,
            programs,
            HAS_DS=ds2 is not None,
            BLOCK=block,
            num_warps=warps_for(block),
        )
        x_dtype, delta_dtype, bias_dtype = ctx.dtypes
        dx = dx.view(dy.shape)
        grad_delta = dx.to(delta_dtype) if ctx.has_delta else None
        grad_bias = db.sum(0).to(bias_dtype) if ctx.has_bias else None
        return dx.to(x_dtype), grad_delta, dw.sum(0).to(weight.dtype), grad_bias, None


def add_layer_norm(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer_norm(x + delta), x + delta); with no ``delta``, (layer_norm(x), x)."""
    if delta is None:
        return _AddLayerNorm.apply(x, None, weight, bias, eps), x
    y, s = _AddLayerNorm.apply(x, delta, weight, bias, eps)
    return y, s
