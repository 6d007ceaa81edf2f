"""Forge's CPU quantized matmuls: int4 and int8 weights in blocks of 32, in C++ (``csrc/quant_cpu.cpp``).

AVX2 everywhere; int4 decode (fewer than 4 rows of activations) takes an AVX512-VNNI path where the CPU has
one (:func:`vnni`).

The activations are rounded to integers per block of 32, so that each block's dot product is integer
arithmetic, with one float multiply-add per block for the scales. By default (``precise=True``) to int16
(``madd_epi16``): within 1/32767 of each block's largest value, finer than bf16's 1/256, and the results match
the dequantized weight's matmul to about 1e-5. ``precise=False`` is llama.cpp's method, int8 (``maddubs``):
it reproduces llama.cpp's greedy tokens on SmolLM2's Q4_1 file token for token, but that rounding moves the
logits by a few percent, enough to turn SmolLM2's answer to "What is the capital of France?" from "Paris"
into "L'Étoile" (so does rounding the activations to bf16): Forge keeps ``precise``.

Layouts, for an (N, K) weight and groups of ``group`` input columns (a multiple of 32):

- int4: ``qs`` (N, K/2) uint8; block b of a row (32 values) is 16 bytes, values 0..15 in the low nibbles
  and 16..31 in the high ones (GGUF's Q4_0/Q4_1 order); ``w = d * q + m`` with q in 0..15, ``d`` and ``m``
  (N, K/group) fp16 or fp32.
- int8: ``qs`` (N, K) int8; ``w = d * q (+ m)``, ``d`` (N, K/group) (GGUF Q8_0 at group 32, no ``m``).

The extension is compiled on first use with torch.utils.cpp_extension (about 20-40 s, then cached in
``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``). :func:`available` says False, and
callers take their portable path, where that can't happen: no AVX2, no compiler, or ``FORGE_CPU_KERNELS=0``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import torch

__all__ = ["DTYPES", "available", "int4_mm", "int8_mm", "vnni"]

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "quant_cpu.cpp"
_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]  # OpenMP: at::parallel_for runs on torch's threads
#: Activation dtypes the kernels take.
DTYPES = (torch.float32, torch.bfloat16)
_lock = threading.Lock()
_state: dict[str, bool] = {}


def available() -> bool:
    """Whether the kernels are built and loaded (building them now if they can be)."""
    if "ok" not in _state:
        with _lock:
            if "ok" not in _state:
                _state["ok"] = _build()
    return _state["ok"]


def _build() -> bool:
    if os.environ.get("FORGE_CPU_KERNELS", "1") == "0":
        return False
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        log.info("Forge's CPU quantized kernels need AVX2; using PyTorch's quantized ops")
        return False
    _clear_stale_lock()
    try:
        from torch.utils.cpp_extension import load

        load(
            name="forge_cpu_quant",
            sources=[str(_SOURCE)],
            extra_cflags=_FLAGS,
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except Exception as exc:  # no compiler, no ninja, a read-only cache...: the portable path still works
        log.warning("Forge's CPU quantized kernels could not be built (%s); using PyTorch's quantized ops", exc)
        return False
    _register_fakes()
    return True


#: A build takes 20-40 s; a lock this old was left by a build that was killed (Ctrl-C on first use).
STALE_LOCK_SECONDS = 600


def _clear_stale_lock(build_dir: Path | None = None, now: float | None = None) -> bool:
    """Remove the extension's build lock when a killed build left it behind; whether it did.

    torch waits for that lock without end, so without this every later process would hang on first use.
    """
    try:
        if build_dir is None:
            from torch.utils.cpp_extension import _get_build_directory

            build_dir = Path(_get_build_directory("forge_cpu_quant", verbose=False))
        lock = build_dir / "lock"
        age = (time.time() if now is None else now) - lock.stat().st_mtime
        if age < STALE_LOCK_SECONDS:
            return False
        log.warning("removing %s, left %.0f s ago by a build of Forge's CPU kernels that did not finish", lock, age)
        lock.unlink()
        return True
    except (OSError, ImportError):  # no lock (the usual case), or torch's layout changed: nothing to clear
        return False


def _register_fakes() -> None:
    """Shapes for torch.compile, which traces through the ops without running them."""

    @torch.library.register_fake("forge_cpu::int4_mm")
    def _(
        x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor, group: int, precise: bool = True
    ) -> torch.Tensor:
        return x.new_empty(x.shape[0], qs.shape[0])

    @torch.library.register_fake("forge_cpu::int8_mm")
    def _(
        x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None, group: int, precise: bool = True
    ) -> torch.Tensor:
        return x.new_empty(x.shape[0], qs.shape[0])


def int4_mm(
    x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor, group: int, *, precise: bool = True
) -> torch.Tensor:
    """``x @ W.T`` (M, N) in x's dtype (fp32 or bf16) for the int4 weight (qs, d, m); needs :func:`available`.

    ``precise=False`` rounds the activations to int8 per block, not int16 (llama.cpp's method; see the module).
    """
    return torch.ops.forge_cpu.int4_mm(x, qs, d, m, group, precise)


def int8_mm(
    x: torch.Tensor,
    qs: torch.Tensor,
    d: torch.Tensor,
    group: int,
    m: torch.Tensor | None = None,
    *,
    precise: bool = True,
) -> torch.Tensor:
    """``x @ W.T`` (M, N) in x's dtype for the group-wise int8 weight (qs, d, optional m); needs :func:`available`."""
    return torch.ops.forge_cpu.int8_mm(x, qs, d, m, group, precise)


def vnni(enable: bool | None = None) -> bool:
    """Whether int4 decode takes the AVX512-VNNI path (where the CPU has it); ``enable`` turns it on or off.

    That path splits each int16 activation into two int8 halves and multiplies 64 of them by 64 weights an
    instruction (``vpdpbusd``), two weight rows a register, against 16 for the AVX2 path's ``madd``. It runs
    for int4 weights, ``precise`` rounding, fewer than 4 rows of x and K a multiple of 64; measured on SmolLM2's
    shapes at one row, 1.5-1.65x the AVX2 kernel. With more rows the AVX2 kernel, which reuses each weight
    block for 4 rows, was faster; int8 weights are memory-bound either way. Its activations are rounded to
    ``max|x| / 32639`` per block (so both halves fit in int8) where the AVX2 path rounds to ``/ 32767``: the
    two agree to about 5e-5 of the output.
    """
    return bool(torch.ops.forge_cpu.vnni(-1 if enable is None else int(enable)))
