"""Weight-only quantized matmuls on CUDA: tinygemm int4, int8 through cuBLAS, and Forge's Triton dequant kernels.

Decoding reads every weight once per step, so a weight stored in 4 or 8 bits is read 4 or 2 times faster
than bf16, if the matmul dequantizes on the fly instead of materialising a float weight. Three ways:

- **tinygemm** (PyTorch's ``aten._weight_int4pack_mm``): int4, group-wise ``[scale, zero]`` in bf16, a
  tensor-core tiled weight layout made by :func:`pack_int4_cuda`. bf16 activations only, out features a
  multiple of 8. :func:`scales_and_zeros_cuda` converts Forge's ``w = q * scale + min`` to its convention.
- **int8 through cuBLAS** (:func:`int8_linear_cuda`): ``F.linear(x, q.to(x.dtype)) * scale``, gpt-fast's
  int8 path; fast only where ``torch.compile`` fuses the cast into the matmul's operand load.
- **Forge's Triton kernels** (:func:`int4_linear`, :func:`int4_linear_sz`, :func:`int8_linear`): a
  dequant-GEMV for a few rows (M <= :data:`GEMV_MAX_M`, decoding) and a tiled dequant-GEMM with ``tl.dot``
  above it. Both read the weight as int32 words and turn values into floats with an integer OR and one
  subtraction, never a conversion instruction. Plain layouts:

  ====  ===========================================  =================================================
  int4  ``q``: uint8 (N, K/2), column 2j in the low   ``scale``, ``minimum``: (N, K/g), any float dtype,
        nibble, 2j+1 in the high one (:func:`pack_int4`)  strided views too; or tinygemm's (K/g, N', 2)
                                                        ``[scale, zero]`` (:func:`int4_linear_sz`)
  int8  ``q``: int8 or uint8 (N, K)                    ``scale``: (N,) per channel or (N, K/g) per group;
                                                        ``minimum``: None or the same shape as ``scale``
  ====  ===========================================  =================================================

  and ``w[n, k] = q[n, k] * scale[n, k // g] + minimum[n, k // g]``. The group size is read off the shapes.
  Accumulation is fp32; the output has x's dtype. Launch parameters depend on shapes alone (no autotuning,
  no host sync), so the calls can be captured in CUDA graphs; ``config=`` overrides the heuristic choice
  (``benchmarks/quant_gpu.py --sweep`` sweeps it).

:func:`dequantize_int4` and :func:`dequantize_int8` are the pure-PyTorch twins the kernels are tested against.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from forge.errors import ConfigError
from forge.kernels.attention_tiles import dot, dot_precision, upcast

__all__ = [
    "GEMV_MAX_M",
    "TINYGEMM_GROUP_SIZES",
    "Config",
    "dequantize_int4",
    "dequantize_int8",
    "gemm_config",
    "gemv_config",
    "int4_linear",
    "int4_linear_sz",
    "int4_linear_tinygemm",
    "int8_linear",
    "int8_linear_cuda",
    "pack_int4",
    "pack_int4_cuda",
    "scales_and_zeros_cuda",
    "tinygemm_inner_k_tiles",
    "tinygemm_supports",
]

#: Up to this many rows of x the Triton path runs the GEMV kernel (one program per row and block of outputs).
GEMV_MAX_M = 16
TINYGEMM_GROUP_SIZES = (32, 64, 128, 256)
_FLOATS = (torch.bfloat16, torch.float16, torch.float32)


class Config(NamedTuple):
    """Launch parameters of a Triton kernel here; ``block_m`` and ``stages`` only matter to the GEMM."""

    block_n: int
    block_k: int
    warps: int = 4
    grouped: bool = True  # GEMV: sum each group, then scale it (False: scale every element)
    block_m: int = 16
    stages: int = 3


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _as_float(v, OFFSET: tl.constexpr):
    """Small non-negative int32 values v as fp32 minus OFFSET without a conversion instruction (a quarter-rate
    op on NVIDIA GPUs, the bottleneck of a naive dequant-GEMV): 0x4B000000 | v is the float 2**23 + v."""
    return (v | 0x4B000000).to(tl.float32, bitcast=True) - OFFSET


@triton.jit
def _unpack(word, BITS: tl.constexpr, SIGNED: tl.constexpr, Q_OFFSET: tl.constexpr):
    """int32 words (A, B) to their 32 // BITS values each, (A, B, 32 // BITS) fp32, minus Q_OFFSET.

    Little-endian: value j of word w is column (32 // BITS) * w + j, so the last two axes flatten into k order.
    """
    shifts = BITS * tl.arange(0, 32 // BITS)
    v = (word[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    if SIGNED:  # an int8 byte b holds v + 128 as b ^ 0x80
        return _as_float(v ^ 0x80, 8388608.0 + 128.0 + Q_OFFSET)
    return _as_float(v, 8388608.0 + Q_OFFSET)


@triton.jit
def _word_value(word, j: tl.constexpr, BITS: tl.constexpr, SIGNED: tl.constexpr, Q_OFFSET: tl.constexpr):
    """Value j of each int32 word (column (32 // BITS) * w + j) as fp32, minus Q_OFFSET."""
    v = (word >> (BITS * j)) & ((1 << BITS) - 1)
    if SIGNED:
        return _as_float(v ^ 0x80, 8388608.0 + 128.0 + Q_OFFSET)
    return _as_float(v, 8388608.0 + Q_OFFSET)


@triton.jit
def _gemv(
    X, W, S, Z, B, Y, N, K, stride_xm, stride_ym, stride_sn, stride_sg,
    BITS: tl.constexpr, SIGNED: tl.constexpr, Q_OFFSET: tl.constexpr, G: tl.constexpr, HAS_MIN: tl.constexpr,
    HAS_BIAS: tl.constexpr, GROUPED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """BLOCK_N outputs of one row of x: y[n] = sum_k x[k] * ((q[n, k] - Q_OFFSET) * s[n, k // G] + z[n, k // G]).

    W is read as int32 words of 32 // BITS values; value j of every word meets x's columns VALS * w + j
    (a strided read of x, from L1: measured faster than unpacking words into a 3-D tile). G == 0: one scale
    (and minimum) per output, applied to the finished sums. GROUPED: each group's q.x is summed, then scaled
    once (G divides BLOCK_K); else each word is scaled (G is a multiple of the values in a word).
    """
    VALS: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // VALS  # words of a weight row per step
    NG: tl.constexpr = BLOCK_K // G if G > 0 else 1  # groups per step
    GW: tl.constexpr = G // VALS if G > 0 else 1  # words per group
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = rn < N
    rn64 = rn.to(tl.int64)
    x_row = X + tl.program_id(1).to(tl.int64) * stride_xm
    rows = W + rn64[:, None] * (K // VALS)
    acc = tl.zeros((BLOCK_N, NG if GROUPED else WORDS), dtype=tl.float32)  # GROUPED only with G > 0
    xacc = tl.zeros((WORDS,), dtype=tl.float32)  # sum of x: a per-channel minimum multiplies it
    for k0 in range(0, K, BLOCK_K):
        w = k0 // VALS + tl.arange(0, WORDS)
        w_in = w < K // VALS
        word = tl.load(rows + w[None, :], mask=n_in[:, None] & w_in[None, :], other=0)
        part = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)  # q.x within each word
        xs = tl.zeros((WORDS,), dtype=tl.float32)
        for j in tl.static_range(VALS):
            xj = tl.load(x_row + VALS * w + j, mask=w_in, other=0.0).to(tl.float32)
            part += _word_value(word, j, BITS, SIGNED, Q_OFFSET) * xj[None, :]
            xs += xj
        if G == 0:
            acc += part
            xacc += xs
        elif GROUPED:
            g = k0 // G + tl.arange(0, NG)
            gmask = n_in[:, None] & (g < K // G)[None, :]
            offs = rn64[:, None] * stride_sn + g[None, :] * stride_sg
            s = tl.load(S + offs, mask=gmask, other=0.0).to(tl.float32)
            acc += s * tl.sum(tl.reshape(part, (BLOCK_N, NG, GW)), axis=2)
            if HAS_MIN:
                z = tl.load(Z + offs, mask=gmask, other=0.0).to(tl.float32)
                acc += z * tl.sum(tl.reshape(xs, (NG, GW)), axis=1)[None, :]
        else:
            offs = rn64[:, None] * stride_sn + (w * VALS // G)[None, :] * stride_sg
            wmask = n_in[:, None] & w_in[None, :]
            acc += tl.load(S + offs, mask=wmask, other=0.0).to(tl.float32) * part
            if HAS_MIN:
                acc += tl.load(Z + offs, mask=wmask, other=0.0).to(tl.float32) * xs[None, :]
    y = tl.sum(acc, axis=1)
    if G == 0:
        y *= tl.load(S + rn64 * stride_sn, mask=n_in, other=0.0).to(tl.float32)
        if HAS_MIN:
            y += tl.load(Z + rn64 * stride_sn, mask=n_in, other=0.0).to(tl.float32) * tl.sum(xacc, axis=0)
    if HAS_BIAS:
        y += tl.load(B + rn, mask=n_in, other=0.0).to(tl.float32)
    tl.store(Y + tl.program_id(1).to(tl.int64) * stride_ym + rn, y.to(Y.dtype.element_ty), mask=n_in)


@triton.jit
def _gemm(
    X, W, S, Z, B, Y, M, N, K, stride_xm, stride_ym, stride_sn, stride_sg,
    BITS: tl.constexpr, SIGNED: tl.constexpr, Q_OFFSET: tl.constexpr, WORDS_IN: tl.constexpr, G: tl.constexpr,
    HAS_MIN: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """A (BLOCK_M, BLOCK_N) tile of x @ W.T: each (BLOCK_N, BLOCK_K) weight tile is dequantized in registers,
    then fed to one tl.dot.

    WORDS_IN: W is read as int32 words, unpacked to (BLOCK_N, BLOCK_K / VALS, VALS) and flattened (needs G a
    multiple of VALS); else W is int8 bytes read one a value (any K and G).
    """
    VALS: tl.constexpr = 32 // BITS if WORDS_IN else 1
    WORDS: tl.constexpr = BLOCK_K // VALS
    m_tiles = tl.cdiv(M, BLOCK_M)
    pid_m = tl.program_id(0) % m_tiles  # neighbouring programs share a weight tile
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (tl.program_id(0) // m_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_in, n_in = rm < M, rn < N
    rn64 = rn.to(tl.int64)
    x_rows = X + rm.to(tl.int64)[:, None] * stride_xm
    rows = W + rn64[:, None] * (K // VALS)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xacc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w = k0 // VALS + tl.arange(0, WORDS)
        wmask = n_in[:, None] & (w < K // VALS)[None, :]
        raw = tl.load(rows + w[None, :], mask=wmask, other=0)  # (BLOCK_N, WORDS)
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
        rk = k0 + tl.arange(0, BLOCK_K)
        xv = tl.load(x_rows + rk[None, :], mask=m_in[:, None] & (rk < K)[None, :], other=0.0)
        acc = dot(xv, tl.trans(q.to(xv.dtype)), acc, PREC, UPCAST)
        if G == 0 and HAS_MIN:
            xacc += tl.sum(xv.to(tl.float32), axis=1)
    if G == 0:
        acc *= tl.load(S + rn64 * stride_sn, mask=n_in, other=0.0).to(tl.float32)[None, :]
        if HAS_MIN:
            acc += xacc[:, None] * tl.load(Z + rn64 * stride_sn, mask=n_in, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(B + rn, mask=n_in, other=0.0).to(tl.float32)[None, :]
    y = Y + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
    tl.store(y, acc.to(Y.dtype.element_ty), mask=m_in[:, None] & n_in[None, :])


# ----------------------------------------------------------------------------------------------------
# Forge's Triton path
# ----------------------------------------------------------------------------------------------------


@functools.cache
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _programs_target(device: torch.device) -> int:
    """About two programs per multiprocessor: enough loads in flight without a long tail."""
    return 2 * (_sm_count(device.index) if device.type == "cuda" else 4)


def gemv_config(m: int, n: int, k: int, bits: int, group: int, device: torch.device) -> Config:
    """The GEMV launch for m rows of x against an (n, k) weight: the widest block of outputs (up to 32) that
    still gives every multiprocessor one and a half programs."""
    block_n = 32
    while block_n > 2 and triton.cdiv(n, block_n) * m < _programs_target(device) * 3 // 4:
        block_n //= 2
    # Measured on an H200 (benchmarks/quant_gpu.py --sweep): 1 KiB of each row a step for narrow blocks of rows,
    # 512 B for wide ones; eight warps for the widest steps.
    row_bytes = 1024 if block_n <= 8 else 512
    block_k = max(min(row_bytes * (8 // bits), triton.next_power_of_2(k)), 32 // bits)
    if _pow2(group):
        block_k = max(block_k, group)  # a whole group per step, so each is scaled once
    warps = 8 if bits == 4 and block_k >= 2048 else 4
    return Config(block_n=block_n, block_k=block_k, warps=warps, grouped=_pow2(group))


def gemm_config(m: int, n: int, k: int, bits: int, group: int, device: torch.device) -> Config:
    """The tiled GEMM launch: BLOCK_M covers up to 64 rows; BLOCK_N shrinks until the SMs are busy."""
    block_m = min(64, max(16, triton.next_power_of_2(m)))
    block_n = 128
    while block_n > 16 and triton.cdiv(m, block_m) * triton.cdiv(n, block_n) < _programs_target(device) // 2:
        block_n //= 2
    return Config(block_n=block_n, block_k=256 if bits == 4 else 128, warps=4, block_m=block_m, stages=3)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _launch(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group: int,
    config: Config | None,
    q_offset: int = 0,
) -> torch.Tensor:
    n, k = q.shape[0], x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*x.shape[:-1], n)
    q = q.contiguous()  # rows of q are dense; scale and minimum may be strided views, alike
    if q.data_ptr() % 4:  # read as int32 words below, which must be aligned
        q = q.clone()
    if minimum is not None and minimum.stride() != scale.stride():
        scale, minimum = scale.contiguous(), minimum.contiguous()
    vals = 32 // bits  # values per int32 word: int4 is always whole words (_check), int8 may not be
    words = k % vals == 0 and group % vals == 0
    gemv = m <= GEMV_MAX_M and words
    strides = (scale.stride(0), scale.stride(1) if scale.dim() == 2 else 0)
    args = (x2, q.view(torch.int32) if words else q, scale, minimum if minimum is not None else scale)
    args += (bias.contiguous() if bias is not None else scale, y)  # unused pointers: any tensor
    flags = dict(BITS=bits, SIGNED=q.dtype == torch.int8, Q_OFFSET=q_offset, G=group, HAS_MIN=minimum is not None)
    flags["HAS_BIAS"] = bias is not None
    if config is not None:
        _check_config(config, bits, gemm=not gemv)
    if gemv:
        cfg = config or gemv_config(m, n, k, bits, group, x.device)
        grouped = cfg.grouped and _pow2(group) and cfg.block_k % group == 0
        _gemv[(triton.cdiv(n, cfg.block_n), m)](
            *args, n, k, x2.stride(0), y.stride(0), *strides, **flags,
            GROUPED=grouped, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.warps,
        )  # fmt: skip
        return y.reshape(*x.shape[:-1], n)
    cfg = config or gemm_config(m, n, k, bits, group, x.device)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    _gemm[grid](
        *args, m, n, k, x2.stride(0), y.stride(0), *strides, **flags, WORDS_IN=words,
        PREC=dot_precision(x.dtype), UPCAST=upcast(x.dtype), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, num_warps=cfg.warps, num_stages=cfg.stages,
    )  # fmt: skip
    return y.reshape(*x.shape[:-1], n)


def _check_config(cfg: Config, bits: int, *, gemm: bool) -> None:
    sizes = {"block_n": cfg.block_n, "block_k": cfg.block_k, "warps": cfg.warps}
    if gemm:
        sizes["block_m"] = cfg.block_m
    bad = {name: v for name, v in sizes.items() if not _pow2(v)}
    # tl.dot multiplies tiles of at least 16; the GEMV reads whole words.
    least = 16 if gemm else 32 // bits
    if bad or (gemm and min(cfg.block_m, cfg.block_n) < 16) or cfg.block_k < least:
        raise ValueError(
            f"bad launch config {cfg}: block sizes and warps are powers of two; the GEMM (more than {GEMV_MAX_M} "
            f"rows) needs block_m and block_n >= 16, and block_k >= {least} here"
        )


def _check(x: torch.Tensor, k: int, scale: torch.Tensor, minimum: torch.Tensor | None, what: str, bits: int) -> int:
    """The group size the shapes imply (0: one scale per output); ValueError on inconsistent shapes."""
    if x.dtype not in _FLOATS:
        raise ValueError(f"{what} takes bf16, fp16 or fp32 activations, got {x.dtype}")
    if x.shape[-1] != k:
        raise ValueError(f"{what}: x has {x.shape[-1]} features but the weight has {k} input columns")
    if minimum is not None and minimum.shape != scale.shape:
        raise ValueError(f"{what}: minimum {tuple(minimum.shape)} and scale {tuple(scale.shape)} differ in shape")
    unit = 8 if bits == 4 else 1  # int4 is read as words of 8 values, one group per word
    if k % unit:
        raise ValueError(f"{what}: the input width {k} must be a multiple of {unit}")
    if scale.dim() == 1:
        return 0
    groups = scale.shape[1]
    if groups == 0 or k % groups or (k // groups) % unit:
        raise ValueError(
            f"{what}: {groups} scale groups do not split {k} input columns into groups of a multiple of {unit}"
        )
    return k // groups


def int4_linear(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    *,
    config: Config | None = None,
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for int4 ``W = q * scale + minimum`` per group; q (N, K/2) uint8 from :func:`pack_int4`.

    x (..., K); scale and minimum (N, K/g). Returns (..., N) in x's dtype.
    """
    if q.dtype != torch.uint8 or q.dim() != 2 or scale.dim() != 2 or scale.shape[0] != q.shape[0]:
        raise ValueError(
            f"int4_linear takes q (N, K/2) uint8 and scale (N, K/g); got q {tuple(q.shape)} {q.dtype}, "
            f"scale {tuple(scale.shape)}"
        )
    group = _check(x, 2 * q.shape[1], scale, minimum, "int4_linear", 4)
    return _launch(x, q, scale, minimum, bias, 4, group, config)


def int4_linear_sz(
    x: torch.Tensor,
    q: torch.Tensor,
    scales_and_zeros: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: Config | None = None,
) -> torch.Tensor:
    """:func:`int4_linear` with tinygemm's scales: ``W = (q - 8) * scale + zero`` from (K/g, N', 2) ``[scale, zero]``.

    N' >= N (rows past N, padding, are not read): the buffer :func:`scales_and_zeros_cuda` makes, shared with
    :func:`int4_linear_tinygemm`, so one copy of the scales serves both kernels.
    """
    n = q.shape[0]
    if scales_and_zeros.dim() != 3 or scales_and_zeros.shape[1] < n or scales_and_zeros.shape[2] != 2:
        raise ValueError(f"scales_and_zeros must be (K/g, >= {n}, 2), got {tuple(scales_and_zeros.shape)}")
    scale, zero = scales_and_zeros[:, :n, 0].t(), scales_and_zeros[:, :n, 1].t()  # (N, K/g) strided views
    if q.dtype != torch.uint8 or q.dim() != 2:
        raise ValueError(f"int4_linear_sz takes q (N, K/2) uint8; got q {tuple(q.shape)} {q.dtype}")
    group = _check(x, 2 * q.shape[1], scale, zero, "int4_linear_sz", 4)
    return _launch(x, q, scale, zero, bias, 4, group, config, q_offset=8)


def int8_linear(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    config: Config | None = None,
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for int8 ``W = q * scale (+ minimum)``, per output channel or per group.

    q (N, K) int8 or uint8; scale (N,) or (N, K/g), minimum None or scale's shape. Returns (..., N) in x's dtype.
    """
    if q.dtype not in (torch.int8, torch.uint8) or q.dim() != 2 or scale.shape[0] != q.shape[0]:
        raise ValueError(
            f"int8_linear takes q (N, K) int8 and scale (N,) or (N, K/g); got q {tuple(q.shape)} {q.dtype}, "
            f"scale {tuple(scale.shape)}"
        )
    group = _check(x, q.shape[1], scale, minimum, "int8_linear", 8)
    return _launch(x, q, scale, minimum, bias, 8, group, config)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) int4 values 0..15 (any integer dtype) as uint8 (N, K/2): column 2j low nibble, 2j+1 high."""
    if q.dim() != 2 or q.shape[1] % 2:
        raise ValueError(f"pack_int4 takes an (N, K) tensor with K even, got {tuple(q.shape)}")
    q = q.to(torch.int32)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None) -> torch.Tensor:
    """The fp32 (N, K) weight :func:`int4_linear` multiplies by: the kernels' pure-PyTorch twin."""
    b = q.to(torch.int32)
    values = torch.stack([b & 0xF, b >> 4], dim=-1).reshape(q.shape[0], -1)
    return _apply_scale(values, scale, minimum)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 (N, K) weight :func:`int8_linear` multiplies by: the kernels' pure-PyTorch twin."""
    return _apply_scale(q.to(torch.int32), scale, minimum)


def _apply_scale(values: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None) -> torch.Tensor:
    n, k = values.shape
    g = k if scale.dim() == 1 else k // scale.shape[1]
    s = scale.float().reshape(n, -1, 1)
    w = values.float().reshape(n, -1, g) * s
    if minimum is not None:
        w = w + minimum.float().reshape(n, -1, 1)
    return w.reshape(n, k)


# ----------------------------------------------------------------------------------------------------
# PyTorch's kernels: tinygemm int4 and int8 through cuBLAS
# ----------------------------------------------------------------------------------------------------


def tinygemm_inner_k_tiles(in_features: int) -> int | None:
    """The widest tinygemm k-tiling (8, 4 or 2 tiles of 16) that divides ``in_features``; None if none does."""
    return next((t for t in (8, 4, 2) if in_features % (16 * t) == 0), None)


def tinygemm_supports(out_features: int, in_features: int, group_size: int) -> bool:
    """Whether tinygemm takes an (out, in) int4 weight at this group size (else use :func:`int4_linear`)."""
    return (
        out_features % 8 == 0
        and group_size in TINYGEMM_GROUP_SIZES
        and in_features % group_size == 0
        and tinygemm_inner_k_tiles(in_features) is not None
    )


def pack_int4_cuda(q: torch.Tensor, inner_k_tiles: int | None = None) -> torch.Tensor:
    """q (N, K) int4 values 0..15 on a CUDA device in tinygemm's tiled layout, for :func:`int4_linear_tinygemm`.

    ``inner_k_tiles`` (2, 4 or 8; default: the widest that divides K) sets how many 16-column k-tiles sit
    together; the matmul reads it back from the packed shape. Since PyTorch 2.5 the op takes the values
    as uint8 (N, K/2), column 2j in the *high* nibble (the opposite of :func:`pack_int4`).
    """
    if q.dim() != 2:
        raise ConfigError(f"pack_int4_cuda takes an (out, in) tensor of int4 values, got shape {tuple(q.shape)}")
    n, k = q.shape
    tiles = inner_k_tiles if inner_k_tiles is not None else tinygemm_inner_k_tiles(k)
    if n % 8 or tiles not in (2, 4, 8) or k % (16 * tiles):
        raise ConfigError(
            f"tinygemm cannot take an int4 weight of shape ({n}, {k}) with inner_k_tiles={inner_k_tiles}: it needs "
            "out features a multiple of 8 and in features a multiple of 16 * inner_k_tiles (2, 4 or 8); use "
            "forge.kernels.quant_matmul.int4_linear for this layer",
            field="inner_k_tiles" if inner_k_tiles is not None else None,
        )
    if q.device.type != "cuda":
        raise ConfigError(
            f"pack_int4_cuda packs for tinygemm on CUDA; move q to a CUDA device first (it is on {q.device})"
        )
    v = q.to(torch.int32)
    byte = ((v[:, 0::2] << 4) | v[:, 1::2]).to(torch.uint8).contiguous()
    return torch.ops.aten._convert_weight_to_int4pack(byte, tiles)


def scales_and_zeros_cuda(
    scale: torch.Tensor, minimum: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Forge's ``w = q * scale + min`` (scale, min (N, K/g)) as tinygemm's (K/g, N, 2) ``[scale, zero]``.

    tinygemm computes ``w = (q - 8) * scale + zero``, so ``zero = min + 8 * scale`` (computed in fp32, then
    cast). The CUDA kernel reads them as bf16 whatever their dtype, so keep the default there.
    """
    if scale.shape != minimum.shape or scale.dim() != 2:
        raise ValueError(
            f"scale and minimum must both be (N, K/g), got {tuple(scale.shape)} and {tuple(minimum.shape)}"
        )
    s = scale.float()
    zero = minimum.float() + 8 * s
    return torch.stack([s, zero], dim=-1).transpose(0, 1).contiguous().to(dtype)


def int4_linear_tinygemm(
    x: torch.Tensor, packed: torch.Tensor, group_size: int, sz: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` through tinygemm: packed from :func:`pack_int4_cuda`, sz from :func:`scales_and_zeros_cuda`.

    The kernel takes bf16 activations: others are cast there and the result back. Returns (..., N).
    """
    x2 = x.reshape(-1, x.shape[-1])
    if x2.dtype != torch.bfloat16 or not x2.is_contiguous():
        x2 = x2.to(torch.bfloat16).contiguous()
    y = torch.ops.aten._weight_int4pack_mm(x2, packed, group_size, sz)
    y = y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])
    return y + bias if bias is not None else y


def int8_linear_cuda(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for per-channel int8 ``W = q * scale[:, None]``: gpt-fast's form.

    Eagerly this writes a float copy of the weight every call; under ``torch.compile`` Inductor fuses the
    cast into the matmul. Prefer :func:`int8_linear` where it measures faster.
    """
    y = F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)
    return y + bias if bias is not None else y
