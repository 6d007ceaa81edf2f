"""The fused residual-add + norm kernels against their PyTorch twins, forward and backward."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import DEVICE, ON_GPU, close

from forge.kernels import reference
from forge.kernels.layer_norm import add_layer_norm
from forge.kernels.rms_norm import add_rms_norm

SHAPES = [(1, 1, 64), (3, 5, 96), (2, 7, 576)] + ([(8, 1024, 768), (4, 333, 2048)] if ON_GPU else [])
DTYPES = [torch.float32, torch.bfloat16]


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, *, delta: bool, seed: int = 0) -> list[torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    x = torch.randn(shape, generator=g).to(DEVICE, dtype).requires_grad_()
    d = torch.randn(shape, generator=g).to(DEVICE, dtype).requires_grad_() if delta else None
    w = (1 + 0.1 * torch.randn(n, generator=g)).to(DEVICE, dtype).requires_grad_()
    b = (0.1 * torch.randn(n, generator=g)).to(DEVICE, dtype).requires_grad_()
    return [x, d, w, b]


def _grads(outputs: tuple[torch.Tensor, torch.Tensor], inputs: list[torch.Tensor | None], seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    y, s = outputs
    loss = (y.float() * torch.randn(y.shape, generator=g).to(y.device)).sum()
    if s.requires_grad:
        loss = loss + (s.float() * torch.randn(s.shape, generator=g).to(s.device)).sum()
    live = [t for t in inputs if t is not None]
    return list(torch.autograd.grad(loss, live))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("delta", [True, False])
def test_add_rms_norm_matches_reference(shape: tuple[int, ...], dtype: torch.dtype, delta: bool) -> None:
    x, d, w, _ = _inputs(shape, dtype, delta=delta)
    got = add_rms_norm(x, d, w, 1e-5)
    want = reference.add_rms_norm(x, d, w, 1e-5)
    close(got[0], want[0], dtype)
    close(got[1], want[1], dtype)
    for a, e in zip(_grads(got, [x, d, w], 1), _grads(want, [x, d, w], 1), strict=True):
        close(a, e, dtype, scale=4)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("delta", "bias"), [(True, True), (False, True), (True, False)])
def test_add_layer_norm_matches_reference(shape: tuple[int, ...], dtype: torch.dtype, delta: bool, bias: bool) -> None:
    x, d, w, b = _inputs(shape, dtype, delta=delta)
    b = b if bias else None
    got = add_layer_norm(x, d, w, b, 1e-5)
    want = reference.add_layer_norm(x, d, w, b, 1e-5)
    close(got[0], want[0], dtype)
    close(got[1], want[1], dtype)
    for a, e in zip(_grads(got, [x, d, w, b], 2), _grads(want, [x, d, w, b], 2), strict=True):
        close(a, e, dtype, scale=4)


def test_sum_takes_the_promoted_dtype() -> None:
    """Under autocast the stream is fp32 and the branch bf16: the sum and the norm come out fp32."""
    x = torch.randn(2, 3, 64, device=DEVICE)
    d = torch.randn(2, 3, 64, device=DEVICE).bfloat16()
    w = torch.ones(64, device=DEVICE)
    y, s = add_rms_norm(x, d, w, 1e-6)
    assert y.dtype == s.dtype == torch.float32
    close(s, x + d, torch.float32)
    close(y, reference.add_rms_norm(x, d, w, 1e-6)[0], torch.float32)


def test_without_delta_the_stream_is_the_input_itself() -> None:
    x = torch.randn(4, 64, device=DEVICE)
    _, s = add_rms_norm(x, None, torch.ones(64, device=DEVICE), 1e-6)
    assert s is x
