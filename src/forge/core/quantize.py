"""Quantized weights that stay quantized: one small class per scheme, dispatched by ``ops.linear``.

- ``Int8Weight``: int8 per output channel, symmetric; ``w = q * scale``. CPU matmul: ``aten._weight_int8pack_mm``.
- ``Int4Weight``: int4 per group of 32/64/128 input columns, asymmetric; ``w = q * scale + min`` with q in 0..15.
  CPU matmul: ``aten._weight_int4pack_mm_for_cpu``, whose ``scales_and_zeros`` is (in/group, out, 2) of
  ``[scale, zero]`` with ``w = (q - 8) * scale + zero``, so ``zero = min + 8 * scale``.

GGUF Q4_0 (``w = d * (q - 8)``) and Q4_1 (``w = d * q + m``) blocks are that int4 layout at group 32:
``Int4Weight.from_gguf`` maps them without requantizing, and ``dequantize`` reproduces ``gguf.quants.dequantize``
bit for bit. Elsewhere than the CPU (or in a dtype the aten op refuses) ``linear`` falls back to a matmul with the
dequantized weight: correct, not fast.

``quantize_model`` swaps each linear layer's ``weight`` parameter for one of these modules, in place.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from forge.errors import ConfigError

SCHEMES = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128)
#: GGUF tensor type ids (gguf.GGMLQuantizationType) of the blocks ``Int4Weight.from_gguf`` maps exactly.
GGUF_Q4_0, GGUF_Q4_1 = 2, 3
_GGUF_BLOCK = 32


class QuantizedWeight(nn.Module, abc.ABC):
    """A linear layer's (out, in) weight held quantized; ``ops.linear`` calls ``linear`` instead of ``F.linear``."""

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype) -> None:
        super().__init__()
        self.shape = torch.Size(shape)
        self.dtype = dtype  # the float dtype the weight had, which dequantize returns by default

    @abc.abstractmethod
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out, in) float weight these values stand for."""

    @abc.abstractmethod
    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W.T + bias`` in x's dtype."""

    @property
    def nbytes(self) -> int:
        """Bytes held in memory by this weight (every buffer, including cached packings)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    @property
    def device(self) -> torch.device:
        """The device the quantized values live on."""
        return next(self.buffers()).device

    def _reference(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.shape)}, dtype={self.dtype}"


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

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return (self.q.float() * self.scale[:, None]).to(dtype or self.dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            return self._reference(x, bias)
        # The op wants 2-D activations and scales in the activations' dtype.
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).contiguous(), self.q, self.scale.to(x.dtype))
        y = y.reshape(*x.shape[:-1], self.shape[0])
        return y + bias if bias is not None else y


class Int4Weight(QuantizedWeight):
    """int4 per group of input columns, asymmetric: ``w[o, k] = q[o, k] * scale[o, g] + min[o, g]``, q in 0..15."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, dtype: torch.dtype) -> None:
        out, width = q.shape
        super().__init__((out, width), dtype)
        self.group_size = width // scale.shape[1]
        # Two nibbles a byte, column 2j in the low nibble: the plain form dequantize reads.
        self.register_buffer("q", (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8))
        self.register_buffer("scale", scale.float())  # (out, in / group)
        self.register_buffer("min", minimum.float())
        # The CPU kernel's own layout: a tiled packing of q and [scale, min + 8 * scale] in the activations' dtype.
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))
        zero = self.min + 8 * self.scale
        self.register_buffer("scales_and_zeros", torch.stack([self.scale, zero], dim=-1).transpose(0, 1).contiguous())
        self._cast: dict[torch.dtype, torch.Tensor] = {}

    @classmethod
    def quantize(cls, weight: torch.Tensor, group_size: int = 32) -> Int4Weight:
        """Round ``weight`` (out, in) to int4 with a scale and a minimum per ``group_size`` input columns."""
        out, width = weight.shape
        check_group_size(group_size, width)
        w = weight.detach().float().reshape(out, width // group_size, group_size)
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)
        scale = (hi - lo).clamp(min=1e-12) / 15
        q = torch.round((w - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
        return cls(q.reshape(out, width), scale, lo, weight.dtype)

    @classmethod
    def from_gguf(cls, qtype: int, blocks: np.ndarray | bytes, shape: Sequence[int]) -> Int4Weight:
        """GGUF Q4_0 or Q4_1 blocks of an (out, in) tensor (in PyTorch's order) as int4 at group 32, exactly.

        ``blocks`` is the raw bytes, as ``GGUFReader``'s ``tensor.data`` holds them for quantized types.
        """
        if qtype not in (GGUF_Q4_0, GGUF_Q4_1):
            raise ConfigError(
                f"GGUF tensor type {qtype} does not map exactly into int4; Int4Weight.from_gguf takes Q4_0 "
                f"({GGUF_Q4_0}) or Q4_1 ({GGUF_Q4_1}): dequantize this tensor instead"
            )
        out, width = (int(n) for n in shape)
        check_group_size(_GGUF_BLOCK, width)
        head = 2 if qtype == GGUF_Q4_0 else 4  # fp16 d, then (Q4_1 only) fp16 m
        raw = np.frombuffer(np.ascontiguousarray(blocks).tobytes(), dtype=np.uint8).reshape(-1, head + 16)
        if raw.shape[0] != out * width // _GGUF_BLOCK:
            raise ConfigError(f"{raw.shape[0]} GGUF blocks do not fill a tensor of shape {tuple(shape)}")
        d = torch.from_numpy(raw[:, 0:2].copy().view(np.float16).astype(np.float32)).reshape(out, -1)
        if qtype == GGUF_Q4_1:
            m = torch.from_numpy(raw[:, 2:4].copy().view(np.float16).astype(np.float32)).reshape(out, -1)
        else:
            m = -8 * d  # d * (q - 8) == d * q - 8 * d exactly in fp32: both terms fit in 24 bits
        qs = torch.from_numpy(raw[:, head:].copy()).to(torch.int32)
        # A block's low nibbles are its elements 0..15, its high nibbles 16..31.
        q = torch.cat([qs & 0xF, qs >> 4], dim=1).reshape(out, width)
        return cls(q, d, m, torch.float32)

    def unpacked(self) -> torch.Tensor:
        """The (out, in) int4 values, 0..15, as int32."""
        q = self.q.to(torch.int32)
        return torch.stack([q & 0xF, q >> 4], dim=-1).reshape(self.shape)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        out, width = self.shape
        q = self.unpacked().float().reshape(out, -1, self.group_size)
        w = q * self.scale[..., None] + self.min[..., None]  # the same fp32 operations as gguf.quants
        return w.reshape(out, width).to(dtype or self.dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            return self._reference(x, bias)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, x.shape[-1]).contiguous(), self.packed, self.group_size, self._scales_and_zeros(x.dtype)
        )
        y = y.reshape(*x.shape[:-1], self.shape[0])
        return y + bias if bias is not None else y

    def _scales_and_zeros(self, dtype: torch.dtype) -> torch.Tensor:
        # The kernel wants them in the activations' dtype; cast once per dtype, not once per token.
        if dtype == torch.float32:
            return self.scales_and_zeros
        cached = self._cast.get(dtype)
        if cached is None or cached.device != self.scales_and_zeros.device:
            cached = self._cast[dtype] = self.scales_and_zeros.to(dtype)
        return cached


def check_group_size(group_size: int, width: int) -> None:
    """Raise a ConfigError unless ``group_size`` is an int4 group size that divides ``width``."""
    if group_size not in INT4_GROUP_SIZES:
        raise ConfigError(f"int4 group size {group_size} is not supported; use one of {INT4_GROUP_SIZES}")
    if width % group_size:
        raise ConfigError(
            f"int4 group size {group_size} does not divide the input width {width}; use a group size that does "
            f"(one of {[g for g in INT4_GROUP_SIZES if width % g == 0] or INT4_GROUP_SIZES})"
        )


def quantize_weight(weight: torch.Tensor, scheme: str, group_size: int = 32) -> QuantizedWeight:
    """``weight`` (out, in) quantized with ``scheme`` ("int8" or "int4") by round-to-nearest."""
    if scheme == "int8":
        return Int8Weight.quantize(weight)
    if scheme == "int4":
        return Int4Weight.quantize(weight, group_size)
    raise ConfigError(f"unknown quantization scheme {scheme!r}; use one of {', '.join(SCHEMES)}")


def quantize_model(
    model: nn.Module, scheme: str, group_size: int = 32, skip: Sequence[str] = ("tok_emb", "lm_head", "head")
) -> nn.Module:
    """Quantize every ``nn.Linear`` of ``model`` in place, except those whose name contains one of ``skip``.

    The embeddings and the output head stay in their float dtype: an int4 round-to-nearest head makes greedy
    output diverge. Returns ``model``.
    """
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown quantization scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not any(s in name.split(".") for s in skip)
    ]
    if scheme == "int4":  # check every layer before changing any, so a bad group size leaves the model whole
        for _, module in targets:
            check_group_size(group_size, module.in_features)
    for _, module in targets:
        quantized = quantize_weight(module.weight, scheme, group_size)
        del module.weight  # the Parameter goes; the quantized module takes its name
        module.weight = quantized
    return model
