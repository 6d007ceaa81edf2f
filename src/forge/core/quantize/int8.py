"""int8 weights: per output channel (round-to-nearest), or per group of 16 or 32 columns (GGUF's 5- to 8-bit types)."""

from __future__ import annotations

import torch

from forge.core.quantize.base import KernelOperands, QuantizedWeight, pad_rows
from forge.errors import ConfigError
from forge.kernels import cpu_quant

__all__ = ["INT8_GROUP_SIZES", "Int8GroupWeight", "Int8Weight"]

INT8_GROUP_SIZES = (16, 32)


class Int8Weight(QuantizedWeight):
    """int8 per output channel, symmetric round-to-nearest: ``w[o, :] = q[o, :] * scale[o]``."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__(tuple(q.shape), dtype)
        self.register_buffer("q", q)  # (out, in) int8
        self.register_buffer("scale", scale)  # (out,) fp32

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> Int8Weight:
        """Round ``weight`` (out, in) to int8 with one scale per output channel."""
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(q, scale, weight.dtype)

    def rows(self, index: torch.Tensor | None = None) -> torch.Tensor:
        q, scale = (self.q, self.scale) if index is None else (self.q[index], self.scale[index])
        return q.float() * scale[:, None]

    def kernel_operands(self) -> KernelOperands:
        return KernelOperands(self.q, self.scale, None, "int8", gguf_blocks=False)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if not self._uses_kernel(x):
            return self._reference(x, bias)
        # The op wants 2-D activations and scales in the activations' dtype.
        scale = self._scales_for(x.dtype, self.scale, lambda: self.scale)
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).contiguous(), self.q, scale)
        y = y.reshape(*x.shape[:-1], self.shape[0])
        return y + bias if bias is not None else y

    def _dequant_rows(self, dtype: torch.dtype) -> int:
        # aten's int8 kernel in fp32 is slow past a few rows: for a (1536, 576) weight on this 2-core CPU, 4.0 ms
        # at 16 rows and 30 ms at 128, against 2.1 and 2.7 ms dequantized.
        return 16 if dtype == torch.float32 else super()._dequant_rows(dtype)


class Int8GroupWeight(QuantizedWeight):
    """int8 per group of 16 or 32 input columns: ``w[o, k] = q[o, k] * scale[o, g] (+ min[o, g])``, q in -128..127.

    GGUF's Q8_0 (``w = d * q``, fp16 d, groups of 32) exactly, and the exact home of the 5- and 6-bit types
    (Q5_0/Q5_1/Q5_K at 32, Q6_K at 16, with ``min`` where they have an offset) and of Q2_K/Q3_K (16).
    ``scale`` and ``min`` are kept in their source dtype, so :meth:`dequantize` equals ``gguf.quants``.

    Held plainly: ``q`` (out, in) int8, a byte a weight, and the scales (fp16 for Q8_0: 1/16 byte a weight). The
    CPU matmul, for groups of 32, is Forge's C++ kernel (:mod:`forge.kernels.cpu_quant`), which reads Q8_0's
    layout as it is: on SmolLM2's tied head (49152 x 576) at batch 1 it takes about 2.6 ms against 3.6 for bf16
    on a copy at twice the memory (2 threads, noisy machine). Groups of 16 (Q6_K, Q2_K, Q3_K), and CPUs where
    the kernel can't be built, take aten's int4 kernel on two nibbles a value, packed on first use: each value
    splits as ``q = 16 * hi + lo`` with ``hi`` in -8..7 and ``lo`` in 0..15, stored per group as
    ``[lo (g) | hi (g)]``, against the activations ``[x_g | 16 * x_g]``; one kernel group of 2g columns with
    ``[scale, zero]`` computes ``sum x * (q * scale - 8 * scale + 17 * zero)``, so ``zero = (min + 8 * scale) / 17``.
    (benchmarks/int8_group_cpu.py measured that path against the alternatives aten offers.)
    """

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None, dtype: torch.dtype) -> None:
        out, width = q.shape
        super().__init__((out, width), dtype)
        groups = scale.shape[1]
        self.group_size = width // max(groups, 1)
        if self.group_size not in INT8_GROUP_SIZES or groups * self.group_size != width:
            raise ConfigError(
                f"{groups} int8 groups do not split the input width {width} into groups of "
                f"{' or '.join(map(str, INT8_GROUP_SIZES))} columns; give a scale for every 16 or 32 columns"
            )
        if minimum is not None and minimum.shape != scale.shape:
            raise ConfigError(f"int8 minimum of shape {tuple(minimum.shape)} does not match scale {tuple(scale.shape)}")
        self.register_buffer("q", q.to(torch.int8).contiguous())
        kept = torch.float16 if scale.dtype == torch.float16 else torch.float32  # what the C++ kernel reads
        self.register_buffer("scale", scale.to(kept).contiguous())  # (out, groups), exact
        self.register_buffer("min", None if minimum is None else minimum.to(kept).contiguous())

    def unpacked(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """The (out, in) int8 values as int32 (the rows ``index`` only, if given)."""
        return (self.q if index is None else self.q[index.to(self.q.device)]).to(torch.int32)

    def rows(self, index: torch.Tensor | None = None) -> torch.Tensor:
        scale, minimum = self.scale, self.min
        if index is not None:
            index = index.to(scale.device)
            scale = scale[index]
            minimum = minimum[index] if minimum is not None else None
        q = self.unpacked(index).float().reshape(len(scale), -1, self.group_size)
        w = q * scale.float()[..., None]  # the operations of gguf.quants, in its order: bit for bit
        if minimum is not None:
            w = w + minimum.float()[..., None]
        return w.reshape(len(scale), self.shape[1])

    def kernel_operands(self) -> KernelOperands:
        return KernelOperands(self.q, self.scale, self.min, "int8_group", gguf_blocks=False)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if not self._uses_kernel(x):
            return self._reference(x, bias)
        g = self.group_size
        if g % 32 == 0 and x.dtype in cpu_quant.DTYPES and cpu_quant.available():
            y = cpu_quant.int8_mm(x.reshape(-1, self.shape[1]).contiguous(), self.q, self.scale, g, self.min)
            y = y.reshape(*x.shape[:-1], self.shape[0])
            return y + bias if bias is not None else y
        packed = self._aten_packing(self._nibbles)  # aten's int4 kernel on two nibbles a value
        x2 = x.reshape(-1, self.shape[1] // g, 1, g)  # (M, groups, 1, g)
        x2 = torch.cat([x2, x2 * 16], dim=2).reshape(x2.shape[0], -1)  # (M, 2 * in): [x_g | 16 x_g] per group
        sz = self._scales_for(x.dtype, packed, self._kernel_scales)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, 2 * g, sz)
        y = y[:, : self.shape[0]].reshape(*x.shape[:-1], self.shape[0])  # drop the padding rows
        return y + bias if bias is not None else y

    def _nibbles(self) -> torch.Tensor:
        """The values as (out, 2 * in) nibbles 0..15, per group ``[lo (g) | hi + 8 (g)]``, for aten's int4 kernel."""
        g = self.group_size
        q32 = self.q.to(torch.int32).reshape(self.shape[0], -1, 1, g)
        return torch.cat([q32 & 0xF, (q32 >> 4) + 8], dim=2).reshape(self.shape[0], 2 * self.shape[1])

    def _kernel_scales(self) -> torch.Tensor:
        scale = self.scale.float()
        offset = 8 * scale if self.min is None else self.min.float() + 8 * scale
        sz = torch.stack([scale, offset / 17], dim=-1).transpose(0, 1)  # (groups, out, 2)
        return pad_rows(sz, dim=1)
