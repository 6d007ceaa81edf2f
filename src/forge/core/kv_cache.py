"""A preallocated key/value cache, one per attention layer.

Buffers are allocated once for the whole generation (batch, heads, max_len,
head_dim), so decoding writes one slot per step and never copies or
recomputes the prefix.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["KVCache"]


class KVCache(nn.Module):
    """Keys and values of one layer for ``max_len`` positions.

    >>> c = KVCache(batch=1, n_kv_head=2, max_len=8, head_dim=4, dtype=torch.float32, device="cpu")
    >>> k, v = c.update(0, torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4))
    >>> tuple(k.shape)
    (1, 2, 3, 4)
    """

    k: torch.Tensor
    v: torch.Tensor

    def __init__(
        self,
        *,
        batch: int,
        n_kv_head: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        shape = (batch, n_kv_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hkv, T, D) at positions [pos, pos+T); return all keys and values so far."""
        end = pos + k.shape[2]
        assert end <= self.max_len, f"KV cache overflow: {end} > {self.max_len}"
        self.k[:, :, pos:end] = k
        self.v[:, :, pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]
