"""A quantized weight's matmul on CUDA: which of Forge's Triton kernels runs, chosen in one table.

``ops.linear`` calls :func:`quantized_linear` (registered as the ``quantized_linear`` kernel) with the operands a
:class:`~forge.core.quantize.QuantizedWeight` gives (``kernel_operands()``): the quantized values as the weight
holds them (GGUF's int4 blocks, plain int8), their scales and minimums, and the scheme's name. :data:`CUDA_PATHS`
picks the kernel from the scheme and the number of rows of x (:mod:`forge.kernels.quant_matmul`):

- ``"gemv_q16"``: dequant-GEMV with x rounded to int16 per group of 32 (within 1/32767 of each group's largest
  value, as Forge's CPU kernels do), two products a ``dp2a``; the decode step of a few sequences. Weights it
  can't take (int4 outside GGUF's blocks, groups that aren't a power of two from 32) get the exact ``"gemv"``.
- ``"gemv_q8"``: the same with x rounded to int8 (as llama.cpp's CUDA MMVQ does), four products a ``dp4a``:
  faster, but the rounding moves logits enough to change a small model's answers (SmolLM2's "capital of France"
  becomes "L'Étoile"; ``benchmarks/gemv_q8_quality.py``), so no table entry takes it.
- ``"gemv"``: dequant-GEMV in fp32, reading 4 or 8 bits a weight: exact to the dequantized weight.
- ``"gemm"``: tiled dequant-GEMM (``tl.dot``), the weight still read once per block of 64 rows; a batch.
- ``"mma"``: the batch GEMMs of :mod:`forge.kernels.quant_gemm`, each weight value dequantized straight into the
  tensor cores' bf16 (or fp16) operand: int8 per channel and int4 in GGUF's blocks, 5 to 64 rows. Calls they
  can't take (fp32 x, int4 outside GGUF's blocks, K not a multiple of 32) run the path they replaced: int4
  ``"dequant"``, int8 ``"gemm"``.
- ``"cuda_mma"``: the same batch GEMM in CUDA C++ compiled by NVRTC (:mod:`forge.kernels.quant_cuda`), the
  weight loaded straight into ``mma.sync``'s register operand; int4 in GGUF's blocks with bf16 x, 1 to 64 rows.
  Calls it can't take (off an NVIDIA GPU, fp16 or fp32 x, K not a multiple of 128) run ``"mma"``.
- ``"dequant"``: the weight written out in x's dtype, then cuBLAS; a long prefill, where the matmul is
  compute-bound and the extra pass over the weight is small against it.

Every path launches with parameters computed from shapes alone: no host sync, no allocation whose size
depends on values, so a decode step that calls it is captured in a CUDA graph (``forge.core.cuda_graphs``).
"""

from __future__ import annotations

import torch

from forge.kernels.quant_matmul import PATHS, int4_linear, int8_linear

__all__ = ["CUDA_PATHS", "SCHEMES", "choose_path", "quantized_linear"]

#: The schemes :func:`quantized_linear` takes: int4 per group, int8 per output channel, int8 per group.
SCHEMES = ("int4", "int8", "int8_group")

_ANY = 1 << 62

