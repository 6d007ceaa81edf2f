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

Prefill stays eager (its shape depends on the prompt). Decoding that is not
plain greedy (temperature, penalties, grammar masks, logprobs) replays a
graph of the forward alone, one step per replay (``logits=True``), and
samples from its logits outside the graph.

Capturing costs about as much as a hundred replayed steps, so captured
decoders are kept on the model (:func:`reusable`, the last two shapes) with
the KV caches their graphs read; a later generation of the same batch size,
cache length and weights only copies its prompt's mask into the static
buffers (:meth:`GraphedGreedyDecoder.restart`) and replays.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator

import torch

from forge import kernels
from forge.core.kv_cache import CacheWrite, KVCache
from forge.core.transformer import Transformer

__all__ = ["GraphedGreedyDecoder", "graph_key", "keep", "reusable"]

#: How many captured decoders a model keeps (each holds its own KV caches).
KEEP = 2


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
        logits: bool = False,
    ) -> None:
        assert not logits or chunk == 1, "a logits graph runs one step per replay: the host samples in between"
        self.model, self.chunk, self.vocab_limit = model, chunk, vocab_limit
        #: logits mode: each replay runs one step and leaves its logits (B, V) in ``self.logits``, for sampling
        #: that stays on the host side (temperature, penalties, grammar masks, logprobs); see :meth:`decode`.
        self.logits_mode = logits
        self.logits = torch.empty(0)
        # torch.compile fuses each layer's elementwise work (norms, RoPE, SwiGLU) into a few kernels;
        # the graph then launches fewer, larger kernels. It costs a compile on first use.
        self.forward = torch.compile(self._forward, dynamic=False) if compile else self._forward
        B, total = valid.shape
        device = valid.device
        self.total = total
        self.valid = valid.clone()  # static: restart() copies a new prompt's mask in
        # Each row's position for RoPE: how many real tokens come before the slot (left padding has none).
        self.positions = (valid.long().cumsum(dim=-1) - 1).clamp(min=0)  # (B, total)
        self.slots = torch.arange(total, device=device)  # (total,)
        self.rows = slice(0, B)
        self.caches = [block.attn.cache for block in model.blocks]  # what the graph reads: reinstall to reuse it
        assert isinstance(self.caches[0], KVCache), "set up the KV cache and prefill first"
        self.token = first[:, None].clone()  # (B, 1): the next input
        self.step = torch.tensor(start, device=device)  # the slot the next input is written to
        self.host_step = start  # the same, on the host: no sync to read it
        self.out = torch.empty(B, chunk, dtype=torch.long, device=device)  # (B, chunk)
        self.graph = self._capture()

    def restart(self, valid: torch.Tensor, *, start: int, first: torch.Tensor) -> None:
        """Reuse the captured graph for a new generation, its prompt already prefilled into ``self.caches``."""
        assert valid.shape == self.valid.shape, "a captured decoder is reused only for the same shape"
        self.valid.copy_(valid)
        self.positions.copy_((valid.long().cumsum(dim=-1) - 1).clamp(min=0))
        self.token.copy_(first[:, None])
        self.step.fill_(start)
        self.host_step = start

    def _forward(self, token: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """One step: the logits (B, V) after ``token`` (B, 1) written at slot ``step``."""
        pos = step.expand(token.shape[0])  # (B,)
        mask = (self.valid & (self.slots <= step))[:, None, None, :]  # (B, 1, 1, total)
        positions = self.positions.index_select(1, step.view(1))  # (B, 1)
        write = CacheWrite(
            rows=self.rows, pos=pos, length=self.total, flat_index=self.caches[0].flat_index(self.rows, pos)
        )
        logits = self.model(token, positions=positions, mask=mask, cache_pos=write)[:, -1]  # (B, V)
        if self.vocab_limit is not None and self.vocab_limit < logits.shape[-1]:
            logits[:, self.vocab_limit :] = float("-inf")
        return logits

    def _one(self, j: int) -> None:
        logits = self.forward(self.token, self.step)
        if self.logits_mode:
            self.logits = logits  # allocated while capturing: the graph's static output
        else:
            nxt = logits.argmax(dim=-1)  # (B,)
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

    def decode(self, token: torch.Tensor) -> torch.Tensor:
        """Logits mode: feed ``token`` (B,) at the next slot; its logits (B, V), valid until the next call."""
        assert self.logits_mode and self.host_step < self.total, "decode() is for logits mode, within the cache"
        self.token.copy_(token[:, None])
        self.graph.replay()
        self.host_step += 1
        return self.logits

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Chunks of tokens (B, chunk), as long as a whole chunk fits in the cache."""
        while self.host_step + self.chunk <= self.total:
            self.graph.replay()
            self.host_step += self.chunk
            yield self.out.clone()


def graph_key(
    model: Transformer,
    batch: int,
    total: int,
    *,
    chunk: int,
    vocab_limit: int | None,
    compile: bool,
    logits: bool = False,
) -> tuple:
    """What a captured graph depends on: shapes, options, kernels on or off, and where the weights live."""
    weights = tuple(p.data_ptr() for p in model.parameters())
    dtype = model.tok_emb.weight.dtype
    return (batch, total, chunk, vocab_limit, compile, logits, kernels.enabled(), dtype, hash(weights))


def reusable(model: Transformer, key: Hashable) -> GraphedGreedyDecoder | None:
    """The decoder captured for ``key`` on this model, if it is still kept."""
    kept: OrderedDict[Hashable, GraphedGreedyDecoder] | None = model.__dict__.get("_decode_graphs")
    if kept is None or key not in kept:
        return None
    kept.move_to_end(key)
    return kept[key]


def keep(model: Transformer, key: Hashable, decoder: GraphedGreedyDecoder) -> None:
    """Keep ``decoder`` for reuse, dropping the least recently used beyond :data:`KEEP`."""
    kept = model.__dict__.setdefault("_decode_graphs", OrderedDict())
    kept[key] = decoder
    kept.move_to_end(key)
    while len(kept) > KEEP:
        kept.popitem(last=False)
