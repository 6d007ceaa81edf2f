"""Token generation with a preallocated KV cache.

Prefill and single-token decode are separate small functions. A batch of
prompts of different lengths is left-padded; a key mask hides the padding and
per-row positions make each prompt start at position 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from forge.core.cuda_graphs import GraphedGreedyDecoder, graph_key, keep, reusable
from forge.core.sampling import (
    SamplingParams,
    TokenConstraint,
    apply_token_bitmask,
    constraint_mask,
    process_logits,
    sample,
)
from forge.core.transformer import Transformer

__all__ = ["generate_tokens"]

#: A sampled generation captures a logits graph (see ``forge.core.cuda_graphs``) only past this many tokens.
LOGITS_GRAPH_MIN_TOKENS = 32


def _prompt_batch(prompts: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts into tokens (B, T) and a validity mask (B, T)."""
    width = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), width, dtype=torch.long)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        if prompt:
            tokens[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            valid[row, width - len(prompt) :] = True
    return tokens.to(device), valid.to(device)


def _attention_mask(valid: torch.Tensor, n_query: int) -> torch.Tensor:
    """(B, 1, Tq, Tk) bool: causal, padding keys hidden; a pad query sees itself so no row is empty."""
    Tk = valid.shape[1]
    q_pos = torch.arange(Tk - n_query, Tk, device=valid.device)[:, None]  # (Tq, 1)
    k_pos = torch.arange(Tk, device=valid.device)[None, :]  # (1, Tk)
    causal = k_pos <= q_pos  # (Tq, Tk)
    mask = causal & (valid[:, None, :] | (k_pos == q_pos))  # (B, Tq, Tk)
    return mask[:, None]  # (B, 1, Tq, Tk)


def _positions(valid: torch.Tensor) -> torch.Tensor:
    """Per-row positions (B, T): 0 at each prompt's first real token, 0 on padding."""
    return (valid.long().cumsum(dim=-1) - 1).clamp(min=0)


def prefill(model: Transformer, tokens: torch.Tensor, valid: torch.Tensor, padded: bool) -> torch.Tensor:
    """Run the prompts, filling the KV cache from position 0; logits (B, V) of the last position."""
    mask = _attention_mask(valid, tokens.shape[1]) if padded else None
    positions = _positions(valid) if padded else None
    return model(tokens, positions=positions, mask=mask, cache_pos=0, last_only=True)[:, -1]


def decode_one(model: Transformer, token: torch.Tensor, pos: int, valid: torch.Tensor, padded: bool) -> torch.Tensor:
    """Feed one token per row (B, 1) at cache slot ``pos``; logits (B, V)."""
    mask = valid[:, None, None, : pos + 1] if padded else None  # (B, 1, 1, pos+1)
    positions = _positions(valid[:, : pos + 1])[:, -1:] if padded else None
    return model(token, positions=positions, mask=mask, cache_pos=pos)[:, -1]


def _forward_full(model: Transformer, tokens: torch.Tensor, valid: torch.Tensor, padded: bool) -> torch.Tensor:
    """The uncached reference: recompute the whole sequence, logits (B, V) of the last position."""
    mask = _attention_mask(valid, tokens.shape[1]) if padded else None
    positions = _positions(valid) if padded else None
    return model(tokens, positions=positions, mask=mask, last_only=True)[:, -1]


@torch.inference_mode()
def generate_tokens(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    autocast_dtype: torch.dtype | None = None,
    vocab_limit: int | None = None,
    observe: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    cuda_graphs: bool = True,
    graph_chunk: int = 8,
    compile: bool = False,
    constraints: Sequence[TokenConstraint | None] | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every prompt, (B,) int64, up to ``max_new_tokens`` times.

    The caller stops early by leaving the loop (e.g. when every row hit a stop).
    ``use_cache=False`` recomputes the whole sequence each step (the reference
    the cached path is tested against). ``vocab_limit`` forbids ids at or above
    it: the model's vocabulary is padded past the tokenizer's, and those ids mean nothing.
    ``observe(logits, tokens)`` sees each step's penalised logits (B, V) and chosen tokens (B,), e.g. for logprobs.
    On CUDA, greedy decoding replays the decode step from a CUDA graph, ``graph_chunk``
    steps per launch (see ``forge.core.cuda_graphs``); other decoding replays a graph of the
    forward alone, a step per launch, and samples outside it. ``cuda_graphs=False`` keeps it eager.
    ``constraints`` holds one :class:`TokenConstraint` per prompt (or None for a free row):
    each step, tokens a row's constraint forbids are masked out before sampling.
    """
    device = model.tok_emb.weight.device
    tokens, valid = _prompt_batch(prompts, device)
    B, T = tokens.shape
    total = T + max_new_tokens
    assert total <= model.config.context_length, "caller must cap max_new_tokens to the context"
    padded = not bool(valid.all())
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=device)
        rows = torch.arange(B, device=device)[:, None].expand_as(tokens)
        seen[rows[valid], tokens[valid]] = True
    counts = torch.zeros(B, model.config.vocab_size, device=device) if params.penalised else None
    rows = list(constraints) if constraints is not None and any(c is not None for c in constraints) else None
    on_graphs = use_cache and cuda_graphs and device.type == "cuda"
    plain = params.greedy and seen is None and counts is None and observe is None and rows is None
    graphable = on_graphs and plain  # greedy: chunks of steps per replay, tokens chosen inside the graph
    logits_graph = on_graphs and not plain  # anything else: the forward per replay, sampling outside it
    key, decoder = None, None
    if graphable or logits_graph:
        # A cache rounded up to 256 slots lets generations of other lengths replay the same captured graph.
        total = min(model.config.context_length, -(-total // 256) * 256)
        chunk = graph_chunk if graphable else 1
        options = dict(chunk=chunk, vocab_limit=vocab_limit, compile=compile, logits=logits_graph)
        key = (graph_key(model, B, total, **options), autocast_dtype)  # type: ignore[arg-type]
        decoder = reusable(model, key)
        # Capturing costs about a hundred steps: a short sampled run without a kept graph stays eager.
        logits_graph = logits_graph and (decoder is not None or max_new_tokens > LOGITS_GRAPH_MIN_TOKENS)
    valid = torch.cat([valid, torch.ones(B, total - T, dtype=torch.bool, device=device)], dim=1)
    autocast = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    was_training = model.training
    model.eval()
    try:
        with autocast:
            if use_cache:
                if decoder is not None:  # its graph reads these caches: the prompt goes there
                    model.use_caches(decoder.caches)
                else:
                    model.setup_cache(B, total, dtype=autocast_dtype)
                logits = prefill(model, tokens, valid[:, :T], padded)
            else:
                logits = _forward_full(model, tokens, valid[:, :T], padded)
            for step in range(max_new_tokens):
                # The CPU computes the masks while a GPU still runs the forward that made `logits`.
                words = constraint_mask(rows, logits.shape[-1]) if rows is not None else None
                if vocab_limit is not None and vocab_limit < logits.shape[-1]:
                    logits[:, vocab_limit:] = float("-inf")
                if words is not None:
                    logits = apply_token_bitmask(logits, words)
                nxt = sample(logits, params, generator, seen, counts)  # (B,)
                if observe is not None:
                    observe(process_logits(logits, params, seen, counts), nxt)
                if rows is not None:
                    for constraint, token in zip(rows, nxt.tolist(), strict=True):
                        if constraint is not None:
                            constraint.accept(token)
                yield nxt
                if step == max_new_tokens - 1:
                    break
                if seen is not None:
                    seen[torch.arange(B, device=device), nxt] = True
                if counts is not None:
                    counts[torch.arange(B, device=device), nxt] += 1
                pos = T + step
                if graphable and step == 0:
                    yield from _graphed(
                        model, nxt, valid, T, max_new_tokens, vocab_limit, padded, graph_chunk, compile, decoder, key
                    )
                    return
                if logits_graph:
                    if decoder is None:  # the caches hold the prompt now: capture the decode step
                        decoder = GraphedGreedyDecoder(
                            model,
                            valid,
                            start=T,
                            first=nxt,
                            vocab_limit=vocab_limit,
                            chunk=1,
                            compile=compile,
                            logits=True,
                        )
                        keep(model, key, decoder)
                    elif step == 0:
                        decoder.restart(valid, start=T, first=nxt)
                    logits = decoder.decode(nxt)
                elif use_cache:
                    logits = decode_one(model, nxt[:, None], pos, valid, padded)
                else:
                    tokens = torch.cat([tokens, nxt[:, None]], dim=1)
                    logits = _forward_full(model, tokens, valid[:, : pos + 1], padded)
    finally:
        model.clear_cache()
        model.train(was_training)


def _graphed(
    model: Transformer,
    first: torch.Tensor,
    valid: torch.Tensor,
    T: int,
    max_new_tokens: int,
    vocab_limit: int | None,
    padded: bool,
    chunk: int,
    compile: bool,
    decoder: GraphedGreedyDecoder | None,
    key: tuple,
) -> Iterator[torch.Tensor]:
    """Greedy tokens 2..max_new_tokens: whole chunks from a CUDA graph, the tail (under a chunk) eagerly.

    ``decoder`` is one captured earlier for the same ``key`` (its caches already hold the prompt).
    """
    done, nxt = 1, first
    chunks: Iterator[torch.Tensor] | tuple[()] = ()
    if decoder is not None:
        decoder.restart(valid, start=T, first=first)
        chunks = iter(decoder)
    elif max_new_tokens > 2 * chunk:  # capturing costs ~100 steps; for a short run the eager path is enough
        decoder = GraphedGreedyDecoder(
            model, valid, start=T, first=first, vocab_limit=vocab_limit, chunk=chunk, compile=compile
        )
        keep(model, key, decoder)
        chunks = iter(decoder)
    for block in chunks:
        for j in range(block.shape[1]):
            nxt = block[:, j]
            yield nxt
            done += 1
            if done == max_new_tokens:
                return
    while done < max_new_tokens:  # token `done + 1` comes from the one written at slot T + done - 1
        logits = decode_one(model, nxt[:, None], T + done - 1, valid, padded)
        if vocab_limit is not None and vocab_limit < logits.shape[-1]:
            logits[:, vocab_limit:] = float("-inf")
        nxt = logits.argmax(dim=-1)
        yield nxt
        done += 1
