"""int8 weights: per output channel (round-to-nearest), or per group of 16 or 32 columns (GGUF's 5- to 8-bit types)."""

from __future__ import annotations

import torch

from forge.core.quantize.base import QuantizedWeight, int4_rows, pack_int4, pad_rows
from forge.errors import ConfigError

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

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if not self._uses_kernel(x):
            return self._reference(x, bias)
        # The op wants 2-D activations and scales in the activations' dtype.
        scale = self._scales_for(x.dtype, self.scale, lambda: self.scale)
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).contiguous(), self.q, scale)
        y = y.reshape(*x.shape[:-1], self.shape[0])
        return y + bias if bias is not None else y


class Int8GroupWeight(QuantizedWeight):
    """int8 per group of 16 or 32 input columns: ``w[o, k] = q[o, k] * scale[o, g] (+ min[o, g])``, q in -128..127.

    GGUF's Q8_0 (``w = d * q``, fp16 d, groups of 32) exactly, and the exact home of the 5- and 6-bit types
    (Q5_0/Q5_1/Q5_K at 32, Q6_K at 16, with ``min`` where they have an offset) and of Q2_K/Q3_K (16).
    ``scale`` and ``min`` are kept in their source dtype, so :meth:`dequantize` equals ``gguf.quants``.

    The matmul is the int4 kernel's. Each value splits into two nibbles, ``q = 16 * hi + lo`` with ``hi`` in
    -8..7 and ``lo`` in 0..15, stored per group as ``[lo (g) | hi (g)]``: a (out, 2 * in) int4 weight. Against the
    activations ``[x_g | 16 * x_g]``, one kernel group of 2g columns with ``[scale, zero]`` computes
    ``sum x * (q * scale - 8 * scale + 17 * zero)``, so ``zero = (min + 8 * scale) / 17``. Rounded to bf16, the
    zero moves each weight by at most ``|min + 8 * scale| / 512`` (1/64 of a step for the symmetric types), the
    scale by 1/512 of the weight, as bf16 weights would. A byte and 4/g bytes of bf16 scales a weight, plus the
    exact scales.

    Why this path, measured (benchmarks/int8_group_cpu.py; 2-core AMD EPYC with AVX2, no native bf16; 2 threads,
    bf16 activations, best of 20 on a quiet machine), ms for SmolLM2's tied head (49152 x 576) / an ffn matrix
    (1536 x 576), groups of 32, at batch 1 and batch 64:

    - this, two nibbles through one int4 kernel call: 4.4 / 0.20 and 90 / 3.0;
    - ``F.linear`` on a dequantized bf16 copy (twice the memory): 3.6 / 0.11 and 195 / 5.9;
    - dequantize at every call, then ``F.linear``: 60 / 0.35 and 201 / 6.1;
    - ``_weight_int8pack_mm`` once per group of a (G, out, g) layout, summed: 3.7 / 0.49 and 115 / 3.9;
    - ``_weight_int8pack_mm`` per channel (not exact for group scales; a lower bound): 3.1 / 0.05 and 69 / 1.5.

    Of the exact ways that keep about a byte a weight it is within 20% of the best at batch 1 (the int4 kernel is
    compute-bound on AVX2) and the fastest at batch 64. (The ffn matrix's bf16 copy stays in the cache here.)
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
        q32 = q.to(torch.int32).reshape(out, groups, 1, self.group_size)
        nibbles = torch.cat([q32 & 0xF, (q32 >> 4) + 8], dim=2)  # (out, groups, [lo, hi], g), each 0..15
        self.register_buffer("packed", pack_int4(nibbles.reshape(out, 2 * width)))
        self.register_buffer("scale", scale.clone())  # (out, groups), source dtype
        self.register_buffer("min", None if minimum is None else minimum.clone())
        self.register_buffer("scales_and_zeros", self._kernel_scales().to(torch.bfloat16).contiguous())

    def unpacked(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """The (out, in) int8 values as int32 (the rows ``index`` only, if given), read off the packing."""
        rows = torch.arange(self.shape[0]) if index is None else index
        nibbles = int4_rows(self.packed, 2 * self.shape[1], rows).reshape(len(rows), -1, 2, self.group_size)
        return (16 * (nibbles[:, :, 1] - 8) + nibbles[:, :, 0]).reshape(len(rows), self.shape[1])

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

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if not self._uses_kernel(x):
            return self._reference(x, bias)
        g = self.group_size
        x2 = x.reshape(-1, self.shape[1] // g, 1, g)  # (M, groups, 1, g)
        x2 = torch.cat([x2, x2 * 16], dim=2).reshape(x2.shape[0], -1)  # (M, 2 * in): [x_g | 16 x_g] per group
        sz = self._scales_for(x.dtype, self.scales_and_zeros, self._kernel_scales)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, 2 * g, sz)
        y = y[:, : self.shape[0]].reshape(*x.shape[:-1], self.shape[0])  # drop the padding rows
        return y + bias if bias is not None else y

    def _kernel_scales(self) -> torch.Tensor:
        scale = self.scale.float()
        offset = 8 * scale if self.min is None else self.min.float() + 8 * scale
        sz = torch.stack([scale, offset / 17], dim=-1).transpose(0, 1)  # (groups, out, 2)
        return pad_rows(sz, dim=1)
