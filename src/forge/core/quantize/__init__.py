"""Quantized weights that stay quantized: one small class per scheme, dispatched by ``ops.linear``/``ops.embedding``.

- :class:`Int8Weight` (``int8.py``): int8 per output channel, symmetric; ``w = q * scale``.
  CPU matmul: ``aten._weight_int8pack_mm``. What ``quantize="int8"`` makes.
- :class:`Int4Weight` (``int4.py``): int4 per group of 32/64/128 input columns, asymmetric; ``w = q * scale + min``
  with q in 0..15, in GGUF's block layout. CPU matmul: Forge's C++ kernel (``forge.kernels.cpu_quant``), else
  aten's int4 kernel. What ``quantize="int4"`` makes, and GGUF's Q4_0, Q4_1 and Q4_K exactly.
- :class:`Int8GroupWeight` (``int8.py``): int8 per group of 16 or 32 columns, optionally with a minimum. GGUF's
  Q8_0 exactly, and the 5- and 6-bit types and Q2_K/Q3_K. CPU matmul: Forge's C++ kernel for groups of 32, else
  aten's int4 kernel on two nibbles a value.

:func:`from_gguf` (``gguf_blocks.py``) maps GGUF blocks into them without requantizing: ``dequantize`` reproduces
``gguf.quants.dequantize`` bit for bit. Off the CPU (or in a dtype the CPU kernels refuse) ``linear`` falls back
to a matmul with the dequantized weight: correct, not fast. On CUDA, ``ops.linear`` runs Forge's Triton
kernels (``forge.kernels.quant_linear``) on the buffers each weight's ``kernel_operands()`` names.

Every weight follows its model's ``.to(device)`` and takes ``.to(dtype)`` as the dtype to compute in, without
casting its quantized values (see :class:`QuantizedWeight`). ``quantize_model`` swaps each float linear layer's
``weight`` for one of these, in place; ``dequantize_model`` swaps them back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from forge.core.quantize.base import KERNEL_DTYPES, KernelOperands, QuantizedWeight
from forge.core.quantize.gguf_blocks import GGUF_KEPT, from_gguf
from forge.core.quantize.int4 import GGUF_Q4_0, GGUF_Q4_1, INT4_GROUP_SIZES, Int4Weight, check_group_size
from forge.core.quantize.int8 import INT8_GROUP_SIZES, Int8GroupWeight, Int8Weight
from forge.errors import ConfigError

__all__ = [
    "GGUF_KEPT",
    "GGUF_Q4_0",
    "GGUF_Q4_1",
    "INT4_GROUP_SIZES",
    "INT8_GROUP_SIZES",
    "KERNEL_DTYPES",
    "SCHEMES",
    "Int4Weight",
    "Int8GroupWeight",
    "Int8Weight",
    "KernelOperands",
    "QuantizedWeight",
    "check_group_size",
    "dequantize_model",
    "from_gguf",
    "has_quantized",
    "quantize_model",
    "quantize_weight",
    "weight_bytes",
]

SCHEMES = ("int8", "int4")


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
    """Quantize every float ``nn.Linear`` of ``model`` in place, except those whose name contains one of ``skip``.

    Linears already quantized (a GGUF's exact blocks) are left as they are: they are not requantized. The
    embeddings and the output head stay as they were: an int4 round-to-nearest head makes greedy output
    diverge. Returns ``model``.
    """
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown quantization scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    targets = [
        module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and not isinstance(module.weight, QuantizedWeight)
        and not any(s in name.split(".") for s in skip)
    ]
    if scheme == "int4":  # check every layer before changing any, so a bad group size leaves the model whole
        for module in targets:
            check_group_size(group_size, module.in_features)
    for module in targets:
        quantized = quantize_weight(module.weight, scheme, group_size)
        del module.weight  # the Parameter goes; the quantized module takes its name
        module.weight = quantized
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every quantized weight of ``model`` by a float Parameter of ``dtype``, in place (ties kept)."""
    done: dict[int, nn.Parameter] = {}
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, QuantizedWeight):
                if id(child) not in done:
                    done[id(child)] = nn.Parameter(child.dequantize(dtype), requires_grad=True)
                delattr(module, name)
                setattr(module, name, done[id(child)])
    return model


def has_quantized(model: nn.Module) -> bool:
    """Whether any weight of ``model`` is held quantized."""
    return any(isinstance(m, QuantizedWeight) for m in model.modules())


def weight_bytes(model: nn.Module) -> int:
    """Bytes ``model`` holds in memory: parameters and buffers (RoPE tables too), quantized weights at their
    :attr:`~QuantizedWeight.nbytes` (casts made for another activation dtype included); tied weights count once."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    casts = [t for m in model.modules() if isinstance(m, QuantizedWeight) for t in m._cast.values()]
    return sum(t.numel() * t.element_size() for t in [*tensors.values(), *casts])
