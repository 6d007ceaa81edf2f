"""The token loop: ``prefill``, ``decode_step`` and ``pick``, run by the :class:`Batcher`.

gpt-fast's shape. :func:`prefill` runs prompts (right-padded, from position 0)
and fills the KV cache; :func:`decode_step` feeds one token per row, each at
its own position; :func:`pick` turns a step's logits into tokens (grammar mask,
vocabulary limit, penalties, sampling, logprobs), written once for everyone.

The :class:`Batcher` is the loop itself. Each running sequence owns a row of
its KV cache; a sequence joins between steps with a prefill into a free row,
and one that leaves is replaced by the last row, so the running rows are
always 0..n-1 and every step works on a contiguous slice of the cache. The
serving engine (``forge.engine``) drives it with sequences coming and going;
the plain generator and ``generate_tokens`` drive one fixed batch
(:func:`fixed_batcher`).

On CUDA a fixed batch replays its decode step from CUDA graphs (see
``forge.core.cuda_graphs``): plain greedy rows run :data:`GRAPH_CHUNK` steps per
replay with the argmax inside the graph; any other decoding replays the
forward alone, one step per replay, and picks outside it. Attention then
reads the whole preallocated cache under a mask, so shapes never change.

With a :class:`~forge.core.prefix_cache.PrefixCache`, a joining prompt starts from the stored keys
and values of its longest cached prefix and only the rest is prefilled; rows with ``speculate``
propose tokens by n-gram lookup and verify them in one forward (see ``forge.core.speculative``).
The forward passes themselves live in ``forge.core.steps``.

Torch only and single-threaded; ``forge.engine`` runs a batcher in a worker thread.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch

from forge.core.cuda_graphs import graph_key, reusable
from forge.core.device import on_device
from forge.core.draft import DraftProposer
from forge.core.kv_cache import CacheWrite, KVCache, move_row
from forge.core.prefix_cache import PrefixCache
from forge.core.sampling import (
    SamplingParams,
    TokenConstraint,
    apply_token_bitmask,
    constraint_mask,
    process_logits,
    sample,
    top_logprobs,
)
from forge.core.speculative import DRAFT_MAX, NgramProposer, Proposer, Speculation, verify
from forge.core.steps import GRAPH_CHUNK, TAIL_MAX_BATCH, TAIL_TOKENS, GraphedSteps, compiled_step, decode_step, prefill
from forge.core.transformer import Transformer

__all__ = [
    "GRAPH_CHUNK",
    "Batcher",
    "Picked",
    "Sequence",
    "StepResult",
    "compiled_step",
    "decode_step",
    "fixed_batcher",
    "pick",
    "prefill",
]

Observer = Callable[[torch.Tensor, torch.Tensor], None]
#: Some rows' logprobs, on the device: (the rows, their tokens' logprobs (m,), top ids (m, k), top values (m, k)).
RowLogprobs = tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(eq=False)
class Sequence:
    """One request inside the batcher."""

    prompt: list[int]
    max_new_tokens: int
    params: SamplingParams
    generator: torch.Generator | None = None
    stop_ids: frozenset[int] = frozenset()
    logprobs: int | None = None  # None: none; k: the chosen token's and the top k
    constraint: TokenConstraint | None = None  # e.g. a JSON schema: masks what may come next
    speculate: bool = False  # propose tokens by n-gram lookup, verified in one forward (forge.core.speculative)
    # state, owned by the batcher
    row: int = -1
    length: int = 0  # tokens in the cache
    generated: int = 0
    done: bool = False
    group: Hashable = field(default=None, repr=False)  # rows of one group are picked in one call
    output: list[int] = field(default_factory=list, repr=False)  # the tokens generated so far
    cached: int = 0  # prompt tokens whose keys and values came from the prefix cache
    spec: Speculation | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class StepResult:
    """A token for a sequence; ``finished`` when it was the sequence's last (a stop token or the budget)."""

    seq: Sequence
    token: int
    finished: bool
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


@dataclass(slots=True)
class Picked:
    """A step's tokens (n, k) on the device: k is 1, or :data:`GRAPH_CHUNK` from a greedy graph replay."""

    tokens: torch.Tensor
    ids: list[list[int]] | None = None  # the same on the host, when a grammar needed them already
    logprobs: list[RowLogprobs] = field(default_factory=list)  # one entry per sampling group that asked
    #: Per row, each new token's (logprob, top): a speculative step's rows emit different numbers of tokens.
    token_logprobs: list[list[tuple[float, tuple[tuple[int, float], ...]]]] | None = None