#: For each scheme, ``(most rows of x, path)`` in increasing order: the first bound that M fits picks the path.
#: Measured on an H200 (``benchmarks/quant_gpu.py``'s "paths" rows, Llama-1B's linears, microseconds): at M=1
#: the GEMVs beat bf16 cuBLAS and the other paths for every scheme, and ``gemv_q16`` (x rounded to int16 per
#: 32, dp2a) beats the exact ``gemv``: int4 gate_up 9.4 against 14.7 and bf16's 19.3, down 8.2 against 9.5
#: (``gemv_q8``: 9.3 and 7.5). 1B int4 decode: 1,137 tok/s with gemv_q16. At M=16 and 64 the GEMVs are 3-30x
#: slower. The GEMV bound of 4 is not measured between 1 and 16. At M=16-64 on the H200, before "mma": int8 per
#: channel's "gemm" (gate_up 21-25) beat dequant-then-cuBLAS (47); for int4 and int8 per group dequant won (int4
#: gate_up at 64: 45.5 against "gemm"'s 53.2; 1B int4 decode at batch 64: 28.0k tok/s against 18.6k), and it
#: still does for int8 per group.
#: "mma" at M=5-64 (int4 in GGUF's blocks, int8 per channel) is from the H100 probe (benchmarks/
#: quant_gemm_probe.py, results/quant_gemm_probe_NVIDIA_H100_80GB_HBM3.json): kernel-level, CUDA-graph timed,
#: cold weights; Llama-1B's qkv + o + gate_up + down summed, us. int8 at M=64: 56 against bf16 cuBLAS's 60 and
#: "gemm"'s 65; at M=16: 44 against 57 and 57. int4 (groups of 32) at M=64: 74 against bf16's 60 and
#: "dequant"'s 112; at M=16: 65 against 57 and 109. In decode at batch 64 on the H200 (1B shape,
#: results/quant_gpu_batch64_mma_NVIDIA_H200.json): int8 42.7k tok/s, int4 35.5k, bf16 46.1k.
#: int4 at M = 5-64 runs "cuda_mma" (forge.kernels.quant_cuda, CUDA C++ by NVRTC; the Triton "mma" where it can't):
#: on an H100 the four 1B linears at M = 64 in 62.3 us against the Triton kernel's 71.9 and bf16's 57.4, at M = 32
#: 50.2 against 72.9 and 56.0 (results/quant_cuda_probe_NVIDIA_H100_80GB_HBM3.json); 1B decode at batch 64 37.0k
#: tok/s against 32.7k, bf16 39.3k (results/quant_gpu_1b_cuda_mma_best_NVIDIA_H100_80GB_HBM3.json). int8 stays on
#: the Triton "mma" (54.2 us against cuda_mma's best 62.3; decode 39.7k against 35.0k).
CUDA_PATHS: dict[str, tuple[tuple[int, str], ...]] = {
    "int4": ((4, "gemv_q16"), (64, "cuda_mma"), (_ANY, "dequant")),
    "int8": ((4, "gemv_q16"), (64, "mma"), (_ANY, "dequant")),
    "int8_group": ((4, "gemv_q16"), (_ANY, "dequant")),
}


def choose_path(scheme: str, m: int) -> str:
    """The kernel :data:`CUDA_PATHS` gives ``scheme`` for ``m`` rows of x: one of :data:`PATHS`."""
    table = CUDA_PATHS.get(scheme)
    if table is None:
        raise ValueError(f"no quantized CUDA kernels for scheme {scheme!r}; the schemes are {', '.join(SCHEMES)}")
    for most, path in table:
        if m <= most:
            if path not in PATHS:
                raise ValueError(f"CUDA_PATHS[{scheme!r}] names an unknown path {path!r}; use one of {PATHS}")
            return path
    return table[-1][1]


def quantized_linear(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    scheme: str,
    gguf_blocks: bool = False,
    path: str | None = None,
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for a quantized W, by the kernel :func:`choose_path` picks (or ``path``).

    int4: q (N, K/2) uint8, in GGUF's blocks of 32 if ``gguf_blocks``; scale and minimum (N, K/g). int8: q (N, K),
    scale (N,) per channel ("int8") or (N, K/g) per group ("int8_group"), minimum None or scale's shape.
    x (..., K) in bf16, fp16 or fp32; returns (..., N) in x's dtype.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"no quantized CUDA kernels for scheme {scheme!r}; the schemes are {', '.join(SCHEMES)}")
    rows = x.numel() // max(x.shape[-1], 1)
    chosen = path or choose_path(scheme, rows)
    if scheme == "int4":
        return int4_linear(x, q, scale, minimum, bias, gguf_blocks=gguf_blocks, path=chosen)
    return int8_linear(x, q, scale, minimum, bias, path=chosen)
