"""The ``"mma"`` path of :mod:`forge.kernels.quant_matmul`: GEMMs for 5 to 64 rows of x whose weight tiles are
dequantized straight into the tensor cores' 16-bit operand.

The older ``"gemm"`` path reads int32 words and unpacks them with ``tl.reshape`` in fp32; at M = 64 it loses to
bf16 cuBLAS. These kernels never reshape: each weight value is addressed by itself (an int4 byte is loaded once
for each of its nibbles), turned into x's dtype with an OR or a conversion, and multiplied with ``tl.dot`` into
fp32 accumulators. Two weight layouts, the winners of ``benchmarks/quant_gemm_probe.py`` (18
variants of int4 and 6 of int8 over Llama-1B's and SmolLM2-135M's linears, H100 with 132 SMs,
``results/quant_gemm_probe_NVIDIA_H100_80GB_HBM3.json``; kernel times over CUDA-graph replays, weights cold in
HBM):

- int8 per output channel (:func:`int8_channel_gemm`; :class:`~forge.core.quantize.Int8Weight`): q (N, K) int8
  converted to x's dtype (exact: |q| <= 128 fits a bf16 significand) and taken as the MMA's *first* operand,
  ``acc^T (N, M) = w @ x^T``, so the weight tile's rows take the MMA's M side (wgmma's 64 rows at BLOCK_N 64,
  even for 16 rows of x); the scale multiplies the fp32 accumulator once, at the end. The probe's
  ``-/cvt/swap``: Llama-1B's four linears in 56 us at M = 64 against bf16 cuBLAS's 60 and the ``"gemm"``
  path's 65; at M = 16, 44 against 57 and 57.
- int4 in GGUF's blocks of 32 (:func:`int4_gguf_gemm`; :class:`~forge.core.quantize.Int4Weight`; byte b of a
  block holds column b in its low nibble and b + 16 in its high one): the (BLOCK_K, BLOCK_N) tile of codes,
  each code ``c`` made the bf16 ``128 + c`` by one OR (``0x4300 | c``; fp16: ``0x6400 | c`` is ``1024 + c``),
  then ``(v - 128) * scale + minimum`` in x's dtype, each value's own group's scale and minimum loaded with it;
  ``y = x @ w``. The probe's ``bcast/bf16/kn``: 74 us at M = 64 (bf16 60; the ``"dequant"`` path 112, 122 on
  pack_int4's layout) and 65 at M = 16 (bf16 57, dequant 109). Measured at groups of 32 only; other GGUF groups
  (64 to 256) run the same code, a group's scale read by each of its values.

The same int4 tile one GGUF block at a time, each block's scale and minimum one (1, BLOCK_N) row broadcast
instead of a load per value (addressing each value's byte, or reading a block's 16 bytes once for two dots of 16
columns), lost on the H100 at M = 64 for every 1B linear: 15.2 and 18.7 us on qkv against 11.4, 51 and 59 on
gate_up against 29 (``results/quant_mma_sweep_NVIDIA_H100_80GB_HBM3.json``). They were dropped. Neither did
reading the codes as int32 words and unpacking eight nibbles at a time help, in a pre-shuffled layout or in GGUF's,
with Triton's shifts or Marlin's ``prmt``/``lop3`` PTX (``benchmarks/quant_words_probe.py``: the four 1B linears at
M = 64 in 67.5 us at best on an H200, against this kernel's 72.4 and bf16 cuBLAS's 47.4): the unpacking is not
what bounds this kernel.

Rows past M and columns past N read the last row or column (no masks on loads; the stores are masked). K is
walked in whole steps of ``BLOCK_K``, which must divide it. Programs along axis 1 of the grid split K: each
stores its fp32 partial to a (splits, M, N) workspace and a second small kernel sums them, adds the bias and
writes y ("reduce"). The probe's one-launch alternative ("fixup": the last program of a tile, found by an atomic
counter that it resets, sums the others' partials) was slower wherever it split (by 5-13% at M = 64) and keeps
state across calls. Launch parameters come from shapes alone (:func:`mma_config`): CUDA-graph safe.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from forge.kernels.attention_tiles import dot, sm_count, upcast

__all__ = ["MmaConfig", "int4_gguf_gemm", "int8_channel_gemm", "mma_config", "mma_linear", "mma_unsupported"]

_PREC = tl.constexpr("tf32")  # tl.dot's input_precision, which 16-bit operands ignore
_LEAST_K = 32  # the smallest K step (a GGUF block): K must be a multiple of it


class MmaConfig(NamedTuple):
    """A launch of the "mma" kernels: tile sizes, warps, pipeline stages, and programs along K."""

    block_m: int
    block_n: int
    block_k: int
    warps: int = 4
    stages: int = 3
    split_k: int = 1


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _int4_values(c, s, z, FP16: tl.constexpr, UPCAST: tl.constexpr):
    """int4 codes c (int32, 0..15) as ``c * s + z`` in bf16 (fp16 if FP16), s and z per value: the code becomes a
    float by an OR into the mantissa of 128.0 (bf16 0x4300) or 1024.0 (fp16 0x6400) and one subtraction.
    UPCAST (the interpreter, whose bf16 arithmetic is on raw integers): the arithmetic in fp32, then bf16."""
    if FP16:
        v = (c | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
        w = (v - 1024.0) * s.to(tl.float16) + z.to(tl.float16)
    elif UPCAST:
        v = (c | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True).to(tl.float32)
        w = ((v - 128.0) * s.to(tl.float32) + z.to(tl.float32)).to(tl.bfloat16)
    else:
        v = (c | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
        w = (v - 128.0) * s.to(tl.bfloat16) + z.to(tl.bfloat16)
    return w  # one return: Triton needs every return of one type, even past a constexpr branch


@triton.jit
def _finish(acc, B, Y, WS, rm, rn, M, N, HAS_BIAS: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Store a program's tile (acc: (BLOCK_M, BLOCK_N), or (BLOCK_N, BLOCK_M) if TRANSPOSED). K in one program:
    to Y, bias added, in Y's dtype; else this split's fp32 partial to its (M, N) slice of WS."""
    if TRANSPOSED:
        offs = rm.to(tl.int64)[None, :] * N + rn[:, None]
        mask = (rm < M)[None, :] & (rn < N)[:, None]
    else:
        offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
        mask = (rm < M)[:, None] & (rn < N)[None, :]
    if tl.num_programs(1) == 1:
        if HAS_BIAS:
            b = tl.load(B + rn, mask=rn < N, other=0.0).to(tl.float32)
            if TRANSPOSED:
                acc += b[:, None]
            else:
                acc += b[None, :]
        tl.store(Y + offs, acc.to(Y.dtype.element_ty), mask=mask)
    else:
        tl.store(WS + tl.program_id(1).to(tl.int64) * M * N + offs, acc, mask=mask)


