"""GGUF's quantized block types as Forge's quantized weights, exactly: :func:`from_gguf`.

Each block type is read into integer values, a scale per group and (for types with an offset) a minimum,
with the same float operations ``gguf.quants.dequantize`` uses, so ``from_gguf(...).dequantize()`` equals it
bit for bit. The layouts follow gguf-py's ``gguf/quants.py`` (and llama.cpp's ``ggml-quants.c``)::

    type   block  values                          per group                        Forge
    Q4_0    32    q 0..15, w = d * (q - 8)         fp16 d                           Int4Weight, group 32
    Q4_1    32    q 0..15, w = d * q + m           fp16 d, m                        Int4Weight, group 32
    Q4_K   256    q 0..15, w = d*sc * q - dmin*m   fp32 d*sc, -dmin*m (32 values)   Int4Weight, group 32
    Q8_0    32    q -128..127, w = d * q           fp16 d                           Int8GroupWeight, group 32
    Q5_0    32    q 0..31, w = d * (q - 16)        fp16 d                           Int8GroupWeight, group 32
    Q5_1    32    q 0..31, w = d * q + m           fp16 d, m                        Int8GroupWeight, group 32
    Q5_K   256    q 0..31, w = d*sc * q - dmin*m   fp32 products (32 values)        Int8GroupWeight, group 32
    Q6_K   256    q -32..31, w = d*sc * q          fp32 d*sc (16 values)            Int8GroupWeight, group 16
    Q3_K   256    q -4..3, w = d*(sc-32) * q       fp32 (16 values)                 Int8GroupWeight, group 16
    Q2_K   256    q 0..3, w = d*sc * q - dmin*m    fp32 products (16 values)        Int8GroupWeight, group 16

The products of an fp16 ``d`` and a 4- to 8-bit ``sc`` are exact in fp32, as gguf computes them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from forge.core.quantize.base import QuantizedWeight
from forge.core.quantize.int4 import Int4Weight
from forge.core.quantize.int8 import Int8GroupWeight
from forge.errors import ConfigError

__all__ = ["GGUF_KEPT", "from_gguf"]

_F16, _F32 = np.float16, np.float32
_Decoded = tuple[np.ndarray, np.ndarray, "np.ndarray | None", int]  # q (n, block), scale, min (n, groups), group


def _half(raw: np.ndarray) -> np.ndarray:
    return raw.copy().view(_F16)  # (n, 2) bytes -> (n, 1) fp16


def _nibbles(qs: np.ndarray) -> np.ndarray:
    return np.concatenate([qs & 0xF, qs >> 4], axis=1)  # a 32-block: low nibbles are 0..15, high 16..31


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    bits = qh.copy().view(np.uint32) >> np.arange(32, dtype=np.uint32)  # (n, 32): bit i of a little-endian word
    return (bits & 1).astype(np.uint8)


def _q4_0(raw: np.ndarray) -> _Decoded:
    return _nibbles(raw[:, 2:]), _half(raw[:, :2]), None, 32


def _q4_1(raw: np.ndarray) -> _Decoded:
    return _nibbles(raw[:, 4:]), _half(raw[:, :2]), _half(raw[:, 2:4]), 32


def _q5_0(raw: np.ndarray) -> _Decoded:
    q = _nibbles(raw[:, 6:]) | (_fifth_bits(raw[:, 2:6]) << 4)
    return q.astype(np.int16) - 16, _half(raw[:, :2]), None, 32


def _q5_1(raw: np.ndarray) -> _Decoded:
    q = _nibbles(raw[:, 8:]) | (_fifth_bits(raw[:, 4:8]) << 4)
    return q, _half(raw[:, :2]), _half(raw[:, 2:4]), 32


def _q8_0(raw: np.ndarray) -> _Decoded:
    return raw[:, 2:].copy().view(np.int8), _half(raw[:, :2]), None, 32


def _shifted(x: np.ndarray, shifts: Sequence[int], run: int, mask: int) -> np.ndarray:
    """(n, bytes) -> (n, values): runs of ``run`` bytes, each read at every shift in turn (gguf's unpacking)."""
    n = x.shape[0]
    parts = x.reshape(n, -1, 1, run) >> np.array(shifts, dtype=np.uint8).reshape(1, 1, -1, 1)
    return (parts & np.uint8(mask)).reshape(n, -1)


def _q2_k(raw: np.ndarray) -> _Decoded:
    scales, qs = raw[:, :16], raw[:, 16:80]
    d, dmin = _half(raw[:, 80:82]).astype(_F32), _half(raw[:, 82:84]).astype(_F32)
    dl, ml = d * (scales & 0xF).astype(_F32), dmin * (scales >> 4).astype(_F32)
    return _shifted(qs, (0, 2, 4, 6), 32, 3), dl, -ml, 16


def _q3_k(raw: np.ndarray) -> _Decoded:
    hmask, qs, scales = raw[:, :32], raw[:, 32:96], raw[:, 96:108]
    d = _half(raw[:, 108:110]).astype(_F32)
    low = _shifted(scales[:, :8], (0, 4), 8, 0xF)  # 16 low nibbles
    high = _shifted(scales[:, 8:], (0, 2, 4, 6), 4, 3)  # 16 pairs of high bits
    sc = ((low | (high << 4)).astype(np.int8) - np.int8(32)).astype(_F32)
    ql = _shifted(qs, (0, 2, 4, 6), 32, 3)
    qh = _shifted(hmask, range(8), 32, 1) ^ np.uint8(1)  # the offset is 4 where the mask bit is 0
    return ql.astype(np.int8) - (qh << 2).astype(np.int8), d * sc, None, 16


def _scale_min_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's eight 6-bit scales and mins packed in 12 bytes (gguf's ``Q4_K.get_scale_min``)."""
    n = scales.shape[0]
    d, m, m_d = np.split(scales.reshape(n, 3, 4), 3, axis=-2)
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mins = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.reshape(n, 8).astype(_F32), mins.reshape(n, 8).astype(_F32)


def _q4_k(raw: np.ndarray) -> _Decoded:
    d, dmin = _half(raw[:, :2]).astype(_F32), _half(raw[:, 2:4]).astype(_F32)
    sc, mins = _scale_min_k4(raw[:, 4:16])
    return _shifted(raw[:, 16:144], (0, 4), 32, 0xF), d * sc, -(dmin * mins), 32


def _q5_k(raw: np.ndarray) -> _Decoded:
    d, dmin = _half(raw[:, :2]).astype(_F32), _half(raw[:, 2:4]).astype(_F32)
    sc, mins = _scale_min_k4(raw[:, 4:16])
    n = raw.shape[0]
    ql = _shifted(raw[:, 48:176], (0, 4), 32, 0xF).reshape(n, -1, 32)
    qh = _shifted(raw[:, 16:48], range(8), 32, 1).reshape(n, -1, 32)
    return (ql | (qh << 4)).reshape(n, -1), d * sc, -(dmin * mins), 32


def _q6_k(raw: np.ndarray) -> _Decoded:
    ql = _shifted(raw[:, :128], (0, 4), 64, 0xF)
    qh = _shifted(raw[:, 128:192], (0, 2, 4, 6), 32, 3)
    scale = _half(raw[:, 208:210]).astype(_F32) * raw[:, 192:208].copy().view(np.int8).astype(_F32)
    return (ql | (qh << 4)).astype(np.int8) - np.int8(32), scale, None, 16


#: GGUF type id -> (name, values a block, bytes a block, decoder): the types Forge keeps quantized.
_TYPES: dict[int, tuple[str, int, int, Callable[[np.ndarray], _Decoded]]] = {
    2: ("Q4_0", 32, 18, _q4_0),
    3: ("Q4_1", 32, 20, _q4_1),
    6: ("Q5_0", 32, 22, _q5_0),
    7: ("Q5_1", 32, 24, _q5_1),
    8: ("Q8_0", 32, 34, _q8_0),
    10: ("Q2_K", 256, 84, _q2_k),
    11: ("Q3_K", 256, 110, _q3_k),
    12: ("Q4_K", 256, 144, _q4_k),
    13: ("Q5_K", 256, 176, _q5_k),
    14: ("Q6_K", 256, 210, _q6_k),
}
#: Names of the GGUF block types :func:`from_gguf` maps exactly.
GGUF_KEPT: tuple[str, ...] = tuple(name for name, *_ in _TYPES.values())
_INT4 = ("Q4_0", "Q4_1", "Q4_K")


def from_gguf(
    qtype: int, blocks: np.ndarray | bytes | torch.Tensor, shape: Sequence[int], dtype: torch.dtype = torch.float32
) -> QuantizedWeight:
    """GGUF blocks of one (out, in) matrix (PyTorch's order) as a quantized weight whose values are exactly theirs.

    ``blocks`` is the raw bytes, as ``GGUFReader``'s ``tensor.data`` holds them, rows of blocks in any array
    shape. Q4_0, Q4_1 and Q4_K become :class:`Int4Weight` (group 32); the rest :class:`Int8GroupWeight`.
    """
    kind = _TYPES.get(int(qtype))
    if kind is None:
        raise ConfigError(
            f"GGUF tensor type {_type_name(int(qtype))} can't be kept quantized; Forge keeps {', '.join(GGUF_KEPT)}: "
            "dequantize it instead (read_gguf(path, quantized=False), or Forge(path, dtype='float32'))"
        )
    name, block, size, decode = kind
    out, width = (int(n) for n in shape)
    if isinstance(blocks, torch.Tensor):
        blocks = blocks.cpu().numpy()
    raw = np.frombuffer(np.ascontiguousarray(blocks).tobytes(), dtype=np.uint8)
    if width % block or raw.size != out * width // block * size:
        raise ConfigError(
            f"{raw.size} bytes of GGUF {name} blocks do not fill a tensor of shape {(out, width)} "
            f"({block} values in {size} bytes a block); the tensor is damaged"
        )
    q, scale, minimum, group = decode(raw.reshape(-1, size))
    q_t = torch.from_numpy(np.ascontiguousarray(q).astype(np.int32)).reshape(out, width)
    scale_t = torch.from_numpy(np.ascontiguousarray(scale)).reshape(out, width // group)
    min_t = None if minimum is None else torch.from_numpy(np.ascontiguousarray(minimum)).reshape(out, width // group)
    if name in _INT4:
        return Int4Weight(q_t, scale_t, min_t, dtype)
    return Int8GroupWeight(q_t.to(torch.int8), scale_t, min_t, dtype)


def _type_name(qtype: int) -> str:
    try:
        import gguf  # optional: only for the name in the message
    except ImportError:
        return f"{qtype}"
    try:
        return f"{gguf.GGMLQuantizationType(qtype).name} ({qtype})"
    except ValueError:
        return f"{qtype}"
