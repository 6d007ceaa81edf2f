"""The forward passes of the token loop: :func:`prefill`, :func:`decode_step`, and their CUDA-graphed form.

Split from ``forge.core.decode`` (which re-exports them): the loop there decides what runs, these
run it. :class:`GraphedSteps` replays a full batch's decode step from CUDA graphs (see
``forge.core.cuda_graphs``); :func:`compiled_step` is the eager step compiled for CPUs.
"""

from __future__ import annotations

import types
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Protocol

import torch

from forge.core import ops
from forge.core.cuda_graphs import capture, keep, weights_at
from forge.core.device import upload
from forge.core.kv_cache import CacheWrite, KVCache
from forge.core.quantize import QuantizedWeight
from forge.core.transformer import Transformer


class Batch(Protocol):
    """What the steps here read of ``forge.core.decode.Batcher`` (typed so, without importing it back)."""

    model: Transformer
    device: torch.device
    max_batch: int
    max_len: int
    caches: Sequence[KVCache]
    tokens: torch.Tensor
    vocab_limit: int | None
    running: Sequence[Any]
    graphs: GraphedSteps | None

    def _install(self) -> None: ...


__all__ = [
    "GRAPH_CHUNK",
    "LOGITS_GRAPH_MIN_TOKENS",
    "TAIL_MAX_BATCH",
    "TAIL_TOKENS",
    "Batch",
    "GraphedSteps",
    "compiled_step",
    "decode_step",
    "prefill",
]

#: Greedy decode steps per CUDA-graph replay: tokens come back to the host once per chunk.
GRAPH_CHUNK = 8
#: A sampled generation captures its graph only past this many tokens (capturing costs about a hundred steps).
LOGITS_GRAPH_MIN_TOKENS = 32
#: Tokens a row of the captured tail-prefill graph computes: the part of a prompt after its cached prefix, up to
#: this many, replays one graph instead of an eager forward's hundreds of launches (GraphedSteps.tail).
TAIL_TOKENS = 32
#: The tail graph computes TAIL_TOKENS for every row of the batch: only batches up to this many rows use it (measured
#: at 8 rows on an H200: 3.3 ms a replay for the 1B shape against ~14 ms of eager launches; a wide batch's padding
#: would cost about what the eager forward does).
TAIL_MAX_BATCH = 16


