"""Choosing a device and the mixed-precision dtype that is fast on it."""

from __future__ import annotations

import torch

from forge.errors import DeviceError

__all__ = ["DEVICES", "autocast_dtype", "on_device", "resolve_device", "upload"]

DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; a named device must be available.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    base = name.split(":", 1)[0]
    if base not in DEVICES:
        raise DeviceError(f"unknown device {name!r}: use one of {', '.join(DEVICES)}", field="device")
    if base == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if base == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            f"device {name!r} is not available: this PyTorch sees no CUDA GPU; use device='cpu' or device='auto'",
            field="device",
        )
    if base == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(
            f"device {name!r} is not available: Apple Metal (MPS) needs macOS on Apple silicon; "
            "use device='cpu' or device='auto'",
            field="device",
        )
    return torch.device(name)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 where the hardware runs it natively, else None (stay in fp32).

    fp16 is never chosen: it needs loss scaling on GPUs and is ~100x slower
    than fp32 on CPUs without native fp16.
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        return torch.bfloat16 if torch.backends.mkldnn.is_available() and _cpu_has_native_bf16() else None
    return None


def _cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def on_device(values: list, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A tensor of host ``values`` on ``device``, without waiting for the device.

    ``torch.tensor(values, device=cuda)`` copies from pageable memory and then waits for every kernel queued
    before it (PyTorch synchronizes the stream): in a prefill, for the prefix cache's copies. From pinned memory
    the copy is queued like a kernel and the host goes on (the pinned block is reused only after the copy).
    """
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def upload(dst: torch.Tensor, values: list) -> None:
    """Copy host ``values`` into ``dst`` without waiting for the device (see :func:`on_device`)."""
    dst.copy_(torch.tensor(values, dtype=dst.dtype, pin_memory=dst.is_cuda), non_blocking=True)
