"""The tensor ops every model calls: the one place where kernels are chosen per device.

Each op has the plain PyTorch implementation here. A backend in ``forge.kernels``
can register a faster one for a device type; ``ops`` asks the registry first,
so models never know which kernel ran.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from forge import kernels

__all__ = ["attention", "gelu", "layer_norm", "linear", "matmul", "rms_norm", "silu", "softmax"]


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with broadcasting."""
    fast = kernels.lookup("matmul", a.device.type)
    return fast(a, b) if fast else torch.matmul(a, b)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias``; weight is (out, in) as in ``nn.Linear``."""
    return F.linear(x, weight, bias)


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    fast = kernels.lookup("softmax", x.device.type)
    return fast(x, dim) if fast else torch.softmax(x, dim=dim)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation, as GPT-2 was trained."""
    fast = kernels.lookup("gelu", x.device.type)
    return fast(x) if fast else F.gelu(x, approximate="tanh")


def silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    fast = kernels.lookup("layer_norm", x.device.type)
    if fast:
        return fast(x, weight, bias, eps)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    fast = kernels.lookup("rms_norm", x.device.type)
    if fast:
        return fast(x, weight, eps)
    # Normalise in fp32: the mean of squares loses precision in bf16.
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (out * weight.float()).to(x.dtype)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention; q is (B, H, Tq, D), k and v are (B, Hkv, Tk, D).

    ``mask`` is a boolean (B, 1, Tq, Tk) where True means "may attend"; it
    replaces ``causal``. Grouped-query attention is handled when Hkv < H.
    """
    fast = kernels.lookup("attention", q.device.type)
    if fast:
        return fast(q, k, v, causal=causal, mask=mask)
    if q.shape[2] == 1 and q.device.type == "cuda":  # on CPUs SDPA's fused kernel is faster (measured)
        return _decode_attention(q, k, v, mask)
    gqa = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, enable_gqa=gqa)


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """One query per row: a few plain kernels, no SDPA dispatch (with a mask, SDPA's slow path on a GPU).

    Grouped heads are handled by viewing the query heads as (Hkv, group), so keys
    and values are never repeated. q (B, H, 1, D); k, v (B, Hkv, Tk, D); mask (B, 1, 1, Tk).
    """
    B, H, _, D = q.shape
    Hkv = k.shape[1]
    qg = q.view(B, Hkv, H // Hkv, D)  # (B, Hkv, G, D)
    scores = torch.matmul(qg, k.transpose(-1, -2)) * (D**-0.5)  # (B, Hkv, G, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask.reshape(mask.shape[0], 1, 1, -1), float("-inf"))  # broadcasts over B
    weights = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    return torch.matmul(weights, v).view(B, H, 1, D)  # (B, H, 1, D)
