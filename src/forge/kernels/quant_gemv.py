"""The dequant-GEMV of :mod:`forge.kernels.quant_matmul`: a few rows of x against an int4 or int8 weight.

Decoding one token reads every weight once and does two flops with each value, so the GEMV is bound by memory
only if unpacking a value costs a handful of instructions. Each program takes ``BLOCK_N`` weight rows and walks
K in steps of ``BLOCK_K`` values: it loads the rows' bytes as one (BLOCK_N, bytes) tile, splits each byte into
its low and high nibble (int4) and turns them into floats with an integer OR and one subtraction (never a
conversion instruction, a quarter-rate op), then multiplies them by the two vectors of x those nibbles meet.
x is loaded once a step for all the rows; each group's sum of q * x is scaled once.

Layouts (``w[n, k] = (q[n, k] - Q_OFFSET) * scale[n, k // g] + minimum[n, k // g]``):

- int4 plain (:func:`~forge.kernels.reference.pack_int4`): byte b of a row holds column 2b (low nibble) and
  2b + 1 (high).
- int4 GGUF (``GGUF``): byte i of a block of 32 holds column i (low) and i + 16 (high).
- int8: byte b is column b, int8 (``SIGNED``) or uint8.

Group sizes are powers of two that divide the step (``G == 0``: one scale per output, applied at the end).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["as_float", "gemv_rounded", "gemv_tile", "gemv_words"]


@triton.jit
def as_float(v, OFFSET: tl.constexpr):
    """Small non-negative int32 values v as fp32 minus OFFSET without a conversion instruction (a quarter-rate
    op on NVIDIA GPUs, the bottleneck of a naive dequant-GEMV): 0x4B000000 | v is the float 2**23 + v."""
    return (v | 0x4B000000).to(tl.float32, bitcast=True) - OFFSET


@triton.jit
def _scaled(
    sums, xsums, S, Z, rn64, n_in, k0, K, stride_sn, stride_sg,
    G: tl.constexpr, NG: tl.constexpr, HAS_MIN: tl.constexpr, EVEN: tl.constexpr,
):  # fmt: skip
    """The step's weight groups from column k0 applied: scale * (q . x) (sums, (BLOCK_N, NG)) plus, with minimums,
    minimum * (the group's sum of x) (xsums, (NG,))."""
    g = k0 // G + tl.arange(0, NG)
    offs = rn64[:, None] * stride_sn + g[None, :] * stride_sg
    mask = n_in[:, None] & (g < K // G)[None, :]
    s = tl.load(S + offs) if EVEN else tl.load(S + offs, mask=mask, other=0.0)
    out = s.to(tl.float32) * sums
    if HAS_MIN:
        z = tl.load(Z + offs) if EVEN else tl.load(Z + offs, mask=mask, other=0.0)
        out += z.to(tl.float32) * xsums[None, :]
    return out


@triton.jit
def _finish(
    acc, xacc, S, Z, B, Y, rn, rn64, n_in, stride_sn, stride_ym,
    G: tl.constexpr, HAS_MIN: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """Sum a program's partial products (acc) into its outputs; per-channel scales (and minimums, times the sum of
    x, xacc) and the bias applied; stored to its row of Y."""
    y = tl.sum(acc, axis=1)
    if G == 0:
        y *= tl.load(S + rn64 * stride_sn, mask=n_in, other=0.0).to(tl.float32)
        if HAS_MIN:
            y += tl.load(Z + rn64 * stride_sn, mask=n_in, other=0.0).to(tl.float32) * tl.sum(xacc, axis=0)
    if HAS_BIAS:
        y += tl.load(B + rn, mask=n_in, other=0.0).to(tl.float32)
    tl.store(Y + tl.program_id(1).to(tl.int64) * stride_ym + rn, y.to(Y.dtype.element_ty), mask=n_in)


@triton.jit
def gemv_tile(
    X, W, S, Z, B, Y, N, K, stride_xm, stride_ym, stride_sn, stride_sg,
    BITS: tl.constexpr, SIGNED: tl.constexpr, Q_OFFSET: tl.constexpr, G: tl.constexpr, HAS_MIN: tl.constexpr,
    HAS_BIAS: tl.constexpr, GGUF: tl.constexpr, EVEN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``BLOCK_N`` outputs of row ``program_id(1)`` of x. EVEN: N and K are whole blocks, so no load is masked."""
    PER: tl.constexpr = 8 // BITS  # values per byte
    BYTES: tl.constexpr = BLOCK_K // PER  # bytes of a weight row per step
    GB: tl.constexpr = G // PER if G > 0 else BYTES  # bytes per group
    NG: tl.constexpr = BLOCK_K // G if G > 0 else 1  # groups per step
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = rn < N
    rn64 = rn.to(tl.int64)
    x_row = X + tl.program_id(1).to(tl.int64) * stride_xm
    rows = W + rn64[:, None] * (K // PER)
    f = tl.arange(0, BYTES)
    acc = tl.zeros((BLOCK_N, NG if G > 0 else BYTES), dtype=tl.float32)
    xacc = tl.zeros((BYTES,), dtype=tl.float32)  # sum of x: a per-channel minimum multiplies it
    for k0 in range(0, K, BLOCK_K):
        b = k0 // PER + f
        if EVEN:
            raw = tl.load(rows + b[None, :])
        else:
            raw = tl.load(rows + b[None, :], mask=n_in[:, None] & (b < K // PER)[None, :], other=0)
        raw = raw.to(tl.int32)  # int8 sign-extends, uint8 zero-extends
        if BITS == 8:
            q = as_float(raw + 128 if SIGNED else raw, 8388608.0 + (128.0 if SIGNED else 0.0) + Q_OFFSET)
            cols = k0 + f
            if EVEN:
                xs = tl.load(x_row + cols).to(tl.float32)
            else:
                xs = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
            part = q * xs[None, :]
        else:
            lo = as_float(raw & 0xF, 8388608.0 + Q_OFFSET)
            hi = as_float(raw >> 4, 8388608.0 + Q_OFFSET)
            # The column each byte's low nibble meets; the high nibble's is 16 on (GGUF) or the next one.
            cols = k0 + ((f // 16) * 32 + f % 16 if GGUF else 2 * f)
            step: tl.constexpr = 16 if GGUF else 1
            if EVEN:
                xl = tl.load(x_row + cols).to(tl.float32)
                xh = tl.load(x_row + cols + step).to(tl.float32)
            else:
                xl = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
                xh = tl.load(x_row + cols + step, mask=cols + step < K, other=0.0).to(tl.float32)
            part = lo * xl[None, :] + hi * xh[None, :]
            xs = xl + xh
        if G > 0:
            sums = tl.sum(tl.reshape(part, (BLOCK_N, NG, GB)), axis=2)
            acc += _scaled(sums, tl.sum(tl.reshape(xs, (NG, GB)), axis=1), S, Z, rn64, n_in, k0, K, stride_sn,
                           stride_sg, G, NG, HAS_MIN, EVEN)  # fmt: skip
        else:
            acc += part
            xacc += xs
    _finish(acc, xacc, S, Z, B, Y, rn, rn64, n_in, stride_sn, stride_ym, G, HAS_MIN, HAS_BIAS)


@triton.jit
def _dp4a(a, b, c, A_SIGNED: tl.constexpr, EMULATE: tl.constexpr):
    """c + the dot product of the four bytes of int32 words a and b (b's signed; a's signed if A_SIGNED): one
    ``dp4a`` instruction each on NVIDIA GPUs, the same sum by shifts in Triton's interpreter (EMULATE)."""
    if EMULATE:
        for j in tl.static_range(4):
            bj = (b << (24 - 8 * j)) >> 24
            aj = (a << (24 - 8 * j)) >> 24 if A_SIGNED else (a >> (8 * j)) & 0xFF
            c += aj * bj
        return c
    if A_SIGNED:
        return tl.inline_asm_elementwise(
            "dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32, is_pure=True, pack=1
        )
    return tl.inline_asm_elementwise(
        "dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32, is_pure=True, pack=1
    )


@triton.jit
def _dp2a(a, b, c, HI: tl.constexpr, B_SIGNED: tl.constexpr, EMULATE: tl.constexpr):
    """c + the dot product of the two signed 16-bit halves of a with bytes 0-1 (2-3 if HI) of b (signed if
    B_SIGNED): one ``dp2a`` instruction each on NVIDIA GPUs, by shifts in Triton's interpreter (EMULATE)."""
    if EMULATE:
        for j in tl.static_range(2):
            aj = (a << (16 - 16 * j)) >> 16
            k: tl.constexpr = 2 * HI + j
            bj = (b << (24 - 8 * k)) >> 24 if B_SIGNED else (b >> (8 * k)) & 0xFF
            c += aj * bj
        return c
    if HI and B_SIGNED:
        asm: tl.constexpr = "dp2a.hi.s32.s32 $0, $1, $2, $3;"
    elif HI:
        asm: tl.constexpr = "dp2a.hi.s32.u32 $0, $1, $2, $3;"
    elif B_SIGNED:
        asm: tl.constexpr = "dp2a.lo.s32.s32 $0, $1, $2, $3;"
    else:
        asm: tl.constexpr = "dp2a.lo.s32.u32 $0, $1, $2, $3;"
    return tl.inline_asm_elementwise(asm, "=r,r,r,r", [a, b, c], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _round(xv, inv):
    """x times its group's inverse scale, rounded to the nearest integer (int32). Adding 1.5 * 2**23 rounds a float
    below 2**22 in magnitude to an integer in its low mantissa bits."""
    return (xv * inv + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000


@triton.jit
def _dot_words(word, r, acc, B_SIGNED: tl.constexpr, X16: tl.constexpr, EMULATE: tl.constexpr):
    """acc (N, W) + each word of weight bytes (N, W) dotted with its 4 rounded x values r (W, 4): int8 x packed
    into a word for one ``dp4a``, or int16 x packed in pairs for two ``dp2a``."""
    j = tl.arange(0, 4)[None, :]
    if X16:
        xlo = tl.sum(tl.where(j < 2, (r & 0xFFFF) << (16 * (j % 2)), 0), axis=1)  # x of bytes 0 and 1
        xhi = tl.sum(tl.where(j >= 2, (r & 0xFFFF) << (16 * (j % 2)), 0), axis=1)  # x of bytes 2 and 3
        acc = _dp2a(tl.broadcast_to(xlo[None, :], word.shape), word, acc, False, B_SIGNED, EMULATE)
        return _dp2a(tl.broadcast_to(xhi[None, :], word.shape), word, acc, True, B_SIGNED, EMULATE)
    xw = tl.sum((r & 0xFF) << (8 * j), axis=1)  # disjoint bytes: the sum is an OR
    return _dp4a(word, tl.broadcast_to(xw[None, :], word.shape), acc, B_SIGNED, EMULATE)


@triton.jit
def gemv_rounded(
    X, W, S, Z, B, Y, N, K, stride_xm, stride_ym, stride_sn, stride_sg,
    BITS: tl.constexpr, SIGNED: tl.constexpr, Q_OFFSET: tl.constexpr, G: tl.constexpr, HAS_MIN: tl.constexpr,
    HAS_BIAS: tl.constexpr, EVEN: tl.constexpr, X16: tl.constexpr, EMULATE: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """:func:`gemv_tile` with x rounded to integers per group of 32, so that the products are integer dot products:
    int16 (X16; scale absmax / 32767, two products a ``dp2a``), or int8 (scale absmax / 127, four a ``dp4a``, as
    llama.cpp's CUDA MMVQ does). W is read as int32 words: int4 in GGUF's blocks (word w of a block: columns
    4w..4w+3 in its low nibbles, 16 on in its high ones) or int8. G: 0 or a multiple of 32."""
    VALS: tl.constexpr = 32 // BITS  # values per word
    WORDS: tl.constexpr = BLOCK_K // VALS
    NX: tl.constexpr = BLOCK_K // 32  # groups of x per step
    WPX: tl.constexpr = 32 // VALS  # words per group of x
    NG: tl.constexpr = BLOCK_K // G if G > 0 else NX
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = rn < N
    rn64 = rn.to(tl.int64)
    x_row = X + tl.program_id(1).to(tl.int64) * stride_xm
    rows = W + rn64[:, None] * (K // VALS)
    wi = tl.arange(0, WORDS)
    j = tl.arange(0, 4)
    acc = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
    xacc = tl.zeros((NX,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w = k0 // VALS + wi
        if EVEN:
            word = tl.load(rows + w[None, :])
        else:
            word = tl.load(rows + w[None, :], mask=n_in[:, None] & (w < K // VALS)[None, :], other=0)
        if BITS == 4:
            cols = k0 + (wi // 4)[:, None] * 32 + (wi % 4)[:, None] * 4 + j[None, :]  # (WORDS, 4): low nibbles'
            if EVEN:
                xl = tl.load(x_row + cols).to(tl.float32)
                xh = tl.load(x_row + cols + 16).to(tl.float32)
            else:
                xl = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
                xh = tl.load(x_row + cols + 16, mask=cols + 16 < K, other=0.0).to(tl.float32)
            amax = tl.maximum(
                tl.max(tl.reshape(tl.abs(xl), (NX, 16)), axis=1), tl.max(tl.reshape(tl.abs(xh), (NX, 16)), axis=1)
            )  # fmt: skip
        else:
            cols = k0 + wi[:, None] * 4 + j[None, :]
            if EVEN:
                xl = tl.load(x_row + cols).to(tl.float32)
            else:
                xl = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
            amax = tl.max(tl.reshape(tl.abs(xl), (NX, 32)), axis=1)
        top: tl.constexpr = 32767.0 if X16 else 127.0
        inv = tl.where(amax > 0, top / amax, 0.0)  # (NX,)
        inv_w = tl.reshape(tl.broadcast_to(inv[:, None], (NX, WPX)), (WORDS,))[:, None]
        zero = tl.zeros((BLOCK_N, WORDS), dtype=tl.int32)
        r = _round(xl, inv_w)
        if BITS == 4:
            d = _dot_words(word & 0x0F0F0F0F, r, zero, False, X16, EMULATE)
            rh = _round(xh, inv_w)
            d = _dot_words((word >> 4) & 0x0F0F0F0F, rh, d, False, X16, EMULATE)
            r += rh
        else:
            d = _dot_words(word, r, zero, SIGNED, X16, EMULATE)
        # Each group of 32's q . x and sum of x, both of the rounded x: a minimum then meets the same x as q.
        xscale = amax / top
        dx = tl.sum(tl.reshape(d, (BLOCK_N, NX, WPX)), axis=2).to(tl.float32) * xscale[None, :]
        xsum = tl.sum(tl.reshape(r, (NX, 4 * WPX)), axis=1).to(tl.float32) * xscale
        if Q_OFFSET != 0:
            dx -= Q_OFFSET * xsum[None, :]
        if G > 0:
            sums = tl.sum(tl.reshape(dx, (BLOCK_N, NG, G // 32)), axis=2)
            acc += _scaled(sums, tl.sum(tl.reshape(xsum, (NG, G // 32)), axis=1), S, Z, rn64, n_in, k0, K,
                           stride_sn, stride_sg, G, NG, HAS_MIN, EVEN)  # fmt: skip
        else:
            acc += dx
            xacc += xsum
    _finish(acc, xacc, S, Z, B, Y, rn, rn64, n_in, stride_sn, stride_ym, G, HAS_MIN, HAS_BIAS)


@triton.jit
def _word_value(word, j: tl.constexpr, BITS: tl.constexpr, SIGNED: tl.constexpr, Q_OFFSET: tl.constexpr):
    """Value j of each int32 word as fp32, minus Q_OFFSET."""
    v = (word >> (BITS * j)) & ((1 << BITS) - 1)
    if SIGNED:
        return as_float(v ^ 0x80, 8388608.0 + 128.0 + Q_OFFSET)
    return as_float(v, 8388608.0 + Q_OFFSET)


@triton.jit
def gemv_words(
    X, W, S, Z, B, Y, N, K, stride_xm, stride_ym, stride_sn, stride_sg,
    BITS: tl.constexpr, SIGNED: tl.constexpr, Q_OFFSET: tl.constexpr, G: tl.constexpr, HAS_MIN: tl.constexpr,
    HAS_BIAS: tl.constexpr, GROUPED: tl.constexpr, GGUF: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """BLOCK_N outputs of one row of x: y[n] = sum_k x[k] * ((q[n, k] - Q_OFFSET) * s[n, k // G] + z[n, k // G]).

    W is read as int32 words of 32 // BITS values; value j of every word meets x's column of it (VALS * w + j,
    or GGUF's order): a strided read of x, from L1, measured faster than unpacking words into a 3-D tile.
    G == 0: one scale (and minimum) per output, applied to the finished sums. GROUPED: each group's q.x is
    summed, then scaled once (G divides BLOCK_K); else each word is scaled (G is a multiple of a word's values).
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
        # The word's first column of x; in GGUF's blocks value j is at + j // 2 (+ 16 for odd j).
        x_word = x_row + ((w // 4) * 32 + (w % 4) * 4 if GGUF else VALS * w)
        part = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)  # q.x within each word
        xs = tl.zeros((WORDS,), dtype=tl.float32)
        for j in tl.static_range(VALS):
            xj = tl.load(x_word + ((j % 2) * 16 + j // 2 if GGUF else j), mask=w_in, other=0.0).to(tl.float32)
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
    _finish(acc, xacc, S, Z, B, Y, rn, rn64, n_in, stride_sn, stride_ym, G, HAS_MIN, HAS_BIAS)
