"""The backward pass of ``forge.kernels.attention``: Triton kernels for dQ, and for dK and dV.

FlashAttention-2's backward: the scores are recomputed from the per-row logsumexp the forward saved,
never stored. One kernel walks key tiles per query tile for dQ (and writes delta = rowsum(dO * O));
the other walks query tiles per key tile for dK and dV, summed over each kv head's group of query heads.
``forge.kernels.attention`` launches both.
"""

from __future__ import annotations

import triton
import triton.language as tl

from forge.kernels.attention_tiles import dot, load_rows

__all__ = ["attn_bwd_dkdv", "attn_bwd_dq"]


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
        k = load_rows(k_ptrs, KD, b, hkv, start_n, stride_kt, Tk, BLOCK_N, HEAD_DIM, MASKED, TMA)
        v = load_rows(v_ptrs, VD, b, hkv, start_n, stride_vt, Tk, BLOCK_N, HEAD_DIM, MASKED, TMA)
        qk = dot(q, tl.trans(k), None, DOT_PREC, UPCAST)
        p = tl.math.exp2(qk * qk_scale - lse[:, None])
        if MASKED:
            allowed = (cols < Tk)[None, :]
            if CAUSAL:
                allowed = allowed & (cols[None, :] <= offs_m[:, None] + causal_off)
            p = tl.where(allowed, p, 0.0)
        dp = dot(do, tl.trans(v), None, DOT_PREC, UPCAST)
        ds = p * (dp - delta[:, None])
        dq = dot(ds.to(k.dtype), k, dq, DOT_PREC, UPCAST)
    return dq


@triton.jit
def attn_bwd_dq(
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
        q = load_rows(q_ptrs, QD, b, h, start_m, stride_qt, Tq, BLOCK_M, HEAD_DIM, MASKED, TMA)
        do = load_rows(do_ptrs, DOD, b, h, start_m, stride_dot, Tq, BLOCK_M, HEAD_DIM, MASKED, TMA)
        if MASKED:
            row_ok = rows < Tq
            # +inf makes p = 0 for padding rows, so they need no mask of their own below.
            lse = tl.load(lse_ptr + rows, mask=row_ok, other=float("inf"))
            delta = tl.load(delta_ptr + rows, mask=row_ok, other=0.0)
        else:
            lse = tl.load(lse_ptr + rows)
            delta = tl.load(delta_ptr + rows)
        qkT = dot(k, tl.trans(q), None, DOT_PREC, UPCAST)
        pT = tl.math.exp2(qkT * qk_scale - lse[None, :])
        if MASKED and CAUSAL:
            pT = tl.where(offs_n[:, None] <= rows[None, :] + causal_off, pT, 0.0)
        dv = dot(pT.to(do.dtype), do, dv, DOT_PREC, UPCAST)
        dpT = dot(v, tl.trans(do), None, DOT_PREC, UPCAST)
        dsT = pT * (dpT - delta[None, :])
        dk = dot(dsT.to(q.dtype), q, dk, DOT_PREC, UPCAST)
    return dk, dv


@triton.jit
def attn_bwd_dkdv(
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
