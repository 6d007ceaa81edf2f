"""A preallocated key/value cache, one per attention layer.

Buffers are allocated once for the whole generation (batch, heads, max_len,
head_dim), so decoding writes one slot per step and never copies or
recomputes the prefix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from forge.config import ModelConfig
from forge.core import ops
from forge.errors import ConfigError, GenerationError

__all__ = [
    "CACHE_MEMORY_FRACTION",
    "CachePlan",
    "CacheWrite",
    "KVCache",
    "cache_bytes",
    "check_cache_fits",
    "free_memory",
    "move_row",
    "plan_cache",
    "read_rows",
    "stacked",
    "write_rows",
]

#: The share of free memory a serving KV cache takes by default; the rest is for activations and everything else.
CACHE_MEMORY_FRACTION = 0.5
#: The most an asked-for cache may take: past this, allocating it would be likely to fail or to swap.
_MAX_MEMORY_FRACTION = 0.9
#: A default context below this (or the model's own, if shorter) trades batch rows for context first.
_MIN_DEFAULT_CONTEXT = 2048
_GB = 1 << 30
#: Caches smaller than this are allocated without asking how much memory is free.
_CHECKED_FROM = 256 << 20


@dataclass(frozen=True, slots=True)
class CacheWrite:
    """Where a forward pass writes its keys and values into a cache, and how much of it attention reads back.

    The one write protocol: T tokens per row, every row from one position (``pos`` an int: a prefill
    from 0, a decode step, or a prefill after a cached prefix) or each row from its own (``pos`` a (B,)
    tensor: a decode step, a speculative verify step, a batch of prefills after cached prefixes).
    ``rows``: the cache rows the batch's rows map to, in order. ``length``: attention reads positions
    [0, length); the caller's mask hides each row's positions past its own end. A block of T > 1 tokens
    written from an int ``pos`` with ``length = pos + T`` needs no mask: causal attention aligns the last
    query with the last key. Blocks at per-row positions need the caller's mask.
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
    >>> k, v = c.write(CacheWrite(rows=slice(0, 1), pos=0, length=3), torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4))
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
        lazy: bool = False,
        buffers: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        shape = (batch, n_kv_head, max_len, head_dim)
        if buffers is not None:  # views of every layer's one buffer (see :func:`stacked`)
            keys, values = buffers
            assert keys.shape == values.shape == shape, f"{tuple(keys.shape)} is not {shape}"
        else:
            make = torch.empty if lazy else torch.zeros  # empty: untouched pages cost no memory
            keys, values = make(shape, dtype=dtype, device=device), make(shape, dtype=dtype, device=device)
        self.register_buffer("k", keys, persistent=False)
        self.register_buffer("v", values, persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def write(self, w: CacheWrite, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hkv, T, D) as ``w`` says; return keys and values (B, Hkv, w.length, D) of those rows."""
        keys, values = self.k, self.v  # each a module attribute lookup: once per layer and step
        assert w.length <= keys.shape[2], f"KV cache overflow: {w.length} > {keys.shape[2]}"
        if isinstance(w.pos, int):
            end = w.pos + k.shape[2]
            keys[w.rows, :, w.pos : end] = k
            values[w.rows, :, w.pos : end] = v
        else:
            # One index_copy_ into the flat (rows * heads * positions, D) view: each row's heads at its own positions.
            T = k.shape[2]
            index = w.flat_index if w.flat_index is not None else self.flat_index(w.rows, w.pos, T)
            D = k.shape[-1]
            keys.view(-1, D).index_copy_(0, index, k.reshape(-1, D))  # k (B, Hkv, T, D) -> (B * Hkv * T, D)
            values.view(-1, D).index_copy_(0, index, v.reshape(-1, D))
        return keys[w.rows, :, : w.length], values[w.rows, :, : w.length]

    def write_rotated(
        self, w: CacheWrite, qk: torch.Tensor, v: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """RoPE and the write of :meth:`write` in one fused kernel, for per-row positions (a decode or verify step):
        the rotated queries, then keys and values as :meth:`write` returns them. ``qk`` (B, H + Hkv, T, D) holds the
        query and key heads before RoPE. None where the device has no such kernel, or ``pos`` is an int."""
        if isinstance(w.pos, int) or (torch.is_grad_enabled() and qk.requires_grad):
            return None
        keys, values = self.k, self.v
        assert w.length <= keys.shape[2], f"KV cache overflow: {w.length} > {keys.shape[2]}"
        index = w.flat_index if w.flat_index is not None else self.flat_index(w.rows, w.pos, qk.shape[2])
        q = ops.rope_cache(qk, v, *rope, keys, values, index)
        if q is None:
            return None
        return q, keys[w.rows, :, : w.length], values[w.rows, :, : w.length]

    def flat_index(self, rows: slice, pos: torch.Tensor, tokens: int = 1) -> torch.Tensor:
        """Indices into ``k.view(-1, D)`` of each row's every head at positions ``pos`` (B,) .. ``pos + tokens - 1``.

        Positions past the cache's end are clamped to its last slot: only padding reaches there (a row's
        real tokens end before ``max_len``), and a slot is always written again before a mask shows it.
        """
        _, H, L, _ = self.k.shape
        r = torch.arange(rows.start, rows.stop, device=self.k.device)[:, None, None]  # (B, 1, 1)
        h = torch.arange(H, device=self.k.device)[None, :, None]  # (1, H, 1)
        t = (pos[:, None] + torch.arange(tokens, device=pos.device)).clamp_(max=L - 1)[:, None, :]  # (B, 1, T)
        return ((r * H + h) * L + t).reshape(-1)  # (B * H * T,)


def stacked(caches: list[KVCache]) -> torch.Tensor | None:
    """The (n_layer, 2, batch, heads, max_len, head_dim) buffer whose views ``caches`` are, in order; None where
    they are not (made one by one, or their buffers since replaced, as ``Module.to`` does).

    ``Transformer.make_caches`` makes every layer's cache a view of one such buffer: the same memory as separate
    buffers, but a row's keys and values of every layer are one strided view (``stacked(caches)[:, :, row]``), so
    a prefix cache copies a prefix into a row, or a row into another, in one op instead of two a layer (on a GPU
    each op costs its launch on the host).
    """
    buffer = caches[0].k._base if caches else None
    if buffer is None or buffer.dim() != 6 or buffer.shape[0] != len(caches) or buffer.shape[2:] != caches[0].k.shape:
        return None
    base, step = buffer.data_ptr(), buffer.stride(1) * buffer.element_size()
    for layer, cache in enumerate(caches):
        k, v = cache.k, cache.v
        if k._base is not buffer or v._base is not buffer or k.data_ptr() != base + 2 * layer * step:
            return None
        if v.data_ptr() != base + (2 * layer + 1) * step:
            return None
    return buffer


def read_rows(caches: list[KVCache], row: int, start: int, end: int) -> torch.Tensor:
    """Every layer's keys and values of ``row`` at positions [start, end): (n_layer, 2, heads, end - start, D), a
    view of the one buffer (a copy where the caches are not its views)."""
    whole = stacked(caches)
    if whole is not None:
        return whole[:, :, row, :, start:end]
    return torch.stack([torch.stack((c.k[row, :, start:end], c.v[row, :, start:end])) for c in caches])


def write_rows(caches: list[KVCache], row: int, kv: torch.Tensor) -> None:
    """Write ``kv`` (n_layer, 2, heads, n, D) into positions [0, n) of ``row`` in every layer: one copy."""
    whole, n = stacked(caches), kv.shape[3]
    if whole is not None:
        whole[:, :, row, :, :n] = kv
        return
    for layer, cache in enumerate(caches):
        cache.k[row, :, :n] = kv[layer, 0]
        cache.v[row, :, :n] = kv[layer, 1]


def move_row(caches: list[KVCache], src: int, dst: int) -> None:
    """Copy row ``src`` onto row ``dst`` in every layer (compacting a batch after a row leaves): one copy."""
    whole = stacked(caches)
    if whole is not None:
        whole[:, :, dst] = whole[:, :, src]
        return
    for cache in caches:
        cache.k[dst] = cache.k[src]
        cache.v[dst] = cache.v[src]


# -- sizing -------------------------------------------------------------------------------------------------------


def free_memory(device: torch.device | str) -> int | None:
    """Bytes that can still be allocated on ``device`` (None where Forge can't tell, e.g. MPS).

    CUDA: ``torch.cuda.mem_get_info``. CPU: ``MemAvailable`` of /proc/meminfo, or less if a cgroup limit
    (a container) leaves less.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if free is None and hasattr(os, "sysconf"):
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            free = None
    try:  # cgroup v2: the container's limit minus what it already uses
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            left = max(0, int(limit) - used)
            free = left if free is None else min(free, left)
    except (OSError, ValueError):
        pass
    return free


def cache_bytes(config: ModelConfig, batch: int, max_len: int, dtype: torch.dtype) -> int:
    """Bytes of the keys and values of every layer for ``batch`` rows of ``max_len`` positions."""
    per_position = 2 * config.n_layer * config.kv_heads * config.head_dim * dtype.itemsize
    return per_position * batch * max_len


def check_cache_fits(config: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse a cache larger than the free memory with a clear error, rather than be killed allocating it."""
    need = cache_bytes(config, batch, max_len, dtype)
    if need < _CHECKED_FROM:  # too small to matter: skip asking the system
        return
    free = free_memory(device)
    if free is not None and need > free:
        raise GenerationError(
            f"a KV cache for {batch} x {max_len} positions needs {_size(need)}, but only {_size(free)} of memory "
            "is free; ask for fewer tokens (max_tokens) or a shorter prompt"
        )


@dataclass(frozen=True, slots=True)
class CachePlan:
    """A serving KV cache's shape, sized by :func:`plan_cache`; ``describe()`` is the line the CLI prints."""

    max_batch: int
    context: int
    bytes: int
    model_context: int
    budget: int | None  # bytes the cache may take; None: unknown
    chosen: bool  # the context or batch were picked to fit the budget, not given

    def describe(self) -> str:
        how = "sized to fit" if self.chosen else "within"
        budget = f"{how} {_size(self.budget)} of free memory" if self.budget is not None else "free memory unknown"
        declared = f" (the model allows {self.model_context})" if self.context < self.model_context else ""
        rows = f"{self.max_batch} request{'s' if self.max_batch > 1 else ''}"
        return (
            f"KV cache: context {self.context} tokens{declared} x {rows} at once = {_size(self.bytes)}, {budget}; "
            "change with --context and --max-batch"
        )


def _size(n: int) -> str:
    return f"{n / _GB:.1f} GB" if n >= _GB else f"{n / (1 << 20):.0f} MB"


def plan_cache(
    config: ModelConfig,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    max_batch: int | None = None,
    context: int | None = None,
    available: int | None = None,
    fraction: float = CACHE_MEMORY_FRACTION,
) -> CachePlan:
    """The KV cache for serving: ``context`` positions x ``max_batch`` rows, within ``fraction`` of free memory.

    Unset, ``max_batch`` is 8 and ``context`` the model's, shortened to fit (a model may declare 131072
    positions: 24 GB of bf16 cache for SmolLM2 at 8 rows); below 2048 positions rows go first. With both
    given, the cache may take up to 90% of free memory, and more raises :class:`ConfigError`.
    ``available`` overrides :func:`free_memory`.

    >>> from forge.config import get_preset
    >>> plan_cache(get_preset("smollm2-135m").replace(context_length=131072), dtype=torch.float32,
    ...            device="cpu", available=8 << 30).context
    11520
    """
    if context is not None and not 1 < context <= config.context_length:
        raise ConfigError(f"context {context} must be between 2 and the model's context of {config.context_length}")
    free = free_memory(device) if available is None else available
    budget = int(free * fraction) if free is not None else None
    rows, ctx = max_batch or 8, context or config.context_length
    if budget is None or cache_bytes(config, rows, ctx, dtype) <= budget:
        return CachePlan(rows, ctx, cache_bytes(config, rows, ctx, dtype), config.context_length, budget, False)
    if context is not None and max_batch is not None:  # both asked for: allowed up to nearly all free memory
        assert free is not None  # a budget came from it
        need, most = cache_bytes(config, rows, ctx, dtype), int(free * _MAX_MEMORY_FRACTION)
        if need <= most:
            return CachePlan(rows, ctx, need, config.context_length, most, False)
        raise ConfigError(
            f"a KV cache for context {ctx} x {rows} requests needs {_size(need)}, but only {_size(most)} "
            f"({_MAX_MEMORY_FRACTION:.0%} of the free memory) is available; lower --context or --max-batch"
        )
    per_token = cache_bytes(config, 1, 1, dtype)  # one position of one request
    if context is None:  # shorten the context (to a multiple of 256); below a useful length, halve the rows first
        floor = min(config.context_length, _MIN_DEFAULT_CONTEXT)
        while max_batch is None and rows > 1 and budget // (rows * per_token) < floor:
            rows //= 2
        ctx = min(config.context_length, budget // (rows * per_token) // 256 * 256)
    else:  # fewer rows for the context asked for; one row may take up to nearly all free memory
        rows = min(rows, budget // (ctx * per_token))
        if rows < 1 and free is not None and ctx * per_token <= free * _MAX_MEMORY_FRACTION:
            rows = 1
    if ctx < 2 or rows < 1:
        raise ConfigError(
            f"the free memory ({_size(int(budget / fraction))}) holds no useful KV cache for this model "
            f"({per_token} bytes per position per request); free some memory, lower --context, or use a smaller model"
        )
    return CachePlan(rows, ctx, cache_bytes(config, rows, ctx, dtype), config.context_length, budget, True)
