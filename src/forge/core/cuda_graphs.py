"""Capturing CUDA graphs, and keeping what was captured for the next generation.

Eager decoding of a small model on a GPU is bound by kernel launches and host
work: every layer launches a dozen small kernels, each a few microseconds of
CPU time, while the GPU finishes each in less. Capturing a decode step once
and replaying it launches the whole step as one graph. The token loop
(``forge.core.decode``) decides what to capture and replays it; this module
holds the mechanics it needs: :func:`capture`, and a small per-model store
(:func:`keep`, :func:`reusable`) under a key saying what a graph depends on
(:func:`graph_key`).

Capturing costs about as much as a hundred replayed steps, so what was
captured (a batcher, with the KV caches and static buffers its graphs read)
is kept on the model, the last :data:`KEEP` shapes; a later generation of the
same batch size, cache length and weights replays it.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

from forge import kernels
from forge.core.transformer import Transformer

__all__ = ["KEEP", "capture", "forget", "graph_key", "keep", "reusable", "weights_at"]

#: How many captured shapes a model keeps (each holds its own KV caches).
KEEP = 2


def capture(steps: Callable[[], None], restore: Sequence[torch.Tensor]) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``steps``, after one warm-up run on a side stream (allocator, kernel selection, compiling).

    The warm-up really runs: ``restore`` (the static inputs it advances) get their values back afterwards.
    Cache slots it wrote are written again, identically, by the first replay.
    """
    saved = [t.clone() for t in restore]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        steps()
    torch.cuda.current_stream().wait_stream(side)
    for tensor, value in zip(restore, saved, strict=True):
        tensor.copy_(value)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        steps()
    return graph


def graph_key(
    model: Transformer, batch: int, total: int, *, chunk: int, vocab_limit: int | None, compile: bool
) -> tuple:
    """What a captured graph depends on: shapes, options, kernels on or off, and where the weights live."""
    dtype = model.tok_emb.weight.dtype
    return (batch, total, chunk, vocab_limit, compile, kernels.enabled(), dtype, weights_at(model))


def weights_at(model: torch.nn.Module) -> int:
    """Where the model's weights and RoPE tables live: a captured graph reads them there. (Not its other
    buffers: the KV caches come and go as buffers while a batcher's caches are installed. The tables count on
    their own: weights moved away and back may land where they were, the tables elsewhere.)

    The parameter list is walked once per module structure (:data:`_structure`): walking a 1B model's modules
    took 0.45 ms of host time on a GPU server, paid before every cached prompt's tail in the serving engine.
    """
    walked = model.__dict__.get("_weights_walk")  # (structure, weak references: replaced weights are not kept alive)
    params = [ref() for ref in walked[1]] if walked is not None and walked[0] == _structure[0] else [None]
    if any(p is None for p in params):
        params = list(model.parameters())
        model.__dict__["_weights_walk"] = (_structure[0], tuple(weakref.ref(p) for p in params))
    tables = (getattr(model, name, None) for name in ("rope_cos", "rope_sin"))
    return hash((*(p.data_ptr() for p in params), *(t.data_ptr() for t in tables if t is not None)))


#: Bumped whenever any module anywhere registers a parameter or a submodule (assigning one replaces it), so that
#: :func:`weights_at` walks a model's parameters again. Moving weights (``.to``) changes their addresses, which it
#: reads every time.
_structure = [0]


def _restructured(*_: object) -> None:
    _structure[0] += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_restructured)
torch.nn.modules.module.register_module_module_registration_hook(_restructured)


def reusable(model: Transformer, key: Hashable) -> Any | None:
    """What was kept for ``key`` on this model, if it still is."""
    kept: OrderedDict[Hashable, Any] | None = model.__dict__.get("_decode_graphs")
    if kept is None or key not in kept:
        return None
    kept.move_to_end(key)
    return kept[key]


def keep(model: Transformer, key: Hashable, value: object) -> None:
    """Keep ``value`` for reuse under ``key``, dropping the least recently used beyond :data:`KEEP`."""
    kept = model.__dict__.setdefault("_decode_graphs", OrderedDict())
    kept[key] = value
    kept.move_to_end(key)
    while len(kept) > KEEP:
        kept.popitem(last=False)


def forget(model: Transformer, key: Hashable) -> None:
    """Drop what was kept for ``key`` on this model (its owner is done with it)."""
    kept: OrderedDict[Hashable, Any] | None = model.__dict__.get("_decode_graphs")
    if kept is not None:
        kept.pop(key, None)
