"""Pure-PyTorch twins of every Triton kernel in ``forge.kernels``.

Each function here defines what its kernel must compute, in the same
signature; the kernel tests compare the two across shapes and dtypes, and
CPU/MPS run these (through ``forge.core.ops``) instead of the kernels.
Reductions are done in fp32 and results cast back to the input dtype, as the
kernels do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "add_layer_norm",
    "add_rms_norm",
    "attention",
    "decode_attention",
    "dequantize_int4",
    "dequantize_int8",
    "gelu",
    "linear_cross_entropy",
    "pack_int4",
    "quantized_linear",
    "rope",
    "round_x",
    "rounded_gemv_applies",
    "softmax",
    "swiglu",
]


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + delta) * weight, x + delta): a residual add fused with the next norm."""
    s = x if delta is None else x + delta
    sf = s.float()
    out = sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps)
    return (out * weight.float()).to(s.dtype), s


def add_layer_norm(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer_norm(x + delta), x + delta)."""
    s = x if delta is None else x + delta
    out = F.layer_norm(s.float(), (s.shape[-1],), weight.float(), None if bias is None else bias.float(), eps)
    return out.to(s.dtype), s


def gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation (GPT-2's)."""
    return F.gelu(x.float(), approximate="tanh").to(x.dtype)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, where h (..., 2F) holds [gate | up] along the last dim; returns (..., F)."""
    gate, up = h.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(h.dtype)


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return torch.softmax(x.float(), dim=dim).to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by cos/sin (B or 1, 1, T, D), "rotate half" layout; contiguous result."""
    half = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype).contiguous()


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float | None = None
) -> torch.Tensor:
    """Softmax attention; q (B, H, Tq, D), k and v (B, Hkv, Tk, D) with H a multiple of Hkv.

    ``causal`` aligns the last query with the last key (query i sees keys up to i + Tk - Tq).
    """
    H, Hkv = q.shape[1], k.shape[1]
    if Hkv != H:
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
    if causal:
        Tq, Tk = q.shape[2], k.shape[2]
        allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """W queries per row over a padded cache: q (B, H, W, D), k and v (B, Hkv, Tk, D), mask (B, W, Tk) bool, or
    (B, Tk) for all of them.

    True in ``mask`` means the key may be attended to; every query has at least one.
    """
    mask = mask[:, None] if mask.dim() == 2 else mask  # (B, 1 or W, Tk)
    H, Hkv = q.shape[1], k.shape[1]
    if Hkv != H:
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, W, Tk)
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype)


def linear_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100
) -> torch.Tensor:
    """Mean cross-entropy of ``x @ weight.T`` against ``targets``; x (N, d), weight (V, d), targets (N,).

    Rows whose target is ``ignore_index`` don't count. The logits are computed in fp32.
    """
    logits = F.linear(x, weight).float()  # (N, V)
    return F.cross_entropy(logits, targets, ignore_index=ignore_index)


# -- the quantized matmuls' weights (quant_matmul): each kernel computes x @ W.T with these W ---------------


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) int4 values 0..15 (any integer dtype) as uint8 (N, K/2): column 2j low nibble, 2j+1 high."""
    if q.dim() != 2 or q.shape[1] % 2:
        raise ValueError(f"pack_int4 takes an (N, K) tensor with K even, got {tuple(q.shape)}")
    q = q.to(torch.int32)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)


def dequantize_int4(
    q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None, *, gguf_blocks: bool = False
) -> torch.Tensor:
    """The fp32 (N, K) weight ``quant_matmul.int4_linear`` multiplies by: the kernels' pure-PyTorch twin."""
    b = q.to(torch.int32)
    if gguf_blocks:  # each block's 16 low nibbles, then its 16 high ones
        b = b.reshape(q.shape[0], -1, 16)
        values = torch.cat([b & 0xF, b >> 4], dim=-1).reshape(q.shape[0], -1)
    else:
        values = torch.stack([b & 0xF, b >> 4], dim=-1).reshape(q.shape[0], -1)
    return _apply_scale(values, scale, minimum)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 (N, K) weight ``quant_matmul.int8_linear`` multiplies by: the kernels' pure-PyTorch twin."""
    return _apply_scale(q.to(torch.int32), scale, minimum)


def round_x(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """x (..., K) rounded to int8 (``bits=8``, scale absmax / 127) or int16 (scale absmax / 32767) per group of 32
    columns, back in fp32: the x that the ``gemv_q8``/``gemv_q16`` paths multiply by (``quant_gemv.gemv_rounded``'s
    twin; K a multiple of 32)."""
    top = 127.0 if bits == 8 else 32767.0
    g = x.float().unflatten(-1, (-1, 32))
    amax = g.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, top / amax, torch.zeros_like(amax))
    return (torch.round(g * inv) * (amax / top)).flatten(-2)


def _apply_scale(values: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None) -> torch.Tensor:
    n, k = values.shape
    g = k if scale.dim() == 1 else k // scale.shape[1]
    s = scale.float().reshape(n, -1, 1)
    w = values.float().reshape(n, -1, g) * s
    if minimum is not None:
        w = w + minimum.float().reshape(n, -1, 1)
    return w.reshape(n, k)


def quantized_linear(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    scheme: str,
    gguf_blocks: bool = False,
    path: str | None = None,
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` with W dequantized in fp32, in x's dtype: what ``quant_linear.quantized_linear`` computes
    (``path`` only chooses its kernel)."""
    if scheme == "int4":
        w = dequantize_int4(q, scale, minimum, gguf_blocks=gguf_blocks)
    else:
        w = dequantize_int8(q, scale, minimum)
    rounded = path in ("gemv_q8", "gemv_q16") and rounded_gemv_applies(scheme, x.shape[-1], scale, gguf_blocks)
    xf = round_x(x, 8 if path == "gemv_q8" else 16) if rounded else x.float()
    return F.linear(xf, w, None if bias is None else bias.float()).to(x.dtype)


def rounded_gemv_applies(scheme: str, k: int, scale: torch.Tensor, gguf_blocks: bool) -> bool:
    """Whether the ``gemv_q8`` and ``gemv_q16`` paths round x for this weight (else they compute the exact GEMV):
    int8, or int4 in GGUF's blocks, K a multiple of 32, groups (if any) a power of two from 32."""
    group = 0 if scale.dim() == 1 else k // scale.shape[1]
    whole = group == 0 or (group >= 32 and group & (group - 1) == 0)
    return (scheme != "int4" or gguf_blocks) and k % 32 == 0 and whole