def pick(
    logits: torch.Tensor,
    seqs: list[Sequence],
    *,
    vocab_limit: int | None = None,
    seen: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    observe: Observer | None = None,
) -> Picked:
    """The next token of each row of ``logits`` (n, V).

    Grammar mask -> vocab limit -> penalties -> sample -> logprobs -> accept -> penalty counts. Rows
    of one group (plain greedy, or the same params and generator) are picked together: a fixed batch
    in one call; the others each with their own seed. ``seen`` (n, V) bool and ``counts`` (n, V), the
    rows' penalty state, are updated in place. ``observe(logits, tokens)`` sees the penalised logits.
    """
    words = constraint_mask([s.constraint for s in seqs], logits.shape[-1])  # CPU work while a GPU still runs
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits[:, vocab_limit:] = float("-inf")
    if words is not None:
        logits = apply_token_bitmask(logits, words)
    first = seqs[0]
    if any(s.group != first.group for s in seqs):
        tokens, processed, found = _pick_groups(logits, seqs, seen, counts, observe is not None)
    elif observe is None and all(s.logprobs is None for s in seqs):  # the common step: sample() penalises
        tokens, processed, found = sample(logits, first.params, first.generator, seen, counts), logits, []
    else:  # one call for every row (a fixed batch): no indexing
        processed = process_logits(logits, first.params, seen, counts)
        tokens = sample(processed, first.params, first.generator)
        found = _logprobs(seqs, list(range(len(seqs))), processed, tokens)
    picked = Picked(tokens[:, None], logprobs=found)
    if observe is not None:
        observe(processed, tokens)
    if words is not None:  # the grammars advance on the host: this step's one sync comes here
        ids = tokens.tolist()
        for seq, token in zip(seqs, ids, strict=True):
            if seq.constraint is not None:
                seq.constraint.accept(token)
        picked.ids = [[t] for t in ids]
    if counts is not None:
        counts.scatter_add_(1, tokens[:, None], torch.ones_like(counts[:, :1]))
    if seen is not None:
        seen.scatter_(1, tokens[:, None], True)
    return picked


def _pick_groups(
    logits: torch.Tensor,
    seqs: list[Sequence],
    seen: torch.Tensor | None,
    counts: torch.Tensor | None,
    observed: bool,
) -> tuple[torch.Tensor, torch.Tensor, list[RowLogprobs]]:
    """Rows of several groups, each group picked in one call with its own params and seed.

    The tokens (n,), the penalised logits (n, V) when ``observed``, and the logprobs the rows asked for.
    """
    groups: dict[Hashable, list[int]] = {}
    for i, seq in enumerate(seqs):
        groups.setdefault(seq.group, []).append(i)
    tokens = torch.empty(len(seqs), dtype=torch.long, device=logits.device)
    processed = torch.empty_like(logits, dtype=torch.float) if observed else logits
    found: list[RowLogprobs] = []
    for rows in groups.values():
        # A row alone (a served request with its own seed) is a slice: no index tensor, no gather copies.
        index: slice | torch.Tensor = (
            slice(rows[0], rows[0] + 1) if len(rows) == 1 else torch.tensor(rows, device=logits.device)
        )
        first = seqs[rows[0]]
        penalised = process_logits(
            logits[index],
            first.params,
            seen[index] if seen is not None else None,
            counts[index] if counts is not None else None,
        )
        chosen = sample(penalised, first.params, first.generator)
        tokens[index] = chosen
        if observed:
            processed[index] = penalised
        found += _logprobs(seqs, rows, penalised, chosen)
    return tokens, processed, found


def _logprobs(
    seqs: list[Sequence], rows: list[int], processed: torch.Tensor, chosen: torch.Tensor
) -> list[RowLogprobs]:
    """The logprobs a group's rows asked for, under its penalised logits: one call for all of them."""
    local = [j for j, i in enumerate(rows) if seqs[i].logprobs is not None]
    if not local:
        return []
    k = max(seqs[rows[j]].logprobs or 0 for j in local)
    if len(local) < len(rows):
        index = torch.tensor(local, device=processed.device)
        processed, chosen = processed[index], chosen[index]
    return [([rows[j] for j in local], *top_logprobs(processed, chosen, k))]


