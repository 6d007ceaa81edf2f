"""Probe: can new Triton weight-only quantized GEMMs (no reshapes) match bf16 cuBLAS at M = 16..64 rows?

Not yet run on a GPU (written when none was lent; ``--check`` passes in Triton's interpreter): the kernels are
candidates for Forge's batch-16..64 GEMM path, to be moved into ``forge.kernels.quant_matmul`` if they win.

Forge's fused GEMM (``forge.kernels.quant_matmul``, path "gemm") loses to bf16 ``F.linear`` at M = 64 on an H200
(Llama-1B qkv, N=3072, K=2048: bf16 6.5 us, int4 g32 19.8 us, int8 per channel 10.5 us, dequant+cuBLAS 11.2 us).
That kernel reads int32 words and unpacks them with ``tl.reshape`` of (BLOCK_N, WORDS, VALS) tiles, in fp32. This
probe tries kernels that never reshape, over Forge's own weight layouts (``forge.kernels.reference``):

* int4: ``q`` uint8 (N, K/2), column 2j in the low nibble and 2j+1 in the high one (``pack_int4``), or GGUF's
  blocks of 32 (byte b of a block: columns b and b+16; what ``Int4Weight`` stores); ``scale`` and ``minimum``
  (N, K/g); ``w[n, k] = q[n, k] * scale[n, k // g] + minimum[n, k // g]``, q in 0..15 as stored (no offset).
* int8 per channel: ``q`` int8 (N, K), ``scale`` (N,), no minimum (``Int8Weight``: symmetric).

Kernel variants (one Triton kernel, :func:`_qgemm`, constexpr switches):

* ``unpack`` (int4): ``bcast``: the (K, N) or (N, K) code tile addressed per value (each byte read twice, the
  nibble picked by the column), or ``halves``: the byte tile read once, its low and high nibbles two half-depth
  tiles, each dotted with the x columns they hold (stride 2 for pack_int4, runs of 16 for GGUF).
* ``dq``: ``f32``: codes to fp32 by the 2**23 OR trick, ``* scale + minimum`` in fp32 per value, then bf16;
  ``bf16``: the same in bf16 (codes as bf16 by a 128.0 OR trick); ``post``: the weight tile is the exact bf16
  ``128 + q`` (one OR a value), one dot per group, then ``acc += scale * dot + (minimum - 128 scale) * sum(x)``
  in fp32 per group (no per-value scale at all). int8: ``cvt`` (``q.to(bf16)``) or ``magic`` (fp32 OR trick,
  then bf16); the per-channel scale multiplies the accumulator at the end.
* ``order``: ``kn``: w built as (BLOCK_K, BLOCK_N), ``dot(x, w)``; ``nk``: w (BLOCK_N, BLOCK_K),
  ``dot(x, trans(w))``; ``swap``: ``acc^T = dot(w, x^T)``, so the dequantized weight is the MMA's A operand
  (wgmma takes A from registers; BLOCK_N >= 64 fills its 64-row M side even at M = 16).
* split-K: programs along K with fp32 partials in a (splits, M, N) workspace; ``fixup`` (one launch: the last
  program of each tile, found with an atomic counter, sums the partials and writes y) or ``reduce`` (a second
  small kernel sums them, as Forge does with torch).

Method, per (shape, scheme) at M = 64: (A) every variant at one default launch config, all shapes; (B) the best
two variants per scheme (geometric mean over shapes) over a launch grid (BLOCK_N x BLOCK_K x warps/stages, split
1 and the split that fills the SMs, then more splits for the top few); (C) M = 16 and 32 with each of those
variants' best M = 64 config, BLOCK_M = M, at its split and at the split that fills the SMs. Kernels are compiled
ahead in a pool of processes (Triton's disk cache; Forge's own kernels too, before any timing), in the order they
are timed, so compiling overlaps timing. The budget (--budget-s) trims each case's config list from its least
promising end rather than dropping whole cases; what was cut is listed under "skipped". Times: CUDA-graph
replays over enough weight copies to leave L2 (as benchmarks/quant_gpu.py times kernels), ``us``; the best
config also eagerly (launch overhead included, ``eager_us``) and with one weight kept hot in L2 (``hot_us``). Errors
against ``F.linear`` of x by the fp32 dequantized weight: max abs and max abs / max |ref| (must be < 1e-2).

    PYTHONPATH=$PWD/src python benchmarks/quant_gemm_probe.py                  # NVIDIA GPU: the sweep, JSON to stdout
    OUT=/some/dir ... python benchmarks/quant_gemm_probe.py                     # also writes $OUT/quant_gemm_probe.json
    TRITON_INTERPRET=1 PYTHONPATH=$PWD/src python benchmarks/quant_gemm_probe.py --check   # correctness only (CPU ok)

Options: --budget-s (default 230: later stages are cut, never the JSON), --schemes, --shapes, --jobs
(compile processes), --reps, --extra-m. A config that fails to compile or run is recorded, never fatal.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

# --check on a machine without CUDA runs the kernels in Triton's interpreter, which must be chosen before the
# kernels are defined (at import of triton and at @triton.jit).
if "--check" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quant_gpu import graph_us, l2_copies  # how Forge's kernel benchmarks time a call

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------

UNPACKS = {"bcast": 0, "halves": 1}
DQS_INT4 = {"f32": 0, "bf16": 1, "post": 2}
DQS_INT8 = {"cvt": 0, "magic": 1}
ORDERS = {"kn": 0, "nk": 1, "swap": 2}


@triton.jit
def _as_f32(v, OFFSET: tl.constexpr):
    """Small non-negative int32 v as fp32 minus OFFSET with an OR and a subtraction (no conversion instruction):
    0x4B000000 | v is the float 2**23 + v."""
    return (v | 0x4B000000).to(tl.float32, bitcast=True) - OFFSET


@triton.jit
def _bf16_128(c):
    """int4 codes c (int32, 0..15) as the exact bf16 value 128 + c: 0x4300 is 128.0, its 7 mantissa bits hold c."""
    return (c | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _grid2(n, k, KN: tl.constexpr):
    """Row vector n (weight rows) and column vector k as broadcastable 2-D indices: (K, N) if KN else (N, K)."""
    if KN:
        return n[None, :], k[:, None]
    else:
        return n[:, None], k[None, :]


@triton.jit
def _nvec(v, ACC_NM: tl.constexpr):
    """A per-output-column (BLOCK_N,) vector broadcast against the accumulator ((N, M) if ACC_NM else (M, N))."""
    if ACC_NM:
        return v[:, None]
    else:
        return v[None, :]


@triton.jit
def _mvec(v, ACC_NM: tl.constexpr):
    """A per-row-of-x (BLOCK_M,) vector broadcast against the accumulator."""
    if ACC_NM:
        return v[None, :]
    else:
        return v[:, None]


@triton.jit
def _x_tile(X, rm_ld, cols, K, stride_xm, XT: tl.constexpr, EVEN_K: tl.constexpr):
    """x at rows rm_ld (clamped into range, so unmasked) and columns cols: (M, C), or (C, M) if XT. Columns past
    K read as 0 (so whatever weight meets them adds nothing)."""
    if XT:
        ptrs = X + rm_ld[None, :] * stride_xm + cols[:, None]
        kmask = (cols < K)[:, None]
    else:
        ptrs = X + rm_ld[:, None] * stride_xm + cols[None, :]
        kmask = (cols < K)[None, :]
    if EVEN_K:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=kmask, other=0.0)


@triton.jit
def _x_sum(xv, XT: tl.constexpr):
    """Each row of x's sum over the tile's columns, fp32 (BLOCK_M,)."""
    if XT:
        return tl.sum(xv.to(tl.float32), axis=0)
    else:
        return tl.sum(xv.to(tl.float32), axis=1)


@triton.jit
def _codes_bcast(Q, rn64, cols_w, K, BITS: tl.constexpr, GGUF: tl.constexpr, KN: tl.constexpr):
    """The weight codes of rows rn64 at columns cols_w (in range), addressed value by value: int4 as int32 0..15
    (each byte read once per nibble; the column picks the nibble), int8 as the raw int8 tile."""
    n2, k2 = _grid2(rn64, cols_w, KN)
    if BITS == 8:
        return tl.load(Q + n2 * K + k2)
    else:
        if GGUF:  # byte b of a 32-column block: column b (low nibble) and b + 16 (high)
            byte = (k2 // 32) * 16 + k2 % 16
            shift = ((k2 // 16) % 2) * 4
        else:  # pack_int4: byte j holds columns 2j (low) and 2j + 1 (high)
            byte = k2 // 2
            shift = (k2 % 2) * 4
        b = tl.load(Q + n2 * (K // 2) + byte).to(tl.int32)
        return (b >> shift) & 0xF


@triton.jit
def _codes_halves(Q, rn64, k0, K, GGUF: tl.constexpr, KN: tl.constexpr, HALF: tl.constexpr, EVEN_K: tl.constexpr):
    """The int4 codes of the 2 * HALF columns from k0 (k0 even; a multiple of 32 for GGUF) as two tiles read from
    one byte tile: (low codes, high codes, the low tile's columns, the high tile's columns)."""
    f = tl.arange(0, HALF)
    byte = k0 // 2 + f
    if GGUF:
        lo_cols = k0 + (f // 16) * 32 + f % 16
        hi_cols = lo_cols + 16
    else:
        lo_cols = k0 + 2 * f
        hi_cols = lo_cols + 1
    if not EVEN_K:
        byte = tl.minimum(byte, K // 2 - 1)
    n2, b2 = _grid2(rn64, byte, KN)
    raw = tl.load(Q + n2 * (K // 2) + b2).to(tl.int32)
    return raw & 0xF, raw >> 4, lo_cols, hi_cols


@triton.jit
def _dequant_full(
    c, S, Z, rn64, cols_w, stride_sn, stride_sg,
    G: tl.constexpr, HAS_MIN: tl.constexpr, KN: tl.constexpr, DQ: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """int4 codes c at columns cols_w dequantized per value, scale and minimum by each value's group, as bf16:
    in fp32 (DQ 0) or bf16 (DQ 1; in fp32 under the interpreter, whose bf16 arithmetic is on raw integers)."""
    n2, g2 = _grid2(rn64, cols_w // G, KN)
    offs = n2 * stride_sn + g2 * stride_sg
    if DQ == 0 or UPCAST:
        w = _as_f32(c, 8388608.0) * tl.load(S + offs).to(tl.float32)
        if HAS_MIN:
            w += tl.load(Z + offs).to(tl.float32)
        return w.to(tl.bfloat16)
    else:
        w = (_bf16_128(c) - 128.0) * tl.load(S + offs).to(tl.bfloat16)
        if HAS_MIN:
            w += tl.load(Z + offs).to(tl.bfloat16)
        return w


@triton.jit
def _int8_bf16(c, DQ: tl.constexpr, UPCAST: tl.constexpr):
    """int8 codes as bf16 (exact: |q| <= 128 fits bf16's 8-bit significand): a conversion (DQ 0) or the fp32
    OR trick on q + 128, then bf16 (DQ 1). The interpreter converts int8 to bf16 wrongly, so there DQ 0 goes
    through fp32 (exact either way)."""
    if DQ == 0:
        if UPCAST:
            return c.to(tl.float32).to(tl.bfloat16)
        return c.to(tl.bfloat16)
    else:
        return _as_f32(c.to(tl.int32) + 128, 8388608.0 + 128.0).to(tl.bfloat16)


@triton.jit
def _mma(w, xv, acc, ORDER: tl.constexpr, UPCAST: tl.constexpr):
    """acc + the tile product. ORDER 0: x (M, C) @ w (C, N); 1: x (M, C) @ trans(w (N, C)); 2: w (N, C) @ x^T
    (C, M), acc (N, M). UPCAST (interpreter only): fp32 operands, since it multiplies bf16 as raw integers."""
    if UPCAST:
        w = w.to(tl.float32)
        xv = xv.to(tl.float32)
    if ORDER == 0:
        return tl.dot(xv, w, acc)
    elif ORDER == 1:
        return tl.dot(xv, tl.trans(w), acc)
    else:
        return tl.dot(w, xv, acc)


@triton.jit
def _fence(v, ENABLE: tl.constexpr):
    """A gpu-scope fence.acq_rel run by every thread (v: any int32 tensor, returned unchanged); off under the
    interpreter, whose programs run one after another."""
    if ENABLE:
        v = tl.inline_asm_elementwise(
            "fence.acq_rel.gpu; mov.b32 $0, $1;", "=r,r", [v], dtype=tl.int32, is_pure=False, pack=1
        )
    return v


@triton.jit(do_not_specialize=["fixup"])
def _qgemm(
    X, Q, S, Z, Y, WS, CNT, M, N, K, stride_xm, stride_sn, stride_sg, k_split, fixup,
    BITS: tl.constexpr, G: tl.constexpr, GGUF: tl.constexpr, HAS_MIN: tl.constexpr,
    UNPACK: tl.constexpr, DQ: tl.constexpr, ORDER: tl.constexpr, FENCE: tl.constexpr,
    EVEN_K: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """A (BLOCK_M, BLOCK_N) tile of y = x @ W.T over columns [pid_k * k_split, + k_split) of K.

    Y (M, N) contiguous, x's dtype. Axis 1 of the grid splits K: each program stores fp32 partials to WS
    (splits, M, N); with ``fixup`` (a runtime flag) the last program of a tile (an atomic count in CNT, reset
    after) adds the others'
    partials and writes Y, else a second kernel sums them. One split: Y directly.
    """
    KN: tl.constexpr = ORDER == 0  # the weight tile as (K, N)
    XT: tl.constexpr = ORDER == 2  # x as (K, M), the accumulator as (N, M)
    pid, pid_k, splits = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    m_tiles = tl.cdiv(M, BLOCK_M)  # neighbouring programs share a weight tile
    rm = (pid % m_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (pid // m_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm_ld = tl.minimum(rm, M - 1)  # rows past the end repeat the last one: loads need no mask, the store has one
    rn64 = tl.minimum(rn, N - 1).to(tl.int64)
    if XT:  # noqa: SIM108 (a constexpr branch)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_k * k_split
    k_hi = tl.minimum(K, k_lo + k_split)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if BITS == 8:
            cols = k0 + tl.arange(0, BLOCK_K)
            cols_w = cols if EVEN_K else tl.minimum(cols, K - 1)
            w = _int8_bf16(_codes_bcast(Q, rn64, cols_w, K, BITS, GGUF, KN), DQ, UPCAST)
            acc = _mma(w, _x_tile(X, rm_ld, cols, K, stride_xm, XT, EVEN_K), acc, ORDER, UPCAST)
        elif DQ == 2:  # post: the weight tile is 128 + q exactly; each group's scale applied to its dot
            for gi in tl.static_range(BLOCK_K // G):
                kg = k0 + gi * G
                if XT:
                    part = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
                else:
                    part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                if UNPACK == 0:
                    cols = kg + tl.arange(0, G)
                    cols_w = cols if EVEN_K else tl.minimum(cols, K - 1)
                    xv = _x_tile(X, rm_ld, cols, K, stride_xm, XT, EVEN_K)
                    c = _codes_bcast(Q, rn64, cols_w, K, BITS, GGUF, KN)
                    part = _mma(_bf16_128(c), xv, part, ORDER, UPCAST)
                    xs = _x_sum(xv, XT)
                else:
                    lo, hi, lc, hc = _codes_halves(Q, rn64, kg, K, GGUF, KN, G // 2, EVEN_K)
                    xl = _x_tile(X, rm_ld, lc, K, stride_xm, XT, EVEN_K)
                    xh = _x_tile(X, rm_ld, hc, K, stride_xm, XT, EVEN_K)
                    part = _mma(_bf16_128(lo), xl, part, ORDER, UPCAST)
                    part = _mma(_bf16_128(hi), xh, part, ORDER, UPCAST)
                    xs = _x_sum(xl, XT) + _x_sum(xh, XT)
                g = kg // G
                if not EVEN_K:
                    g = tl.minimum(g, K // G - 1)  # a group past K: part and xs are 0, any finite scale will do
                s = tl.load(S + rn64 * stride_sn + g * stride_sg).to(tl.float32)
                if HAS_MIN:  # noqa: SIM108 (a constexpr branch)
                    zc = tl.load(Z + rn64 * stride_sn + g * stride_sg).to(tl.float32) - 128.0 * s
                else:
                    zc = -128.0 * s
                acc += part * _nvec(s, XT) + _nvec(zc, XT) * _mvec(xs, XT)
        elif UNPACK == 0:  # full dequant, values addressed one by one
            cols = k0 + tl.arange(0, BLOCK_K)
            cols_w = cols if EVEN_K else tl.minimum(cols, K - 1)
            c = _codes_bcast(Q, rn64, cols_w, K, BITS, GGUF, KN)
            w = _dequant_full(c, S, Z, rn64, cols_w, stride_sn, stride_sg, G, HAS_MIN, KN, DQ, UPCAST)
            acc = _mma(w, _x_tile(X, rm_ld, cols, K, stride_xm, XT, EVEN_K), acc, ORDER, UPCAST)
        else:  # full dequant, a byte tile as two half-depth tiles
            lo, hi, lc, hc = _codes_halves(Q, rn64, k0, K, GGUF, KN, BLOCK_K // 2, EVEN_K)
            lw = lc if EVEN_K else tl.minimum(lc, K - 1)
            hw = hc if EVEN_K else tl.minimum(hc, K - 1)
            w = _dequant_full(lo, S, Z, rn64, lw, stride_sn, stride_sg, G, HAS_MIN, KN, DQ, UPCAST)
            acc = _mma(w, _x_tile(X, rm_ld, lc, K, stride_xm, XT, EVEN_K), acc, ORDER, UPCAST)
            w = _dequant_full(hi, S, Z, rn64, hw, stride_sn, stride_sg, G, HAS_MIN, KN, DQ, UPCAST)
            acc = _mma(w, _x_tile(X, rm_ld, hc, K, stride_xm, XT, EVEN_K), acc, ORDER, UPCAST)
    if G == 0:  # per-channel scale (int8)
        acc *= _nvec(tl.load(S + rn64 * stride_sn).to(tl.float32), XT)
    if XT:
        offs = rm[None, :] * N + rn[:, None]
        mask = (rm < M)[None, :] & (rn < N)[:, None]
    else:
        offs = rm[:, None] * N + rn[None, :]
        mask = (rm < M)[:, None] & (rn < N)[None, :]
    if splits == 1:
        tl.store(Y + offs, acc.to(Y.dtype.element_ty), mask=mask)
    else:
        tl.store(WS + pid_k * M * N + offs, acc, mask=mask)
        if fixup != 0:
            rm = _fence(rm, FENCE)  # this thread's partials are visible before the count says so
            tl.debug_barrier()  # ... and every thread's, before one thread counts
            done = tl.atomic_add(CNT + pid, 1, sem="acq_rel", scope="gpu")
            if done == splits - 1:  # the last of this tile's programs: the others' partials are all stored
                rm = _fence(rm, FENCE)
                for s in range(0, splits):
                    if s != pid_k:
                        acc += tl.load(WS + s * M * N + offs, mask=mask, other=0.0, cache_modifier=".cg")
                tl.store(Y + offs, acc.to(Y.dtype.element_ty), mask=mask)
                tl.atomic_xchg(CNT + pid, 0)  # ready for the next launch


@triton.jit
def _sum_splits(WS, Y, MN, SPLITS, BLOCK: tl.constexpr):
    """Y (MN values, x's dtype) = the sum of WS's SPLITS fp32 slices: the second launch of split-K "reduce"."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLITS):
        acc += tl.load(WS + s * MN + offs, mask=mask, other=0.0)
    tl.store(Y + offs, acc.to(Y.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# Weights, variants, launch configs
# ----------------------------------------------------------------------------------------------------


@dataclass
class QWeight:
    """A quantized weight as Forge's kernels take it (one copy of a bank of copies)."""

    bits: int
    q: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor | None
    group: int  # 0: per channel
    gguf: bool

    def clone(self) -> QWeight:
        mn = None if self.minimum is None else self.minimum.clone()
        return replace(self, q=self.q.clone(), scale=self.scale.clone(), minimum=mn)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.scale, self.minimum) if t is not None)


#: scheme name -> (bits, group, GGUF layout)
SCHEMES = {
    "int4_g32": (4, 32, False),
    "int4_g64": (4, 64, False),
    "int4_g32_gguf": (4, 32, True),
    "int4_g64_gguf": (4, 64, True),
    "int8": (8, 0, False),
}
DEFAULT_SCHEMES = ("int4_g32", "int4_g64", "int4_g32_gguf", "int8")

#: (N, K) of each linear as Forge's Transformer fuses them (benchmarks/quant_gpu.py linear_shapes).
SHAPES = {
    "1b_qkv": (3072, 2048),
    "1b_o": (2048, 2048),
    "1b_gate_up": (16384, 2048),
    "1b_down": (2048, 8192),
    "135m_qkv": (960, 576),  # 9 heads of 64, 3 kv heads: 576 + 2 * 192
    "135m_gate_up": (3072, 576),
    "135m_down": (576, 1536),
}


def quantize(w: torch.Tensor, scheme: str) -> QWeight:
    """Forge's own quantizers (Int4Weight: fp16 scale and minimum picked first; Int8Weight: symmetric, fp32 scale),
    the codes then laid out as the scheme says (pack_int4, or GGUF's blocks as Int4Weight holds them)."""
    from forge.core.quantize import Int4Weight, Int8Weight
    from forge.kernels.reference import pack_int4

    bits, group, gguf = SCHEMES[scheme]
    if bits == 8:
        iw = Int8Weight.quantize(w)
        return QWeight(8, iw.q.contiguous(), iw.scale.contiguous(), None, 0, False)
    iw = Int4Weight.quantize(w, group)
    q = iw.qs.contiguous() if gguf else pack_int4(iw.unpacked()).contiguous()
    return QWeight(4, q, iw.scale.contiguous(), iw.min.contiguous(), group, gguf)


def dequantized(qw: QWeight) -> torch.Tensor:
    """The fp32 (N, K) weight Forge's kernels multiply by (forge.kernels.reference)."""
    from forge.kernels.reference import dequantize_int4, dequantize_int8

    if qw.bits == 8:
        return dequantize_int8(qw.q, qw.scale, qw.minimum)
    return dequantize_int4(qw.q, qw.scale, qw.minimum, gguf_blocks=qw.gguf)


@dataclass(frozen=True)
class Variant:
    unpack: str  # int4: bcast | halves; int8: "-"
    dq: str  # int4: f32 | bf16 | post; int8: cvt | magic
    order: str  # kn | nk | swap

    @property
    def name(self) -> str:
        return f"{self.unpack}/{self.dq}/{self.order}"


def variants(bits: int) -> list[Variant]:
    if bits == 8:
        return [Variant("-", d, o) for d in DQS_INT8 for o in ORDERS]
    return [Variant(u, d, o) for u in UNPACKS for d in DQS_INT4 for o in ORDERS]


@dataclass(frozen=True)
class Cfg:
    bm: int
    bn: int
    bk: int
    warps: int = 4
    stages: int = 3
    split: int = 1
    fixup: bool = True  # split-K: one launch (last program sums) or a second reduce kernel

    def short(self) -> list:
        return [self.bm, self.bn, self.bk, self.warps, self.stages, self.split, "fixup" if self.fixup else "reduce"]


def cfg_from(short: list) -> Cfg:
    """The Cfg that :meth:`Cfg.short` listed."""
    return Cfg(*short[:6], fixup=short[6] == "fixup")


CFG_KEYS = ["block_m", "block_n", "block_k", "warps", "stages", "split_k", "split_mode"]


def valid(qw: QWeight, var: Variant, cfg: Cfg) -> str | None:
    """Why (variant, cfg) can't run this weight, or None."""
    if min(cfg.bm, cfg.bn, cfg.bk) < 16:
        return "tl.dot needs tiles of at least 16"
    if qw.bits == 4:
        if cfg.bk % qw.group and qw.group % cfg.bk:
            return "BLOCK_K and the group size must divide one another"
        if var.dq == "post" and cfg.bk < qw.group:
            return "post: BLOCK_K must hold whole groups"
        if var.unpack == "halves" and cfg.bk < 32:
            return "halves: BLOCK_K >= 32"
    return None


class Launch:
    """One (weight shape, M, variant, config): grid, flags and buffers worked out once; call it per weight copy."""

    def __init__(self, qw: QWeight, m: int, var: Variant, cfg: Cfg, device: torch.device) -> None:
        n = qw.q.shape[0]
        k = qw.q.shape[1] * (2 if qw.bits == 4 else 1)
        steps = triton.cdiv(k, cfg.bk)
        split = max(1, min(cfg.split, steps))
        self.k_split = triton.cdiv(steps, split) * cfg.bk
        self.split = triton.cdiv(k, self.k_split)  # no empty splits
        self.m, self.n, self.k, self.cfg = m, n, k, cfg
        tiles = triton.cdiv(m, cfg.bm) * triton.cdiv(n, cfg.bn)
        self.grid = (tiles, self.split)
        # Buffers of one dtype whatever the split, so one compiled kernel serves every split.
        self.ws = torch.empty((self.split * m * n if self.split > 1 else 1,), dtype=torch.float32, device=device)
        self.cnt = torch.zeros((tiles,), dtype=torch.int32, device=device)
        dq = (DQS_INT8 if qw.bits == 8 else DQS_INT4)[var.dq]
        self.kw = dict(
            BITS=qw.bits, G=qw.group, GGUF=qw.gguf, HAS_MIN=qw.minimum is not None,
            UNPACK=UNPACKS.get(var.unpack, 0), DQ=dq, ORDER=ORDERS[var.order],
            FENCE=not INTERPRET, EVEN_K=k % cfg.bk == 0, UPCAST=INTERPRET,
            BLOCK_M=cfg.bm, BLOCK_N=cfg.bn, BLOCK_K=cfg.bk,
        )  # fmt: skip
        self.compiled = None

    def ints(self, qw: QWeight) -> tuple:
        sg = qw.scale.stride(1) if qw.scale.dim() == 2 else 0
        return (self.m, self.n, self.k, self.k, qw.scale.stride(0), sg, self.k_split, int(self.cfg.fixup))

    def __call__(self, x: torch.Tensor, qw: QWeight) -> torch.Tensor:
        y = torch.empty((self.m, self.n), dtype=x.dtype, device=x.device)
        z = qw.minimum if qw.minimum is not None else qw.scale
        self.compiled = _qgemm[self.grid](
            x, qw.q, qw.scale, z, y, self.ws, self.cnt, *self.ints(qw),
            num_warps=self.cfg.warps, num_stages=self.cfg.stages, **self.kw,
        )  # fmt: skip
        if self.split > 1 and not self.cfg.fixup:
            mn = self.m * self.n
            _sum_splits[(triton.cdiv(mn, 1024),)](self.ws, y, mn, self.split, BLOCK=1024, num_warps=4)
        return y

    def compile_task(self, qw: QWeight, x: torch.Tensor) -> tuple:
        """What a compile worker needs to build the same kernel (same constexprs and argument specialization)."""
        z = qw.minimum if qw.minimum is not None else qw.scale
        dtypes = tuple(str(t.dtype) for t in (x, qw.q, qw.scale, z, x, self.ws, self.cnt))
        return (tuple(sorted(self.kw.items())), self.cfg.warps, self.cfg.stages, self.ints(qw), dtypes)


def kernel_info(launch: Launch) -> dict:
    """Registers, spills, shared memory and whether the MMA is Hopper's wgmma, of the last compiled kernel."""
    k = launch.compiled
    info: dict = {}
    try:
        info["regs"] = getattr(k, "n_regs", None)
        info["spills"] = getattr(k, "n_spills", None)
        info["shared"] = getattr(k, "shared", None) or getattr(getattr(k, "metadata", None), "shared", None)
        ptx = k.asm.get("ptx", "") if hasattr(k, "asm") else ""
        info["wgmma"] = "wgmma" in ptx
        info["mma_sync"] = "mma.sync" in ptx
    except Exception as e:  # informational only
        info["error"] = repr(e)[:120]
    return info


# ----------------------------------------------------------------------------------------------------
# Compiling ahead, in worker processes (Triton's disk cache then serves the timing process)
# ----------------------------------------------------------------------------------------------------


def _spec(v: int) -> tuple:
    """How Triton specializes an int argument: by 16-divisibility and by being 1."""
    return (v % 16 == 0, v == 1)


def _warm(task: tuple) -> str | None:
    """Worker: compile one kernel without launching it (JITFunction.warmup), on tiny tensors of the same dtypes."""
    kw, warps, stages, ints, dtypes = task
    try:
        ptrs = [torch.empty(64, dtype=getattr(torch, d.split(".")[-1]), device="cuda") for d in dtypes]
        _qgemm.warmup(*ptrs, *ints, grid=(1, 1), num_warps=warps, num_stages=stages, **dict(kw))
        return None
    except Exception as e:
        return f"{type(e).__name__}: {e}"[:200]


def _key(task: tuple) -> tuple:
    kw, warps, stages, ints, dtypes = task
    return (kw, warps, stages, tuple(_spec(i) for i in ints[:-1]), dtypes)  # the last int: fixup, unspecialized


def _warm_forge(task: tuple) -> str | None:
    """Worker: run Forge's "gemm" and "dequant" paths once on a random weight of this shape, so its kernels are
    in Triton's disk cache before the timing process calls them (done before any timing: it uses the GPU)."""
    scheme, n, k, m = task
    try:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        qw, x = quantize(w, scheme), torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        for path in ("gemm", "dequant"):
            forge_call(qw, x, path)
        torch.cuda.synchronize()
        return None
    except Exception as e:
        return f"forge {scheme} {n}x{k} m={m}: {type(e).__name__}: {e}"[:200]


class Compiler:
    """A pool of spawned processes compiling kernels ahead of their timing, in the order they will be timed;
    :meth:`ready` waits for one kernel's compile only, so timing runs alongside compiling. Anything failing here
    just leaves the kernel to compile on its first call."""

    def __init__(self, jobs: int) -> None:
        self.pool = None
        self.futures: dict = {}
        self.errors: list[str] = []
        self.seconds = 0.0
        if jobs > 1:
            try:
                import concurrent.futures as cf
                import multiprocessing as mp

                self.pool = cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"))
            except Exception as e:
                self.errors.append(f"pool: {e!r}"[:200])

    def submit(self, tasks: list[tuple], fn=_warm, key=_key) -> None:
        for t in tasks:
            if self.pool is None:
                return
            k = key(t)
            if k in self.futures:
                continue
            try:
                self.futures[k] = self.pool.submit(fn, t)
            except Exception as e:  # a broken pool: compile lazily from now on
                self.errors.append(f"submit: {e!r}"[:200])
                self.pool = None

    def ready(self, task: tuple, timeout: float = 180.0, key=_key) -> None:
        """Wait (at most ``timeout`` s) for this kernel's compile, if it was submitted."""
        f = self.futures.get(key(task))
        if f is None or f.done():
            return
        t0 = time.perf_counter()
        try:
            err = f.exception(timeout=timeout) or f.result()
            if err and len(self.errors) < 20:
                self.errors.append(str(err)[:200])
        except Exception as e:
            if len(self.errors) < 20:
                self.errors.append(f"wait: {e!r}"[:200])
        self.seconds += time.perf_counter() - t0

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


# ----------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------


class Clock:
    def __init__(self, budget_s: float) -> None:
        self.t0 = time.perf_counter()
        self.end = self.t0 + budget_s
        self.skipped: list[str] = []

    def left(self) -> float:
        return self.end - time.perf_counter()

    def ok(self, what: str, need: float = 0.0) -> bool:
        if self.left() > need:
            return True
        self.skipped.append(what)
        return False


def time_eager(fn, bank: list, reps: int) -> float:
    """us per call launched from Python one after another (launch overhead included), over the same copies."""
    for p in bank[:2]:
        fn(p)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        for p in bank:
            fn(p)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / (reps * len(bank))


def errors(y: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    d = (y.float() - ref).abs().max().item()
    return d, d / max(ref.abs().max().item(), 1e-30)


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".replace("\n", " ")[:200]


# ----------------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------------


def block_m(m: int) -> int:
    return min(64, max(16, triton.next_power_of_2(m)))


def auto_split(m: int, n: int, k: int, bm: int, bn: int, bk: int, sms: int) -> int:
    """The least power-of-two split of K that gives a program per multiprocessor (at most 16, a step each)."""
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    steps = triton.cdiv(k, bk)
    s = 1
    while tiles * s < sms and s * 2 <= min(16, steps):
        s *= 2
    return s


def default_cfg(m: int, n: int, k: int, group: int, sms: int) -> Cfg:
    """Stage A's one config: BLOCK_M covering the rows, BLOCK_N 64, BLOCK_K 128 (64 where 128 does not divide K:
    SmolLM2's 576), 4 warps, 3 stages, the split that fills the SMs."""
    bm, bn = block_m(m), 64
    bk = max(128 if k % 128 == 0 else 64, group)
    return Cfg(bm, bn, bk, 4, 3, auto_split(m, n, k, bm, bn, bk, sms))


def grid_cfgs(m: int, n: int, k: int, sms: int) -> list[Cfg]:
    """Stage B's grid: BLOCK_N {32, 64, 128} x BLOCK_K {64, 128, 256} x (warps, stages) {(4, 3), (8, 3), (4, 4)},
    each at the split that fills the SMs (or 2 where one already does) and at split 1: up to 27 compiles (the
    split is a runtime choice), 54 timings. Ordered by a guess at their promise, so a budget cut drops the least
    likely ones: filled SMs first, then BLOCK_N 64, 32, 128 and BLOCK_K 128, 256, 64."""
    out = []
    bm = block_m(m)
    # Only steps that divide K (every K here is a multiple of 64): a ragged last step is a second compile.
    steps = [bk for bk in (128, 256, 64) if k % bk == 0] or [128, 256, 64]
    for fill in (True, False):
        for warps, stages in ((4, 3), (8, 3), (4, 4)):
            for bn in (64, 32, 128):
                for bk in steps:
                    sa = auto_split(m, n, k, bm, bn, bk, sms)
                    s = (sa if sa > 1 else 2) if fill else 1
                    if s <= triton.cdiv(k, bk):
                        out.append(Cfg(bm, bn, bk, warps, stages, s))
    return out


class Case:
    """One (shape, scheme) at one M: the bank of weight copies, x, the reference and the timings made."""

    def __init__(self, shape: str, scheme: str, w: torch.Tensor, qw0: QWeight, wref: torch.Tensor, m: int) -> None:
        self.shape, self.scheme, self.m = shape, scheme, m
        self.n, self.k = w.shape
        self.qw0 = qw0
        self.bank: list[QWeight] = []
        self.x = torch.randn(m, self.k, device=w.device, dtype=torch.bfloat16)
        self.ref = F.linear(self.x.float(), wref)
        self.results: dict[tuple, dict] = {}  # (variant, cfg) -> {"us": ..} or {"error": ..}

    def ensure_bank(self) -> list[QWeight]:
        if not self.bank:
            self.bank = [self.qw0] + [self.qw0.clone() for _ in range(l2_copies(self.qw0.nbytes()) - 1)]
        return self.bank

    def free(self) -> None:
        self.bank = []


def measure_new(
    case: Case, var: Variant, cfg: Cfg, reps: int, extra: bool = False, compiler: Compiler | None = None
) -> dict:
    """Check then time one (variant, config) on a case; the outcome is cached on the case."""
    key = (var, cfg)
    if key in case.results and not extra:
        return case.results[key]
    res: dict = {"variant": var.name, "cfg": cfg.short()}
    why = valid(case.qw0, var, cfg)
    if why:
        res["error"] = why
        case.results[key] = res
        return res
    try:
        launch = Launch(case.qw0, case.m, var, cfg, case.x.device)
        if compiler is not None:
            compiler.ready(launch.compile_task(case.qw0, case.x))
        worst = (0.0, 0.0)
        for _ in range(2 if launch.split > 1 else 1):  # split-K fixup: twice (counters reset themselves)
            worst = max(worst, errors(launch(case.x, case.qw0), case.ref), key=lambda e: e[1])
        res["err_abs"], res["err_rel"] = worst
        if not worst[1] < 1e-2:
            res["error"] = f"wrong result: max rel error {worst[1]:.3g}"
        else:
            bank = case.ensure_bank()
            res["us"] = graph_us(lambda p: launch(case.x, p), bank, reps)
            after = errors(launch(case.x, case.qw0), case.ref)  # once more after the replays (split-K races)
            if not after[1] < 1e-2:
                res["error"] = f"wrong result after timing: max rel error {after[1]:.3g}"
                res.pop("us")
            if extra:
                res["eager_us"] = time_eager(lambda p: launch(case.x, p), bank, reps)
                res["hot_us"] = graph_us(lambda p: launch(case.x, p), [case.qw0] * len(bank), reps)
                res["kernel"] = kernel_info(launch)
                res["copies"] = len(bank)
    except Exception as e:
        res["error"] = _err(e)
    case.results[key] = res
    return res


def forge_call(qw: QWeight, x: torch.Tensor, path: str) -> torch.Tensor:
    from forge.kernels.quant_matmul import int4_linear, int8_linear

    if qw.bits == 8:
        return int8_linear(x, qw.q, qw.scale, qw.minimum, path=path)
    return int4_linear(x, qw.q, qw.scale, qw.minimum, gguf_blocks=qw.gguf, path=path)


def bf16_bank(wb16: torch.Tensor) -> list[torch.Tensor]:
    return [wb16] + [wb16.clone() for _ in range(l2_copies(wb16.numel() * 2) - 1)]


def baselines(case: Case, wb16: torch.Tensor, reps: int, bf16_cache: dict) -> dict:
    """Graph-timed bf16 F.linear (the dequantized weight rounded to bf16; its error against the fp32 reference
    is the bf16 noise floor) and Forge's "gemm" and "dequant" paths (their default launch configs)."""
    out: dict = {}
    key = (case.shape, case.m)
    if key not in bf16_cache:
        try:
            r = {"us": graph_us(lambda p: F.linear(case.x, p), bf16_bank(wb16), reps)}
            r["err_abs"], r["err_rel"] = errors(F.linear(case.x, wb16), case.ref)
            bf16_cache[key] = r
        except Exception as e:
            bf16_cache[key] = {"error": _err(e)}
    out["bf16"] = dict(bf16_cache[key])
    bank = case.ensure_bank()
    for path in ("gemm", "dequant"):
        try:
            r = {"us": graph_us(lambda p, path=path: forge_call(p, case.x, path), bank, reps)}
            r["err_abs"], r["err_rel"] = errors(forge_call(case.qw0, case.x, path), case.ref)
            out[f"forge_{path}"] = r
        except Exception as e:
            out[f"forge_{path}"] = {"error": _err(e)}
    return out


def extra_baselines(row: dict, case: Case, wb16: torch.Tensor, reps: int) -> None:
    """Eager (launch overhead included) and L2-hot timings of bf16 and Forge's gemm path, run while no compile
    worker competes for the CPU."""
    try:
        bank = bf16_bank(wb16)
        row["bf16"]["eager_us"] = time_eager(lambda p: F.linear(case.x, p), bank, reps)
        row["bf16"]["hot_us"] = graph_us(lambda p: F.linear(case.x, p), [wb16] * len(bank), reps)
        del bank
        qbank = case.ensure_bank()
        if "us" in row.get("forge_gemm", {}):
            row["forge_gemm"]["eager_us"] = time_eager(lambda p: forge_call(p, case.x, "gemm"), qbank, reps)
            row["forge_gemm"]["hot_us"] = graph_us(
                lambda p: forge_call(p, case.x, "gemm"), [case.qw0] * len(qbank), reps
            )
    except Exception as e:
        row["extra_baselines_error"] = _err(e)


def best_of(results, n: int = 1) -> list[dict]:
    ok = [r for r in results if "us" in r]
    return sorted(ok, key=lambda r: r["us"])[:n]


def sweep(args) -> dict:
    dev = torch.device(args.device)
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(dev)
    sms = props.multi_processor_count
    clock = Clock(args.budget_s)
    schemes = [s for s in args.schemes.split(",") if s]
    shapes = [s for s in args.shapes.split(",") if s]
    m0 = args.m
    compiler = Compiler(args.jobs)
    out: dict = {
        "probe": "gemm2",
        "device": props.name,
        "sms": sms,
        "l2_bytes": props.L2_cache_size,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "m": m0,
        "schemes": schemes,
        "shapes": {s: list(SHAPES[s]) for s in shapes},
        "timing": "us: CUDA-graph replays over weight copies totalling 2x L2 (cold weights, no launch overhead); "
        "eager_us: the same calls launched from Python; hot_us: one weight copy, L2-resident",
        "cfg_keys": CFG_KEYS,
    }

    # Weights and cases at M = m0, built first (quantizing is fast on the GPU).
    cases: dict[tuple, Case] = {}
    wb16s: dict[tuple, torch.Tensor] = {}
    for shape in shapes:
        n, k = SHAPES[shape]
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        for scheme in schemes:
            qw = quantize(w, scheme)
            wref = dequantized(qw)
            wb16s[(shape, scheme)] = wref.to(torch.bfloat16)
            cases[(shape, scheme)] = Case(shape, scheme, w, qw, wref, m0)

    # Stage A: every variant at one config per shape. Compile in the pool while the baselines run here.
    stage_a: dict[tuple, list[tuple[Variant, Cfg]]] = {}
    tasks = []
    for (shape, scheme), case in cases.items():
        qw = case.qw0
        cfg = default_cfg(m0, case.n, case.k, qw.group, sms)
        stage_a[(shape, scheme)] = [(v, cfg) for v in variants(qw.bits) if not valid(qw, v, cfg)]
        for v, c in stage_a[(shape, scheme)]:
            tasks.append(Launch(qw, m0, v, c, dev).compile_task(qw, case.x))
    t0 = time.perf_counter()
    # Forge's kernels (every M this run times) first: they run on the GPU, so the timing waits for them.
    ms_all = [m0] + [int(v) for v in args.extra_m.split(",") if v and int(v) != m0]
    forge_tasks = [(scheme, *SHAPES[shape], m) for m in ms_all for shape in shapes for scheme in schemes]
    compiler.submit(forge_tasks, fn=_warm_forge, key=lambda t: ("forge", t))
    compiler.submit(tasks)
    for t in forge_tasks:
        compiler.ready(t, key=lambda t: ("forge", t))
    secs = out["seconds_by_stage"] = {"forge_warm": round(time.perf_counter() - t0, 1)}
    t0 = time.perf_counter()
    bf16_cache: dict = {}
    base: dict[tuple, dict] = {}
    for key, case in cases.items():
        if clock.ok(f"baselines {key}", 30):
            base[key] = baselines(case, wb16s[key], args.reps, bf16_cache)
            case.free()
    secs["baselines"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()

    screen: dict[str, dict[str, dict[str, float | str]]] = {s: {} for s in schemes}
    for (shape, scheme), case in cases.items():
        for v, cfg in stage_a[(shape, scheme)]:
            if not clock.ok(f"stage A {shape} {scheme} {v.name}", 40):
                break
            r = measure_new(case, v, cfg, args.reps, compiler=compiler)
            screen[scheme].setdefault(v.name, {})[shape] = round(r["us"], 3) if "us" in r else r.get("error", "?")
        case.free()
    secs["stage_a"] = round(time.perf_counter() - t0, 1)
    out["stage_a"] = {
        "config": "default_cfg: BLOCK_M covering M, BLOCK_N 64, BLOCK_K 128 (64 for K=576), 4 warps, "
        "3 stages, the split filling the SMs (fixup)",
        "us": screen,
    }

    # The two best variants per scheme: geometric mean over shapes of time / that shape's best time.
    chosen: dict[str, list[Variant]] = {}
    for scheme in schemes:
        best_shape: dict[str, float] = {}
        for per in screen[scheme].values():
            for shape, us in per.items():
                if isinstance(us, float):
                    best_shape[shape] = min(best_shape.get(shape, us), us)
        scores = []
        for name, per in screen[scheme].items():
            if not best_shape:
                break
            logs = [
                math.log((per[s] if isinstance(per.get(s), float) else 10 * best_shape[s]) / best_shape[s])
                for s in best_shape
            ]
            scores.append((math.exp(sum(logs) / len(logs)), name))
        scores.sort()
        chosen[scheme] = [Variant(*name.split("/")) for _, name in scores[: args.top_variants]]
    out["chosen_variants"] = {s: [v.name for v in vs] for s, vs in chosen.items()}

    # Stage B: the launch grid for the chosen variants, every shape; compiled in the order it is timed.
    tasks = []
    for (_shape, scheme), case in cases.items():
        for cfg in grid_cfgs(m0, case.n, case.k, sms):
            for v in chosen[scheme]:
                if not valid(case.qw0, v, cfg):
                    tasks.append(Launch(case.qw0, m0, v, cfg, dev).compile_task(case.qw0, case.x))
    compiler.submit(tasks)
    t0 = time.perf_counter()
    reserve = 45.0  # for the best configs' extra timings and stage C
    for i, ((shape, scheme), case) in enumerate(cases.items()):
        # An equal share of what is left for each case still to sweep, not counting waits for compiles (which fall
        # on the first cases), so a short budget trims every case's tail rather than whole cases.
        start, waited = time.perf_counter(), compiler.seconds
        share = (clock.left() - reserve) / (len(cases) - i)
        cut = 0
        for cfg in grid_cfgs(m0, case.n, case.k, sms):
            for v in chosen[scheme]:
                spent = time.perf_counter() - start - (compiler.seconds - waited)
                if spent < share and clock.left() > reserve / 2:
                    measure_new(case, v, cfg, args.reps, compiler=compiler)
                else:
                    cut += 1
        if cut:
            clock.skipped.append(f"stage B {shape} {scheme}: {cut} (variant, config) pairs past its time share")
        # Refine the top 3: the splits around the best one.
        for r in best_of(case.results.values(), 3):
            v, c = Variant(*r["variant"].split("/")), cfg_from(r["cfg"])
            for s in (c.split // 2, c.split * 2, c.split * 4):
                if 1 <= s <= min(16, triton.cdiv(case.k, c.bk)) and clock.ok(f"refine {shape} {scheme}", 50):
                    measure_new(case, v, replace(c, split=s), args.reps)
        case.free()
    secs["stage_b"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()

    # Per case: the best, timed again with eager/hot timings and kernel info, and its split-K "reduce" twin.
    rows = []
    for (shape, scheme), case in cases.items():
        row: dict = {
            "shape": shape,
            "n": case.n,
            "k": case.k,
            "m": m0,
            "scheme": scheme,
            **base.get((shape, scheme), {}),
        }
        top = best_of(case.results.values(), 5)
        if top and clock.ok(f"best {shape} {scheme}", 20):
            b = top[0]
            v, c = Variant(*b["variant"].split("/")), cfg_from(b["cfg"])
            row["new"] = measure_new(case, v, c, args.reps, extra=True)
            extra_baselines(row, case, wb16s[(shape, scheme)], args.reps)
            if c.split > 1:
                red = measure_new(case, v, replace(c, fixup=False), args.reps)
                row["new_split_reduce_us"] = red.get("us", red.get("error"))
            row["top"] = [[r["us"], r["variant"], *r["cfg"]] for r in top]
            per_variant = {}
            for r in case.results.values():
                if "us" in r and r["us"] < per_variant.get(r["variant"], (math.inf,))[0]:
                    per_variant[r["variant"]] = (round(r["us"], 3), r["cfg"])
            row["best_per_variant"] = {k: [u, *c] for k, (u, c) in sorted(per_variant.items(), key=lambda i: i[1][0])}
        _ratios(row)
        fails = [[r["variant"], *r["cfg"], r["error"]] for r in case.results.values() if "error" in r]
        row["failed"] = fails[:12]
        row["n_failed"], row["n_timed"] = len(fails), sum("us" in r for r in case.results.values())
        rows.append(row)
        case.free()
    out["rows"] = rows
    secs["best"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()

    # Stage C: smaller M with each chosen variant's best M = m0 config, BLOCK_M = M, at its split and at the split
    # that fills the SMs at this M.
    extra_rows = []
    ms = [int(v) for v in args.extra_m.split(",") if v and int(v) != m0]
    tasks, plans = [], []
    for m in ms:
        for (shape, scheme), case0 in cases.items():
            qw, bm = case0.qw0, block_m(m)
            pairs = []
            for v in chosen.get(scheme, []):
                got = best_of([r for r in case0.results.values() if r["variant"] == v.name])
                if got:
                    c = cfg_from(got[0]["cfg"])
                    split = auto_split(m, case0.n, case0.k, bm, c.bn, c.bk, sms)
                    pairs += [
                        (v, cf)
                        for cf in sorted({replace(c, bm=bm), replace(c, bm=bm, split=split)}, key=lambda c: c.split)
                    ]
            if pairs:
                case = Case(shape, scheme, wb16s[(shape, scheme)], qw, dequantized(qw), m)
                plans.append((case, pairs))
                tasks += [Launch(qw, m, v, cf, dev).compile_task(qw, case.x) for v, cf in pairs]
    compiler.submit(tasks)
    for case, _ in plans:  # baselines here while the pool compiles
        if clock.ok(f"stage C baselines {case.shape} {case.scheme} m={case.m}", 15):
            base[(case.shape, case.scheme, case.m)] = baselines(
                case, wb16s[(case.shape, case.scheme)], args.reps, bf16_cache
            )
            case.free()
    for case, pairs in plans:
        key = (case.shape, case.scheme, case.m)
        if key not in base or not clock.ok(f"stage C {key}", 5):
            continue
        row = {"shape": case.shape, "n": case.n, "k": case.k, "m": case.m, "scheme": case.scheme, **base[key]}
        tried = [measure_new(case, v, cf, args.reps, compiler=compiler) for v, cf in pairs]
        top = best_of(tried)
        row["new"] = top[0] if top else {"error": [r.get("error") for r in tried]}
        row["tried"] = [[r.get("us", r.get("error")), r["variant"], *r["cfg"]] for r in tried]
        _ratios(row)
        extra_rows.append(row)
        case.free()
    out["rows_small_m"] = extra_rows
    secs["stage_c"] = round(time.perf_counter() - t0, 1)
    out["summary"] = [
        [
            r["shape"],
            r["scheme"],
            r["m"],
            *(_us(r.get(k)) for k in ("bf16", "forge_gemm", "forge_dequant", "new")),
            r.get("bf16_over_new"),
            (r.get("new") or {}).get("variant"),
        ]
        for r in rows + extra_rows
    ]
    out["summary_keys"] = [
        "shape",
        "scheme",
        "m",
        "bf16_us",
        "forge_gemm_us",
        "forge_dequant_us",
        "new_us",
        "bf16_over_new",
        "new_variant",
    ]
    out["compile"] = {
        "jobs": args.jobs,
        "kernels_submitted": len(compiler.futures),
        "seconds_waited": round(compiler.seconds, 1),
        "errors": compiler.errors,
    }
    out["skipped"] = clock.skipped[:50]
    out["n_skipped"] = len(clock.skipped)
    out["seconds"] = round(time.perf_counter() - clock.t0, 1)
    compiler.close()
    return out


def _us(r) -> float | None:
    return round(r["us"], 3) if isinstance(r, dict) and "us" in r else None


def _ratios(row: dict) -> None:
    new, bf = _us(row.get("new")), _us(row.get("bf16"))
    if new and bf:
        row["bf16_over_new"] = round(bf / new, 3)
        for p in ("forge_gemm", "forge_dequant"):
            if _us(row.get(p)):
                row[f"{p}_over_new"] = round(_us(row[p]) / new, 3)


# ----------------------------------------------------------------------------------------------------
# --check: correctness of every variant on small shapes (Triton's interpreter on a CPU)
# ----------------------------------------------------------------------------------------------------


def check(args) -> dict:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    # (M, N, K, config base): even tiles; ragged M, N and K (masked last K chunk).
    shapes = [(16, 64, 256, Cfg(16, 32, 64)), (13, 80, 192, Cfg(16, 32, 128))]
    results, failures = [], []
    forge_ok = {}
    for scheme in [s for s in args.schemes.split(",") if s] or list(SCHEMES):
        for si, (m, n, k, base_cfg) in enumerate(shapes):
            w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
            qw = quantize(w, scheme)
            wref = dequantized(qw)
            case = Case(f"check{si}", scheme, w, qw, wref, m)
            if si == 0:  # the reference is what Forge's own kernel computes (the layouts are read alike)
                try:
                    forge_ok[scheme] = errors(forge_call(qw, case.x, "gemm"), case.ref)[1]
                except Exception as e:
                    forge_ok[scheme] = _err(e)
            bk = max(base_cfg.bk, qw.group)
            # split 1, split 2 with the in-kernel fixup, split 2 with the reduce kernel (K = 192, BLOCK_K 128: a
            # partial last chunk in split 1 or the second split)
            cfgs = [
                replace(base_cfg, bk=bk),
                replace(base_cfg, bk=bk, split=2),
                replace(base_cfg, bk=bk, split=2, fixup=False),
            ]
            for v in variants(qw.bits):
                for cfg in cfgs:
                    why = valid(qw, v, cfg)
                    if why:
                        continue
                    try:
                        launch = Launch(qw, m, v, cfg, dev)
                        ea, er = errors(launch(case.x, qw), case.ref)
                        if launch.split > 1 and cfg.fixup:  # the counters must have reset: a second call agrees
                            ea2, er2 = errors(launch(case.x, qw), case.ref)
                            ea, er = max(ea, ea2), max(er, er2)
                        ok = er < 1e-2
                        results.append([scheme, f"{m}x{n}x{k}", v.name, *cfg.short(), launch.split, round(er, 5), ok])
                        if not ok:
                            failures.append(results[-1])
                    except Exception as e:
                        failures.append([scheme, f"{m}x{n}x{k}", v.name, *cfg.short(), _err(e)])
                        if args.verbose:
                            traceback.print_exc()
    return {
        "probe": "gemm2 --check",
        "device": str(dev),
        "interpreter": INTERPRET,
        "cases": len(results) + sum(1 for f in failures if isinstance(f[-1], str)),
        "passed": sum(1 for r in results if r[-1]),
        "failures": failures,
        "forge_gemm_vs_reference_rel_err": forge_ok,
        "interpreter_notes": "Triton's interpreter truncates fp32 -> bf16 (the GPU rounds to nearest), so variants "
        "that round a dequantized weight to bf16 show ~2.5x the bf16 floor here (Forge's own gemm likewise); it "
        "computes bf16 arithmetic on raw integers (the bf16-dequant path runs in fp32 here) and converts int8 -> "
        "bf16 wrongly (int8 cvt goes through fp32 here); dots take fp32 operands here"
        if INTERPRET
        else None,
        "max_rel_err": max((r[-2] for r in results), default=None),
        "result_keys": ["scheme", "MxNxK", "variant", *CFG_KEYS, "splits_run", "rel_err", "ok"],
        "results": results if args.verbose else results[:6],
        "seconds": round(time.perf_counter() - t0, 1),
        "ok": not failures and bool(results),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="correctness of every variant on small shapes, then exit")
    p.add_argument("--budget-s", type=float, default=230.0, help="later stages are cut past this many seconds")
    p.add_argument("--schemes", default=None, help=f"comma-separated, of {', '.join(SCHEMES)}")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--m", type=int, default=64, help="rows of x for the sweep (default 64)")
    p.add_argument("--extra-m", default="16,32", help="rows for the best config only, comma-separated ('' none)")
    p.add_argument("--reps", type=int, default=10, help="graph replays per timing")
    p.add_argument("--top-variants", type=int, default=2, help="variants per scheme taken to the config grid")
    p.add_argument("--jobs", type=int, default=min(14, max(1, (os.cpu_count() or 2) - 2)), help="compile processes")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # tests of the driver logic only
    args = p.parse_args()
    if args.schemes is None:
        args.schemes = ",".join(SCHEMES) if args.check else ",".join(DEFAULT_SCHEMES)
    if args.check:
        out = check(args)
    else:
        if not torch.cuda.is_available() or INTERPRET:
            sys.exit("quant_gemm_probe.py needs an NVIDIA GPU without TRITON_INTERPRET (or --check)")
        out = sweep(args)
    text = json.dumps(out, indent=1)
    print(text)
    if os.environ.get("OUT"):
        os.makedirs(os.environ["OUT"], exist_ok=True)
        with open(
            os.path.join(os.environ["OUT"], "gemm2_check.json" if args.check else "quant_gemm_probe.json"), "w"
        ) as f:
            f.write(text + "\n")
    if args.check and not out["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
