"""GELU, SwiGLU and softmax kernels against their PyTorch twins, forward and backward."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from kernel_checks import DEVICE, ON_GPU, close

from forge.kernels import reference
from forge.kernels.gelu import gelu
from forge.kernels.softmax import softmax
from forge.kernels.swiglu import swiglu

DTYPES = [torch.float32, torch.bfloat16]


def _check(fn: Callable, ref: Callable, x: torch.Tensor, dtype: torch.dtype) -> None:
    x = x.to(DEVICE, dtype).requires_grad_()
    got, want = fn(x), ref(x)
    assert got.shape == want.shape and got.dtype == want.dtype
    close(got, want, dtype)
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    (ga,) = torch.autograd.grad(got, x, g)
    (ge,) = torch.autograd.grad(want, x, g)
    close(ga, ge, dtype, scale=2)


@pytest.mark.parametrize("shape", [(1,), (7, 33), (2, 3, 1025)] + ([(16, 1024, 3072)] if ON_GPU else []))
@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    _check(gelu, reference.gelu, 3 * torch.randn(shape, generator=torch.Generator().manual_seed(0)), dtype)


@pytest.mark.parametrize("shape", [(1, 2), (5, 66), (2, 3, 2 * 1536)] + ([(16, 1024, 2 * 8192)] if ON_GPU else []))
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    _check(swiglu, reference.swiglu, 2 * torch.randn(shape, generator=torch.Generator().manual_seed(1)), dtype)


def test_swiglu_rejects_an_odd_width() -> None:
    with pytest.raises(ValueError, match="even last dimension"):
        swiglu(torch.randn(2, 5, device=DEVICE))


@pytest.mark.parametrize("shape", [(1, 1), (4, 100), (3, 9000)] + ([(64, 50304), (4096, 1024)] if ON_GPU else []))
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    _check(softmax, reference.softmax, 4 * torch.randn(shape, generator=torch.Generator().manual_seed(2)), dtype)


def test_softmax_over_another_dim_and_masked_entries() -> None:
    x = torch.randn(6, 5, device=DEVICE)
    close(softmax(x, dim=0), torch.softmax(x, dim=0), torch.float32)
    x[:, :2] = float("-inf")  # masked keys get exactly zero weight
    y = softmax(x)
    assert (y[:, :2] == 0).all()
    close(y, torch.softmax(x, dim=-1), torch.float32)
