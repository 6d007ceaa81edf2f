"""Shared by the kernel tests: where they run and how close is close enough."""

from __future__ import annotations

import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    """Assert two results agree to the precision of ``dtype`` (relative to the expected magnitude)."""
    tol = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype] * scale
    a, e = actual.float(), expected.float()
    err = (a - e).abs().max().item()
    ref = e.abs().max().item()
    assert err <= tol * max(ref, 1.0), f"max abs error {err:.3g} over tolerance {tol * max(ref, 1.0):.3g}"
