"""The RoPE kernel against its PyTorch twin, on strided views of a fused qkv projection."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import DEVICE, close

from forge.core.attention import rope_tables
from forge.kernels import reference
from forge.kernels.rope import rope


@pytest.mark.parametrize(("B", "T", "H", "Hkv", "D"), [(1, 1, 9, 3, 64), (2, 7, 4, 2, 32), (3, 5, 2, 2, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_row", [False, True])
def test_rope_matches_reference(B: int, T: int, H: int, Hkv: int, D: int, dtype: torch.dtype, per_row: bool) -> None:
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D, generator=g).to(DEVICE, dtype).requires_grad_()
    qk = qkv[..., : (H + Hkv) * D].view(B, T, H + Hkv, D).transpose(1, 2)  # (B, H + Hkv, T, D), strided
    cos, sin = (t.to(DEVICE) for t in rope_tables(D, 64, 10000.0))
    if per_row:  # each row at its own positions, as in batched decoding
        positions = torch.randint(0, 64 - T, (B, 1), generator=g).to(DEVICE) + torch.arange(T, device=DEVICE)
        c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)  # (B, 1, T, D)
    else:
        c, s = cos[:T][None, None], sin[:T][None, None]  # (1, 1, T, D)
    got, want = rope(qk, c, s), reference.rope(qk, c, s)
    assert got.is_contiguous() and got.shape == want.shape
    close(got, want, dtype)
    dy = torch.randn(want.shape, generator=g).to(DEVICE, dtype)
    close(torch.autograd.grad(got, qkv, dy)[0], torch.autograd.grad(want, qkv, dy)[0], dtype)


def test_rope_rejects_an_odd_head_dim() -> None:
    with pytest.raises(ValueError, match="even head dimension"):
        rope(torch.randn(1, 1, 1, 5, device=DEVICE), torch.ones(1, 1, 1, 5), torch.zeros(1, 1, 1, 5))
