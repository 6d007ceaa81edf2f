"""int4 weights per group of input columns: round-to-nearest, or GGUF's 4-bit blocks exactly."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from forge.core.quantize.base import QuantizedWeight, int4_rows, pack_int4, pad_rows
from forge.errors import ConfigError

__all__ = ["GGUF_Q4_0", "GGUF_Q4_1", "INT4_GROUP_SIZES", "Int4Weight", "check_group_size"]

INT4_GROUP_SIZES = (32, 64, 128)
#: GGUF tensor type ids (gguf.GGMLQuantizationType) of the blocks ``Int4Weight.from_gguf`` maps exactly.
GGUF_Q4_0, GGUF_Q4_1 = 2, 3
_GGUF_BLOCK = 32


class Int4Weight(QuantizedWeight):
    """int4 per group of input columns, asymmetric: ``w[o, k] = q[o, k] * scale[o, g] + min[o, g]``, q in 0..15.

    Held as the CPU kernel wants it and little more: ``packed`` (the kernel's packing, half a byte a weight) and
    ``scales_and_zeros`` (in/group, out, 2) in bf16, ``[scale, min + 8 * scale]``. Where bf16 cannot hold a scale
    or minimum exactly (GGUF's fp16 ``d`` and ``m``, the K-quants' products) it is kept too, in its own dtype,
    so ``dequantize`` is exact: 0.75 bytes a weight for a GGUF Q4_1 matrix at group 32, 0.625 for
    round-to-nearest, whose scale and zero are chosen in bf16. ``min=None`` means ``min = -8 * scale`` (Q4_0).
    """

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None, dtype: torch.dtype) -> None:
        out, width = q.shape
        super().__init__((out, width), dtype)
        self.group_size = width // scale.shape[1]
        check_group_size(self.group_size, width)
        scale32 = scale.float()
        min32 = -8 * scale32 if minimum is None else minimum.float()
        self.register_buffer("packed", pack_int4(q))
        sz = torch.stack([scale32, min32 + 8 * scale32], dim=-1).transpose(0, 1)  # (groups, out, 2)
        self.register_buffer("scales_and_zeros", pad_rows(sz, dim=1).to(torch.bfloat16).contiguous())
        self.register_buffer("exact_scale", None)
        self.register_buffer("exact_min", None)
        self._symmetric = minimum is None
        # Keep the source values only where the bf16 pair does not give them back.
        if not torch.equal(self.scale, scale32):
            self.exact_scale = scale.clone()
        if minimum is not None and not torch.equal(self.min, min32):
            self.exact_min = minimum.clone()

    @classmethod
    def quantize(cls, weight: torch.Tensor, group_size: int = 32) -> Int4Weight:
        """Round ``weight`` (out, in) to int4 with a scale and a minimum per ``group_size`` input columns.

        The scale and zero are picked in bf16 (the kernel's dtype) before q is computed, so the kernel multiplies
        by the values q was rounded against: the grid ``min + j * scale`` covers [lo, hi] of every group.
        """
        out, width = weight.shape
        check_group_size(group_size, width)
        w = weight.detach().float().reshape(out, width // group_size, group_size)
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)
        # The zero lands within one bf16 step of the range's centre: widen the range by two such steps.
        step = _bf16_ulp((lo + hi).abs() / 2 + (hi - lo) / 15)
        scale = _bf16_up(((hi - lo + 2 * step) / 15).clamp(min=1e-12))
        zero = ((lo + hi) / 2 + scale / 2).to(torch.bfloat16).float()  # the middle of [hi - 7 scale, lo + 8 scale]
        minimum = zero - 8 * scale
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

    @property
    def scale(self) -> torch.Tensor:
        """(out, in / group) float32, exact."""
        return self._scale_min(None)[0]

    @property
    def min(self) -> torch.Tensor:
        """(out, in / group) float32, exact: ``w = q * scale + min``."""
        return self._scale_min(None)[1]

    def _scale_min(self, index: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact float32 scale and minimum of the rows ``index`` (all if None), each (rows, in / group)."""
        rows = slice(0, self.shape[0]) if index is None else index.to(self.scales_and_zeros.device)
        sz = self.scales_and_zeros[:, rows].transpose(0, 1).float()  # (rows, groups, [scale, zero])
        scale = self.exact_scale[rows].float() if self.exact_scale is not None else sz[..., 0]
        if self.exact_min is not None:
            return scale, self.exact_min[rows].float()
        if self._symmetric:
            return scale, -8 * scale
        return scale, sz[..., 1] - 8 * sz[..., 0]  # exact: checked when the weight was made

    def unpacked(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """The (out, in) int4 values 0..15 as int32 (the rows ``index`` only, if given), read off the packing."""
        return int4_rows(self.packed, self.shape[1], torch.arange(self.shape[0]) if index is None else index)

    def rows(self, index: torch.Tensor | None = None) -> torch.Tensor:
        scale, minimum = self._scale_min(index)
        q = self.unpacked(index).float().reshape(len(scale), -1, self.group_size)
        w = q * scale[..., None] + minimum[..., None]  # two roundings, as gguf.quants does it: bit for bit
        return w.reshape(len(scale), self.shape[1])

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if not self._uses_kernel(x):
            return self._reference(x, bias)
        sz = self._scales_for(x.dtype, self.scales_and_zeros, self._exact_scales_and_zeros)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, x.shape[-1]).contiguous(), self.packed, self.group_size, sz
        )
        y = y[:, : self.shape[0]].reshape(*x.shape[:-1], self.shape[0])  # drop the padding rows
        return y + bias if bias is not None else y

    def _exact_scales_and_zeros(self) -> torch.Tensor:
        scale = self.scale
        return pad_rows(torch.stack([scale, self.min + 8 * scale], dim=-1).transpose(0, 1), dim=1)


def check_group_size(group_size: int, width: int) -> None:
    """Raise a ConfigError unless ``group_size`` is an int4 group size that divides ``width``."""
    if group_size not in INT4_GROUP_SIZES:
        raise ConfigError(f"int4 group size {group_size} is not supported; use one of {INT4_GROUP_SIZES}")
    if width % group_size:
        raise ConfigError(
            f"int4 group size {group_size} does not divide the input width {width}; use a group size that does "
            f"(one of {[g for g in INT4_GROUP_SIZES if width % g == 0] or INT4_GROUP_SIZES})"
        )


def _bf16_up(x: torch.Tensor) -> torch.Tensor:
    """Positive ``x`` rounded up to a bf16 value, as float32."""
    b = x.to(torch.bfloat16)
    up = torch.nextafter(b, torch.full_like(b, float("inf")))
    return torch.where(b.float() < x, up, b).float()


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 values (8 significant bits) around ``x`` >= 0, as float32."""
    _, exponent = torch.frexp(x.clamp(min=1e-30))
    return torch.ldexp(torch.ones_like(x), exponent - 8)
