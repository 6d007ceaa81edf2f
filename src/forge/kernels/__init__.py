"""GPU backends: a registry of fast kernels keyed by (op, device type).

``forge.core.ops`` asks :func:`lookup` before falling back to plain PyTorch.
A backend registers a kernel only where it has been measured to beat PyTorch
on that device, so an empty registry (the CPU case) is the correct default.

>>> lookup("softmax", "cpu") is None
True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["lookup", "register", "registered"]

_REGISTRY: dict[tuple[str, str], Callable[..., Any]] = {}


def register(op: str, device_type: str, fn: Callable[..., Any]) -> None:
    """Make ``fn`` the kernel for ``op`` on ``device_type`` (e.g. ``"cuda"``)."""
    _REGISTRY[(op, device_type)] = fn


def lookup(op: str, device_type: str) -> Callable[..., Any] | None:
    """The registered kernel for ``op`` on ``device_type``, or None for PyTorch's."""
    return _REGISTRY.get((op, device_type))


def registered() -> dict[tuple[str, str], str]:
    """What is registered, as {(op, device): kernel name}."""
    return {key: getattr(fn, "__qualname__", repr(fn)) for key, fn in _REGISTRY.items()}
