"""The "cuda_mma" path (forge.kernels.quant_cuda, CUDA C++ compiled by NVRTC) against F.linear with the dequantized
weight on an NVIDIA GPU; everywhere, its refusals and the fallback to the Triton "mma" kernels.

The kernel itself runs only on a GPU (NVRTC and mma.sync): on a CPU those tests skip, and the path's fallback is
checked through Triton's interpreter. Its replay in a CUDA graph is test_quant_linear's, which runs every path.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import DEVICE, ON_GPU, close

from forge.core.quantize import Int4Weight, Int8Weight
from forge.kernels import quant_cuda
from forge.kernels.quant_cuda import (
    CudaCompileError,
    CudaMmaConfig,
    cuda_config,
    cuda_mma_linear,
    cuda_mma_unsupported,
)
from forge.kernels.quant_matmul import int4_linear, int8_linear
from forge.kernels.reference import dequantize_int4, dequantize_int8

gpu = pytest.mark.skipif(not ON_GPU, reason="the CUDA kernel needs an NVIDIA GPU")
HOPPER = ON_GPU and torch.cuda.get_device_capability() == (9, 0)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _expected(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x.float(), w.float(), None if bias is None else bias.float()).to(x.dtype)


# (rows, N, K, group, bias, launch): one n8 tile and all eight; N past the CTA's rows; K split unevenly; groups of
# 32 and 128; two A tiles a warp; 8 warps.
CASES = [
    (1, 40, 256, 32, False, CudaMmaConfig()),
    (5, 200, 1024, 128, True, CudaMmaConfig(split_k=4)),
    (17, 72, 768, 32, True, CudaMmaConfig(at=2, stages=3, pd=1, split_k=2)),
    (64, 264, 2048, 64, False, CudaMmaConfig(warps=8, split_k=8)),
    (64, 130, 640, 32, True, CudaMmaConfig(at=2, warps=8, split_k=3)),
]
# the Hopper form: the same shapes; warpgroups of 4 warps (one or two a CTA), 2 to 4 stages, serial and overlapped,
# the K split summed by the kernel or (split 4, 8) by a cluster
WGMMA_CASES = [
    (m, n, k, group, bias, CudaMmaConfig(1, 4 * (1 + i % 2), 2 + i % 3, 1 + i % 2, cfg.split_k, wgmma=1, cluster=i % 2))
    for i, (m, n, k, group, bias, cfg) in enumerate(CASES)
]
CASES += [pytest.param(*case, marks=pytest.mark.skipif(not HOPPER, reason="wgmma needs sm_90")) for case in WGMMA_CASES]


@gpu
@pytest.mark.parametrize(("m", "n", "k", "group", "with_bias", "config"), CASES)
def test_int4_in_gguf_blocks_matches_the_dequantized_matmul(
    m: int, n: int, k: int, group: int, with_bias: bool, config: CudaMmaConfig
) -> None:
    weight = Int4Weight.quantize(torch.randn(n, k, generator=_gen(n + k)), group).to(DEVICE)
    bias = torch.randn(n, generator=_gen(3)).to(DEVICE, torch.bfloat16) if with_bias else None
    x = torch.randn(m, k, generator=_gen(m)).to(DEVICE, torch.bfloat16)
    y = cuda_mma_linear(x, weight.qs, weight.scale, weight.min, bias, bits=4, config=config)
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    close(y, _expected(x, dequantize_int4(weight.qs, weight.scale, weight.min, gguf_blocks=True), bias), x.dtype)


@gpu
@pytest.mark.parametrize(("m", "n", "k", "group", "with_bias", "config"), CASES)
def test_int8_per_channel_matches_the_dequantized_matmul(
    m: int, n: int, k: int, group: int, with_bias: bool, config: CudaMmaConfig
) -> None:
    weight = Int8Weight.quantize(torch.randn(n, k, generator=_gen(n + k))).to(DEVICE)
    bias = torch.randn(n, generator=_gen(4)).to(DEVICE, torch.bfloat16) if with_bias else None
    x = torch.randn(m, k, generator=_gen(m)).to(DEVICE, torch.bfloat16)
    y = cuda_mma_linear(x, weight.q, weight.scale, None, bias, bits=8, config=config)
    close(y, _expected(x, dequantize_int8(weight.q, weight.scale), bias), x.dtype)


def test_calls_it_cant_take_are_named_and_run_the_triton_kernels() -> None:
    """Off an NVIDIA GPU, fp32 x, more than 64 rows, K not a multiple of the super-step, int4 outside GGUF's
    blocks: a reason each, and path="cuda_mma" then gives what path="mma" gives."""
    int4 = Int4Weight.quantize(torch.randn(24, 256, generator=_gen(8)), 32).to(DEVICE)
    int8 = Int8Weight.quantize(torch.randn(24, 256, generator=_gen(9))).to(DEVICE)
    x = torch.randn(5, 256, generator=_gen(10)).to(DEVICE, torch.bfloat16)
    why = cuda_mma_unsupported(x, int4.qs, int4.scale, int4.min, bits=4, gguf=True)
    if not ON_GPU:
        assert why == "the CUDA kernel runs on NVIDIA GPUs"
    else:
        assert why is None
    if ON_GPU:
        assert "takes bf16" in str(cuda_mma_unsupported(x.float(), int8.q, int8.scale, None, bits=8, gguf=False))
        assert "1 to 64" in str(cuda_mma_unsupported(x.repeat(13, 1), int8.q, int8.scale, None, bits=8, gguf=False))
        assert "multiple of 128" in str(
            cuda_mma_unsupported(x[:, :96], int4.qs, int4.scale, int4.min, bits=4, gguf=True)
        )
        assert "GGUF" in str(cuda_mma_unsupported(x, int4.qs, int4.scale, int4.min, bits=4, gguf=False))
    y4 = int4_linear(x, int4.qs, int4.scale, int4.min, gguf_blocks=True, path="cuda_mma")
    y8 = int8_linear(x, int8.q, int8.scale, path="cuda_mma")
    close(y4, _expected(x, dequantize_int4(int4.qs, int4.scale, int4.min, gguf_blocks=True)), x.dtype)
    close(y8, _expected(x, dequantize_int8(int8.q, int8.scale)), x.dtype)
    if not ON_GPU:  # the fallback is the Triton kernel, bit for bit
        assert torch.equal(y8, int8_linear(x, int8.q, int8.scale, path="mma"))
    with pytest.raises(ValueError, match="cuda_mma_linear can't take this call"):
        cuda_mma_linear(x.float(), int8.q, int8.scale, bits=8)


def test_a_kernel_nvrtc_cannot_build_is_refused_from_then_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """NVRTC failing (no libnvrtc, an old driver): CudaCompileError with the cause, one warning, and every later
    call refused with that reason, so path="cuda_mma" runs the Triton kernel."""

    def no_nvrtc(*args: object, **kwargs: object) -> None:
        raise RuntimeError("libnvrtc.so: cannot open shared object file")

    monkeypatch.setattr(quant_cuda, "_failed", [])
    monkeypatch.setattr(torch.cuda, "_compile_kernel", no_nvrtc)
    with (
        caplog.at_level("WARNING", logger="forge.kernels.quant_cuda"),
        pytest.raises(CudaCompileError, match=r"NVRTC could not build .* libnvrtc\.so: cannot open"),
    ):
        quant_cuda._kernel.__wrapped__(4, 8, CudaMmaConfig(), 2)
    assert "batched quantized matmuls take the Triton kernels" in caplog.text
    int4 = Int4Weight.quantize(torch.randn(24, 256, generator=_gen(11)), 32).to(DEVICE)
    x = torch.randn(5, 256, generator=_gen(12)).to(DEVICE, torch.bfloat16)
    assert "libnvrtc.so" in str(cuda_mma_unsupported(x, int4.qs, int4.scale, int4.min, bits=4, gguf=True))
    y = int4_linear(x, int4.qs, int4.scale, int4.min, gguf_blocks=True, path="cuda_mma")
    assert torch.equal(y, int4_linear(x, int4.qs, int4.scale, int4.min, gguf_blocks=True, path="mma"))


def test_the_launch_splits_k_to_fill_the_multiprocessors() -> None:
    """Llama-1B on 132 SMs (the H100 sweep's best at M = 64): qkv (24 CTAs of 128 rows, 16 super-steps) split 4,
    o 8, down (64 super-steps of int8) 8, gate_up (128 CTAs of 4 warps with two A tiles) unsplit; a K of two
    super-steps never split."""
    split = {(n, k, bits): cuda_config(64, n, k, bits=bits, sms=132).split_k for n, k, bits in
             [(3072, 2048, 4), (2048, 2048, 4), (2048, 8192, 8), (16384, 2048, 4), (64, 256, 4)]}  # fmt: skip
    assert list(split.values()) == [4, 8, 8, 1, 1]
    assert cuda_config(64, 2048, 2048, bits=4, sms=132)[:4] == (1, 8, 3, 1)
    assert cuda_config(64, 16384, 2048, bits=4, sms=132)[:4] == (2, 4, 3, 1)
