"""Kernel tests run everywhere: on the GPU for real, on CPUs through Triton's interpreter.

``TRITON_INTERPRET`` is read when a kernel is decorated, so it is set here,
before any test module imports a kernel. Without CUDA the kernels run on CPU
tensors, slowly: keep CPU shapes small.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: F401
except ImportError:  # a dev install has it; without it there is nothing here to test
    collect_ignore_glob = ["test_*.py"]
