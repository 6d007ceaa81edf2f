"""The compiled CPU decode step: the same tokens as the eager loop, one compile for every length."""

from __future__ import annotations

import torch

from forge.config import get_preset
from forge.core.decode import Sequence as Row
from forge.core.decode import fixed_batcher
from forge.core.generate import generate_tokens
from forge.core.sampling import SamplingParams
from forge.core.transformer import Transformer


def _model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(get_preset("tiny").replace(vocab_size=128)).eval()


def _run(model: Transformer, prompts: list[list[int]], n: int, compile: bool, **kw: object) -> list[list[int]]:
    params = SamplingParams(**kw) if kw else SamplingParams(temperature=0)
    gen = torch.Generator().manual_seed(3) if kw else None
    steps = generate_tokens(model, prompts, max_new_tokens=n, params=params, generator=gen, compile=compile)
    return torch.stack(list(steps), dim=1).tolist()


def test_compiled_steps_give_the_eager_tokens_and_compile_once() -> None:
    import torch._dynamo.utils  # here, not at collection: importing Dynamo imports Triton (see tests/conftest.py)

    model = _model()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps them: an earlier test's compile would count here
    for prompt, n in (([1, 2, 3], 24), ([5] * 11, 40), ([7, 8], 9)):  # lengths of every size: one compile
        assert _run(model, [prompt], n, True) == _run(model, [prompt], n, False)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    # Sampled rows, and a batch of prompts of one length, compile too and agree.
    sampled = {"temperature": 0.8, "top_k": 20}
    assert _run(model, [[4, 4, 2]], 16, True, **sampled) == _run(model, [[4, 4, 2]], 16, False, **sampled)
    assert _run(model, [[1, 2], [3, 4]], 12, True) == _run(model, [[1, 2], [3, 4]], 12, False)


def test_a_compiled_batch_takes_the_whole_context_lazily_and_ragged_prompts_stay_eager() -> None:
    model = _model()
    p = SamplingParams(temperature=0)
    same = fixed_batcher(model, [Row([1, 2], 4, p), Row([3, 4], 4, p)], compile=True)
    assert same.compiled and same.max_len == model.config.context_length
    ragged = fixed_batcher(model, [Row([1, 2], 4, p), Row([3], 4, p)], compile=True)
    assert not ragged.compiled and ragged.max_len == 6


def test_a_compiled_step_is_kept_per_structure_and_reads_the_weights_it_is_given() -> None:
    """The compiled step skips Dynamo's guards on the model's modules and is kept per model structure instead:
    two models of one structure share it, each with its own weights' tokens; a model quantized in place has a
    new structure and gets a step of its own."""
    from forge.core import steps
    from forge.core.quantize import quantize_model

    a, b = _model(0), _model(1)
    prompt, sampled = [[3, 1, 4, 1, 5]], {"temperature": 1.0}
    want_a, want_b = _run(a, prompt, 12, False, **sampled), _run(b, prompt, 12, False, **sampled)
    assert want_a != want_b  # else sharing the wrong weights would go unseen
    assert _run(a, prompt, 12, True, **sampled) == want_a
    kept = len(steps._compiled_steps)
    assert _run(b, prompt, 12, True, **sampled) == want_b
    assert len(steps._compiled_steps) == kept  # one structure: one compiled step
    quantize_model(a, "int8")
    assert _run(a, prompt, 12, True, **sampled) == _run(a, prompt, 12, False, **sampled)
    assert len(steps._compiled_steps) == min(kept + 1, steps.COMPILED_KEEP)
