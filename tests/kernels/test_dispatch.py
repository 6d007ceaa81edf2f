"""Models run through forge.core.ops with Forge's kernels registered: the same numbers as PyTorch's path.

On CPUs the kernels run in Triton's interpreter, registered for "cpu" for the
length of a test; on a GPU they are what CUDA uses by default.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from kernel_checks import DEVICE, close

from forge import kernels
from forge.config import get_preset
from forge.core.generate import generate_tokens
from forge.core.sampling import SamplingParams
from forge.models import create_model

KERNELS = list(kernels.ALL_KERNELS)


@pytest.fixture
def with_kernels() -> Iterator[None]:
    kernels.load(KERNELS, DEVICE)
    yield
    kernels.unload(DEVICE) if DEVICE == "cpu" else None


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_forward_and_gradients_match_pytorch(preset: str, with_kernels: None) -> None:
    torch.manual_seed(0)
    model = create_model(get_preset(preset).replace(vocab_size=300, n_layer=2)).to(DEVICE)
    idx = torch.randint(0, 300, (2, 24), device=DEVICE)
    targets = torch.randint(0, 300, (2, 24), device=DEVICE)

    def run() -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        logits = model(idx)
        loss = model.loss(idx, targets)
        loss.backward()
        return logits.detach(), loss.detach(), [p.grad.clone() for p in model.parameters()]

    fast = run()
    with kernels.disabled():
        slow = run()
    close(fast[0], slow[0], torch.float32, scale=10)
    close(fast[1], slow[1], torch.float32, scale=10)
    for a, e in zip(fast[2], slow[2], strict=True):
        close(a, e, torch.float32, scale=50)


def test_cached_decoding_matches_pytorch(with_kernels: None) -> None:
    torch.manual_seed(1)
    model = create_model(get_preset("llama-tiny").replace(vocab_size=300, n_layer=2)).to(DEVICE).eval()
    prompts = [torch.randint(0, 300, (9,)).tolist(), torch.randint(0, 300, (4,)).tolist()]  # left-padded batch

    def run() -> list[list[int]]:
        steps = generate_tokens(model, prompts, max_new_tokens=12, params=SamplingParams(temperature=0.0))
        return torch.stack(list(steps), dim=1).tolist()

    fast = run()
    with kernels.disabled():
        slow = run()
    assert fast == slow


def test_kernels_are_off_on_cpu_by_default() -> None:
    assert kernels.lookup("add_rms_norm", "cpu") is None


def test_an_unknown_op_is_named() -> None:
    with pytest.raises(ValueError, match="no Forge kernel for op 'flash'"):
        kernels.load(["flash"], DEVICE)