def _plain(seq: Sequence) -> bool:
    """Whether a row's picks depend on nothing but the step's logits: no grammar, no penalties (can speculate)."""
    return seq.constraint is None and not seq.params.penalised and seq.params.repetition_penalty == 1.0


def _group(seq: Sequence) -> Hashable:
    """Rows with equal keys are picked in one call: plain greedy rows all together, others by params and seed."""
    params = seq.params
    if params.greedy and not params.penalised and params.repetition_penalty == 1.0:
        return None
    return id(params), 0 if params.greedy else id(seq.generator)


class Batcher:
    """Runs up to ``max_batch`` sequences of at most ``max_len`` tokens each on ``model``: the token loop.

    ``cache=False`` recomputes every sequence in full each step: the reference the cached loop is
    tested against. ``graphs`` (CUDA, a fixed batch; see :func:`fixed_batcher`): replay the decode
    step from CUDA graphs while every row runs, and keep this batcher on the model under that key.
    ``observe(logits, tokens)`` sees each pick's penalised logits (n, V) and tokens (n,).
    """

    def __init__(
        self,
        model: Transformer,
        *,
        max_batch: int,
        max_len: int,
        vocab_limit: int | None = None,
        dtype: torch.dtype | None = None,
        cache: bool = True,
        graphs: Hashable | None = None,
        partial_graphs: bool = False,
        compile: bool = False,
        prefix_cache: PrefixCache | None = None,
        draft: Transformer | None = None,
    ) -> None:
        self.model, self.max_batch, self.max_len, self.vocab_limit = model, max_batch, max_len, vocab_limit
        self.draft = draft  # speculating rows take this model's proposals, else n-gram lookup's
        self.prefix_cache = prefix_cache  # prompts start from the stored keys and values of their longest prefix
        self.device = model.tok_emb.weight.device
        # A compiled step's caches span the whole context, allocated lazily (pages only as they are written).
        lazy = compile and graphs is None
        self.caches: list[KVCache] = model.make_caches(max_batch, max_len, dtype=dtype, lazy=lazy) if cache else []
        self._first = model.blocks[0].attn  # where to see whose caches the model holds
        # Each row's next input token; without a cache, each row's whole sequence so far.
        self.tokens = torch.zeros(max_batch, 1 if cache else max_len, dtype=torch.long, device=self.device)
        self.seen: torch.Tensor | None = None  # (max_batch, V) bool, for the repetition penalty
        self.counts: torch.Tensor | None = None  # (max_batch, V), for presence/frequency penalties
        self.running: list[Sequence] = []  # running[i].row == i
        self.observe: Observer | None = None
        self.graphs = GraphedSteps(self, graphs, compile, partial_graphs) if graphs is not None and cache else None
        # Elsewhere than CUDA, ``compile`` compiles the eager decode step (see :func:`compiled_step`).
        self.compiled = compile and cache and self.graphs is None
        self._step: Callable[..., torch.Tensor] | None = None  # the compiled step, chosen on first use

    @property
    def free(self) -> int:
        return self.max_batch - len(self.running)

    # -- sequences join, step and leave ---------------------------------------------------------
    @torch.inference_mode()
    def add(self, seq: Sequence) -> StepResult:
        """Prefill ``seq`` into a free row and pick its first token."""
        return self.add_many([seq])[0]

    @torch.inference_mode()
    def add_many(self, seqs: list[Sequence]) -> list[StepResult]:
        """Prefill several sequences in one forward and pick their first tokens (see :meth:`prefill`)."""
        return self._results(seqs, self.prefill(seqs))

    @torch.inference_mode()
    def step(self) -> list[StepResult]:
        """One batched forward: the next token of every running sequence, each sequence's tokens in order.

        A greedy graph replay gives the next :data:`GRAPH_CHUNK` of each (up to a sequence's last).
        """
        if not self.running:
            return []
        seqs = list(self.running)
        return self._results(seqs, self.decode())

    @torch.inference_mode()
    def remove(self, seq: Sequence) -> None:
        """Free ``seq``'s row (the last running row moves into it)."""
        if seq.row < 0 or seq.row >= len(self.running) or self.running[seq.row] is not seq:
            return
        if self.prefix_cache is not None and self.caches and seq.output:  # a next turn may start with this exchange
            # (no output: its prefill failed, and its row may hold anything)
            tokens = seq.prompt + seq.output
            self.prefix_cache.store(tokens, self.caches, seq.row, min(seq.length, len(tokens) - 1))
        last = self.running.pop()
        if last is not seq:
            move_row(self.caches, last.row, seq.row)
            for state in (self.tokens, self.seen, self.counts):
                if state is not None:
                    state[seq.row] = state[last.row]
            last.row = seq.row
            self.running[seq.row] = last
        seq.row, seq.done = -1, True
        if self.graphs is not None:
            self.graphs.synced = False

    def clear(self) -> None:
        """Drop every sequence and take the caches out of the model: ready for another generation."""
        for seq in self.running:
            seq.row, seq.done = -1, True
        self.running, self.observe = [], None
        self.release()

    def release(self) -> None:
        """Take this batcher's caches out of the model (its next forward puts them back)."""
        if self.caches and self._first.cache is self.caches[0]:
            self.model.use_caches(None)

    # -- the loop, on the device ----------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> Picked:
        """``seqs`` join in free rows: one forward over their prompts, right-padded to the longest; first tokens.

        The padding writes keys past each prompt's end, which no mask shows before the row's next tokens
        overwrite them.
        """
        assert 0 < len(seqs) <= self.free, "not enough free rows: check Batcher.free first"
        sizes = [len(s.prompt) for s in seqs]
        T, first = max(sizes), len(self.running)
        rows = slice(first, first + len(seqs))
        for i, seq in enumerate(seqs):
            assert seq.prompt and len(seq.prompt) + seq.max_new_tokens <= self.max_len, "the caller checks the budget"
            seq.row, seq.length, seq.generated, seq.done, seq.group = first + i, len(seq.prompt), 0, False, _group(seq)
            seq.output, seq.cached = [], 0
            seq.spec = Speculation(self._proposer(seq)) if seq.speculate and _plain(seq) else None
        self.running.extend(seqs)
        self._reset_penalties(rows, seqs)
        if self.graphs is not None:
            self.graphs.synced = False
        if not self.caches:
            padded = torch.tensor([s.prompt + [0] * (T - len(s.prompt)) for s in seqs], device=self.device)
            last = torch.tensor([n - 1 for n in sizes], device=self.device) if min(sizes) < T else None
            self.tokens[rows, :T] = padded
            return self._pick(rows, seqs, prefill(self.model, padded, None, last))
        self._install()
        if self.prefix_cache is not None:
            for seq in seqs:
                seq.cached = self.prefix_cache.load(seq.prompt, self.caches, seq.row)
        suffixes = [s.prompt[s.cached :] for s in seqs]
        if self._tail_graph(seqs, suffixes):  # every row continues a cached prefix, by a few tokens: one replay
            assert self.graphs is not None
            joining = {id(s) for s in seqs}
            lengths = [s.cached if id(s) in joining else s.length for s in self.running]
            logits = self.graphs.tail({s.row: p for s, p in zip(seqs, suffixes, strict=True)}, lengths)[rows]
            return self._stored(rows, seqs, logits)
        T = max(map(len, suffixes))
        padded = on_device([p + [0] * (T - len(p)) for p in suffixes], self.device)  # (k, T)
        last = on_device([len(p) - 1 for p in suffixes], self.device) if min(map(len, suffixes)) < T else None
        cached = {s.cached for s in seqs}
        if len(cached) == 1 and (start := cached.pop()):  # every row continues a cached prefix of one length
            # Causal attention over [0, start + T) with no mask: the fused kernel's path, no new shapes to plan.
            logits = prefill(self.model, padded, CacheWrite(rows=rows, pos=start, length=start + T), last)
        elif any(s.cached for s in seqs):  # each row continues its cached prefix
            starts = on_device([s.cached for s in seqs], self.device)
            write = CacheWrite(rows=rows, pos=starts, length=max(sizes))
            logits = prefill(self.model, padded, write, last, starts)
        else:
            logits = prefill(self.model, padded, CacheWrite(rows=rows, pos=0, length=T), last)
        return self._stored(rows, seqs, logits)

    def _stored(self, rows: slice, seqs: list[Sequence], logits: torch.Tensor) -> Picked:
        """After a prefill: the prompts' new blocks go into the prefix cache, then the first tokens are picked."""
        if self.prefix_cache is not None:
            for seq in seqs:
                self.prefix_cache.store(seq.prompt, self.caches, seq.row, len(seq.prompt))
        return self._pick(rows, seqs, logits)

    def _tail_graph(self, seqs: list[Sequence], suffixes: list[list[int]]) -> bool:
        """Whether the joining rows' prefill replays the captured tail graph (GraphedSteps.tail): CUDA graphs
        that replay partial batches (or a full one) of at most TAIL_MAX_BATCH rows, every row after a cached
        prefix with at most TAIL_TOKENS tokens left, all of them inside the cache."""
        g = self.graphs
        return (
            g is not None
            and self.max_batch <= TAIL_MAX_BATCH
            and (g.partial or len(self.running) == self.max_batch)
            and all(s.cached for s in seqs)
            and max(map(len, suffixes)) <= TAIL_TOKENS
            and all(s.cached + TAIL_TOKENS <= self.max_len for s in seqs)
        )

    @torch.inference_mode()
    def decode(self) -> Picked:
        """Advance every running sequence: one step, a speculative step, or a greedy graph replay's chunk."""
        seqs, lengths = self.running, [s.length for s in self.running]
        if any(s.spec is not None for s in seqs) and self.observe is None and all(map(_plain, seqs)):
            accepted = verify(self)  # None: no row has a proposal this step
            if accepted is not None:
                if self.graphs is not None:
                    self.graphs.synced = False
                ids = [a.tokens for a in accepted]
                logprobs = [a.logprobs for a in accepted] if any(s.logprobs is not None for s in seqs) else None
                return Picked(self.tokens[: len(seqs)], ids=ids, token_logprobs=logprobs)
        logits = None
        if self.graphs is not None and (len(seqs) == self.max_batch or self.graphs.partial):
            # Replay the whole batch's graph; with ``partial``, rows past the running ones compute on in their
            # free rows (cache slots no running row reads) and their outputs are dropped.
            n, remaining = len(seqs), max(s.max_new_tokens - s.generated for s in seqs)
            if self.observe is None and all(s.group is None and s.logprobs is None for s in seqs):
                block = self.graphs.chunk(lengths, remaining)
                if block is not None:
                    for seq in seqs:
                        seq.length, seq.generated = seq.length + GRAPH_CHUNK, seq.generated + GRAPH_CHUNK
                    return Picked(block[:n])
            logits = self.graphs.step(lengths, remaining)
            logits = logits[:n] if logits is not None else None
        if logits is None:
            logits = self._forward(lengths)
        for seq in seqs:
            seq.length += 1
        return self._pick(slice(0, len(seqs)), seqs, logits)

    def _forward(self, lengths: list[int]) -> torch.Tensor:
        """One eager step of rows 0..n-1, whose newest tokens sit at ``lengths``: logits (n, V)."""
        rows = slice(0, len(lengths))
        if self.graphs is not None:
            self.graphs.synced = False
        if not self.caches:  # the reference: every sequence again, in full
            last = torch.tensor(lengths, device=self.device) if min(lengths) < max(lengths) else None
            return prefill(self.model, self.tokens[rows, : max(lengths) + 1], None, last)
        self._install()
        if min(lengths) == max(lengths):  # one position for all rows (batch 1 always): the cheapest step
            tokens = self.tokens if rows.stop == self.max_batch else self.tokens[rows]  # batch 1: no slicing
            if self.compiled:
                if self._step is None:  # once the caches are installed: they are part of the model's structure
                    self._step = compiled_step(self.model)
                return self._step(self.model, tokens, rows.stop, lengths[0])
            return decode_step(self.model, tokens, CacheWrite(rows=rows, pos=lengths[0], length=lengths[0] + 1))
        pos = on_device(lengths, self.device)  # (n,), from the host: no device sync
        flat = self.caches[0].flat_index(rows, pos)
        write = CacheWrite(rows=rows, pos=pos, length=max(lengths) + 1, flat_index=flat)
        return decode_step(self.model, self.tokens[rows], write, pos)

    def _pick(self, rows: slice, seqs: list[Sequence], logits: torch.Tensor) -> Picked:
        """Pick the rows' next tokens and make them the rows' next inputs."""
        seen = self.seen[rows] if self.seen is not None else None
        counts = self.counts[rows] if self.counts is not None else None
        picked = pick(logits, seqs, vocab_limit=self.vocab_limit, seen=seen, counts=counts, observe=self.observe)
        if self.caches:
            (self.tokens if rows.stop - rows.start == self.max_batch else self.tokens[rows]).copy_(picked.tokens)
        else:  # appended after each sequence's newest token
            at = torch.tensor([[s.length] for s in seqs], device=self.device)  # (k, 1)
            self.tokens[rows] = self.tokens[rows].scatter(1, at, picked.tokens)
        for seq in seqs:
            seq.generated += 1
        return picked

    def _reset_penalties(self, rows: slice, seqs: list[Sequence]) -> None:
        """Fresh penalty state for joining rows: no counts yet, their prompt tokens already seen."""
        if self.seen is None:
            if all(not s.params.penalised and s.params.repetition_penalty == 1.0 for s in seqs):
                return
            vocab = self.model.config.vocab_size
            self.seen = torch.zeros(self.max_batch, vocab, dtype=torch.bool, device=self.device)
            self.counts = torch.zeros(self.max_batch, vocab, device=self.device)
        assert self.counts is not None
        self.counts[rows] = 0
        self.seen[rows] = False
        for i, seq in enumerate(seqs):
            self.seen[rows.start + i, torch.tensor(seq.prompt, device=self.device)] = True

    def _proposer(self, seq: Sequence) -> Proposer:
        if self.draft is None:
            return NgramProposer(seq.prompt)
        room = len(seq.prompt) + seq.max_new_tokens + DRAFT_MAX + 1
        return DraftProposer(self.draft, seq.prompt, room, self.vocab_limit)

    def _install(self) -> None:
        """Put this batcher's caches into the model (another batcher may have used it since)."""
        if self._first.cache is not self.caches[0]:
            self.model.use_caches(self.caches)

    # -- back to the host ---------------------------------------------------------------------
    def _results(self, seqs: list[Sequence], picked: Picked) -> list[StepResult]:
        """Each sequence's new tokens, up to its last; token ids reach the host in one transfer."""
        ids = picked.ids if picked.ids is not None else picked.tokens.tolist()  # the one host sync of the step
        logprobs: dict[int, tuple[float, tuple[tuple[int, float], ...]]] = {}
        for rows, own, top_ids, top_values in picked.logprobs:
            for i, lp, tids, tvalues in zip(rows, own.tolist(), top_ids.tolist(), top_values.tolist(), strict=True):
                k = seqs[i].logprobs or 0
                logprobs[i] = (lp, tuple(zip(tids[:k], tvalues[:k], strict=True)))
        results = []
        for i, (seq, new) in enumerate(zip(seqs, ids, strict=True)):
            before = seq.generated - len(new)
            for j, token in enumerate(new):
                finished = token in seq.stop_ids or before + j + 1 >= seq.max_new_tokens
                if picked.token_logprobs is not None and picked.token_logprobs[i]:
                    results.append(StepResult(seq, token, finished, *picked.token_logprobs[i][j]))
                else:
                    results.append(StepResult(seq, token, finished, *logprobs.get(i, (None, ()))))
                if finished:
                    new = new[: j + 1]
                    break
            seq.output += new
            if seq.spec is not None:
                seq.spec.proposer.extend(new)
        return results


