"""A preallocated key/value cache, one per attention layer.

Buffers are allocated once for the whole generation (batch, heads, max_len,
head_dim), so decoding writes one slot per step and never copies or
recomputes the prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["CacheWrite", "KVCache"]


@dataclass(frozen=True, slots=True)
class CacheWrite:
    """Where a forward pass writes into a cache shared by many sequences (continuous batching).

    ``rows``: the cache rows the batch's rows map to, in order. ``pos``: an int
    offset for every row (a prefill), or a (B,) tensor of per-row positions
    with one new token each (a decode step). ``length``: how many positions
    the attention reads back, [0, length); the caller's mask hides each row's
    positions past its own end.
    """

    rows: slice
    pos: int | torch.Tensor
    length: int
    #: For per-row positions: the rows' slots in the flat cache view (see :meth:`KVCache.flat_index`),
    #: computed once per step for every layer.
    flat_index: torch.Tensor | None = None


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

    def write(self, w: CacheWrite, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hkv, T, D) as ``w`` says; return keys and values (B, Hkv, w.length, D) of those rows."""
        assert w.length <= self.max_len, f"KV cache overflow: {w.length} > {self.max_len}"
        if isinstance(w.pos, int):
            self.k[w.rows, :, w.pos : w.pos + k.shape[2]] = k
            self.v[w.rows, :, w.pos : w.pos + k.shape[2]] = v
        else:
            assert k.shape[2] == 1, "per-row positions take one new token per row"
            # One index_copy_ into the flat (rows * heads * positions, D) view: each row's heads at its own position.
            index = w.flat_index if w.flat_index is not None else self.flat_index(w.rows, w.pos)
            D = k.shape[-1]
            self.k.view(-1, D).index_copy_(0, index, k.reshape(-1, D))  # k (B, Hkv, 1, D) -> (B * Hkv, D)
            self.v.view(-1, D).index_copy_(0, index, v.reshape(-1, D))
        return self.k[w.rows, :, : w.length], self.v[w.rows, :, : w.length]

    def flat_index(self, rows: slice, pos: torch.Tensor) -> torch.Tensor:
        """Indices into ``k.view(-1, D)`` of each row's every head at that row's position ``pos`` (B,)."""
        _, H, L, _ = self.k.shape
        r = torch.arange(rows.start, rows.stop, device=self.k.device)[:, None]  # (B, 1)
        h = torch.arange(H, device=self.k.device)[None, :]  # (1, H)
        return ((r * H + h) * L + pos[:, None]).reshape(-1)  # (B * H,)

    def move_row(self, src: int, dst: int) -> None:
        """Copy row ``src`` onto row ``dst`` (compacting the rows of a batch after one leaves)."""
        self.k[dst] = self.k[src]
        self.v[dst] = self.v[src]
