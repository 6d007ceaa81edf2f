"""What every quantized weight shares: the module type ``ops`` dispatches on, and the int4 kernel's packing.

The CPU int4 kernel (``aten._weight_int4pack_mm_for_cpu``) is the matmul of both schemes that keep groups
(``Int4Weight``, ``Int8GroupWeight``). It wants its own tiled packing of the 4-bit values
(``aten._convert_weight_to_int4pack_for_cpu``), ``out`` a multiple of 16, and ``scales_and_zeros`` (in/group,
out, 2) in the activations' dtype, computing ``w = (q - 8) * scale + zero``. :func:`pack_int4` pads the rows to
16 and packs; :func:`int4_rows` reads values back out of that packing, so nothing else needs to be kept.
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from forge.errors import ConfigError

__all__ = ["KERNEL_DTYPES", "QuantizedWeight", "int4_rows", "pack_int4", "padded_rows"]

#: Activation dtypes the CPU kernels take; other dtypes, and other devices, use the dequantized reference.
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_ROW_MULTIPLE = 16  # the int4 kernel's out-features multiple
_ROWS_AT_ONCE = 2048  # rows decoded per step when the whole weight is read back: bounds the index temporaries


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
        return x.device.type == "cpu" and x.dtype in KERNEL_DTYPES

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


def int4_rows(packed: torch.Tensor, width: int, index: torch.Tensor | None = None) -> torch.Tensor:
    """The int32 values 0..15 of rows ``index`` (all if None) of a :func:`pack_int4` packing of ``width`` columns."""
    n = packed.shape[0]
    index = torch.arange(n, device=packed.device) if index is None else index.to(packed.device, torch.long)
    read = _gather_rows if _layout_known() else _kernel_rows
    parts = [read(packed, width, index[i : i + _ROWS_AT_ONCE]) for i in range(0, len(index), _ROWS_AT_ONCE)]
    return torch.cat(parts) if parts else torch.empty(0, width, dtype=torch.int32, device=packed.device)


def _gather_rows(packed: torch.Tensor, width: int, rows: torch.Tensor) -> torch.Tensor:
    # The packing, as read off the kernel: blocks of 32 rows, each a run of ``width`` 16-byte groups (column k of
    # rows j and j + 16 in byte j's low and high nibbles); a last block of 16 rows uses 8-byte groups (rows 2j
    # and 2j + 1). :func:`_layout_known` checks this against the kernel before it is trusted.
    full = packed.shape[0] // 32 * 32
    tail = rows - full
    in_full = rows < full
    base = torch.where(in_full, rows // 32 * (width * 16) + rows % 16, full * width // 2 + tail // 2)
    stride = torch.where(in_full, 16, 8)
    shift = torch.where(in_full, rows % 32 // 16, tail % 2) * 4
    cols = torch.arange(width, device=packed.device)
    byte = packed.reshape(-1)[base[:, None] + cols[None, :] * stride[:, None]]  # (len, width)
    return (byte.to(torch.int32) >> shift[:, None]) & 0xF


def _kernel_rows(packed: torch.Tensor, width: int, rows: torch.Tensor) -> torch.Tensor:
    # The kernel itself as the decoder, if its packing ever changes: with scale 1 and zero 8 it computes
    # x @ q.T, so the identity gives q exactly (small integers in fp32).
    n = packed.shape[0]
    unit = torch.tensor([1.0, 8.0]).expand(width // 32, n, 2).contiguous()
    eye = torch.eye(width)
    q = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, packed.cpu(), 32, unit)  # (width, n): column k, row o
    return q.t()[rows.cpu()].round().to(torch.int32).to(packed.device)


@functools.cache
def _layout_known() -> bool:
    q = torch.randint(0, 16, (48, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    return packed.shape == (48, 32) and torch.equal(_gather_rows(packed, 64, torch.arange(48)), q)