def fixed_batcher(
    model: Transformer,
    seqs: list[Sequence],
    *,
    vocab_limit: int | None = None,
    cache: bool = True,
    cuda_graphs: bool = True,
    compile: bool = False,
    draft: Transformer | None = None,
) -> Batcher:
    """A batcher for exactly ``seqs``, one fixed batch; :meth:`Batcher.clear` it when done.

    On CUDA (``cuda_graphs``) its decode steps replay CUDA graphs, and one kept from an earlier
    generation of the same batch size, cache length and weights is reused, with its graphs.
    """
    need = max(len(s.prompt) + s.max_new_tokens for s in seqs)
    if not (cache and cuda_graphs and model.tok_emb.weight.device.type == "cuda"):
        # Elsewhere, ``compile`` compiles the step of rows that share one position: prompts of one length.
        compile = compile and cache and len({len(s.prompt) for s in seqs}) == 1
        total = model.config.context_length if compile else need
        return Batcher(
            model,
            max_batch=len(seqs),
            max_len=total,
            vocab_limit=vocab_limit,
            cache=cache,
            compile=compile,
            draft=draft,
        )
    # A cache rounded up to 256 slots lets generations of other lengths replay the same captured graphs.
    total = min(model.config.context_length, -(-need // 256) * 256)
    key = graph_key(model, len(seqs), total, chunk=GRAPH_CHUNK, vocab_limit=vocab_limit, compile=compile)
    kept = reusable(model, key)
    if isinstance(kept, Batcher) and not kept.running:
        kept.draft = draft
        return kept
    return Batcher(
        model, max_batch=len(seqs), max_len=total, vocab_limit=vocab_limit, graphs=key, compile=compile, draft=draft
    )
