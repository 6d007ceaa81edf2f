"""Helpers shared by the row-wise kernels: viewing a tensor as rows, sizing blocks and grids."""

from __future__ import annotations

import torch
import triton

__all__ = ["as_rows", "block_for", "reduction_programs", "warps_for"]


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """x (..., N) as a contiguous 2-D (M, N) tensor (a view when possible): the kernels index rows as row * N."""
    if x.numel() >= 2**31:
        raise ValueError(f"{tuple(x.shape)} has {x.numel()} elements; these kernels index with 32 bits (< 2**31)")
    x2 = x.reshape(-1, x.shape[-1])
    return x2.contiguous()


def block_for(n: int, *, at_most: int = 65536) -> int:
    """The power-of-two block that holds a whole row of ``n`` elements."""
    block = triton.next_power_of_2(n)
    if block > at_most:
        raise ValueError(f"rows of {n} elements are longer than this kernel's limit of {at_most}")
    return block


def reduction_programs(device: torch.device, rows: int) -> int:
    """How many programs share the rows in a backward pass that also reduces over rows (weight grads).

    A few per multiprocessor keeps every SM busy while the per-program partial sums stay few.
    """
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(rows, 4 * sms))
    return max(1, min(rows, 4))


def warps_for(block: int) -> int:
    """Warps for a program that owns a row of ``block`` elements: one per 256, 1 to 16."""
    return min(16, max(1, block // 256))
