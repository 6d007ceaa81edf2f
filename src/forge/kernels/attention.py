"""Triton flash attention for training and prefill, and the pieces split-K decoding shares with it.

``attention`` never materialises the (Tq, Tk) score matrix: each program keeps one tile of queries in
registers and streams tiles of keys and values past it with an online softmax (FlashAttention-2). Its
backward recomputes the scores from the saved per-row logsumexp instead of storing them, which is what
keeps training memory linear in the sequence length.

Grouped-query attention maps query head h to kv head h // (H // Hkv) inside the kernels, so keys and
values are never repeated in memory. ``forge.kernels.reference`` holds the PyTorch twin this is tested
against. The decoding op lives in ``forge.kernels.decode_attention`` and imports its input checks, dot and
launch-config tuple from here (``_check``, ``_dot``, ``_Config``...), so both ops accept the same inputs.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

__all__ = ["attention"]

_LOG2E = 1.4426950408889634
_HEAD_DIMS = (16, 32, 64, 128)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    # Triton's interpreter multiplies bf16 tiles as their raw 16-bit integers; UPCAST is set only there.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _load_rows(
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
        k = _load_rows(k_ptrs, KD, b, hkv, start_n, stride_kt, Tk, BLOCK_N, HEAD_DIM, MASKED, TMA)
        v = _load_rows(v_ptrs, VD, b, hkv, start_n, stride_vt, Tk, BLOCK_N, HEAD_DIM, MASKED, TMA)
        qk = _dot(q, tl.trans(k), None, DOT_PREC, UPCAST)
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
        acc = _dot(p.to(v.dtype), v, acc, DOT_PREC, UPCAST)
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
    q = _load_rows(q_ptrs, QD, b, h, start_m, 0, Tq, BLOCK_M, HEAD_DIM, True, TMA)

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
# Backward
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _dq_tiles(
    dq,
    q,
    do,
    lse,
    delta,
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
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        k = _load_rows(k_ptrs, KD, b, hkv, start_n, stride_kt, Tk, BLOCK_N, HEAD_DIM, MASKED, TMA)
        v = _load_rows(v_ptrs, VD, b, hkv, start_n, stride_vt, Tk, BLOCK_N, HEAD_DIM, MASKED, TMA)
        qk = _dot(q, tl.trans(k), None, DOT_PREC, UPCAST)
        p = tl.math.exp2(qk * qk_scale - lse[:, None])
        if MASKED:
            allowed = (cols < Tk)[None, :]
            if CAUSAL:
                allowed = allowed & (cols[None, :] <= offs_m[:, None] + causal_off)
            p = tl.where(allowed, p, 0.0)
        dp = _dot(do, tl.trans(v), None, DOT_PREC, UPCAST)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, dq, DOT_PREC, UPCAST)
    return dq


@triton.jit
def _attn_bwd_dq(
    Q,
    K,
    V,
    Out,
    DO,
    DQ,
    LSE,
    DELTA,
    KD,
    VD,
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
    sdob,
    sdoh,
    sdot,
    sdod,
    sdqb,
    sdqh,
    sdqt,
    sdqd,
    H,
    G,
    Tq,
    Tk,
    qk_scale,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    TMA: tl.constexpr,
):
    """dQ for one query tile, iterating over key tiles; also writes delta = rowsum(dO * O) for dK/dV."""
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hkv = h // G
    causal_off = Tk - Tq

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Tq
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)

    q = tl.load(Q + b64 * sqb + h64 * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd, mask=row_ok[:, None])
    do = tl.load(DO + b64 * sdob + h64 * sdoh + offs_m[:, None] * sdot + offs_d[None, :] * sdod, mask=row_ok[:, None])
    o = tl.load(Out + b64 * sob + h64 * soh + offs_m[:, None] * sot + offs_d[None, :] * sod, mask=row_ok[:, None])
    # The preprocessing pass of FlashAttention-2, folded in here since this program already holds dO;
    # the dK/dV kernel launched after this one reads it.
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    row_base = bh.to(tl.int64) * Tq
    tl.store(DELTA + row_base + offs_m, delta, mask=row_ok)
    lse = tl.load(LSE + row_base + offs_m, mask=row_ok, other=float("inf"))

    k_ptrs = K + b64 * skb + hkv.to(tl.int64) * skh + offs_n[:, None] * skt + offs_d[None, :] * skd
    v_ptrs = V + b64 * svb + hkv.to(tl.int64) * svh + offs_n[:, None] * svt + offs_d[None, :] * svd
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    tk_full = (Tk // BLOCK_N) * BLOCK_N
    if CAUSAL:
        full_hi = tl.minimum((tl.maximum(start_m + causal_off + 1, 0) // BLOCK_N) * BLOCK_N, tk_full)
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + causal_off, 0), Tk)
    else:
        full_hi = tk_full
        hi = Tk
    dq = _dq_tiles(
        dq, q, do, lse, delta, k_ptrs, v_ptrs, KD, VD, b, hkv, skt, svt, offs_m, 0, full_hi, Tk, causal_off, qk_scale,
        HEAD_DIM, BLOCK_N, False, CAUSAL, DOT_PREC, UPCAST, TMA,
    )  # fmt: skip
    dq = _dq_tiles(
        dq, q, do, lse, delta, k_ptrs, v_ptrs, KD, VD, b, hkv, skt, svt, offs_m, full_hi, hi, Tk, causal_off, qk_scale,
        HEAD_DIM, BLOCK_N, True, CAUSAL, DOT_PREC, UPCAST, TMA,
    )  # fmt: skip
    dq = dq * sm_scale
    dq_ptrs = DQ + b64 * sdqb + h64 * sdqh + offs_m[:, None] * sdqt + offs_d[None, :] * sdqd
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _dkdv_tiles(
    dk,
    dv,
    k,
    v,
    q_ptrs,
    do_ptrs,
    QD,
    DOD,
    b,
    h,
    lse_ptr,
    delta_ptr,
    stride_qt,
    stride_dot,
    offs_n,
    lo,
    hi,
    Tq,
    causal_off,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    TMA: tl.constexpr,
):
    # Works on the transposed scores (keys x queries) so that dV = P^T dO and dK = dS^T Q come out of
    # plain dots without transposing P.
    offs_m = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + offs_m
        q = _load_rows(q_ptrs, QD, b, h, start_m, stride_qt, Tq, BLOCK_M, HEAD_DIM, MASKED, TMA)
        do = _load_rows(do_ptrs, DOD, b, h, start_m, stride_dot, Tq, BLOCK_M, HEAD_DIM, MASKED, TMA)
        if MASKED:
            row_ok = rows < Tq
            # +inf makes p = 0 for padding rows, so they need no mask of their own below.
            lse = tl.load(lse_ptr + rows, mask=row_ok, other=float("inf"))
            delta = tl.load(delta_ptr + rows, mask=row_ok, other=0.0)
        else:
            lse = tl.load(lse_ptr + rows)
            delta = tl.load(delta_ptr + rows)
        qkT = _dot(k, tl.trans(q), None, DOT_PREC, UPCAST)
        pT = tl.math.exp2(qkT * qk_scale - lse[None, :])
        if MASKED and CAUSAL:
            pT = tl.where(offs_n[:, None] <= rows[None, :] + causal_off, pT, 0.0)
        dv = _dot(pT.to(do.dtype), do, dv, DOT_PREC, UPCAST)
        dpT = _dot(v, tl.trans(do), None, DOT_PREC, UPCAST)
        dsT = pT * (dpT - delta[None, :])
        dk = _dot(dsT.to(q.dtype), q, dk, DOT_PREC, UPCAST)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q,
    K,
    V,
    DO,
    DK,
    DV,
    LSE,
    DELTA,
    QD,
    DOD,
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
    sdob,
    sdoh,
    sdot,
    sdod,
    sdkb,
    sdkh,
    sdkt,
    sdkd,
    sdvb,
    sdvh,
    sdvt,
    sdvd,
    H,
    Hkv,
    G,
    Tq,
    Tk,
    qk_scale,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    TMA: tl.constexpr,
):
    """dK and dV for one key tile of one kv head, summed over every query head of its group."""
    pid_n = tl.program_id(0)
    bhkv = tl.program_id(1)
    b = bhkv // Hkv
    hkv = bhkv % Hkv
    causal_off = Tk - Tq

    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < Tk
    b64 = b.to(tl.int64)
    hkv64 = hkv.to(tl.int64)

    k = tl.load(K + b64 * skb + hkv64 * skh + offs_n[:, None] * skt + offs_d[None, :] * skd, mask=col_ok[:, None])
    v = tl.load(V + b64 * svb + hkv64 * svh + offs_n[:, None] * svt + offs_d[None, :] * svd, mask=col_ok[:, None])
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    tq_pad = tl.cdiv(Tq, BLOCK_M) * BLOCK_M
    tq_full = (Tq // BLOCK_M) * BLOCK_M
    if CAUSAL:
        # Query tiles before `lo` see none of these keys; from `diag_end` on they see all of them.
        lo = (tl.maximum(start_n - causal_off, 0) // BLOCK_M) * BLOCK_M
        diag_end = tl.maximum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - causal_off, 0), BLOCK_M) * BLOCK_M, lo)
    else:
        lo = 0
        diag_end = 0
    # [lo, e1): diagonal tiles, masked; [e1, e2): full tiles; [e2, tq_pad): the ragged last tile, masked.
    e1 = tl.minimum(diag_end, tq_pad)
    e2 = tl.maximum(e1, tq_full)

    # The group's query heads are walked here rather than in separate programs, so each kv head's
    # gradient is summed in registers and written once, with no atomics and no (B, H, Tk, D) buffer.
    for g in range(G):
        h = hkv * G + g
        h64 = h.to(tl.int64)
        q_ptrs = Q + b64 * sqb + h64 * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd
        do_ptrs = DO + b64 * sdob + h64 * sdoh + offs_m[:, None] * sdot + offs_d[None, :] * sdod
        row_base = (b64 * H + h64) * Tq
        lse_ptr = LSE + row_base
        delta_ptr = DELTA + row_base
        dk, dv = _dkdv_tiles(
            dk, dv, k, v, q_ptrs, do_ptrs, QD, DOD, b, h, lse_ptr, delta_ptr, sqt, sdot, offs_n, lo, e1, Tq,
            causal_off, qk_scale, HEAD_DIM, BLOCK_M, True, CAUSAL, DOT_PREC, UPCAST, TMA,
        )  # fmt: skip
        dk, dv = _dkdv_tiles(
            dk, dv, k, v, q_ptrs, do_ptrs, QD, DOD, b, h, lse_ptr, delta_ptr, sqt, sdot, offs_n, e1, e2, Tq,
            causal_off, qk_scale, HEAD_DIM, BLOCK_M, False, CAUSAL, DOT_PREC, UPCAST, TMA,
        )  # fmt: skip
        dk, dv = _dkdv_tiles(
            dk, dv, k, v, q_ptrs, do_ptrs, QD, DOD, b, h, lse_ptr, delta_ptr, sqt, sdot, offs_n, e2, tq_pad, Tq,
            causal_off, qk_scale, HEAD_DIM, BLOCK_M, True, CAUSAL, DOT_PREC, UPCAST, TMA,
        )  # fmt: skip

    dk = dk * sm_scale
    dk_ptrs = DK + b64 * sdkb + hkv64 * sdkh + offs_n[:, None] * sdkt + offs_d[None, :] * sdkd
    dv_ptrs = DV + b64 * sdvb + hkv64 * sdvh + offs_n[:, None] * sdvt + offs_d[None, :] * sdvd
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


# ----------------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------------


class _Config(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def _fit(block: int, length: int) -> int:
    # Short sequences (decode-sized prefill chunks, tests) would waste most of a big tile; tl.dot needs 16.
    return max(16, min(block, triton.next_power_of_2(max(length, 1))))


def _fwd_config(head_dim: int, dtype: torch.dtype, tq: int, tk: int) -> _Config:
    """Tiles for the forward pass, fixed per head dim and dtype (the best of a sweep on an H200)."""
    if dtype == torch.float32:  # twice the bytes per tile: halve the tiles to stay in shared memory
        bm, bn, warps, stages = 64, 32, 4, 2
    elif head_dim <= 64:
        bm, bn, warps, stages = 128, 64, 8, 3
    else:
        bm, bn, warps, stages = 128, 128, 8, 3
    return _Config(_fit(bm, tq), _fit(bn, tk), warps, stages)


def _bwd_dq_config(head_dim: int, dtype: torch.dtype, tq: int, tk: int) -> _Config:
    if dtype == torch.float32:
        bm, bn, warps, stages = 64, 32, 4, 2
    elif head_dim <= 64:
        bm, bn, warps, stages = 64, 64, 4, 3
    else:
        bm, bn, warps, stages = 128, 64, 8, 3
    return _Config(_fit(bm, tq), _fit(bn, tk), warps, stages)


def _bwd_dkdv_config(head_dim: int, dtype: torch.dtype, tq: int, tk: int) -> _Config:
    if dtype == torch.float32:
        bm, bn, warps, stages = 32, 64, 4, 2
    elif head_dim <= 64:
        bm, bn, warps, stages = 64, 64, 4, 3
    else:
        bm, bn, warps, stages = 64, 128, 8, 3
    return _Config(_fit(bm, tq), _fit(bn, tk), warps, stages)


# ----------------------------------------------------------------------------------------------------
# Python entry points
# ----------------------------------------------------------------------------------------------------


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs ask for fp32 results; plain tf32 would be ~1e-3 off. 3xTF32 is close to fp32 at a
    # fraction of the cost of true fp32 FMAs. For 16-bit inputs the setting is ignored.
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    return _INTERPRET and dtype == torch.bfloat16


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, what: str) -> tuple[int, int, int, int, int, int]:
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
    if D not in _HEAD_DIMS:
        raise ValueError(
            f"{what}: head dim {D} is not supported by the Triton kernel; "
            f"use a power of two from 16 to 128 ({', '.join(map(str, _HEAD_DIMS))})"
        )
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"{what}: q, k and v must share one of float16, bfloat16, float32; got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if Tk == 0:
        raise ValueError(f"{what}: there must be at least one key")
    return B, H, Hkv, Tq, Tk, D


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
    elif not _INTERPRET:
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
    B, H, Hkv, Tq, Tk, D = _check(q, k, v, "attention")
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
        H, H // Hkv, Tq, Tk, sm_scale * _LOG2E,
        HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CAUSAL=causal,
        DOT_PREC=_dot_precision(q.dtype), UPCAST=_upcast(q.dtype), TMA=use_tma,
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
    prec = _dot_precision(q.dtype)
    qk_scale = sm_scale * _LOG2E

    cfg = _bwd_dq_config(D, q.dtype, Tq, Tk)
    tma = _tma_ok(_work(q, k, causal), q, k, v, do)
    descs = [_desc(k, cfg.block_n), _desc(v, cfg.block_n)] if tma else [None, None]
    _attn_bwd_dq[(triton.cdiv(Tq, cfg.block_m), B * H)](
        q, k, v, o, do, dq, lse, delta, *descs,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *do.stride(), *dq.stride(),
        H, G, Tq, Tk, qk_scale, sm_scale,
        HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CAUSAL=causal, DOT_PREC=prec, UPCAST=_upcast(q.dtype),
        TMA=tma, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    cfg = _bwd_dkdv_config(D, q.dtype, Tq, Tk)
    descs = [_desc(q, cfg.block_m), _desc(do, cfg.block_m)] if tma else [None, None]
    _attn_bwd_dkdv[(triton.cdiv(Tk, cfg.block_n), B * Hkv)](
        q, k, v, do, dk, dv, lse, delta, *descs,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        H, Hkv, G, Tq, Tk, qk_scale, sm_scale,
        HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CAUSAL=causal, DOT_PREC=prec, UPCAST=_upcast(q.dtype),
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