def prefill(
    model: Transformer,
    tokens: torch.Tensor,
    write: CacheWrite | None,
    last: torch.Tensor | None = None,
    starts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits (k, V) after each prompt of ``tokens`` (k, T), right-padded, written into the cache as ``write`` says.

    ``last`` (k,): each row's last real position (None: every row is T long). Causal attention alone
    keeps the padding, which comes after a row's tokens, out of their view. ``starts`` (k,): each row's
    tokens continue its cached prefix from there (``write.pos``); a mask shows each query its row's keys
    up to itself.
    """
    if starts is None:
        return model(tokens, write=write, last_only=last is None, select=last)[:, -1]
    assert write is not None, "a prefill after a cached prefix reads that prefix from the cache"
    top = write.length - 1  # padding past the cache's end (see KVCache.flat_index) reads as its last slot
    positions = (starts[:, None] + torch.arange(tokens.shape[1], device=tokens.device)).clamp_(max=top)  # (k, T)
    mask = torch.arange(write.length, device=tokens.device) <= positions[:, :, None]  # (k, T, length)
    select = last if last is not None else torch.full_like(starts, tokens.shape[1] - 1)
    return model(tokens, positions=positions, mask=mask[:, None], write=write, select=select)[:, -1]


def decode_step(
    model: Transformer, tokens: torch.Tensor, write: CacheWrite, pos: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits (n, V) after one token per row, ``tokens`` (n, 1), written into the cache as ``write`` says.

    ``pos`` (n,): each row's own position. None: every row is at ``write.pos`` (an int), and sees all of
    [0, write.length): no mask, no position tensors.
    """
    if pos is None:
        return model(tokens, write=write)[:, -1]
    mask = torch.arange(write.length, device=pos.device) <= pos[:, None]  # (n, length): each row's own keys
    return model(tokens, positions=pos[:, None], mask=mask[:, None, None], write=write)[:, -1]


class GraphedSteps:
    """A full batch's decode step captured in CUDA graphs, replayed from its batcher's static buffers.

    The greedy graph unrolls :data:`GRAPH_CHUNK` steps, argmax inside: one replay, that many tokens
    per row, no host round trip. The sampled graph holds one forward; the pick runs outside it.
    Both read the batcher's caches and ``tokens`` and this object's ``pos``, which they advance.
    """

    def __init__(self, batcher: Batch, key: Hashable, compile: bool, partial: bool = False) -> None:
        B, device = batcher.max_batch, batcher.device
        self.batcher, self.key = batcher, key
        # partial: replay while only some rows run (the serving engine, whose batch is never full for long);
        # the rest compute in their free rows at position 0, unread. Its graphs outlive a request, so they are
        # captured on first use however few tokens that request still needs.
        self.partial = partial
        self.weights = weights_at(batcher.model)  # the graphs read these tensors: new ones mean a new capture
        self.pos = torch.zeros(B, dtype=torch.long, device=device)  # each row's next cache slot
        self.synced = False  # whether pos matches the rows' lengths
        self.out = torch.empty(B, GRAPH_CHUNK, dtype=torch.long, device=device)
        self.logits = torch.empty(0)
        self.greedy: torch.cuda.CUDAGraph | None = None
        self.sampled: torch.cuda.CUDAGraph | None = None
        self.verifier: torch.cuda.CUDAGraph | None = None
        self.verify_inputs = torch.zeros(0, dtype=torch.long, device=device)  # (B, width), set on first use
        self.verify_out: tuple[torch.Tensor, torch.Tensor] | None = None  # (logits (B, width, V), argmax (B, width))
        # The tail graphs, by how many leading rows they compute (1, 2, 4, ... up to B): rows 0..k-1, where k covers
        # the joining rows. A lone request computes one row's tokens, not the whole batch's.
        self.tailers: dict[int, torch.cuda.CUDAGraph] = {}
        self.tail_inputs = torch.zeros(B, TAIL_TOKENS, dtype=torch.long, device=device)
        self.tail_last = torch.zeros(B, dtype=torch.long, device=device)  # each row's last real input
        self.tail_outs: dict[int, torch.Tensor] = {}  # k -> (k, V), set when captured
        # torch.compile fuses each layer's elementwise work (norms, RoPE, SwiGLU) into a few kernels;
        # the graph then launches fewer, larger kernels. It costs a compile on first use.
        self.forward = torch.compile(self._forward, dynamic=False) if compile else self._forward

    def chunk(self, lengths: list[int], remaining: int) -> torch.Tensor | None:
        """The next :data:`GRAPH_CHUNK` greedy tokens of every row (B, chunk); None where eager steps are better."""
        if max(lengths) + GRAPH_CHUNK > self.batcher.max_len:
            return None
        self._fresh()
        if self.greedy is None:
            if remaining <= 2 * GRAPH_CHUNK and not self.partial:  # capturing costs ~100 steps: a short run stays
                return None  # eager, except in the serving engine, whose graphs serve every later request
            self.greedy = self._capture(self._greedy_steps, lengths)
        self._sync(lengths)
        self.greedy.replay()
        return self.out.clone()

    def step(self, lengths: list[int], remaining: int) -> torch.Tensor | None:
        """The logits (B, V) of one replayed step, valid until the next; None where an eager step is better."""
        self._fresh()
        if self.sampled is None:
            if remaining <= LOGITS_GRAPH_MIN_TOKENS and not self.partial:  # as in chunk
                return None
            self.sampled = self._capture(self._sampled_step, lengths)
        self._sync(lengths)
        self.sampled.replay()
        return self.logits

    def verify(self, inputs: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One replayed speculative verify forward of every row: logits (B, W, V) and their argmax (B, W).

        ``inputs`` (B, W): each row's next input and its proposals, padded to the graph's width W (the
        first call's width; later calls pad to it, and a short proposal costs the same as a long one,
        which weight-bound decoding hardly notices). Row i's tokens sit from ``lengths[i]`` on. The
        outputs are valid until the next replay.
        """
        self._fresh()
        n = inputs.shape[0]  # the running rows: fewer than B when ``partial``
        if self.verifier is None:
            self.verify_inputs = inputs.new_zeros(self.batcher.max_batch, inputs.shape[1])
            self.verify_inputs[:n] = inputs
            self.synced = False
            self.verifier = self._capture(self._verify_step, lengths)
        assert inputs.shape[1] <= self.verify_width, "the caller pads the proposals to verify_width"
        self.verify_inputs.zero_()
        self.verify_inputs[:n, : inputs.shape[1]] = inputs
        self._sync(lengths)
        self.verifier.replay()
        self.synced = False  # the caller advances each row by what it accepted
        assert self.verify_out is not None
        logits, argmax = self.verify_out
        return logits[:n], argmax[:n]

    def tail(self, joining: dict[int, list[int]], lengths: list[int]) -> torch.Tensor:
        """Logits (k, V) of rows 0..k-1 after each joining row's tokens, from one replay of a captured forward of
        those rows, k the smallest of 1, 2, 4, ... (or the batch) that holds every joining row.

        ``joining``: row -> its prompt's tokens after its cached prefix (at most :data:`TAIL_TOKENS`), which
        continue from that row's entry of ``lengths`` (the prefix's length; the other running rows' lengths
        are where their next tokens go). Every row of the k computes TAIL_TOKENS tokens from its position: the
        padding of joining rows and the zeros of the others land past their rows' lengths, slots written again
        before a mask shows them (as the verify graph's do); rows past k are not touched. Valid until the next
        replay.
        """
        self._fresh()
        self.synced = False  # joining rows start at their cached prefix's length
        B = self.batcher.max_batch
        k = min(B, 1 << max(joining).bit_length())  # rows 0..max(joining): a power of two at least that many
        if k not in self.tailers:
            self.tailers[k] = self._capture(lambda: self._tail_step(k), lengths)
        inputs, last = [[0] * TAIL_TOKENS for _ in range(k)], [0] * k
        for row, tokens in joining.items():
            assert 0 < len(tokens) <= TAIL_TOKENS, "the caller sends at most TAIL_TOKENS tokens a row"
            inputs[row][: len(tokens)] = tokens
            last[row] = len(tokens) - 1
        upload(self.tail_inputs[:k], inputs)  # no wait for the prefix cache's copies queued before
        upload(self.tail_last[:k], last)
        self._sync(lengths)
        self.tailers[k].replay()
        self.synced = False  # the joining rows' lengths are their prompts' now
        return self.tail_outs[k]

    def _tail_step(self, k: int) -> None:
        """The tail forward of rows 0..k-1: each row's TAIL_TOKENS inputs from its ``pos``, the logits of its
        ``tail_last`` one."""
        self.tail_outs[k] = self._window(self.tail_inputs[:k], select=self.tail_last[:k])[:, -1]

    def _fresh(self) -> None:
        """Forget the graphs when the model's weights were replaced (they read the old tensors): capture anew."""
        if self.partial and (now := weights_at(self.batcher.model)) != self.weights:
            self.greedy = self.sampled = self.verifier = None
            self.tailers.clear()
            self.weights = now

    @property
    def verify_width(self) -> int:
        return int(self.verify_inputs.shape[1])

    def _verify_step(self) -> None:
        """The verify forward over the whole cache, each row's W tokens from its ``pos``, under a causal mask."""
        b = self.batcher
        logits = self._window(self.verify_inputs)  # (B, W, V)
        if b.vocab_limit is not None and b.vocab_limit < logits.shape[-1]:
            logits[..., b.vocab_limit :] = float("-inf")
        self.verify_out = (logits, ops.argmax(logits))

    def _window(self, tokens: torch.Tensor, select: torch.Tensor | None = None) -> torch.Tensor:
        """The forward of rows 0..n-1 (n = ``tokens.shape[0]``), each row's W = ``tokens.shape[1]`` tokens from its
        ``pos``, over the whole cache under a causal mask (the verify and tail graphs): logits (n, W, V), or
        (n, 1, V) at ``select``."""
        b, (n, W) = self.batcher, tokens.shape
        rows, pos = slice(0, n), self.pos[:n]
        positions = (pos[:, None] + torch.arange(W, device=pos.device)).clamp_(max=b.max_len - 1)
        mask = torch.arange(b.max_len, device=pos.device) <= positions[:, :, None]  # (n, W, max_len)
        flat = b.caches[0].flat_index(rows, pos, W)
        write = CacheWrite(rows=rows, pos=pos, length=b.max_len, flat_index=flat)
        return b.model(tokens, positions=positions, mask=mask[:, None], write=write, select=select)

    def _forward(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One step of every row over the whole cache, under a mask: the same shapes every step."""
        b = self.batcher
        rows = slice(0, b.max_batch)
        write = CacheWrite(rows=rows, pos=pos, length=b.max_len, flat_index=b.caches[0].flat_index(rows, pos))
        return decode_step(b.model, tokens, write, pos)

    def _greedy_steps(self) -> None:
        b = self.batcher
        for j in range(GRAPH_CHUNK):
            logits = self.forward(b.tokens, self.pos)  # (B, V)
            if b.vocab_limit is not None and b.vocab_limit < logits.shape[-1]:
                logits[:, b.vocab_limit :] = float("-inf")
            self.out[:, j] = ops.argmax(logits)
            b.tokens.copy_(self.out[:, j : j + 1])
            self.pos.add_(1)

    def _sampled_step(self) -> None:
        self.logits = self.forward(self.batcher.tokens, self.pos)  # allocated while capturing: the static output
        self.pos.add_(1)

    def _sync(self, lengths: list[int]) -> None:
        if not self.synced:  # rows joined, left or stepped eagerly since the last replay
            padded = lengths + [0] * (self.batcher.max_batch - len(lengths))  # free rows: position 0
            upload(self.pos, padded)
            self.synced = True

    def _capture(self, steps: Callable[[], None], lengths: list[int]) -> torch.cuda.CUDAGraph:
        self._sync(lengths)
        self.batcher._install()
        graph = capture(steps, restore=[self.batcher.tokens, self.pos])
        keep(self.batcher.model, self.key, self.batcher)  # worth reusing now
        return graph


#: Compiled decode steps by model structure (:func:`_structure`), the most recently used last.
_compiled_steps: OrderedDict[Hashable, Callable[..., torch.Tensor]] = OrderedDict()
#: How many structures keep their compiled step.
COMPILED_KEEP = 4


def _plain_step(model: Transformer, tokens: torch.Tensor, n: int, pos: int) -> torch.Tensor:
    return decode_step(model, tokens, CacheWrite(rows=slice(0, n), pos=pos, length=pos + 1))


def _structure(model: Transformer) -> Hashable:
    """What a compiled step's code depends on in the model: the names, shapes and dtypes of its parameters and
    buffers (the installed KV caches among them) and the kinds of its quantized weights."""
    tensors = tuple((name, tuple(t.shape), t.dtype) for name, t in model.named_parameters())
    tensors += tuple((name, tuple(t.shape), t.dtype) for name, t in model.named_buffers())
    return tensors + tuple(type(m).__name__ for m in model.modules() if isinstance(m, QuantizedWeight))


def compiled_step(model: Transformer) -> Callable[[Transformer, torch.Tensor, int, int], torch.Tensor]:
    """``step(model, tokens, n, pos)``: the decode step of rows 0..n-1 all at ``pos``, compiled for ``model``'s
    structure, for all lengths.

    On a CPU the eager step is hundreds of small PyTorch ops a token, each paying Python dispatch;
    torch.compile (Inductor) fuses the norms, RoPE, SwiGLU and residual adds into a few C++ loops and
    calls the matmuls (quantized or not) directly. Positions are dynamic. Dynamo's guards on the model's
    modules are skipped (checking them took 1.7 ms a token for SmolLM2, more than a layer's work): instead
    each structure (:func:`_structure`: the caches' shapes too, which is why :func:`fixed_batcher` gives a
    compiled batch caches of the model's whole context, allocated lazily) gets its own compiled copy of the
    step, looked up once per generation. A model of the same structure shares it: the weights are read from the
    model passed in. Inductor's on-disk cache makes later processes' compiles faster.
    """
    key = _structure(model)
    step = _compiled_steps.get(key)
    if step is None:
        # A copy of the function's code: Dynamo keeps its compiled code on the code object, so this copy's cache,
        # whose guards skip the model's modules, is never consulted for another structure.
        code = _plain_step.__code__.replace()
        fresh = types.FunctionType(code, _plain_step.__globals__, _plain_step.__name__)
        options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        step = torch.compile(fresh, dynamic=True, options=options)
        _compiled_steps[key] = step
        while len(_compiled_steps) > COMPILED_KEEP:
            _compiled_steps.popitem(last=False)
    _compiled_steps.move_to_end(key)
    return step
