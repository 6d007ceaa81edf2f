"""Weight-only quantized matmuls through PyTorch's own CUDA kernels: tinygemm int4, and int8 through cuBLAS.

- **tinygemm** (PyTorch's ``aten._weight_int4pack_mm``): int4, group-wise ``[scale, zero]`` in bf16, a
  tensor-core tiled weight layout made by :func:`pack_int4_cuda`. bf16 activations only, out features a
  multiple of 8. :func:`scales_and_zeros_cuda` converts Forge's ``w = q * scale + min`` to its convention.
  gpt-fast and torchao use it; ``benchmarks/quant_gpu.py`` times it against Forge's Triton kernels
  (:mod:`forge.kernels.quant_matmul`), which read Forge's own layouts and are what ``ops.linear`` runs.
- **int8 through cuBLAS** (:func:`int8_linear_cuda`): ``F.linear(x, q.to(x.dtype)) * scale``, gpt-fast's
  int8 path; fast only where ``torch.compile`` fuses the cast into the matmul's operand load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from forge.errors import ConfigError

__all__ = [
    "TINYGEMM_GROUP_SIZES",
    "int4_linear_tinygemm",
    "int8_linear_cuda",
    "pack_int4_cuda",
    "scales_and_zeros_cuda",
    "tinygemm_inner_k_tiles",
    "tinygemm_supports",
]

TINYGEMM_GROUP_SIZES = (32, 64, 128, 256)


def tinygemm_inner_k_tiles(in_features: int) -> int | None:
    """The widest tinygemm k-tiling (8, 4 or 2 tiles of 16) that divides ``in_features``; None if none does."""
    return next((t for t in (8, 4, 2) if in_features % (16 * t) == 0), None)


def tinygemm_supports(out_features: int, in_features: int, group_size: int) -> bool:
    """Whether tinygemm takes an (out, in) int4 weight at this group size (else use Forge's Triton kernels)."""
    return (
        out_features % 8 == 0
        and group_size in TINYGEMM_GROUP_SIZES
        and in_features % group_size == 0
        and tinygemm_inner_k_tiles(in_features) is not None
    )


def pack_int4_cuda(q: torch.Tensor, inner_k_tiles: int | None = None) -> torch.Tensor:
    """q (N, K) int4 values 0..15 on a CUDA device in tinygemm's tiled layout, for :func:`int4_linear_tinygemm`.

    ``inner_k_tiles`` (2, 4 or 8; default: the widest that divides K) sets how many 16-column k-tiles sit
    together; the matmul reads it back from the packed shape. Since PyTorch 2.5 the op takes the values
    as uint8 (N, K/2), column 2j in the *high* nibble (the opposite of :func:`~forge.kernels.quant_matmul.pack_int4`).
    """
    if q.dim() != 2:
        raise ConfigError(f"pack_int4_cuda takes an (out, in) tensor of int4 values, got shape {tuple(q.shape)}")
    n, k = q.shape
    tiles = inner_k_tiles if inner_k_tiles is not None else tinygemm_inner_k_tiles(k)
    if n % 8 or tiles not in (2, 4, 8) or k % (16 * tiles):
        raise ConfigError(
            f"tinygemm cannot take an int4 weight of shape ({n}, {k}) with inner_k_tiles={inner_k_tiles}: it needs "
            "out features a multiple of 8 and in features a multiple of 16 * inner_k_tiles (2, 4 or 8); use "
            "forge.kernels.quant_matmul.int4_linear for this layer",
            field="inner_k_tiles" if inner_k_tiles is not None else None,
        )
    if q.device.type != "cuda":
        raise ConfigError(
            f"pack_int4_cuda packs for tinygemm on CUDA; move q to a CUDA device first (it is on {q.device})"
        )
    v = q.to(torch.int32)
    byte = ((v[:, 0::2] << 4) | v[:, 1::2]).to(torch.uint8).contiguous()
    return torch.ops.aten._convert_weight_to_int4pack(byte, tiles)


def scales_and_zeros_cuda(
    scale: torch.Tensor, minimum: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Forge's ``w = q * scale + min`` (scale, min (N, K/g)) as tinygemm's (K/g, N, 2) ``[scale, zero]``.

    tinygemm computes ``w = (q - 8) * scale + zero``, so ``zero = min + 8 * scale`` (computed in fp32, then
    cast). The CUDA kernel reads them as bf16 whatever their dtype, so keep the default there.
    """
    if scale.shape != minimum.shape or scale.dim() != 2:
        raise ValueError(
            f"scale and minimum must both be (N, K/g), got {tuple(scale.shape)} and {tuple(minimum.shape)}"
        )
    s = scale.float()
    zero = minimum.float() + 8 * s
    return torch.stack([s, zero], dim=-1).transpose(0, 1).contiguous().to(dtype)


def int4_linear_tinygemm(
    x: torch.Tensor, packed: torch.Tensor, group_size: int, sz: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` through tinygemm: packed from :func:`pack_int4_cuda`, sz from :func:`scales_and_zeros_cuda`.

    The kernel takes bf16 activations: others are cast there and the result back. Returns (..., N).
    """
    x2 = x.reshape(-1, x.shape[-1])
    if x2.dtype != torch.bfloat16 or not x2.is_contiguous():
        x2 = x2.to(torch.bfloat16).contiguous()
    y = torch.ops.aten._weight_int4pack_mm(x2, packed, group_size, sz)
    y = y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])
    return y + bias if bias is not None else y


def int8_linear_cuda(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for per-channel int8 ``W = q * scale[:, None]``: gpt-fast's form.

    Eagerly this writes a float copy of the weight every call; under ``torch.compile`` Inductor fuses the
    cast into the matmul. Prefer :func:`~forge.kernels.quant_matmul.int8_linear` where it measures faster.
    """
    y = F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)
    return y + bias if bias is not None else y
