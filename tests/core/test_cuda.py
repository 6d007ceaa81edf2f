"""CUDA-only checks: fused AdamW, bf16 training, cached generation on the GPU."""

from __future__ import annotations

import pytest
import torch

from forge.config import get_preset
from forge.core.device import autocast_dtype
from forge.core.generate import generate_tokens
from forge.core.optim import build_adamw
from forge.core.sampling import SamplingParams
from forge.models import create_model
from forge.trainer import train

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

TEXT = ["to be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 80]


def test_adamw_is_fused_on_cuda() -> None:
    model = create_model("tiny", vocab_size=256).cuda()
    opt = build_adamw(model, lr=1e-3)
    assert opt.defaults["fused"] is True


def test_training_on_cuda_uses_bf16_and_learns() -> None:
    assert autocast_dtype(torch.device("cuda")) == torch.bfloat16
    result = train(TEXT, preset="tiny", tokenizer="char", steps=40, batch_size=8, context=64, device="cuda", lr=3e-3)
    assert next(result.model.parameters()).is_cuda
    first, last = result.evals[0][1], result.evals[-1][1]
    assert last < first - 1.0, result.evals


def test_cached_generation_matches_uncached_on_cuda() -> None:
    torch.manual_seed(0)
    model = create_model(get_preset("llama-tiny").replace(vocab_size=300)).cuda().float()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11]]
    params = SamplingParams(temperature=0)
    a = torch.stack(list(generate_tokens(model, prompts, max_new_tokens=24, params=params)), 1)
    b = torch.stack(list(generate_tokens(model, prompts, max_new_tokens=24, params=params, use_cache=False)), 1)
    assert torch.equal(a, b)
