"""Causal self-attention with optional RoPE and grouped-query attention."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from forge.config import ModelConfig
from forge.core import ops
from forge.core.kv_cache import CacheWrite, KVCache

__all__ = ["CausalSelfAttention", "apply_rope", "rope_tables"]


def rope_tables(
    head_dim: int, max_len: int, theta: float, scaling: dict[str, Any] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (max_len, head_dim) in the "rotate half" layout used by HF Llama.

    ``scaling`` is an HF ``rope_scaling`` dict: "linear" divides positions by
    ``factor``; "llama3" rescales the low frequencies as Llama 3.1 does.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])  # type: ignore[index]
    elif kind == "llama3":
        assert scaling is not None
        factor, low, high = (
            float(scaling["factor"]),
            float(scaling["low_freq_factor"]),
            float(scaling["high_freq_factor"]),
        )
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        medium = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        inv_freq = torch.where(medium, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)  # (T, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, D)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by cos/sin broadcastable to (B, 1, T, D)."""
    return ops.rope(x, cos, sin)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        # One fused projection for q, k and v: a single matmul instead of three.
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim, bias=cfg.attn_bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.cache: KVCache | None = None
        # QK-norm: RMSNorm over each head's queries and keys, one gain per head dim shared by the heads (Qwen3).
        self.qk_norm_eps = cfg.norm_eps
        self.q_norm = nn.Parameter(torch.ones(cfg.head_dim)) if cfg.qk_norm else None
        self.k_norm = nn.Parameter(torch.ones(cfg.head_dim)) if cfg.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        write: CacheWrite | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        qkv = ops.linear(x, self.qkv.weight, self.qkv.bias)  # (B, T, (H + 2Hkv) * D)
        v = qkv[..., (H + Hkv) * D :].view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        qk = qkv[..., : (H + Hkv) * D].view(B, T, H + Hkv, D).transpose(1, 2)  # (B, H + Hkv, T, D)
        if self.q_norm is not None and self.k_norm is not None:  # before RoPE, as Qwen3
            q, k = qk.split([H, Hkv], dim=1)
            q = ops.add_rms_norm(q, None, self.q_norm, self.qk_norm_eps)[0]
            k = ops.add_rms_norm(k, None, self.k_norm, self.qk_norm_eps)[0]
            qk = torch.cat([q, k], dim=1)
        fused = None
        if write is not None:
            assert self.cache is not None, "a CacheWrite needs a KV cache: Transformer.use_caches first"
            if rope is not None:  # RoPE and the cache write in one kernel, where the device has one
                fused = self.cache.write_rotated(write, qk, v, rope)
        if fused is not None:
            q, k, v = fused
        else:
            if rope is not None:  # queries and keys rotate together: one op for both
                qk = ops.rope(qk, *rope)
            q, k = qk.split([H, Hkv], dim=1)  # (B, H, T, D), (B, Hkv, T, D)
            if write is not None:
                k, v = self.cache.write(write, k, v)  # type: ignore[union-attr]
        # A prefill from 0 is causal; a decode step's one query attends under the caller's mask (or to all).
        causal = write is None or T > 1
        if self.training and self.dropout:
            y = nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout, enable_gqa=Hkv != H
            )
        else:
            y = ops.attention(q, k, v, causal=causal, mask=mask)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, H * D)
        return ops.linear(y, self.proj.weight, self.proj.bias)
