"""The ``"cuda_mma"`` path of :mod:`forge.kernels.quant_matmul`: a CUDA C++ quantized GEMM for 5 to 64 rows of bf16
x, compiled at run time by NVRTC (``torch.cuda._compile_kernel``; no nvcc needed), ``csrc/quant_mma.cu``.

Why below Triton: at M = 64 the Triton ``"mma"`` kernels (:mod:`forge.kernels.quant_gemm`) lose to bf16 cuBLAS on
the H200 (the four Llama-1B linears in 72 us against 47), and no cheaper unpacking changed that
(``benchmarks/quant_words_probe.py``); the likely cause is how Triton schedules a dot whose operand is computed in
registers.
This kernel is Marlin's idea cut to Forge's layouts: the weight is the ``mma.sync`` A operand, loaded from HBM
straight into registers (128-bit loads, one super-step ahead), dequantized there with ``prmt``/``lop3`` and
``fma.rn.bf16x2``; x is the B operand, staged by ``cp.async``. It reads the weights as Forge keeps them (GGUF's
int4 blocks, int8 per channel): no second copy.

Two forms, one source: ``mma.sync`` (any GPU from sm_80; the default) and, on Hopper, ``wgmma`` reading x through a
shared-memory descriptor (``wgmma=1``; x's columns are copied in the threads' k order), whose K split can also be
summed inside a thread-block cluster (``cluster=1``). On an H100 at M = 64 (``benchmarks/quant_cuda_probe.py``) the
mma.sync form is the faster for int4 (the four 1B linears in 62.3 us, Triton's "mma" 71.9, bf16 cuBLAS 57.4), the
wgmma form for int8 (62.3, behind Triton's 54.2, so int8 stays on Triton), and the cluster sum never won.

Numerics are the Triton kernels': int4 ``((128 + c) - 128) * scale + minimum`` rounded once to bf16 per value
(scale and minimum rounded to bf16), int8 exact with the scale on the fp32 accumulator; fp32 accumulation.
Launch parameters come from shapes alone (:func:`cuda_config`), so the call is captured in CUDA graphs.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import NamedTuple

import torch
import triton

from forge.kernels.attention_tiles import sm_count
from forge.kernels.quant_gemm import _sum_splits

__all__ = [
    "CudaCompileError",
    "CudaMmaConfig",
    "cuda_config",
    "cuda_mma_linear",
    "cuda_mma_or_none",
    "cuda_mma_unsupported",
]

log = logging.getLogger(__name__)
_SOURCE = Path(__file__).parent / "csrc" / "quant_mma.cu"
#: Why NVRTC could not build the kernel in this process (empty: it could, or wasn't asked). Once it fails, every
#: call is refused and takes the Triton kernels, with one warning.
_failed: list[str] = []


class CudaCompileError(RuntimeError):
    """NVRTC could not build or load the kernel here (no libnvrtc, a driver too old for the code, ...)."""


_SCALE_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
MAX_M = 64


class CudaMmaConfig(NamedTuple):
    """A launch of the CUDA kernel: 16-row A tiles a warp, warps a CTA, x stages, weight super-steps loaded ahead,
    and CTAs along K (their fp32 partials summed by a second kernel)."""

    at: int = 1
    warps: int = 4
    stages: int = 4
    pd: int = 2
    split_k: int = 1
    wgmma: int = 0  # 1: the Hopper form (sm_90a: wgmma, x read by the tensor cores from shared memory)
    cluster: int = 0  # 1 (with wgmma): a K split of 2, 4 or 8 CTAs is one cluster, summed in distributed smem


def _super_step(bits: int) -> int:
    return 128 if bits == 4 else 64  # columns of K a super-step: four GGUF blocks, or four 16-byte int8 spans


def cuda_mma_unsupported(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None, *, bits: int, gguf: bool
) -> str | None:
    """Why the CUDA kernel can't take this call (None: it can)."""
    if _failed:
        return _failed[0]
    if x.device.type != "cuda" or torch.version.hip is not None:
        return "the CUDA kernel runs on NVIDIA GPUs"
    if torch.cuda.get_device_capability(x.device) < (8, 0):
        return "mma.sync with bf16 needs compute capability 8.0 or newer"
    if x.dtype != torch.bfloat16:
        return f"x is {x.dtype}: the CUDA kernel takes bf16"
    m, k = x.numel() // max(x.shape[-1], 1), x.shape[-1]
    if not 1 <= m <= MAX_M:
        return f"{m} rows of x: the CUDA kernel takes 1 to {MAX_M}"
    if k % _super_step(bits):
        return f"K={k} is not a multiple of {_super_step(bits)}"
    if scale.dtype not in _SCALE_KINDS:
        return f"scales in {scale.dtype}"
    if bits == 8:
        if q.dtype != torch.int8 or scale.dim() != 1 or minimum is not None:
            return "int8 takes signed q with one scale per output channel and no minimum"
        return None
    if not gguf or minimum is None or scale.dim() != 2:
        return "int4 takes GGUF's blocks of 32 with a scale and a minimum per group"
    if k % scale.shape[1] or (k // scale.shape[1]) % 32 or minimum.dtype != scale.dtype:
        return "int4 takes groups of a multiple of 32 columns, scale and minimum of one dtype"
    return None


def cuda_config(m: int, n: int, k: int, *, bits: int, sms: int) -> CudaMmaConfig:
    """The launch for m rows of x against an (n, k) weight, from shapes alone: the H100 sweep's best for Llama-1B's
    four linears at M = 64 (``results/quant_cuda_probe_NVIDIA_H100_80GB_HBM3.json``). The mma.sync form, 3 stages,
    weights one super-step ahead; CTAs of 8 warps and one A tile each, or for wide weights (N >= 8192: gate_up) 4
    warps of two; K split, up to 8 ways, while two CTAs a split still fit one wave and each split keeps at least 2
    super-steps (qkv 4, o and down 8, gate_up 1)."""
    wide = n >= 8192
    cfg = CudaMmaConfig(at=2 if wide else 1, warps=4 if wide else 8, stages=3, pd=1)
    tiles = triton.cdiv(n, _rows(cfg))
    steps = k // _super_step(bits)
    split = 1
    while split < 8 and tiles * split * 2 <= sms and steps % (2 * split) == 0 and steps // (2 * split) >= 2:
        split *= 2
    return cfg._replace(split_k=split)


@functools.cache
def _kernel(bits: int, mt: int, cfg: CudaMmaConfig, scale_kind: int):
    defines = dict(INT4=int(bits == 4), MT=mt, AT=cfg.at, WARPS=cfg.warps, STAGES=cfg.stages, PD=cfg.pd,
                   SCALE_KIND=scale_kind, WGMMA=cfg.wgmma, CLUSTER=cfg.split_k if cfg.cluster else 1)  # fmt: skip
    options = [f"-D{key}={value}" for key, value in defines.items()] + ["--std=c++17"]
    try:
        arch = "90a" if cfg.wgmma else None  # wgmma needs sm_90a; None: the device's own
        kernel = torch.cuda._compile_kernel(
            _SOURCE.read_text(), "forge_quant_mma", compute_capability=arch, nvcc_options=options
        )
    except Exception as exc:  # no libnvrtc, an old driver, a compiler error: the Triton kernels still work
        why = f"NVRTC could not build Forge's CUDA quantized GEMM here ({type(exc).__name__}: {exc})"
        _failed.append(why)
        log.warning("%s; batched quantized matmuls take the Triton kernels", why)
        raise CudaCompileError(why) from exc
    smem = _smem(bits, mt, cfg)
    if smem >= 48 * 1024:  # past the default limit a kernel must ask for it
        kernel.set_shared_memory_config(smem)
    return kernel


def _smem(bits: int, mt: int, cfg: CudaMmaConfig) -> int:
    """Bytes of x's stages: mt * 8 rows of a super-step's columns (the mma.sync form pads rows, as XS in the
    source)."""
    row = _super_step(bits) * 2 + (0 if cfg.wgmma else 32 if bits == 4 else 16)
    partials = _rows(cfg) * (mt * 8 + 1) * 4 if cfg.cluster else 0  # the cluster's fp32 partials reuse the stages
    return max(cfg.stages * mt * 8 * row, partials)


def _rows(cfg: CudaMmaConfig) -> int:
    """Rows of the weight a CTA: 16 a warp (the Hopper form: one A tile a warp, warps in fours)."""
    return cfg.warps * 16 * (1 if cfg.wgmma else cfg.at)


def cuda_mma_linear(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    bits: int,
    config: CudaMmaConfig | None = None,
) -> torch.Tensor:
    """``x @ W.T (+ bias)``: int4 (``bits=4``: q (N, K/2) uint8 in GGUF's blocks, scale and minimum (N, K/g)) or
    int8 per channel (``bits=8``: q (N, K) int8, scale (N,)); x (..., K) bf16 with at most 64 rows."""
    why = cuda_mma_unsupported(x, q, scale, minimum, bits=bits, gguf=True)
    if why is not None:
        raise ValueError(f"cuda_mma_linear can't take this call: {why}")
    return _run(x, q, scale, minimum, bias, bits, config)


def cuda_mma_or_none(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    bits: int,
    gguf: bool,
) -> torch.Tensor | None:
    """:func:`cuda_mma_linear` with the launch from :func:`cuda_config`, or None where the kernel can't take the call
    (:func:`cuda_mma_unsupported`) or NVRTC can't build it here (logged once): the caller runs another kernel."""
    if cuda_mma_unsupported(x, q, scale, minimum, bits=bits, gguf=gguf) is not None:
        return None
    try:
        return _run(x, q, scale, minimum, bias, bits, None)
    except CudaCompileError:  # from now on cuda_mma_unsupported says why
        return None


def _run(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    config: CudaMmaConfig | None,
) -> torch.Tensor:
    """The launch (and a split's sum) for a call :func:`cuda_mma_unsupported` accepted."""
    k, n = x.shape[-1], q.shape[0]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1 or x2.stride(0) % 8 or x2.data_ptr() % 16:  # cp.async copies 16-byte pieces of rows
        x2 = x2.clone(memory_format=torch.contiguous_format)  # a new buffer: dense and aligned
    m = x2.shape[0]
    cfg = config or cuda_config(m, n, k, bits=bits, sms=sm_count(x.device))
    ss = _super_step(bits)
    steps = k // ss
    split = max(1, min(cfg.split_k, steps))
    k_split = triton.cdiv(steps, split) * ss
    split = triton.cdiv(k, k_split)
    mt = min(8, max(2, triton.next_power_of_2(triton.cdiv(m, 8))))
    clustered = bool(cfg.wgmma and cfg.cluster and split in (2, 4, 8))
    cfg = cfg._replace(cluster=int(clustered), split_k=split if clustered else 1, at=1 if cfg.wgmma else cfg.at)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    ws = torch.empty((split, m, n), dtype=torch.float32, device=x.device) if split > 1 and not clustered else y
    q = q.contiguous()
    if q.data_ptr() % 16:  # each thread loads 16 bytes of a row at once (a view of a larger buffer may be offset)
        q = q.clone()
    if bits == 4:
        if minimum.stride() != scale.stride():
            scale, minimum = scale.contiguous(), minimum.contiguous()
        strides = (scale.stride(0), scale.stride(1))
        blocks_per_group = (k // scale.shape[1]) // 32
    else:
        strides, blocks_per_group, minimum = (scale.stride(0), 0), 1, scale
    b = bias.to(x.dtype).contiguous() if bias is not None else y
    if cfg.wgmma and (cfg.warps % 4 or torch.cuda.get_device_capability(x.device) != (9, 0)):
        raise ValueError(f"launch {cfg}: the wgmma form needs a Hopper GPU (sm_90) and warps in fours")
    kernel = _kernel(bits, mt, cfg, _SCALE_KINDS[scale.dtype])
    kernel(
        grid=(triton.cdiv(n, _rows(cfg)), split, 1),
        block=(cfg.warps * 32, 1, 1),
        args=[q, scale, minimum, b, x2, y, ws, m, n, k, x2.stride(0), *strides, blocks_per_group, k_split,
              int(bias is not None), int(split > 1 and not clustered)],
        shared_mem=_smem(bits, mt, cfg),
    )  # fmt: skip
    if split > 1 and not clustered:
        mn = m * n
        _sum_splits[(triton.cdiv(mn, 1024),)](ws, b, y, n, mn, split, HAS_BIAS=bias is not None, BLOCK=1024)
    return y.view(*x.shape[:-1], n)
