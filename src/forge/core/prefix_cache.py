"""Prefix caching: the KV of prompts already seen, kept in 16-token blocks and reused by the next request.

vLLM's automatic prefix caching, in its simplest form. A sequence's tokens are cut into blocks of
:data:`BLOCK` tokens; each full block is named by a hash of its tokens and of the block before it,
so a name stands for the whole prefix up to the block's end. After a prefill (and when a sequence
leaves) the blocks of its cache row that are not stored yet are copied out; a joining sequence
looks its prompt's blocks up in order, copies the longest stored run into its row, and prefills
only the rest (see ``Batcher.prefill``). Keys and values are the same numbers the prefill would
compute, so the output is the same with the cache and without.

The store is bounded in bytes; when full, the least recently used blocks go first. A lookup marks
a prefix's blocks used from the last to the first, so a prefix is evicted from its tail and a stored
block's ancestors are always stored too (a block without them could never be found).

Torch only; single-threaded, like the batcher that owns it.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import torch

from forge.core.kv_cache import KVCache, read_rows, write_rows

__all__ = ["BLOCK", "PrefixCache", "PrefixStats"]

#: Tokens per cached block (vLLM's default).
BLOCK = 16


@dataclass
class PrefixStats:
    """Counters for ``/metrics``: lookups, hits (a lookup that reused at least one block), tokens reused."""

    lookups: int = 0
    hits: int = 0
    tokens_reused: int = 0
    tokens_looked_up: int = 0
    blocks_stored: int = 0
    evictions: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass(eq=False, slots=True)
class _Block:
    key: int
    parent: int | None
    tokens: tuple[int, ...]
    kv: torch.Tensor  # (n_layer * 2 * Hkv, BLOCK, D): 3-d, so that a load concatenates them in one launch


@dataclass
class PrefixCache:
    """Blocks of keys and values by prefix hash, at most ``max_bytes`` of them, least recently used out first."""

    max_bytes: int
    stats: PrefixStats = field(default_factory=PrefixStats)

    def __post_init__(self) -> None:
        self._blocks: collections.OrderedDict[int, _Block] = collections.OrderedDict()
        self._block_bytes = 0  # bytes of one block, known from the first one stored

    @property
    def bytes(self) -> int:
        return len(self._blocks) * self._block_bytes

    def __len__(self) -> int:
        return len(self._blocks)

    def snapshot(self) -> dict[str, int]:
        return {**self.stats.as_dict(), "blocks": len(self._blocks), "bytes": self.bytes, "max_bytes": self.max_bytes}

    def clear(self) -> None:
        self._blocks.clear()

    # -- lookup ---------------------------------------------------------------------------------
    def _chain(self, tokens: list[int], limit: int) -> list[tuple[int, int | None, tuple[int, ...]]]:
        """(hash, parent hash, tokens) of each full block of ``tokens[:limit]``, in order."""
        out: list[tuple[int, int | None, tuple[int, ...]]] = []
        parent: int | None = None
        for start in range(0, limit - BLOCK + 1, BLOCK):
            block = tuple(tokens[start : start + BLOCK])
            key = hash((parent, block))
            out.append((key, parent, block))
            parent = key
        return out

    def _found(self, tokens: list[int], limit: int) -> list[_Block]:
        """The stored blocks of the longest stored prefix of ``tokens[:limit]``."""
        found = []
        for key, parent, block in self._chain(tokens, limit):
            stored = self._blocks.get(key)
            if stored is None or stored.parent != parent or stored.tokens != block:  # absent, or a hash collision
                break
            found.append(stored)
        return found

    def cached_blocks(self, tokens: list[int]) -> int:
        """How many leading full blocks of ``tokens`` are stored (a peek: no counters, no recency)."""
        return len(self._found(tokens, len(tokens)))

    def reusable(self, tokens: list[int]) -> int:
        """How many leading tokens of ``tokens`` a :meth:`load` would reuse (a peek: no counters, no recency)."""
        return _reused(self.cached_blocks(tokens), tokens)

    def load(self, tokens: list[int], caches: list[KVCache], row: int) -> int:
        """Copy the longest stored prefix of ``tokens`` into ``row`` of ``caches``; how many tokens it covers.

        At least the last token is left to compute: its logits start the generation.
        """
        self.stats.lookups += 1
        self.stats.tokens_looked_up += len(tokens)
        found = self._found(tokens, len(tokens))
        if not found:
            return 0
        self._touch([b.key for b in found])
        _, H, _, D = caches[0].k.shape
        # One batched concatenation of 3-d blocks: CUDA's takes at most 4 dimensions, and 5-d blocks fell back to
        # a copy a block (125 launches for a 2,000-token prefix, ~1 ms on an H100).
        write_rows(caches, row, torch.cat([b.kv for b in found], dim=1).view(len(caches), 2, H, -1, D))
        n = _reused(len(found), tokens)
        self.stats.hits += 1
        self.stats.tokens_reused += n
        return n

    def _touch(self, keys: list[int]) -> None:
        """Mark a prefix's stored blocks used, the last first: a prefix is evicted from its tail."""
        for key in reversed(keys):
            if key in self._blocks:
                self._blocks.move_to_end(key)

    # -- store ----------------------------------------------------------------------------------
    def store(self, tokens: list[int], caches: list[KVCache], row: int, length: int) -> int:
        """Keep the full blocks of ``tokens[:length]`` whose keys and values sit in ``row``; how many were new."""
        chain = self._chain(tokens, min(length, len(tokens)))
        keys = [key for key, _, _ in chain]
        self._touch(keys)  # its stored ancestors stay while its new blocks make room
        first = next((i for i, key in enumerate(keys) if key not in self._blocks), len(keys))
        if first == len(keys):
            return 0
        start, end = first * BLOCK, len(keys) * BLOCK
        kv = read_rows(caches, row, start, end)  # (L, 2, Hkv, n, D): cut into blocks (copies) below
        L, two, H, _, D = kv.shape
        new = 0
        for index in range(first, len(keys)):
            key, parent, block = chain[index]
            part = kv[:, :, :, (index - first) * BLOCK : (index - first + 1) * BLOCK]
            part = part.clone(memory_format=torch.contiguous_format).view(L * two * H, BLOCK, D)  # never a view
            self._block_bytes = part.numel() * part.element_size()
            if self._block_bytes > self.max_bytes:
                break
            self._make_room()
            if parent is not None and parent not in self._blocks:  # evicted to make room: the rest can't be found
                break
            self._blocks[key] = _Block(key, parent, block, part)
            new += 1
        self._touch(keys)
        self.stats.blocks_stored += new
        return new

    def _make_room(self) -> None:
        """Evict the least recently used blocks until one more fits."""
        while self._blocks and (len(self._blocks) + 1) * self._block_bytes > self.max_bytes:
            self._blocks.popitem(last=False)
            self.stats.evictions += 1

    def evict(self, nbytes: int) -> int:
        """Free at least ``nbytes`` (memory pressure), least recently used first; how many blocks went."""
        gone = 0
        while self._blocks and gone * self._block_bytes < nbytes:
            self._blocks.popitem(last=False)
            self.stats.evictions += 1
            gone += 1
        return gone


def _reused(blocks: int, tokens: list[int]) -> int:
    """The tokens ``blocks`` stored blocks of ``tokens`` save computing: a prompt found whole still computes its
    last token, whose logits start the generation."""
    return min(blocks * BLOCK, len(tokens) - 1)
