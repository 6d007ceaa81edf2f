"""GPU backends: Forge's Triton kernels, and a registry of them keyed by (op, device type).

``forge.core.ops`` asks :func:`lookup` before falling back to plain PyTorch.
Each kernel lives in its own module (``rms_norm``, ``rope``, ``attention``...)
with a pure-PyTorch twin in ``reference``. On CUDA the registry fills itself
on first use with :data:`CUDA_KERNELS`: only the kernels measured to beat
PyTorch's path there (``benchmarks/kernels_gpu.py``). An empty registry, the
CPU and MPS case, is the correct default.

>>> lookup("softmax", "cpu") is None
True
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = [
    "ALL_KERNELS",
    "CUDA_KERNELS",
    "disabled",
    "enabled",
    "load",
    "lookup",
    "register",
    "registered",
    "unload",
]

log = logging.getLogger(__name__)

#: Every Triton kernel Forge has, by op: "module:function" under forge.kernels.
ALL_KERNELS: dict[str, str] = {
    "add_rms_norm": "rms_norm:add_rms_norm",
    "add_layer_norm": "layer_norm:add_layer_norm",
    "gelu": "gelu:gelu",
    "swiglu": "swiglu:swiglu",
    "softmax": "softmax:softmax",
    "rope": "rope:rope",
    "rope_cache": "rope:rope_cache",
    "attention": "attention:attention",
    "decode_attention": "decode_attention:decode_attention",
    "linear_cross_entropy": "cross_entropy:linear_cross_entropy",
    "quantized_linear": "quant_linear:quantized_linear",
}

#: The ones used on CUDA by default: faster than PyTorch's path on an H100/H200 (see benchmarks/results/).
#: Not among them: training attention (SDPA's flash kernel is 20-33% faster on an H200) and the fused
#: add + LayerNorm (PyTorch's native LayerNorm backward is faster).
CUDA_KERNELS: tuple[str, ...] = (
    "add_rms_norm",
    "gelu",
    "swiglu",
    "softmax",
    "rope",
    "rope_cache",
    "decode_attention",
    "linear_cross_entropy",
    "quantized_linear",
)

_REGISTRY: dict[tuple[str, str], Callable[..., Any]] = {}
_autoloaded: set[str] = set()
_enabled = True


def register(op: str, device_type: str, fn: Callable[..., Any]) -> None:
    """Make ``fn`` the kernel for ``op`` on ``device_type`` (e.g. ``"cuda"``)."""
    _REGISTRY[(op, device_type)] = fn


def lookup(op: str, device_type: str) -> Callable[..., Any] | None:
    """The registered kernel for ``op`` on ``device_type``, or None for PyTorch's."""
    if not _enabled:
        return None
    if device_type == "cuda" and device_type not in _autoloaded:
        _autoloaded.add(device_type)
        if os.environ.get("FORGE_KERNELS", "1") != "0":
            try:
                load(CUDA_KERNELS, "cuda")
            except ImportError as exc:  # triton missing: PyTorch's path is still correct
                log.warning("Forge's CUDA kernels are off (%s); pip install triton to use them", exc)
    return _REGISTRY.get((op, device_type))


def load(ops: Iterable[str], device_type: str) -> list[str]:
    """Register Forge's Triton kernels for ``ops`` on ``device_type``; returns the ops registered.

    On a CPU this only works in Triton's interpreter (``TRITON_INTERPRET=1``), which is how the
    kernels are tested without a GPU.
    """
    done = []
    for op in ops:
        if op not in ALL_KERNELS:
            raise ValueError(f"no Forge kernel for op {op!r}; the kernels are: {', '.join(ALL_KERNELS)}")
        module, name = ALL_KERNELS[op].split(":")
        register(op, device_type, getattr(importlib.import_module(f"forge.kernels.{module}"), name))
        done.append(op)
    return done


def unload(device_type: str) -> None:
    """Forget every kernel registered for ``device_type`` (and don't autoload CUDA's again)."""
    _autoloaded.add(device_type)
    for key in [key for key in _REGISTRY if key[1] == device_type]:
        del _REGISTRY[key]


@contextmanager
def disabled() -> Iterator[None]:
    """Run PyTorch's path everywhere inside the block: the baseline the kernels are measured against."""
    global _enabled
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous


def enabled() -> bool:
    """False inside :func:`disabled`: whatever was captured with kernels must not be replayed there."""
    return _enabled


def registered() -> dict[tuple[str, str], str]:
    """What is registered, as {(op, device): kernel name}."""
    return {key: getattr(fn, "__qualname__", repr(fn)) for key, fn in _REGISTRY.items()}
