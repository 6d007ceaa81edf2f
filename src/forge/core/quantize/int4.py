"""int4 weights per group of input columns: round-to-nearest, or GGUF's 4-bit blocks exactly."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from forge.core.quantize.base import KernelOperands, QuantizedWeight, pad_rows
from forge.errors import ConfigError
from forge.kernels import cpu_quant

__all__ = ["GGUF_Q4_0", "GGUF_Q4_1", "INT4_GROUP_SIZES", "Int4Weight", "check_group_size"]

INT4_GROUP_SIZES = (32, 64, 128)
#: GGUF tensor type ids (gguf.GGMLQuantizationType) of the blocks ``Int4Weight.from_gguf`` maps exactly.
GGUF_Q4_0, GGUF_Q4_1 = 2, 3
_GGUF_BLOCK = 32


class Int4Weight(QuantizedWeight):
    """int4 per group of input columns, asymmetric: ``w[o, k] = q[o, k] * scale[o, g] + min[o, g]``, q in 0..15.

    Held in GGUF's own block layout, half a byte a weight: ``qs`` (out, in/2), each block of 32 values 16 bytes,
    values 0..15 in the low nibbles and 16..31 in the high ones; ``scale`` and ``min`` (out, in/group) in fp16
    where that holds them exactly (GGUF's Q4_0/Q4_1, and round-to-nearest, which picks them in fp16), else fp32
    (the K-quants' products). 0.625 bytes a weight at group 32; ``dequantize`` is exact.

    The CPU matmul is Forge's C++ kernel (:mod:`forge.kernels.cpu_quant`), which reads this layout as it is.
    Where it can't be built, aten's int4 kernel runs on a packing made on first use (and counted in
    :attr:`nbytes`). On CUDA ``ops.linear`` runs Forge's Triton kernels on the same blocks
    (:mod:`forge.kernels.quant_linear`); elsewhere, the dequantized reference.
    """

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None, dtype: torch.dtype) -> None:
        out, width = q.shape
        super().__init__((out, width), dtype)
        self.group_size = width // scale.shape[1]
        check_group_size(self.group_size, width)
        q = q.to(torch.int32)
        if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
            raise ConfigError(f"int4 values must lie in 0..15, got {int(q.min())}..{int(q.max())}")
        blocks = q.to(torch.uint8).reshape(out, width // _GGUF_BLOCK, _GGUF_BLOCK)
        self.register_buffer("qs", (blocks[..., :16] | (blocks[..., 16:] << 4)).reshape(out, width // 2).contiguous())
        minimum = -8 * scale.float() if minimum is None else minimum  # Q4_0: d * (q - 8)
        kept = _exact_dtype(scale.float(), minimum.float())
        self.register_buffer("scale", scale.float().to(kept).contiguous())
        self.register_buffer("min", minimum.float().to(kept).contiguous())

    @classmethod
    def quantize(cls, weight: torch.Tensor, group_size: int = 32) -> Int4Weight:
        """Round ``weight`` (out, in) to int4 with a scale and a minimum per ``group_size`` input columns.

        The minimum and scale are picked in fp16 (as they are stored) before q is computed, so the kernel multiplies
        by the values q was rounded against: the grid ``min + j * scale`` covers [lo, hi] of every group.
        """
        out, width = weight.shape
        check_group_size(group_size, width)
        w = weight.detach().float().reshape(out, width // group_size, group_size)
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)
        minimum = _fp16_toward(lo, -math.inf)
        scale = _fp16_toward(((hi - minimum) / 15).clamp(min=1e-4), math.inf)
        q = torch.round((w - minimum[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
        return cls(q.reshape(out, width), scale, minimum, weight.dtype)

    @classmethod
    def from_gguf(cls, qtype: int, blocks: np.ndarray | bytes, shape: Sequence[int]) -> Int4Weight:
        """GGUF Q4_0 or Q4_1 blocks of an (out, in) tensor (in PyTorch's order) as int4 at group 32, exactly.

        ``blocks`` is the raw bytes, as ``GGUFReader``'s ``tensor.data`` holds them for quantized types.
        :func:`forge.core.quantize.from_gguf` maps every GGUF block type Forge keeps quantized.
        """
        if qtype not in (GGUF_Q4_0, GGUF_Q4_1):
            raise ConfigError(
                f"GGUF tensor type {qtype} does not map exactly into int4; Int4Weight.from_gguf takes Q4_0 "
                f"({GGUF_Q4_0}) or Q4_1 ({GGUF_Q4_1}): use forge.core.quantize.from_gguf for the others"
            )
        out, width = (int(n) for n in shape)
        head = 2 if qtype == GGUF_Q4_0 else 4  # fp16 d, then (Q4_1 only) fp16 m
        raw = np.frombuffer(np.ascontiguousarray(blocks).tobytes(), dtype=np.uint8)
        if width % _GGUF_BLOCK or raw.size != out * width // _GGUF_BLOCK * (head + 16):
            raise ConfigError(f"{raw.size} bytes of GGUF blocks do not fill a tensor of shape {tuple(shape)}")
        raw = raw.reshape(-1, head + 16)
        d = torch.from_numpy(raw[:, 0:2].copy().view(np.float16)).reshape(out, -1)
        m = torch.from_numpy(raw[:, 2:4].copy().view(np.float16)).reshape(out, -1) if qtype == GGUF_Q4_1 else None
        qs = torch.from_numpy(raw[:, head:].copy()).to(torch.int32)
        # A block's low nibbles are its elements 0..15, its high nibbles 16..31.
        q = torch.cat([qs & 0xF, qs >> 4], dim=1).reshape(out, width)
        return cls(q, d, m, torch.float32)

    def unpacked(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """The (out, in) int4 values 0..15 as int32 (the rows ``index`` only, if given)."""
        qs = self.qs if index is None else self.qs[index.to(self.qs.device)]
        b = qs.reshape(len(qs), -1, 16).to(torch.int32)
        return torch.cat([b & 0xF, b >> 4], dim=-1).reshape(len(qs), self.shape[1])

    def rows(self, index: torch.Tensor | None = None) -> torch.Tensor:
        scale, minimum = self.scale.float(), self.min.float()
        if index is not None:
            index = index.to(scale.device)
            scale, minimum = scale[index], minimum[index]
        q = self.unpacked(index).float().reshape(len(scale), -1, self.group_size)
        w = q * scale[..., None] + minimum[..., None]  # two roundings, as gguf.quants does it: bit for bit
        return w.reshape(len(scale), self.shape[1])

    def kernel_operands(self) -> KernelOperands:
        return KernelOperands(self.qs, self.scale, self.min, "int4", gguf_blocks=True)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if not self._uses_kernel(x):
            return self._reference(x, bias)
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        if x.dtype in cpu_quant.DTYPES and cpu_quant.available():
            y = cpu_quant.int4_mm(x2, self.qs, self.scale, self.min, self.group_size)
        else:  # aten's kernel, on its own packing (made once)
            packed = self._aten_packing(self.unpacked)
            sz = self._scales_for(x.dtype, packed, self._kernel_scales)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, self.group_size, sz)[:, : self.shape[0]]
        y = y.reshape(*x.shape[:-1], self.shape[0])
        return y + bias if bias is not None else y

    def _kernel_scales(self) -> torch.Tensor:
        scale = self.scale.float()
        return pad_rows(torch.stack([scale, self.min.float() + 8 * scale], dim=-1).transpose(0, 1), dim=1)


def check_group_size(group_size: int, width: int) -> None:
    """Raise a ConfigError unless ``group_size`` is an int4 group size that divides ``width``."""
    if group_size not in INT4_GROUP_SIZES:
        raise ConfigError(f"int4 group size {group_size} is not supported; use one of {INT4_GROUP_SIZES}")
    if width % group_size:
        raise ConfigError(
            f"int4 group size {group_size} does not divide the input width {width}; use a group size that does "
            f"(one of {[g for g in INT4_GROUP_SIZES if width % g == 0] or INT4_GROUP_SIZES})"
        )


def _exact_dtype(*values: torch.Tensor) -> torch.dtype:
    """fp16 if it holds every value exactly (GGUF's scales, round-to-nearest's), else fp32."""
    return torch.float16 if all(torch.equal(v.half().float(), v) for v in values) else torch.float32


def _fp16_toward(x: torch.Tensor, direction: float) -> torch.Tensor:
    """``x`` rounded to an fp16 value toward ``direction`` (+inf or -inf), as float32."""
    h = x.half()
    off = (h.float() < x) if direction > 0 else (h.float() > x)
    return torch.where(off, torch.nextafter(h, torch.full_like(h, direction)), h).float()
