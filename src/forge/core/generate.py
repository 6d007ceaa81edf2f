"""``generate_tokens``: a fixed batch of prompts through the token loop, a token per row per step.

A thin client of :class:`forge.core.decode.Batcher`: every prompt is a row at
its own positions (no padding to line them up), prefilled together, then
decoded together until ``max_new_tokens``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from forge.core.decode import Sequence as Row
from forge.core.decode import fixed_batcher
from forge.core.sampling import SamplingParams, TokenConstraint
from forge.core.transformer import Transformer

__all__ = ["generate_tokens"]


@torch.inference_mode()
def generate_tokens(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    vocab_limit: int | None = None,
    observe: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    cuda_graphs: bool = True,
    compile: bool = False,
    constraints: Sequence[TokenConstraint | None] | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every prompt, (B,) int64, up to ``max_new_tokens`` times.

    The caller stops early by leaving the loop (e.g. when every row hit a stop). Every row samples
    with ``params`` and the one ``generator``. ``use_cache=False`` recomputes the whole sequence each
    step (the reference the cached path is tested against). ``vocab_limit`` forbids ids at or above
    it: the model's vocabulary is padded past the tokenizer's, and those ids mean nothing.
    ``observe(logits, tokens)`` sees each step's penalised logits (B, V) and chosen tokens (B,), e.g.
    for logprobs. On CUDA the decode steps replay CUDA graphs (greedy: several steps per replay; see
    ``forge.core.decode``); ``cuda_graphs=False`` keeps them eager, ``compile`` compiles the graphed
    step. ``constraints`` holds one :class:`TokenConstraint` per prompt (or None for a free row):
    each step, tokens a row's constraint forbids are masked out before sampling.

    >>> from forge.config import get_preset
    >>> m = Transformer(get_preset("tiny").replace(vocab_size=64)).eval()
    >>> [t.shape for t in generate_tokens(m, [[1, 2], [3]], max_new_tokens=2, params=SamplingParams(temperature=0))]
    [torch.Size([2]), torch.Size([2])]
    """
    assert max(map(len, prompts)) + max_new_tokens <= model.config.context_length, "caller caps max_new_tokens"
    masks = list(constraints) if constraints is not None else [None] * len(prompts)
    rows = [Row(list(p), max_new_tokens, params, generator, constraint=c) for p, c in zip(prompts, masks, strict=True)]
    batcher = fixed_batcher(
        model, rows, vocab_limit=vocab_limit, cache=use_cache, cuda_graphs=cuda_graphs, compile=compile
    )
    batcher.observe = observe
    was_training = model.training
    model.eval()
    try:
        block, done = batcher.prefill(rows).tokens, 0  # (B, k): k tokens per row, several from a greedy graph
        while True:
            for j in range(block.shape[1]):
                yield block[:, j]
                done += 1
                if done == max_new_tokens:
                    return
            block = batcher.decode().tokens
    finally:
        batcher.clear()
        model.train(was_training)
