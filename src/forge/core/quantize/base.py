"""What every quantized weight shares: the module type ``ops`` dispatches on, and aten's int4 packing (the fallback).

On a CPU, the weights' matmuls are Forge's C++ kernels (``forge.kernels.cpu_quant``), which read GGUF's block
layout as the weights hold it. Where those can't be built, aten's int4 kernel (``aten._weight_int4pack_mm_for_cpu``)
runs instead, on its own tiled packing (``aten._convert_weight_to_int4pack_for_cpu``), made on first use: it wants
``out`` a multiple of 16 and ``scales_and_zeros`` (in/group, out, 2) in the activations' dtype, computing
``w = (q - 8) * scale + zero``. :func:`pack_int4` pads the rows to 16 and packs.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from forge.errors import ConfigError

__all__ = ["KERNEL_DTYPES", "KernelOperands", "QuantizedWeight", "pack_int4", "padded_rows"]

#: Activation dtypes the CPU kernels take; other dtypes, and other devices, use the dequantized reference.
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
#: On a CPU, a matmul of at least this many rows of x (a prompt's prefill) dequantizes the weight and calls the
#: float matmul: the quantized kernels are made for decoding, reading the weight once for every few rows. Measured
#: on this 2-core CPU for a (1536, 576) weight, kernel against dequantize + matmul, in ms: int4 at 2,000 rows 75 /
#: 12.7 (fp32) and 75 / 2.8 (bf16), at 128 rows 2.3-2.6 / 2.5, at 64 rows 1.2-1.6 / 1.3-4; int8 per channel in
#: bf16 at 128 rows 1.5 / 0.7 (in fp32 see ``Int8Weight``). A 2,000-token prompt of SmolLM2 (Q4_1) took 11.4 s
#: through the kernels, 9.7 s of it in their matmuls.
CPU_DEQUANT_ROWS = 128
_ROW_MULTIPLE = 16  # the int4 kernel's out-features multiple


class KernelOperands(NamedTuple):
    """What a device kernel needs to multiply by a quantized weight (``forge.kernels.quant_linear.quantized_linear``).

    The tensors are the weight's own buffers, not copies: reading them costs nothing, so a captured CUDA graph can.
    """

    q: torch.Tensor  # the values as held: int4 (out, in/2) uint8, int8 (out, in)
    scale: torch.Tensor  # (out,) per channel or (out, in/group)
    minimum: torch.Tensor | None  # scale's shape, or None
    scheme: str  # the kernels' name for the layout: "int4", "int8" (per channel) or "int8_group"
    gguf_blocks: bool  # int4 in GGUF's blocks of 32: byte b of a block holds values b and b + 16


class QuantizedWeight(nn.Module, abc.ABC):
    """A linear layer's (out, in) weight held quantized, in place of its ``weight`` Parameter.

    ``ops.linear`` calls :meth:`linear` instead of ``F.linear``, and ``ops.embedding`` calls :meth:`embedding`
    (a tied token embedding is the same module as the output head). ``dtype`` is the float dtype the model
    computes in: ``model.to(dtype)`` sets it, and ``model.to(device)`` moves the buffers, but neither casts
    them: the quantized values and their scales keep their own dtypes.
    """

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype) -> None:
        super().__init__()
        self.shape = torch.Size(shape)
        self.dtype = dtype  # the activations' dtype, which dequantize and embedding return by default
        self._cast: dict[torch.dtype, torch.Tensor] = {}  # scales in another activation dtype, made when first used

    @abc.abstractmethod
    def rows(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """The float32 values of the rows ``index`` (all rows if None), (len, in): exactly what the weight holds."""

    @abc.abstractmethod
    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W.T + bias`` in x's dtype."""

    def kernel_operands(self) -> KernelOperands | None:
        """The buffers a device kernel reads (``ops.linear`` hands them to the registered ``quantized_linear``);
        None where this scheme has no such kernel and :meth:`linear` must run."""
        return None

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out, in) float weight these values stand for."""
        return self.rows().to(dtype or self.dtype)

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """``F.embedding(ids, W)``: only the rows asked for are dequantized; (*ids.shape, in) in ``dtype``."""
        return self.rows(ids.reshape(-1)).to(self.dtype).reshape(*ids.shape, self.shape[1])

    def numel(self) -> int:
        """How many weights this stands for, as a tensor's ``numel`` (parameter counts use it)."""
        return self.shape.numel()

    @property
    def nbytes(self) -> int:
        """Bytes held in memory by this weight: every buffer and every cast made for another activation dtype."""
        held = [*self.buffers(), *self._cast.values()]
        return sum(t.numel() * t.element_size() for t in held)

    @property
    def device(self) -> torch.device:
        """The device the quantized values live on."""
        return next(self.buffers()).device

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> QuantizedWeight:
        # ``Module.to(dtype)`` would cast the float buffers (scales) with the model; a probe tells what ``fn`` does,
        # so a dtype change becomes the activations' dtype and only a device change moves the buffers.
        probe = fn(torch.empty(0, dtype=self.dtype, device=self.device))
        if probe.is_floating_point():
            self.dtype = probe.dtype
        if probe.device != self.device:
            for name, buf in self._buffers.items():
                if buf is not None:
                    self._buffers[name] = buf.to(probe.device)
        self._cast.clear()
        return self

    def _reference(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # Correct anywhere, fast nowhere: the path off the CPU until a device kernel is registered for it.
        return F.linear(x, self.dequantize(x.dtype), bias)

    def _uses_kernel(self, x: torch.Tensor) -> bool:
        """Whether the CPU kernels take x: a CPU tensor of a kernel dtype, with fewer rows than a prefill's."""
        cpu = x.device.type == "cpu" and x.dtype in KERNEL_DTYPES
        return cpu and x.numel() < self._dequant_rows(x.dtype) * x.shape[-1]

    def _dequant_rows(self, dtype: torch.dtype) -> int:
        """From this many rows of x on, a CPU matmul dequantizes the weight instead (:data:`CPU_DEQUANT_ROWS`)."""
        return CPU_DEQUANT_ROWS

    def _aten_packing(self, values: Callable[[], torch.Tensor]) -> torch.Tensor:
        """aten's int4 packing of ``values()`` (out, in) 0..15, made on first use and kept (counted in ``nbytes``)."""
        packed = self._cast.get(torch.uint8)
        if packed is None:
            packed = self._cast[torch.uint8] = pack_int4(values())
        return packed

    def _scales_for(self, dtype: torch.dtype, stored: torch.Tensor, exact: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The kernel's scales_and_zeros in ``dtype``: the stored bf16 ones, or a cast made once from exact values."""
        if dtype == stored.dtype:
            return stored
        cached = self._cast.get(dtype)
        if cached is None:
            cached = self._cast[dtype] = exact().to(stored.device, dtype).contiguous()
        return cached

    def extra_repr(self) -> str:
        return f"shape={tuple(self.shape)}, dtype={self.dtype}, nbytes={self.nbytes}"


def padded_rows(n: int) -> int:
    """``n`` rounded up to the int4 kernel's multiple of output rows."""
    return -(-n // _ROW_MULTIPLE) * _ROW_MULTIPLE


def pad_rows(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``t`` with zeros appended along ``dim`` up to :func:`padded_rows`."""
    extra = padded_rows(t.shape[dim]) - t.shape[dim]
    if not extra:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(out, in) values 0..15 in the CPU int4 kernel's packing (rows padded to a multiple of 16)."""
    q = q.to(torch.int32)
    values = q.cpu().numpy()  # numpy's integer min/max are far faster than torch's on the CPU
    if q.numel() and (values.min() < 0 or values.max() > 15):
        raise ConfigError(f"int4 values must lie in 0..15, got {values.min()}..{values.max()}")
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(pad_rows(q).contiguous(), 1)


def _kernel_rows(packed: torch.Tensor, width: int, rows: torch.Tensor) -> torch.Tensor:
    # aten's packing read back through its kernel (the tests check pack_int4 with it): with scale 1 and zero 8
    # it computes x @ q.T, so the identity gives q exactly (small integers in fp32).
    n = packed.shape[0]
    unit = torch.tensor([1.0, 8.0]).expand(width // 32, n, 2).contiguous()
    eye = torch.eye(width)
    q = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, packed.cpu(), 32, unit)  # (width, n): column k, row o
    return q.t()[rows.cpu()].round().to(torch.int32).to(packed.device)
