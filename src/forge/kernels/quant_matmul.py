"""Forge's Triton kernels for weight-only quantized matmuls: dequant-GEMV, tiled dequant-GEMM, dequantize.

Decoding reads every weight once per step, so a weight stored in 4 or 8 bits is read 4 or 2 times faster
than bf16, if the matmul dequantizes on the fly instead of materialising a float weight. The kernels, which
:mod:`forge.kernels.quant_linear` chooses between by the rows of x (``path=``):

- ``"gemv_q16"`` and ``"gemv_q8"``: a dequant-GEMV for a few rows (decoding) with x rounded to int16 or int8 per
  group of 32, integer dot products (``dp2a``, ``dp4a``: :func:`~forge.kernels.quant_gemv.gemv_rounded`); weights they
  can't take get the exact ``"gemv"``.
- ``"gemv"``: the exact dequant-GEMV, in fp32 (:func:`~forge.kernels.quant_gemv.gemv_tile`; groups that are not
  a power of two: :func:`~forge.kernels.quant_gemv.gemv_words`).
- ``"gemm"``: a tiled dequant-GEMM (the seed's ``matmul_tiled``): weight tiles dequantized in registers, then
  ``tl.dot``.
- ``"mma"``: GEMMs for batches (:mod:`~forge.kernels.quant_gemm`) that dequantize each weight value straight into
  the tensor cores' 16-bit operand, for int8 per channel and int4 in GGUF's blocks with bf16 or fp16 x; other
  calls run the path it replaced (int4 ``"dequant"``, int8 ``"gemm"``).
- ``"cuda_mma"``: the same GEMMs in CUDA C++ compiled by NVRTC (:mod:`~forge.kernels.quant_cuda`), bf16 x, 1 to
  64 rows; calls it can't take run ``"mma"``.
- ``"dequant"``: the weight dequantized to x's dtype by a Triton kernel, then cuBLAS (long prefills).

Values become floats with an integer OR and one subtraction, never a conversion instruction. Layouts:

- int4: ``q`` uint8 (N, K/2), column 2j in the low nibble and 2j+1 in the high one (:func:`pack_int4`), or
  GGUF's blocks of 32 (``gguf_blocks=True``: byte b of a block holds columns b and b + 16); ``scale`` and
  ``minimum`` (N, K/g), any float dtype, strided views too, or tinygemm's (K/g, N', 2) ``[scale, zero]``.
- int8: ``q`` int8 or uint8 (N, K); ``scale`` (N,) per channel or (N, K/g) per group; ``minimum`` None or
  ``scale``'s shape.

and ``w[n, k] = q[n, k] * scale[n, k // g] + minimum[n, k // g]``; the group size is read off the shapes.
Accumulation is fp32; the output has x's dtype. Launch parameters depend on shapes alone (no autotuning,
no host sync, no allocation that depends on values), so the calls can be captured in CUDA graphs;
``config=`` overrides the heuristic choice. PyTorch's own quantized CUDA kernels (tinygemm, int8 through
cuBLAS) are in :mod:`forge.kernels.quant_tinygemm`; :func:`dequantize_int4` and :func:`dequantize_int8` (in
``reference``) are the pure-PyTorch twins the kernels are tested against.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from forge.kernels.attention_tiles import dot, dot_precision, sm_count, upcast
from forge.kernels.quant_cuda import cuda_mma_or_none
from forge.kernels.quant_gemm import MmaConfig, mma_linear
from forge.kernels.quant_gemv import as_float as _as_float
from forge.kernels.quant_gemv import gemv_rounded, gemv_tile, gemv_words
from forge.kernels.reference import dequantize_int4, dequantize_int8, pack_int4

__all__ = [
    "GEMV_MAX_M",
    "PATHS",
    "Config",
    "dequantize",
    "dequantize_int4",
    "dequantize_int8",
    "gemm_config",
    "gemv_config",
    "int4_linear",
    "int4_linear_sz",
    "int8_linear",
    "pack_int4",
]

#: Without ``path=``, up to this many rows of x run the GEMV kernel, more the GEMM.
GEMV_MAX_M = 16
#: The kernels a call can ask for with ``path=``.
PATHS = ("gemv", "gemv_q16", "gemv_q8", "gemm", "mma", "cuda_mma", "dequant")
#: The GEMV paths that round x to integers per group of 32: int16 (``gemv_q16``) or int8 (``gemv_q8``).
ROUNDED_GEMV = ("gemv_q16", "gemv_q8")
_FLOATS = (torch.bfloat16, torch.float16, torch.float32)
_GGUF_BLOCK = 32  # values in a GGUF block: 16 bytes of int4


class Config(NamedTuple):
    """Launch parameters of a Triton kernel here; ``block_m`` and ``stages`` only matter to the GEMM."""

    block_n: int
    block_k: int
    warps: int = 4
    grouped: bool = True  # GEMV: sum each group, then scale it (False: scale every element)
    block_m: int = 16
    stages: int = 3
    split_k: int = 1  # GEMM: programs along K, each summing every split_k-th step; fp32 partials summed after


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _unpack(word, BITS: tl.constexpr, SIGNED: tl.constexpr, Q_OFFSET: tl.constexpr):
    """int32 words (A, B) to their 32 // BITS values each, (A, B, 32 // BITS) fp32, minus Q_OFFSET.

    Value j of word w is nibble (or byte) j, little-endian: column (32 // BITS) * w + j of a plain layout.
    """
    shifts = BITS * tl.arange(0, 32 // BITS)
    v = (word[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    if SIGNED:  # an int8 byte b holds v + 128 as b ^ 0x80
        return _as_float(v ^ 0x80, 8388608.0 + 128.0 + Q_OFFSET)
    return _as_float(v, 8388608.0 + Q_OFFSET)


@triton.jit
def _weight_tile(
    W, S, Z, rn64, n_in, k0, K, stride_sn, stride_sg,
    BITS: tl.constexpr, SIGNED: tl.constexpr, Q_OFFSET: tl.constexpr, WORDS_IN: tl.constexpr, G: tl.constexpr,
    HAS_MIN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The (BLOCK_N, BLOCK_K) fp32 weights of rows rn64 from column k0 of a plain layout, each group's scale and
    minimum applied (G == 0 leaves the per-channel ones to the caller).

    WORDS_IN: W is read as int32 words, unpacked to (BLOCK_N, BLOCK_K / VALS, VALS) and flattened (needs G a
    multiple of VALS); else W is int8 bytes read one a value (any K and G).
    """
    VALS: tl.constexpr = 32 // BITS if WORDS_IN else 1
    WORDS: tl.constexpr = BLOCK_K // VALS
    w = k0 // VALS + tl.arange(0, WORDS)
    wmask = n_in[:, None] & (w < K // VALS)[None, :]
    raw = tl.load(W + rn64[:, None] * (K // VALS) + w[None, :], mask=wmask, other=0)  # (BLOCK_N, WORDS)
    q = raw.to(tl.float32)  # bytes: one value each
    if WORDS_IN:
        q = tl.reshape(_unpack(raw, BITS, SIGNED, Q_OFFSET), (BLOCK_N, BLOCK_K))
    if G > 0:  # one group per word: its scale broadcast over the word's values
        offs = rn64[:, None] * stride_sn + (w * VALS // G)[None, :] * stride_sg
        s = tl.load(S + offs, mask=wmask, other=0.0).to(tl.float32)
        q = tl.reshape(tl.reshape(q, (BLOCK_N, WORDS, VALS)) * s[:, :, None], (BLOCK_N, BLOCK_K))
        if HAS_MIN:
            z = tl.load(Z + offs, mask=wmask, other=0.0).to(tl.float32)
            q = tl.reshape(tl.reshape(q, (BLOCK_N, WORDS, VALS)) + z[:, :, None], (BLOCK_N, BLOCK_K))
    return q


@triton.jit
def _gguf_halves(
    W, S, Z, rn64, n_in, k0, K, stride_sn, stride_sg,
    Q_OFFSET: tl.constexpr, G: tl.constexpr, HAS_MIN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The weights of GGUF's int4 blocks (W: bytes) from column k0 as two (BLOCK_N, BLOCK_K / 2) fp32 tiles, scaled.

    Byte i of a block of 32 holds column i (low nibble) and i + 16 (high), so byte f of the tile's bytes is
    column :func:`_gguf_cols` (f) in the low tile and 16 past it in the high one: each half meets x in runs of
    16 contiguous columns, and neither needs a shuffle of registers. G divides BLOCK_K.
    """
    HALF: tl.constexpr = BLOCK_K // 2
    NG: tl.constexpr = BLOCK_K // G
    b = k0 // 2 + tl.arange(0, HALF)
    raw = tl.load(W + rn64[:, None] * (K // 2) + b[None, :], mask=n_in[:, None] & (b < K // 2)[None, :], other=0)
    raw = raw.to(tl.int32)
    lo = tl.reshape(_as_float(raw & 0xF, 8388608.0 + Q_OFFSET), (BLOCK_N, NG, G // 2))  # a group: G / 2 bytes
    hi = tl.reshape(_as_float(raw >> 4, 8388608.0 + Q_OFFSET), (BLOCK_N, NG, G // 2))
    g = k0 // G + tl.arange(0, NG)
    offs = rn64[:, None] * stride_sn + g[None, :] * stride_sg
    gmask = n_in[:, None] & (g < K // G)[None, :]
    s = tl.load(S + offs, mask=gmask, other=0.0).to(tl.float32)[:, :, None]
    lo, hi = lo * s, hi * s
    if HAS_MIN:
        z = tl.load(Z + offs, mask=gmask, other=0.0).to(tl.float32)[:, :, None]
        lo, hi = lo + z, hi + z
    return tl.reshape(lo, (BLOCK_N, HALF)), tl.reshape(hi, (BLOCK_N, HALF))


@triton.jit
def _gguf_cols(HALF: tl.constexpr):
    """The column (from the tile's first) of each byte's low nibble in GGUF's blocks: runs of 16, 32 apart."""
    f = tl.arange(0, HALF)
    return (f // 16) * 32 + f % 16


@triton.jit
def _gemm(
    X, W, S, Z, B, Y, M, N, K, stride_xm, stride_ym, stride_yk, stride_sn, stride_sg,
    BITS: tl.constexpr, SIGNED: tl.constexpr, Q_OFFSET: tl.constexpr, WORDS_IN: tl.constexpr, G: tl.constexpr,
    HAS_MIN: tl.constexpr, HAS_BIAS: tl.constexpr, GGUF: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """A (BLOCK_M, BLOCK_N) tile of x @ W.T: each (BLOCK_N, BLOCK_K) weight tile is dequantized in registers,
    then fed to tl.dot (GGUF: as two half tiles; W is then bytes, else words where WORDS_IN). Programs along
    axis 1 split K: split s sums steps s, s + splits, ... into its own (M, N) slice of Y, stride_yk apart (the
    bias in split 0's)."""
    pid_k, splits = tl.program_id(1), tl.num_programs(1)
    m_tiles = tl.cdiv(M, BLOCK_M)
    pid_m = tl.program_id(0) % m_tiles  # neighbouring programs share a weight tile
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (tl.program_id(0) // m_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_in, n_in = rm < M, rn < N
    rn64 = rn.to(tl.int64)
    x_rows = X + rm.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xacc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * splits):
        if GGUF:  # two dots of half the depth: the low nibbles' columns, then the high ones' (16 further on)
            lo, hi = _gguf_halves(
                W, S, Z, rn64, n_in, k0, K, stride_sn, stride_sg, Q_OFFSET, G, HAS_MIN, BLOCK_N, BLOCK_K
            )  # fmt: skip
            rk = k0 + _gguf_cols(BLOCK_K // 2)
            xmask = m_in[:, None] & (rk < K)[None, :]
            xv = tl.load(x_rows + rk[None, :], mask=xmask, other=0.0)
            acc = dot(xv, tl.trans(lo.to(xv.dtype)), acc, PREC, UPCAST)
            xv = tl.load(x_rows + 16 + rk[None, :], mask=xmask, other=0.0)
            acc = dot(xv, tl.trans(hi.to(xv.dtype)), acc, PREC, UPCAST)
        else:
            q = _weight_tile(
                W, S, Z, rn64, n_in, k0, K, stride_sn, stride_sg, BITS, SIGNED, Q_OFFSET, WORDS_IN, G, HAS_MIN,
                BLOCK_N, BLOCK_K,
            )  # fmt: skip
            rk = k0 + tl.arange(0, BLOCK_K)
            xv = tl.load(x_rows + rk[None, :], mask=m_in[:, None] & (rk < K)[None, :], other=0.0)
            acc = dot(xv, tl.trans(q.to(xv.dtype)), acc, PREC, UPCAST)
            if G == 0 and HAS_MIN:
                xacc += tl.sum(xv.to(tl.float32), axis=1)
    if G == 0:
        acc *= tl.load(S + rn64 * stride_sn, mask=n_in, other=0.0).to(tl.float32)[None, :]
        if HAS_MIN:
            acc += xacc[:, None] * tl.load(Z + rn64 * stride_sn, mask=n_in, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:  # noqa: SIM102 (a constexpr, then a runtime test)
        if pid_k == 0:
            acc += tl.load(B + rn, mask=n_in, other=0.0).to(tl.float32)[None, :]
    y = Y + pid_k.to(tl.int64) * stride_yk + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
    tl.store(y, acc.to(Y.dtype.element_ty), mask=m_in[:, None] & n_in[None, :])


@triton.jit
def _dequant(
    W, S, Z, OUT, N, K, stride_sn, stride_sg,
    BITS: tl.constexpr, SIGNED: tl.constexpr, Q_OFFSET: tl.constexpr, WORDS_IN: tl.constexpr, G: tl.constexpr,
    HAS_MIN: tl.constexpr, GGUF: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """A (BLOCK_N, BLOCK_K) tile of the float weight, written in OUT's dtype in column order."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = rn < N
    rn64 = rn.to(tl.int64)
    k0 = tl.program_id(1) * BLOCK_K
    rows = OUT + rn64[:, None] * K
    if GGUF:
        lo, hi = _gguf_halves(W, S, Z, rn64, n_in, k0, K, stride_sn, stride_sg, Q_OFFSET, G, HAS_MIN, BLOCK_N, BLOCK_K)
        cols = k0 + _gguf_cols(BLOCK_K // 2)
        mask = n_in[:, None] & (cols < K)[None, :]
        tl.store(rows + cols[None, :], lo.to(OUT.dtype.element_ty), mask=mask)
        tl.store(rows + 16 + cols[None, :], hi.to(OUT.dtype.element_ty), mask=mask)
    else:
        w = _weight_tile(
            W, S, Z, rn64, n_in, k0, K, stride_sn, stride_sg, BITS, SIGNED, Q_OFFSET, WORDS_IN, G, HAS_MIN,
            BLOCK_N, BLOCK_K,
        )  # fmt: skip
        if G == 0:
            w *= tl.load(S + rn64 * stride_sn, mask=n_in, other=0.0).to(tl.float32)[:, None]
            if HAS_MIN:
                w += tl.load(Z + rn64 * stride_sn, mask=n_in, other=0.0).to(tl.float32)[:, None]
        cols = k0 + tl.arange(0, BLOCK_K)
        tl.store(rows + cols[None, :], w.to(OUT.dtype.element_ty), mask=n_in[:, None] & (cols < K)[None, :])


# ----------------------------------------------------------------------------------------------------
# Launching
# ----------------------------------------------------------------------------------------------------


def _programs_target(device: torch.device) -> int:
    """About two programs per multiprocessor: enough loads in flight without a long tail."""
    return 2 * sm_count(device)


def gemv_config(
    m: int, n: int, k: int, bits: int, group: int, device: torch.device, *, rounded: bool = False
) -> Config:
    """The GEMV launch for m rows of x against an (n, k) weight, from a sweep of launch configs on an H200 (the 1B
    and 135M Llama shapes' linears, 36 configs each): whole rows of up to 2,048 values a step.

    ``rounded`` (:func:`~forge.kernels.quant_gemv.gemv_rounded`): blocks of 8 rows, 8 warps; where the rows give
    more than 8 programs per multiprocessor, half the step and 4 warps (an int8 per-channel weight: a quarter).
    Else (:func:`~forge.kernels.quant_gemv.gemv_tile`): blocks of 2 rows (4 for groups above 32), 2 warps.
    """
    step = min(2048, triton.next_power_of_2(k))
    if rounded:
        if triton.cdiv(n, 8) * m >= 4 * _programs_target(device):
            step = min(step, 512 if bits == 8 and group == 0 else 1024)
        return Config(block_n=8, block_k=max(step, group, 32), warps=8 if step >= 2048 else 4)
    if bits == 8 and k < 4096:
        step = min(step, 1024)
    return Config(block_n=4 if group > 32 else 2, block_k=max(step, group, 32 // bits), warps=2)


def gemm_config(m: int, n: int, k: int, *, itemsize: int = 2) -> Config:
    """The tiled GEMM launch, from a sweep at M = 64 on an H200 (``quant_gemm_sweep_NVIDIA_H200.json``: Llama-1B's
    linears, int4 in groups of 32 and int8 per channel, 24-36 launches each; the best for int8 per channel, which
    the path table sends here at batch 5-64, measured at 64 only): BLOCK_M covers the rows, up to 64; a weight at
    least 4x longer than wide (the MLP's down projection) splits K 4 ways, else its few tiles along N leave SMs
    idle (int8 down: 20.2 us against 32.7 unsplit); BLOCK_N 64 for such weights and wide ones (N >= 8192), else 32 (more
    programs; qkv: 10.5 us against 13.8 with the old 16); K steps of 256, 128 for wide weights and for fp32 x
    (``itemsize`` 4: three stages of its (64, 256) tiles would not fit in an SM's shared memory)."""
    block_m = min(64, max(16, triton.next_power_of_2(m)))
    split = 4 if k >= 4 * n else 1
    wide = n >= 8192
    block_n = 64 if split > 1 or wide else 32
    block_k = 128 if wide or itemsize > 2 else 256
    return Config(block_n=block_n, block_k=block_k, warps=4, block_m=block_m, stages=3, split_k=split)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _operands(
    q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None, bits: int, group: int, *, as_bytes: bool
) -> tuple[tuple[torch.Tensor, ...], dict[str, object], tuple[int, int]]:
    """The weight's pointer arguments, the flags they set and the scales' strides. W is read as int32 words
    where every group is whole words, unless ``as_bytes`` (GGUF's blocks in the GEMM); int8 of other widths is
    read a byte at a time."""
    q = q.contiguous()  # rows of q are dense; scale and minimum may be strided views, alike
    if q.data_ptr() % 4:  # read as int32 words, which must be aligned (never so for a buffer of its own)
        q = q.clone()
    if minimum is not None and minimum.stride() != scale.stride():
        scale, minimum = scale.contiguous(), minimum.contiguous()
    words = _whole_words(q.shape[1] * 8 // bits, group, bits) and not as_bytes
    strides = (scale.stride(0), scale.stride(1) if scale.dim() == 2 else 0)
    pointers = (q.view(torch.int32) if words else q, scale, minimum if minimum is not None else scale)
    flags = dict(BITS=bits, SIGNED=q.dtype == torch.int8, G=group, HAS_MIN=minimum is not None, WORDS_IN=words)
    return pointers, flags, strides


def _whole_words(k: int, group: int, bits: int) -> bool:
    """Whether rows and groups are whole int32 words (int4 always is, by :func:`_check`; int8 may not be)."""
    vals = 32 // bits
    return k % vals == 0 and group % vals == 0


def _launch(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group: int,
    config: Config | None,
    *,
    q_offset: int = 0,
    gguf: bool = False,
    path: str | None = None,
) -> torch.Tensor:
    n, k = q.shape[0], x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if path == "cuda_mma":  # quant_cuda's kernel where it takes the call, else the Triton "mma"
        y = cuda_mma_or_none(x2, q, scale, minimum, bias, bits=bits, gguf=gguf)
        if y is not None:
            return y.reshape(*x.shape[:-1], n)
        path = "mma"
    if path == "mma":  # quant_gemm's kernels where they take the weight, else the path they replaced
        cfg = None if config is None else MmaConfig(**{f: getattr(config, f) for f in MmaConfig._fields})
        y = mma_linear(x2, q, scale, minimum, bias, bits=bits, gguf=gguf, config=cfg)
        if y is not None:
            return y.reshape(*x.shape[:-1], n)
        path = "dequant" if bits == 4 else "gemm"
    if path == "dequant":
        w = _dequantize(q, scale, minimum, bits, group, x.dtype, q_offset, gguf)
        b = bias.to(x.dtype) if bias is not None else None
        return F.linear(x2, w, b).reshape(*x.shape[:-1], n)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*x.shape[:-1], n)
    gemv = (path in ("gemv", *ROUNDED_GEMV) or (path is None and m <= GEMV_MAX_M)) and _whole_words(k, group, bits)
    if config is not None:
        _check_config(config, bits, gemm=not gemv, gguf_group=group if gguf else 0)
        cfg = config
    elif gemv:
        cfg = gemv_config(m, n, k, bits, group, x.device, rounded=path in ROUNDED_GEMV)
    else:
        cfg = gemm_config(m, n, k, itemsize=x.element_size())
    # quant_gemv's tile kernel: groups of a power of two within a step, or one scale per output (else gemv_words)
    tile = gemv and (group == 0 or (_pow2(group) and cfg.block_k % group == 0))
    rounded = path in ROUNDED_GEMV and _rounded_fits(k, group, bits, gguf, cfg)
    (w_ptr, s_ptr, z_ptr), flags, strides = _operands(
        q, scale, minimum, bits, group, as_bytes=(gguf and not gemv) or (tile and not rounded)
    )  # fmt: skip
    words = flags.pop("WORDS_IN")
    args = (x2, w_ptr, s_ptr, z_ptr, bias.contiguous() if bias is not None else s_ptr, y)  # unused: any tensor
    flags.update(Q_OFFSET=q_offset, HAS_BIAS=bias is not None, GGUF=gguf)
    if rounded:
        gemv_rounded[(triton.cdiv(n, cfg.block_n), m)](
            *args, n, k, x2.stride(0), y.stride(0), *strides, **{f: v for f, v in flags.items() if f != "GGUF"},
            EVEN=n % cfg.block_n == 0 and k % cfg.block_k == 0, X16=path == "gemv_q16", EMULATE=x.device.type != "cuda",
            BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.warps,
        )  # fmt: skip
        return y.reshape(*x.shape[:-1], n)
    if tile:
        gemv_tile[(triton.cdiv(n, cfg.block_n), m)](
            *args, n, k, x2.stride(0), y.stride(0), *strides, **flags,
            EVEN=n % cfg.block_n == 0 and k % cfg.block_k == 0, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.warps,
        )  # fmt: skip
        return y.reshape(*x.shape[:-1], n)
    if gemv:
        grouped = cfg.grouped and _pow2(group) and cfg.block_k % group == 0
        gemv_words[(triton.cdiv(n, cfg.block_n), m)](
            *args, n, k, x2.stride(0), y.stride(0), *strides, **flags,
            GROUPED=grouped, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.warps,
        )  # fmt: skip
        return y.reshape(*x.shape[:-1], n)
    splits = max(1, min(cfg.split_k, triton.cdiv(k, cfg.block_k)))
    out = y if splits == 1 else torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), splits)
    _gemm[grid](
        *args[:-1], out, m, n, k, x2.stride(0), n, m * n, *strides, **flags, WORDS_IN=words,
        PREC=dot_precision(x.dtype), UPCAST=upcast(x.dtype), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, num_warps=cfg.warps, num_stages=cfg.stages,
    )  # fmt: skip
    if splits > 1:
        y.copy_(out.sum(0))
    return y.reshape(*x.shape[:-1], n)


def _rounded_fits(k: int, group: int, bits: int, gguf: bool, cfg: Config) -> bool:
    """Whether :func:`~forge.kernels.quant_gemv.gemv_rounded` (``gemv_q16``, ``gemv_q8``) takes this weight: int8,
    or int4 in GGUF's blocks, with x in whole groups of 32 and weight groups of a power of two from 32 that divide
    the step."""
    whole = group == 0 or (group % 32 == 0 and _pow2(group) and cfg.block_k % group == 0)
    return (bits == 8 or gguf) and k % 32 == 0 and cfg.block_k % 32 == 0 and whole


def _dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor | None,
    bits: int,
    group: int,
    dtype: torch.dtype,
    q_offset: int,
    gguf: bool,
) -> torch.Tensor:
    """The float weight by the _dequant kernel, 16 rows by 256 columns a program (group sizes divide 256)."""
    n, k = q.shape[0], q.shape[1] * 8 // bits
    out = torch.empty((n, k), dtype=dtype, device=q.device)
    if out.numel() == 0:
        return out
    (w_ptr, s_ptr, z_ptr), flags, strides = _operands(q, scale, minimum, bits, group, as_bytes=gguf)
    _dequant[(triton.cdiv(n, 16), triton.cdiv(k, 256))](
        w_ptr, s_ptr, z_ptr, out, n, k, *strides, **flags, Q_OFFSET=q_offset, GGUF=gguf, BLOCK_N=16, BLOCK_K=256,
    )  # fmt: skip
    return out


def _check_config(cfg: Config, bits: int, *, gemm: bool, gguf_group: int = 0) -> None:
    sizes = {"block_n": cfg.block_n, "block_k": cfg.block_k, "warps": cfg.warps}
    if gemm:
        sizes["block_m"] = cfg.block_m
    bad = {name: v for name, v in sizes.items() if not _pow2(v)}
    # tl.dot multiplies tiles of at least 16; the GEMV reads whole words; the GEMM's GGUF tiles are whole groups.
    least = max(gguf_group, 16) if gemm else 32 // bits
    if bad or (gemm and min(cfg.block_m, cfg.block_n) < 16) or cfg.block_k < least or cfg.split_k < 1:
        raise ValueError(
            f"bad launch config {cfg}: block sizes and warps are powers of two; the GEMM (more than {GEMV_MAX_M} "
            f"rows) needs block_m and block_n >= 16, and block_k >= {least} here; split_k >= 1"
        )


def _check(
    x: torch.Tensor,
    k: int,
    scale: torch.Tensor,
    minimum: torch.Tensor | None,
    what: str,
    bits: int,
    gguf: bool,
    path: str | None = None,
) -> int:
    """The group size the shapes imply (0: one scale per output); ValueError on inconsistent shapes or paths."""
    if path is not None and path not in PATHS:
        raise ValueError(f"unknown quantized matmul path {path!r}; use one of {', '.join(PATHS)} (or None)")
    if x.dtype not in _FLOATS:
        raise ValueError(f"{what} takes bf16, fp16 or fp32 activations, got {x.dtype}")
    if x.shape[-1] != k:
        raise ValueError(f"{what}: x has {x.shape[-1]} features but the weight has {k} input columns")
    return _group_size(k, scale, minimum, what, bits, gguf)


def _group_size(k: int, scale: torch.Tensor, minimum: torch.Tensor | None, what: str, bits: int, gguf: bool) -> int:
    if minimum is not None and minimum.shape != scale.shape:
        raise ValueError(f"{what}: minimum {tuple(minimum.shape)} and scale {tuple(scale.shape)} differ in shape")
    # int4 is read as words of 8 values, one group per word; GGUF's blocks hold 32 values.
    unit = _GGUF_BLOCK if gguf else 8 if bits == 4 else 1
    if k % unit:
        blocks = " (GGUF's blocks of 32 values)" if gguf else ""
        raise ValueError(f"{what}: the input width {k} must be a multiple of {unit}{blocks}")
    if scale.dim() == 1:
        return 0
    groups = scale.shape[1]
    if groups == 0 or k % groups or (k // groups) % unit or (gguf and not (_pow2(k // groups) and k // groups <= 256)):
        kind = "a power of two from 32 to 256 (whole GGUF blocks)" if gguf else f"a multiple of {unit}"
        raise ValueError(f"{what}: {groups} scale groups do not split {k} input columns into groups of {kind}")
    return k // groups


def int4_linear(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    *,
    config: Config | None = None,
    gguf_blocks: bool = False,
    path: str | None = None,
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for int4 ``W = q * scale + minimum`` per group; q (N, K/2) uint8 from :func:`pack_int4`
    (or in GGUF's blocks of 32, ``gguf_blocks=True``, as :class:`~forge.core.quantize.Int4Weight` holds it).

    x (..., K); scale and minimum (N, K/g). ``path`` is one of :data:`PATHS` (None: by the rows of x).
    Returns (..., N) in x's dtype.
    """
    if q.dtype != torch.uint8 or q.dim() != 2 or scale.dim() != 2 or scale.shape[0] != q.shape[0]:
        raise ValueError(
            f"int4_linear takes q (N, K/2) uint8 and scale (N, K/g); got q {tuple(q.shape)} {q.dtype}, "
            f"scale {tuple(scale.shape)}"
        )
    group = _check(x, 2 * q.shape[1], scale, minimum, "int4_linear", 4, gguf_blocks, path)
    return _launch(x, q, scale, minimum, bias, 4, group, config, gguf=gguf_blocks, path=path)


def int4_linear_sz(
    x: torch.Tensor,
    q: torch.Tensor,
    scales_and_zeros: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: Config | None = None,
) -> torch.Tensor:
    """:func:`int4_linear` with tinygemm's scales: ``W = (q - 8) * scale + zero`` from (K/g, N', 2) ``[scale, zero]``.

    N' >= N (rows past N, padding, are not read): the buffer ``quant_tinygemm.scales_and_zeros_cuda`` makes,
    shared with tinygemm, so one copy of the scales serves both kernels.
    """
    n = q.shape[0]
    if scales_and_zeros.dim() != 3 or scales_and_zeros.shape[1] < n or scales_and_zeros.shape[2] != 2:
        raise ValueError(f"scales_and_zeros must be (K/g, >= {n}, 2), got {tuple(scales_and_zeros.shape)}")
    scale, zero = scales_and_zeros[:, :n, 0].t(), scales_and_zeros[:, :n, 1].t()  # (N, K/g) strided views
    if q.dtype != torch.uint8 or q.dim() != 2:
        raise ValueError(f"int4_linear_sz takes q (N, K/2) uint8; got q {tuple(q.shape)} {q.dtype}")
    group = _check(x, 2 * q.shape[1], scale, zero, "int4_linear_sz", 4, False)
    return _launch(x, q, scale, zero, bias, 4, group, config, q_offset=8)


def int8_linear(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    config: Config | None = None,
    path: str | None = None,
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for int8 ``W = q * scale (+ minimum)``, per output channel or per group.

    q (N, K) int8 or uint8; scale (N,) or (N, K/g), minimum None or scale's shape. ``path`` is one of
    :data:`PATHS` (None: by the rows of x). Returns (..., N) in x's dtype.
    """
    if q.dtype not in (torch.int8, torch.uint8) or q.dim() != 2 or scale.shape[0] != q.shape[0]:
        raise ValueError(
            f"int8_linear takes q (N, K) int8 and scale (N,) or (N, K/g); got q {tuple(q.shape)} {q.dtype}, "
            f"scale {tuple(scale.shape)}"
        )
    group = _check(x, q.shape[1], scale, minimum, "int8_linear", 8, False, path)
    return _launch(x, q, scale, minimum, bias, 8, group, config, path=path)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor | None,
    *,
    bits: int,
    dtype: torch.dtype = torch.bfloat16,
    gguf_blocks: bool = False,
) -> torch.Tensor:
    """The (N, K) float weight in ``dtype``, by the Triton kernel: what ``path="dequant"`` multiplies by."""
    if bits not in (4, 8):
        raise ValueError(f"dequantize takes bits=4 (q (N, K/2) uint8) or bits=8 (q (N, K) int8), got {bits}")
    if dtype not in _FLOATS:
        raise ValueError(f"dequantize writes bf16, fp16 or fp32, not {dtype}")
    group = _group_size(q.shape[1] * 8 // bits, scale, minimum, "dequantize", bits, gguf_blocks)
    return _dequantize(q, scale, minimum, bits, group, dtype, 0, gguf_blocks)
