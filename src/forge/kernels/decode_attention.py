"""Triton split-K flash decoding: attention for one query per sequence, over a KV cache, during generation.

``decode_attention`` serves one query per sequence over a preallocated, padded KV cache. A single query
gives each (batch, kv head) far too little work to fill the GPU, so the cache is cut into splits
processed in parallel and merged by a second small kernel ("flash decoding"). Every launch parameter
depends on shapes alone, so the call can be captured in a CUDA graph. A few queries per sequence, each with
its own mask row (a speculative verify, a prompt's tail after a cached prefix), take the same path: their
rows join the grouped heads' rows of one program, which reads the keys and values once for all of them.

It is a separate op from ``forge.kernels.attention`` (training and prefill) but shares its input checks,
dot and launch-config tuple (``forge.kernels.attention_tiles``). As there, query head h reads kv head
h // (H // Hkv) inside the kernels, so keys and values are never repeated in memory.
``forge.kernels.reference`` holds the PyTorch twin this is tested against.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from forge.kernels.attention_tiles import LOG2E, TileConfig, check_inputs, dot, dot_precision, sm_count, upcast

__all__ = ["MAX_ROWS", "decode_attention"]


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _decode_split(
    Q,
    K,
    V,
    MASK,
    Out,
    PART_M,
    PART_L,
    PART_ACC,
    sqb,
    sqh,
    sqw,
    sqd,
    skb,
    skh,
    skt,
    skd,
    svb,
    svh,
    svt,
    svd,
    smb,
    smw,
    smt,
    sob,
    soh,
    sow,
    sod,
    H,
    Hkv,
    G,
    W,
    Tk,
    chunk,
    splits,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SCAN: tl.constexpr,
    BLOCK_W: tl.constexpr,
    SINGLE: tl.constexpr,
    MULTI: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One split of the cache for all G query heads of one kv head, and all W queries of the row (``MULTI``):
    K and V are read once for the G * W rows of scores."""
    bhkv = tl.program_id(0)
    split = tl.program_id(1)
    b = bhkv // Hkv
    hkv = bhkv % Hkv
    b64 = b.to(tl.int64)
    hkv64 = hkv.to(tl.int64)

    offs_g = tl.arange(0, BLOCK_G)  # rows: query w = r // G of head g = r % G
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    g_ok = offs_g < G * W
    query = (offs_g // G).to(tl.int64)
    heads = hkv * G + offs_g % G
    # The G heads (of W queries) are rows of one matrix so the scores are a tensor-core dot; rows past G * W are
    # padding.
    q_rows = b64 * sqb + heads[:, None] * sqh + query[:, None] * sqw
    q = tl.load(Q + q_rows + offs_d[None, :] * sqd, mask=g_ok[:, None], other=0.0)

    k_ptrs = K + b64 * skb + hkv64 * skh + offs_n[:, None] * skt + offs_d[None, :] * skd
    v_ptrs = V + b64 * svb + hkv64 * svh + offs_n[:, None] * svt + offs_d[None, :] * svd
    mask_ptr = MASK + b64 * smb

    m_i = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, Tk)
    # A preallocated cache is mostly empty early in a generation, and prompts may be left-padded: find the
    # span of allowed keys in this split first (one byte per key, against 4 * D for K and V) and walk only
    # that. The bounds come from data on the device, so the launch stays the same for a CUDA graph.
    offs_s = tl.arange(0, SCAN)
    offs_w = tl.arange(0, BLOCK_W)
    first = hi
    last = lo
    for start in range(lo, hi, SCAN):  # the span any of the row's queries may see
        cols = start + offs_s
        # All W mask rows in one load: a loop over them waited for memory W times in a row (on an H200, a 32-token
        # tail of one row took 35.4 us that way, 18.4 this way).
        seen = (offs_w < W)[:, None] & (cols < hi)[None, :]
        rows = tl.load(mask_ptr + offs_w[:, None] * smw + cols[None, :] * smt, mask=seen, other=0)
        ok = tl.max(rows.to(tl.int32), 0) != 0
        first = tl.minimum(first, tl.min(tl.where(ok, cols, hi), 0))
        last = tl.maximum(last, tl.max(tl.where(ok, cols + 1, lo), 0))
    for start_n in range(lo + (first - lo) // BLOCK_N * BLOCK_N, last, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        if MULTI:  # each query its own mask row; keys any of them sees are loaded
            rows_ok = g_ok[:, None] & (cols < hi)[None, :]
            allowed = tl.load(mask_ptr + query[:, None] * smw + cols[None, :] * smt, mask=rows_ok, other=0) != 0
            needed = tl.max(allowed.to(tl.int32), 0) != 0
        else:
            needed = tl.load(mask_ptr + cols * smt, mask=cols < hi, other=0) != 0
            allowed = needed[None, :]
        # Loads predicated on the mask fetch nothing for the holes inside the span.
        k = tl.load(k_ptrs + start_n * skt, mask=needed[:, None], other=0.0)
        v = tl.load(v_ptrs + start_n * svt, mask=needed[:, None], other=0.0)
        qk = dot(q, tl.trans(k), None, DOT_PREC, UPCAST)
        qk = tl.where(allowed, qk * qk_scale, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = dot(p.to(v.dtype), v, acc, DOT_PREC, UPCAST)
        m_i = m_ij

    if SINGLE:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_ptrs = Out + b64 * sob + heads[:, None] * soh + query[:, None] * sow + offs_d[None, :] * sod
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=g_ok[:, None])
    else:
        part = ((b64 * W + query) * H + heads) * splits + split  # partials laid out (B, W, H, splits[, D])
        tl.store(PART_M + part, m_i, mask=g_ok)
        tl.store(PART_L + part, l_i, mask=g_ok)
        tl.store(PART_ACC + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=g_ok[:, None])


@triton.jit
def _decode_merge(
    PART_M,
    PART_L,
    PART_ACC,
    Out,
    sob,
    soh,
    sow,
    sod,
    H,
    W,
    splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Combine the splits' (max, sum, unnormalised output) of one (batch, query, head) into its output row."""
    bh = tl.program_id(0)
    b = bh // (W * H)
    query = bh // H % W
    h = bh % H
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    s_ok = offs_s < splits
    part = bh.to(tl.int64) * splits + offs_s
    m = tl.load(PART_M + part, mask=s_ok, other=-1.0e30)
    l_s = tl.load(PART_L + part, mask=s_ok, other=0.0)
    acc = tl.load(PART_ACC + part[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    m_max = tl.max(m, 0)
    w = tl.math.exp2(m - m_max)  # splits with no allowed key have m = -1e30 and weigh 0
    denom = tl.sum(l_s * w, 0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)
    o_ptrs = Out + b.to(tl.int64) * sob + h.to(tl.int64) * soh + query.to(tl.int64) * sow + offs_d * sod
    tl.store(o_ptrs, out.to(Out.dtype.element_ty))


# ----------------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------------


def _decode_config(head_dim: int, dtype: torch.dtype) -> TileConfig:
    """block_m is unused by decoding (the group's heads form the rows)."""
    if dtype == torch.float32:
        return TileConfig(16, 32, 4, 2)
    return TileConfig(16, 64 if head_dim > 64 else 128, 4, 3)


def _decode_splits(batch_kv_heads: int, tk: int, block_n: int, sms: int) -> tuple[int, int]:
    """(splits, keys per split): about two programs per SM, each with at least a couple of tiles."""
    tiles = triton.cdiv(tk, block_n)
    splits = max(1, min(triton.cdiv(2 * sms, batch_kv_heads), triton.cdiv(tiles, 2), 64))
    chunk = triton.cdiv(tiles, splits) * block_n
    return triton.cdiv(tk, chunk), chunk


# ----------------------------------------------------------------------------------------------------
# Python entry point
# ----------------------------------------------------------------------------------------------------


#: At most this many rows of scores a program (query heads of a kv head, times queries of a row).
MAX_ROWS = 128


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A few queries per row over a padded cache: q (B, H, W, D), k and v (B, Hkv, Tk, D), mask (B, W, Tk) bool
    (for W = 1 also (B, Tk)). W is one in a decode step, a few in a speculative verify or a prompt's tail after a
    cached prefix: each (batch, kv head, split) program takes all W * H / Hkv rows at once, so K and V are read
    once for them, at most :data:`MAX_ROWS` rows.

    True in ``mask`` means the key may be attended to; every query must have at least one. Forward only.
    Launches one kernel, or two when the cache is split; the launch depends on shapes alone (no host
    sync), so it can be captured in a CUDA graph.
    """
    B, H, Hkv, W, Tk, D = check_inputs(q, k, v, "decode_attention")
    G = H // Hkv
    if G * W > MAX_ROWS:
        raise ValueError(
            f"decode_attention: {W} queries of {G} heads a kv head make {G * W} rows, more than {MAX_ROWS}; "
            "use forge.kernels.attention for long blocks of queries"
        )
    if W == 1 and mask.dim() == 2:
        mask = mask[:, None]
    if mask.shape != (B, W, Tk) or mask.dtype != torch.bool:
        raise ValueError(
            f"decode_attention: mask must be a bool (B, W, Tk) = ({B}, {W}, {Tk}); got {mask.dtype} {tuple(mask.shape)}"
        )
    out = torch.empty(B, H, W, D, dtype=q.dtype, device=q.device)
    if B * H == 0:
        return out
    rows = max(16, triton.next_power_of_2(G * W))
    cfg = _decode_config(D, q.dtype) if W == 1 else TileConfig(16, 64, 4 if rows <= 32 else 8, 2)
    splits, chunk = _decode_splits(B * Hkv, Tk, cfg.block_n, sm_count(q.device))
    if splits > 1:
        part_m = torch.empty(B, W, H, splits, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(B, W, H, splits, D, dtype=torch.float32, device=q.device)
    else:  # never touched by the kernel when there is one split
        part_m = part_l = part_acc = out
    block_w = triton.next_power_of_2(W)  # the mask rows a span scan reads at once (at most MAX_ROWS bytes a key)
    mask_u8 = mask.view(torch.uint8)  # same bytes; bool pointers are awkward in Triton
    _decode_split[(B * Hkv, splits)](
        q, k, v, mask_u8, out, part_m, part_l, part_acc,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3), *k.stride(), *v.stride(), *mask_u8.stride(),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        H, Hkv, G, W, Tk, chunk, splits, D**-0.5 * LOG2E,
        HEAD_DIM=D, BLOCK_G=rows, BLOCK_N=cfg.block_n,
        SCAN=max(cfg.block_n, min(2048, 4096 // block_w, triton.next_power_of_2(chunk))), BLOCK_W=block_w,
        SINGLE=splits == 1, MULTI=W > 1,
        DOT_PREC=dot_precision(q.dtype), UPCAST=upcast(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if splits > 1:
        _decode_merge[(B * W * H,)](
            part_m, part_l, part_acc, out, out.stride(0), out.stride(1), out.stride(2), out.stride(3), H, W, splits,
            HEAD_DIM=D, BLOCK_S=triton.next_power_of_2(splits), num_warps=4,
        )  # fmt: skip
    return out
