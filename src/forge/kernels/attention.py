"""Triton flash attention for training and prefill: the forward kernel and the Python entry point.

``attention`` never materialises the (Tq, Tk) score matrix: each program keeps one tile of queries in
registers and streams tiles of keys and values past it with an online softmax (FlashAttention-2). Its
backward recomputes the scores from the saved per-row logsumexp instead of storing them, which is what
keeps training memory linear in the sequence length.

Grouped-query attention maps query head h to kv head h // (H // Hkv) inside the kernels, so keys and
values are never repeated in memory. ``forge.kernels.reference`` holds the PyTorch twin this is tested
against. The backward kernels live in ``forge.kernels.attention_backward``; what this op shares with the
decoding op (``forge.kernels.decode_attention``) lives in ``forge.kernels.attention_tiles``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from forge.kernels.attention_backward import attn_bwd_dkdv, attn_bwd_dq
from forge.kernels.attention_tiles import (
    INTERPRET,
    LOG2E,
    TileConfig,
    check_inputs,
    dot,
    dot_precision,
    load_rows,
    upcast,
)

__all__ = ["attention"]


# ----------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_tiles(
    acc,
    l_i,
    m_i,
    q,
    k_ptrs,
    v_ptrs,
    KD,
    VD,
    b,
    hkv,
    stride_kt,
    stride_vt,
    offs_m,
    lo,
    hi,
    Tk,
    causal_off,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    TMA: tl.constexpr,
):
    # MASKED is a compile-time split: most tiles lie wholly inside the causal triangle and the key range,
    # and they run without the compares and selects that only the diagonal and the ragged end need.
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        k = load_rows(k_ptrs, KD, b, hkv, start_n, stride_kt, Tk, BLOCK_N, HEAD_DIM, MASKED, TMA)
        v = load_rows(v_ptrs, VD, b, hkv, start_n, stride_vt, Tk, BLOCK_N, HEAD_DIM, MASKED, TMA)
        qk = dot(q, tl.trans(k), None, DOT_PREC, UPCAST)
        if MASKED:
            allowed = (cols < Tk)[None, :]
            if CAUSAL:
                allowed = allowed & (cols[None, :] <= offs_m[:, None] + causal_off)
            qk = tl.where(allowed, qk * qk_scale, float("-inf"))
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            qk = qk - m_ij[:, None]
        else:
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            qk = qk * qk_scale - m_ij[:, None]
        p = tl.math.exp2(qk)
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = dot(p.to(v.dtype), v, acc, DOT_PREC, UPCAST)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(
    Q,
    K,
    V,
    Out,
    LSE,
    QD,
    KD,
    VD,
    OD,
    sqb,
    sqh,
    sqt,
    sqd,
    skb,
    skh,
    skt,
    skd,
    svb,
    svh,
    svt,
    svd,
    sob,
    soh,
    sot,
    sod,
    H,
    G,
    Tq,
    Tk,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    TMA: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if CAUSAL:  # the last query tiles see the most keys: start them first so the tail of the grid is short
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hkv = h // G
    causal_off = Tk - Tq  # query i sees keys j <= i + causal_off

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Tq

    q_ptrs = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd
    k_ptrs = K + b.to(tl.int64) * skb + hkv.to(tl.int64) * skh + offs_n[:, None] * skt + offs_d[None, :] * skd
    v_ptrs = V + b.to(tl.int64) * svb + hkv.to(tl.int64) * svh + offs_n[:, None] * svt + offs_d[None, :] * svd
    q = load_rows(q_ptrs, QD, b, h, start_m, 0, Tq, BLOCK_M, HEAD_DIM, True, TMA)

    # A finite floor instead of -inf: a row whose tile is wholly masked then gets exp2(-inf - floor) = 0
    # rather than NaN from (-inf) - (-inf).
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    tk_full = (Tk // BLOCK_N) * BLOCK_N
    if CAUSAL:
        # Tiles wholly visible to the first row of this query tile need no mask; the tiles after them up to
        # what the last row sees straddle the diagonal; everything beyond is skipped.
        full_hi = tl.minimum((tl.maximum(start_m + causal_off + 1, 0) // BLOCK_N) * BLOCK_N, tk_full)
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + causal_off, 0), Tk)
    else:
        full_hi = tk_full
        hi = Tk
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, KD, VD, b, hkv, skt, svt, offs_m, 0, full_hi, Tk, causal_off, qk_scale,
        HEAD_DIM, BLOCK_N, False, CAUSAL, DOT_PREC, UPCAST, TMA,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, KD, VD, b, hkv, skt, svt, offs_m, full_hi, hi, Tk, causal_off, qk_scale,
        HEAD_DIM, BLOCK_N, True, CAUSAL, DOT_PREC, UPCAST, TMA,
    )  # fmt: skip

    # A row with no visible key (causal with Tq > Tk) gets zeros, and a logsumexp of +inf so that the
    # backward's exp2(s - lse) is 0 for it too.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))  # base 2, in units of qk_scale
    tl.store(LSE + bh.to(tl.int64) * Tq + offs_m, lse, mask=row_ok)
    if TMA:
        OD.store([b, h, start_m, 0], acc.to(Out.dtype.element_ty).reshape(1, 1, BLOCK_M, HEAD_DIM))
    else:
        o_ptrs = Out + b.to(tl.int64) * sob + h.to(tl.int64) * soh + offs_m[:, None] * sot + offs_d[None, :] * sod
        tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------------


def _fit(block: int, length: int) -> int:
    # Short sequences (decode-sized prefill chunks, tests) would waste most of a big tile; tl.dot needs 16.
    return max(16, min(block, triton.next_power_of_2(max(length, 1))))


def _fwd_config(head_dim: int, dtype: torch.dtype, tq: int, tk: int) -> TileConfig:
    """Tiles for the forward pass, fixed per head dim and dtype (the best of a sweep on an H200)."""
    if dtype == torch.float32:  # twice the bytes per tile: halve the tiles to stay in shared memory
        bm, bn, warps, stages = 64, 32, 4, 2
    elif head_dim <= 64:
        bm, bn, warps, stages = 128, 64, 8, 3
    else:
        bm, bn, warps, stages = 128, 128, 8, 3
    return TileConfig(_fit(bm, tq), _fit(bn, tk), warps, stages)


def _bwd_dq_config(head_dim: int, dtype: torch.dtype, tq: int, tk: int) -> TileConfig:
    if dtype == torch.float32:
        bm, bn, warps, stages = 64, 32, 4, 2
    elif head_dim <= 64:
        bm, bn, warps, stages = 64, 64, 4, 3
    else:
        bm, bn, warps, stages = 128, 64, 8, 3
    return TileConfig(_fit(bm, tq), _fit(bn, tk), warps, stages)


def _bwd_dkdv_config(head_dim: int, dtype: torch.dtype, tq: int, tk: int) -> TileConfig:
    if dtype == torch.float32:
        bm, bn, warps, stages = 32, 64, 4, 2
    elif head_dim <= 64:
        bm, bn, warps, stages = 64, 64, 4, 3
    else:
        bm, bn, warps, stages = 64, 128, 8, 3
    return TileConfig(_fit(bm, tq), _fit(bn, tk), warps, stages)


# ----------------------------------------------------------------------------------------------------
# Python entry points
# ----------------------------------------------------------------------------------------------------


def _heads_last(b: int, t: int, h: int, d: int, like: torch.Tensor) -> torch.Tensor:
    """An empty (B, H, T, D) tensor laid out as (B, T, H, D).

    That is the layout the model reshapes attention's output into (and its q/k/v gradients come from), so
    ``y.transpose(1, 2).reshape(B, T, H * D)`` becomes a view rather than a copy.
    """
    return torch.empty(b, t, h, d, dtype=like.dtype, device=like.device).transpose(1, 2)


_USE_TMA = True  # tests turn it off to check the plain-pointer loads on every machine
# Tensor descriptors cut the GPU time of big calls by 5-10% (H200) but add ~100 us of launch work on the
# host (each one is several more kernel arguments and a driver call), which small calls can't hide.
# Measured in B * H * Tq * Tk * D (halved when causal): 5e10 is about half a millisecond of forward.
_TMA_MIN_WORK = 5e10


def _tma_ok(work: float, *ts: torch.Tensor) -> bool:
    """Whether to load tiles of these (B, H, T, D) tensors through tensor descriptors (Hopper's copy engine).

    That needs a Hopper-or-newer GPU (or the interpreter, which emulates it), a unit last stride and
    16-byte aligned base and strides (views of a fused qkv projection qualify), and a call big enough.
    """
    if not _USE_TMA or work < _TMA_MIN_WORK:
        return False
    device = ts[0].device
    if device.type == "cuda":
        if _capability(device) < (9, 0):
            return False
    elif not INTERPRET:
        return False
    return all(
        t.stride(-1) == 1
        and t.data_ptr() % 16 == 0
        and all(s > 0 and s * t.element_size() % 16 == 0 for s in t.stride()[:-1])
        for t in ts
    )


def _work(q: torch.Tensor, k: torch.Tensor, causal: bool) -> float:
    B, H, Tq, D = q.shape
    return B * H * Tq * k.shape[2] * D * (0.5 if causal else 1.0)


def _capability(device: torch.device) -> tuple[int, int]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABILITIES:
        _CAPABILITIES[index] = torch.cuda.get_device_capability(index)
    return _CAPABILITIES[index]


_CAPABILITIES: dict[int, tuple[int, int]] = {}


def _desc(t: torch.Tensor, block: int) -> TensorDescriptor:
    """A descriptor over the 4-d (B, H, T, D) tensor whose tile is one head's ``block`` rows."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, block, t.shape[-1]])


def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, sm_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, Hkv, Tq, Tk, D = check_inputs(q, k, v, "attention")
    o = _heads_last(B, Tq, H, D, q)
    lse = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)
    if B * H * Tq == 0:
        return o, lse
    cfg = _fwd_config(D, q.dtype, Tq, Tk)
    grid = (triton.cdiv(Tq, cfg.block_m), B * H)
    use_tma = _tma_ok(_work(q, k, causal), q, k, v, o)
    if use_tma:
        descs = [_desc(q, cfg.block_m), _desc(k, cfg.block_n), _desc(v, cfg.block_n), _desc(o, cfg.block_m)]
    else:
        descs = [None] * 4
    _attn_fwd[grid](
        q, k, v, o, lse, *descs,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        H, H // Hkv, Tq, Tk, sm_scale * LOG2E,
        HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CAUSAL=causal,
        DOT_PREC=dot_precision(q.dtype), UPCAST=upcast(q.dtype), TMA=use_tma,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return o, lse


def _backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    sm_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = H // Hkv
    dq = _heads_last(B, Tq, H, D, q)
    dk = _heads_last(B, Tk, Hkv, D, k)
    dv = _heads_last(B, Tk, Hkv, D, v)
    if B * H * Tq == 0:
        return dq, dk.zero_(), dv.zero_()
    if do.stride(-1) != 1:  # gradients of odd layouts: one copy buys coalesced loads in both kernels
        do = do.contiguous()
    delta = torch.empty_like(lse)
    prec = dot_precision(q.dtype)
    qk_scale = sm_scale * LOG2E

    cfg = _bwd_dq_config(D, q.dtype, Tq, Tk)
    tma = _tma_ok(_work(q, k, causal), q, k, v, do)
    descs = [_desc(k, cfg.block_n), _desc(v, cfg.block_n)] if tma else [None, None]
    attn_bwd_dq[(triton.cdiv(Tq, cfg.block_m), B * H)](
        q, k, v, o, do, dq, lse, delta, *descs,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *do.stride(), *dq.stride(),
        H, G, Tq, Tk, qk_scale, sm_scale,
        HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CAUSAL=causal, DOT_PREC=prec, UPCAST=upcast(q.dtype),
        TMA=tma, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    cfg = _bwd_dkdv_config(D, q.dtype, Tq, Tk)
    descs = [_desc(q, cfg.block_m), _desc(do, cfg.block_m)] if tma else [None, None]
    attn_bwd_dkdv[(triton.cdiv(Tk, cfg.block_n), B * Hkv)](
        q, k, v, do, dk, dv, lse, delta, *descs,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        H, Hkv, G, Tq, Tk, qk_scale, sm_scale,
        HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CAUSAL=causal, DOT_PREC=prec, UPCAST=upcast(q.dtype),
        TMA=tma, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        causal: bool,
        sm_scale: float,
    ) -> torch.Tensor:
        o, lse = _forward(q, k, v, causal, sm_scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal = causal
        ctx.sm_scale = sm_scale
        return o

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, do: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None]:
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, lse, ctx.causal, ctx.sm_scale)
        return dq, dk, dv, None, None


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float | None = None
) -> torch.Tensor:
    """Softmax attention; q (B, H, Tq, D), k and v (B, Hkv, Tk, D) with H a multiple of Hkv.

    ``causal`` aligns the last query with the last key (query i sees keys up to i + Tk - Tq); a query
    that sees no key at all (only possible when Tq > Tk) gets zeros. ``scale`` defaults to D ** -0.5.
    Differentiable. The result has q's dtype and shape (B, H, Tq, D), stored as (B, Tq, H, D) so that
    merging the heads afterwards is a view.
    """
    sm_scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _FlashAttention.apply(q, k, v, bool(causal), sm_scale)