@triton.jit
def _int8_channel(
    X, Q, S, B, Y, WS, M, N, K, stride_xm, stride_s, k_split,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """y^T's (BLOCK_N, BLOCK_M) tile over columns [program_id(1) * k_split, + k_split) of K: the int8 weight
    tile in x's dtype is the dot's first operand, x's tile transposed its second; scale (N,) applied at the end."""
    m_tiles = tl.cdiv(M, BLOCK_M)  # neighbouring programs share a weight tile
    rm = (tl.program_id(0) % m_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (tl.program_id(0) // m_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    x_cols = X + tl.minimum(rm, M - 1).to(tl.int64)[None, :] * stride_xm  # rows past M: the last one again
    rn64 = tl.minimum(rn, N - 1).to(tl.int64)
    w_rows = Q + rn64[:, None] * K
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    k_lo = tl.program_id(1) * k_split
    for k0 in range(k_lo, tl.minimum(K, k_lo + k_split), BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        q = tl.load(w_rows + rk[None, :])
        if UPCAST:  # the interpreter converts int8 to bf16 wrongly; through fp32 it is exact
            q = q.to(tl.float32)
        w = q.to(X.dtype.element_ty)
        acc = dot(w, tl.load(x_cols + rk[:, None]), acc, _PREC, UPCAST)
    acc *= tl.load(S + rn64 * stride_s).to(tl.float32)[:, None]
    _finish(acc, B, Y, WS, rm, rn, M, N, HAS_BIAS, True)


@triton.jit
def _int4_gguf(
    X, Q, S, Z, B, Y, WS, M, N, K, stride_xm, stride_sn, stride_sg, k_split,
    G: tl.constexpr, FP16: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """y's (BLOCK_M, BLOCK_N) tile over columns [program_id(1) * k_split, + k_split) of K: the weight built as a
    (BLOCK_K, BLOCK_N) tile of x's dtype from GGUF's blocks, each value scaled by its group's scale and minimum."""
    m_tiles = tl.cdiv(M, BLOCK_M)
    rm = (tl.program_id(0) % m_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (tl.program_id(0) // m_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    x_rows = X + tl.minimum(rm, M - 1).to(tl.int64)[:, None] * stride_xm
    rn64 = tl.minimum(rn, N - 1).to(tl.int64)
    w_cols = Q + rn64[None, :] * (K // 2)
    s_cols = rn64[None, :] * stride_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = tl.program_id(1) * k_split
    for k0 in range(k_lo, tl.minimum(K, k_lo + k_split), BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        byte = (rk // 32) * 16 + rk % 16  # column rk's byte in its block of 32, and its nibble
        shift = ((rk // 16) % 2) * 4
        c = (tl.load(w_cols + byte[:, None]).to(tl.int32) >> shift[:, None]) & 0xF
        offs = s_cols + (rk // G)[:, None] * stride_sg
        w = _int4_values(c, tl.load(S + offs), tl.load(Z + offs), FP16, UPCAST)
        acc = dot(tl.load(x_rows + rk[None, :]), w, acc, _PREC, UPCAST)
    _finish(acc, B, Y, WS, rm, rn, M, N, HAS_BIAS, False)


@triton.jit
def _sum_splits(WS, B, Y, N, MN, SPLITS, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """Y (M, N contiguous, MN values) = the sum of WS's SPLITS fp32 (M, N) slices, plus the bias."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLITS):
        acc += tl.load(WS + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(B + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, acc.to(Y.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# Launch configs
# ----------------------------------------------------------------------------------------------------


def _k_step(k: int, most: int) -> int:
    """The largest power of two up to ``most`` that divides k (at least :data:`_LEAST_K`; 0 if none does)."""
    step = most
    while step >= _LEAST_K and k % step:
        step //= 2
    return step if step >= _LEAST_K else 0


def mma_config(m: int, n: int, k: int, *, bits: int, sms: int) -> MmaConfig:
    """The launch for m rows of x against an (n, k) weight (int8 per channel, or int4 in GGUF blocks), from shapes
    alone: the best configs of the H100 probe (quant_gemm_probe's grid: BLOCK_N 32/64/128 x BLOCK_K 64/128/256 x
    warps and stages, K split 1 and to fill the SMs), which this reproduces for the seven Llama-1B and SmolLM2-135M
    linears at M = 64 (and, BLOCK_M = M, at 16 and 32, where the probe kept them). 4 warps throughout.

    - BLOCK_M covers the rows, 16 to 64.
    - int8: a weight tile of 8192 values, BLOCK_N x BLOCK_K 32 x 256, or 64 x 128 for wide weights (N >= 8192) and
      long ones (K >= 4N: the MLP's down projection); where no K step over 64 divides K (SmolLM2's 576), 64 x 64.
      3 stages, 4 for steps of 64.
    - int4: BLOCK_N 32 (64 for wide weights), K steps of 256, 128 for wide weights and where K >= 2048 is split;
      4 stages (no more than a split's steps + 1), 3 at BLOCK_N 64.
    - K is split where the tiles fill at most half the SMs and K >= 1024 (576 lost by splitting: 6.96 us at 4
      splits against 6.72): into the most splits, a power of two up to 16 and the K steps, that keep the programs
      within one per SM (int8) or two (int4). Llama-1B's o projection (64 tiles): int4 4 splits (10.5 us against
      11.2 at 2), int8 2 (M = 16: 6.7 against 6.9 at 4); its down projection 4 for both.
    """
    block_m = min(64, max(16, triton.next_power_of_2(max(m, 1))))
    wide = n >= 8192
    block_n = 64 if wide or (bits == 8 and k >= 4 * n) else 32
    if bits == 8:
        block_k = _k_step(k, 8192 // block_n) or _LEAST_K
        block_n = 64 if block_k <= 64 else block_n
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split_wanted = k >= 1024 and 2 * tiles <= sms
    if bits == 4:
        block_k = _k_step(k, 128 if wide or (split_wanted and k >= 2048) else 256) or _LEAST_K
    steps = max(1, k // block_k)
    split = 1
    if split_wanted:
        programs = sms * (1 if bits == 8 else 2)
        while split < 16 and 2 * split <= steps and tiles * 2 * split <= programs:
            split *= 2
    int8_stages = 4 if block_k <= 64 else 3
    int4_stages = 3 if block_n == 64 else min(4, triton.cdiv(steps, split) + 1)
    return MmaConfig(block_m, block_n, block_k, 4, int8_stages if bits == 8 else int4_stages, split)


def _check_config(cfg: MmaConfig, k: int) -> None:
    sizes = (cfg.block_m, cfg.block_n, cfg.block_k, cfg.warps)
    if any(v <= 0 or v & (v - 1) for v in sizes) or min(cfg.block_m, cfg.block_n, cfg.block_k) < 16:
        raise ValueError(f"bad launch config {cfg} for the mma kernels: powers of two, blocks of at least 16")
    if k % cfg.block_k or cfg.split_k < 1 or cfg.stages < 1:
        raise ValueError(f"bad launch config {cfg} for the mma kernels: block_k must divide K={k}; split_k >= 1")


# ----------------------------------------------------------------------------------------------------
# Launching
# ----------------------------------------------------------------------------------------------------


def mma_unsupported(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None, *, bits: int, gguf: bool
) -> str | None:
    """Why the "mma" kernels can't take this call (None: they can). quant_matmul then runs the path they replaced:
    ``"dequant"`` for int4, ``"gemm"`` for int8."""
    k = x.shape[-1]
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f"x is {x.dtype}: the kernels multiply 16-bit tiles (fp32 keeps its exact paths)"
    if k % _LEAST_K:
        return f"K={k} is not a multiple of {_LEAST_K}"
    if bits == 8 and (q.dtype != torch.int8 or scale.dim() != 1 or minimum is not None):
        return "int8 takes signed q with one scale per output channel and no minimum"
    if bits == 4 and not gguf:
        return "int4 takes GGUF's blocks of 32 (gguf_blocks=True), not pack_int4's pairs"
    if bits == 4 and (minimum is None or scale.dim() != 2 or k % scale.shape[1] or (k // scale.shape[1]) % 32):
        return "int4 takes a scale and a minimum per group of a multiple of 32 columns"
    return None


def _gemm(
    kernel, x2: torch.Tensor, n: int, weight: tuple, bias: torch.Tensor | None, cfg: MmaConfig, **flags: object
) -> torch.Tensor:
    """Launch ``kernel`` over (M, N) tiles and the splits of K, then (split) the sum of its partials."""
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    (m, k), scale = x2.shape, weight[1]
    _check_config(cfg, k)
    steps = k // cfg.block_k
    k_split = triton.cdiv(steps, max(1, min(cfg.split_k, steps))) * cfg.block_k
    splits = triton.cdiv(k, k_split)  # no split left empty
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    if y.numel() == 0:
        return y
    ws = y if splits == 1 else torch.empty((splits, m, n), dtype=torch.float32, device=x2.device)
    bias = bias.contiguous() if bias is not None else None
    b = bias if bias is not None else scale  # unused: any tensor
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), splits)
    kernel[grid](
        x2, *weight, b, y, ws, m, n, k, x2.stride(0), *flags.pop("strides"), k_split, **flags,
        HAS_BIAS=bias is not None, UPCAST=upcast(x2.dtype), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, num_warps=cfg.warps, num_stages=cfg.stages,
    )  # fmt: skip
    if splits > 1:
        mn = m * n
        _sum_splits[(triton.cdiv(mn, 1024),)](ws, b, y, n, mn, splits, HAS_BIAS=bias is not None, BLOCK=1024)
    return y


def int8_channel_gemm(
    x2: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: MmaConfig | None = None,
) -> torch.Tensor:
    """``x2 @ (q * scale[:, None]).T (+ bias)``: x2 (M, K) bf16 or fp16, q (N, K) int8, scale (N,); (M, N) in
    x2's dtype. ``config`` overrides :func:`mma_config`."""
    (m, k), n = x2.shape, q.shape[0]
    cfg = config or mma_config(m, n, k, bits=8, sms=sm_count(x2.device))
    return _gemm(_int8_channel, x2, n, (q.contiguous(), scale), bias, cfg, strides=(scale.stride(0),))


def int4_gguf_gemm(
    x2: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: MmaConfig | None = None,
) -> torch.Tensor:
    """``x2 @ W.T (+ bias)`` for W in GGUF's int4 blocks: x2 (M, K) bf16 or fp16, q (N, K/2) uint8, scale and
    minimum (N, K/g) with g a multiple of 32; (M, N) in x2's dtype. ``config`` overrides :func:`mma_config`."""
    (m, k), n = x2.shape, q.shape[0]
    cfg = config or mma_config(m, n, k, bits=4, sms=sm_count(x2.device))
    if minimum.stride() != scale.stride():  # one pair of strides serves both
        scale, minimum = scale.contiguous(), minimum.contiguous()
    weight = (q.contiguous(), scale, minimum)
    strides = (scale.stride(0), scale.stride(1))
    return _gemm(
        _int4_gguf, x2, n, weight, bias, cfg, strides=strides, G=k // scale.shape[1], FP16=x2.dtype == torch.float16
    )


def mma_linear(
    x2: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    bits: int,
    gguf: bool,
    config: MmaConfig | None = None,
) -> torch.Tensor | None:
    """``x2 @ W.T (+ bias)`` by the kernel for this weight, or None where :func:`mma_unsupported` says it can't."""
    if mma_unsupported(x2, q, scale, minimum, bits=bits, gguf=gguf) is not None:
        return None
    if bits == 8:
        return int8_channel_gemm(x2, q, scale, bias, config)
    assert minimum is not None  # mma_unsupported checked it
    return int4_gguf_gemm(x2, q, scale, minimum, bias, config)
