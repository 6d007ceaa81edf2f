"""Greedy decoding with the decode step captured in a CUDA graph.

Eager decoding of a small model on a GPU is bound by kernel launches and
host work: every layer launches a dozen small kernels, each a few
microseconds of CPU time, while the GPU finishes each in less. Capturing the
decode step once and replaying it launches the whole step as one graph.

Everything the step touches is static: the KV cache (preallocated by
``Transformer.setup_cache``), the current tokens, the step counter (a device
tensor the graph advances itself) and an output buffer. A graph holds
``chunk`` steps unrolled, so one replay produces ``chunk`` tokens per row with
no host round trip between them; the caller reads them after the replay.
Attention reads the whole preallocated cache under a mask (keys past the
current step hidden), so shapes never change between steps.

Prefill stays eager (its shape depends on the prompt); sampling other than
greedy stays on the eager path.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from forge.core.kv_cache import CacheWrite, KVCache
from forge.core.transformer import Transformer

__all__ = ["GraphedGreedyDecoder"]


class GraphedGreedyDecoder:
    """Replays ``chunk`` greedy decode steps of ``model`` per CUDA-graph launch.

    ``valid`` (B, total) marks real positions (False on left padding); the
    model's cache must already hold the prompt (positions [0, start)).
    """

    def __init__(
        self,
        model: Transformer,
        valid: torch.Tensor,
        *,
        start: int,
        first: torch.Tensor,
        vocab_limit: int | None,
        chunk: int = 8,
        compile: bool = False,
    ) -> None:
        self.model, self.chunk, self.vocab_limit = model, chunk, vocab_limit
        # torch.compile fuses each layer's elementwise work (norms, RoPE, SwiGLU) into a few kernels;
        # the graph then launches fewer, larger kernels. It costs a compile on first use.
        self.forward = torch.compile(self._forward, dynamic=False) if compile else self._forward
        B, total = valid.shape
        device = valid.device
        self.total = total
        self.valid = valid
        # Each row's position for RoPE: how many real tokens come before the slot (left padding has none).
        self.positions = (valid.long().cumsum(dim=-1) - 1).clamp(min=0)  # (B, total)
        self.slots = torch.arange(total, device=device)  # (total,)
        self.rows = slice(0, B)
        cache = model.blocks[0].attn.cache
        assert isinstance(cache, KVCache), "set up the KV cache and prefill first"
        self.cache = cache
        self.token = first[:, None].clone()  # (B, 1): the next input
        self.step = torch.tensor(start, device=device)  # the slot the next input is written to
        self.host_step = start  # the same, on the host: no sync to read it
        self.out = torch.empty(B, chunk, dtype=torch.long, device=device)  # (B, chunk)
        self.graph = self._capture()

    def _forward(self, token: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """One greedy step: the next token (B,) after ``token`` (B, 1) written at slot ``step``."""
        pos = step.expand(token.shape[0])  # (B,)
        mask = (self.valid & (self.slots <= step))[:, None, None, :]  # (B, 1, 1, total)
        positions = self.positions.index_select(1, step.view(1))  # (B, 1)
        write = CacheWrite(rows=self.rows, pos=pos, length=self.total, flat_index=self.cache.flat_index(self.rows, pos))
        logits = self.model(token, positions=positions, mask=mask, cache_pos=write)[:, -1]  # (B, V)
        if self.vocab_limit is not None and self.vocab_limit < logits.shape[-1]:
            logits[:, self.vocab_limit :] = float("-inf")
        return logits.argmax(dim=-1)  # (B,)

    def _one(self, j: int) -> None:
        nxt = self.forward(self.token, self.step)
        self.out[:, j] = nxt
        self.token.copy_(nxt[:, None])
        self.step.add_(1)

    def _steps(self) -> None:
        for j in range(self.chunk):
            self._one(j)

    def _capture(self) -> torch.cuda.CUDAGraph:
        token, step = self.token.clone(), self.step.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up outside the graph (allocator, kernel selection)
            self._steps()
        torch.cuda.current_stream().wait_stream(side)
        self.token.copy_(token)  # the warm-up wrote slots the replays will write again, identically
        self.step.copy_(step)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._steps()
        return graph

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Chunks of tokens (B, chunk), as long as a whole chunk fits in the cache."""
        while self.host_step + self.chunk <= self.total:
            self.graph.replay()
            self.host_step += self.chunk
            yield self.out.clone()
