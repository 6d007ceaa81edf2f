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
    "gelu",
    "linear_cross_entropy",
    "rope",
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
    """One query per row over a padded cache: q (B, H, 1, D), k and v (B, Hkv, Tk, D), mask (B, Tk) bool.

    True in ``mask`` means the key may be attended to; every row has at least one.
    """
    H, Hkv = q.shape[1], k.shape[1]
    if Hkv != H:
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, 1, Tk)
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype)


def linear_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100
) -> torch.Tensor:
    """Mean cross-entropy of ``x @ weight.T`` against ``targets``; x (N, d), weight (V, d), targets (N,).

    Rows whose target is ``ignore_index`` don't count. The logits are computed in fp32.
    """
    logits = F.linear(x, weight).float()  # (N, V)
    return F.cross_entropy(logits, targets, ignore_index=ignore_index)
