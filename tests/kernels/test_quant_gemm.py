"""The "mma" path's GEMMs (forge.kernels.quant_gemm) against F.linear with the dequantized weight, its fallbacks,
and its launch heuristic against the H100 probe's best configs.

On a CPU the kernels run in Triton's interpreter (bf16 arithmetic in fp32 there, rounded by truncation): shapes
kept small, a few seconds in all.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import DEVICE, close

from forge.core.quantize import Int4Weight, Int8Weight
from forge.kernels import quant_gemm
from forge.kernels.quant_gemm import MmaConfig, int4_gguf_gemm, int8_channel_gemm, mma_config, mma_unsupported
from forge.kernels.quant_linear import CUDA_PATHS, choose_path, quantized_linear
from forge.kernels.quant_matmul import Config, int4_linear, int8_linear, pack_int4
from forge.kernels.reference import dequantize_int4, dequantize_int8


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _x(m: int, k: int, dtype: torch.dtype = torch.bfloat16, seed: int = 1) -> torch.Tensor:
    return torch.randn(m, k, generator=_gen(seed)).to(DEVICE, dtype)


def _expected(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 matmul with the fp32 dequantized weight, in x's dtype."""
    return F.linear(x.float(), w.float(), None if bias is None else bias.float()).to(x.dtype)


# (rows of x, N, K, launch, bias): M = 5, 16, 64; N odd or past the last tile; K in 1 split, in 2, and in 3 of
# 2 steps each (4 asked for, 6 steps: no split left empty); x fp16 once (a tighter check than bf16's).
CASES = [
    (5, 40, 256, MmaConfig(16, 32, 64, stages=3), False, torch.bfloat16),
    (16, 33, 512, MmaConfig(16, 32, 128, stages=4, split_k=2), True, torch.bfloat16),
    (64, 72, 384, MmaConfig(64, 64, 64, split_k=4), True, torch.bfloat16),
    (16, 33, 512, MmaConfig(16, 32, 128, split_k=2), True, torch.float16),
]
IDS = ["m5", "m16-split2-bias", "m64-split3-bias", "m16-split2-bias-fp16"]


@pytest.mark.parametrize(("m", "n", "k", "config", "with_bias", "dtype"), CASES, ids=IDS)
def test_int8_per_channel_matches_the_dequantized_matmul(
    m: int, n: int, k: int, config: MmaConfig, with_bias: bool, dtype: torch.dtype
) -> None:
    weight = Int8Weight.quantize(torch.randn(n, k, generator=_gen(n + k))).to(DEVICE)
    bias = torch.randn(n, generator=_gen(2)).to(DEVICE) if with_bias else None
    x = _x(m, k, dtype)
    y = int8_channel_gemm(x, weight.q, weight.scale, bias, config)
    assert y.shape == (m, n) and y.dtype == dtype
    close(y, _expected(x, dequantize_int8(weight.q, weight.scale), bias), dtype)


@pytest.mark.parametrize(("m", "n", "k", "config", "with_bias", "dtype"), CASES, ids=IDS)
def test_int4_in_gguf_blocks_matches_the_dequantized_matmul(
    m: int, n: int, k: int, config: MmaConfig, with_bias: bool, dtype: torch.dtype
) -> None:
    """Groups of 32 (a GGUF block), and of 64 at 16 rows."""
    group = 64 if m == 16 else 32
    weight = Int4Weight.quantize(torch.randn(n, k, generator=_gen(n + k)), group).to(DEVICE)
    bias = torch.randn(n, generator=_gen(3)).to(DEVICE) if with_bias else None
    x = _x(m, k, dtype)
    y = int4_gguf_gemm(x, weight.qs, weight.scale, weight.min, bias, config)
    assert y.shape == (m, n) and y.dtype == dtype
    w = dequantize_int4(weight.qs, weight.scale, weight.min, gguf_blocks=True)
    close(y, _expected(x, w, bias), dtype)


def test_the_paths_own_launch_with_split_k_strided_rows_and_groups_of_64() -> None:
    """Through int4_linear / int8_linear(path="mma"), the heuristic's launch: K = 1024 split 4 ways (on a CPU it
    counts 4 SMs); x's rows 2K apart; int4 groups of 64 (one scale read by each of its 64 values)."""
    assert mma_config(8, 24, 1024, bits=4, sms=4).split_k == 4 == mma_config(8, 24, 1024, bits=8, sms=4).split_k
    x = _x(8, 2 * 1024, seed=4)[:, 1024:]
    int4 = Int4Weight.quantize(torch.randn(24, 1024, generator=_gen(5)), 64).to(DEVICE)
    y = int4_linear(x, int4.qs, int4.scale, int4.min, gguf_blocks=True, path="mma")
    close(y, _expected(x, dequantize_int4(int4.qs, int4.scale, int4.min, gguf_blocks=True)), x.dtype)
    int8 = Int8Weight.quantize(torch.randn(24, 1024, generator=_gen(6))).to(DEVICE)
    y = int8_linear(x.reshape(2, 4, 1024), int8.q, int8.scale, path="mma")  # leading dims kept
    assert y.shape == (2, 4, 24)
    close(y.reshape(8, 24), _expected(x, dequantize_int8(int8.q, int8.scale)), x.dtype)


def test_calls_the_kernels_cant_take_run_the_path_they_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    """int4 outside GGUF's blocks -> "dequant"; fp32 x, int8 per group -> "dequant" / "gemm": bit for bit those
    paths' results, and neither mma kernel launched."""
    launched: list[str] = []
    for name in ("_int4_gguf", "_int8_channel"):
        monkeypatch.setattr(quant_gemm, name, _Spy(getattr(quant_gemm, name), name, launched))
    int4 = Int4Weight.quantize(torch.randn(24, 256, generator=_gen(7)), 32).to(DEVICE)
    packed = pack_int4(int4.unpacked())  # the same values as pairs of columns
    x = _x(5, 256)
    assert "GGUF" in str(mma_unsupported(x, packed, int4.scale, int4.min, bits=4, gguf=False))
    y = int4_linear(x, packed, int4.scale, int4.min, path="mma")
    assert torch.equal(y, int4_linear(x, packed, int4.scale, int4.min, path="dequant"))
    close(y, _expected(x, dequantize_int4(packed, int4.scale, int4.min)), x.dtype, scale=4)
    xf = x.float()
    int8 = Int8Weight.quantize(torch.randn(24, 256, generator=_gen(8))).to(DEVICE)
    assert "fp32" in str(mma_unsupported(xf, int8.q, int8.scale, None, bits=8, gguf=False))
    assert torch.equal(
        int8_linear(xf, int8.q, int8.scale, path="mma"), int8_linear(xf, int8.q, int8.scale, path="gemm")
    )
    per_group = (0.001 + 0.01 * torch.rand(24, 8, generator=_gen(9))).to(DEVICE)  # int8 per group of 32
    assert "per output channel" in str(mma_unsupported(x, int8.q, per_group, None, bits=8, gguf=False))
    y = int8_linear(x, int8.q, per_group, path="mma")
    assert torch.equal(y, int8_linear(x, int8.q, per_group, path="gemm"))
    assert launched == []
    int8_linear(x, int8.q, int8.scale, path="mma")  # the spy sees a call it can take
    assert launched == ["_int8_channel"]


class _Spy:
    """A Triton kernel's launches, recorded by name (``kernel[grid](...)``)."""

    def __init__(self, kernel: object, name: str, seen: list[str]) -> None:
        self.kernel, self.name, self.seen = kernel, name, seen

    def __getitem__(self, grid: tuple) -> object:
        self.seen.append(self.name)
        return self.kernel[grid]  # type: ignore[index]


def test_the_table_takes_mma_for_batches() -> None:
    for scheme, batch in (("int4", "cuda_mma"), ("int8", "mma")):  # cuda_mma: the Triton "mma" off an NVIDIA GPU
        assert [choose_path(scheme, m) for m in (4, 5, 16, 64, 65)] == ["gemv_q16", *[batch] * 3, "dequant"]
    assert choose_path("int8_group", 16) == "dequant"
    assert dict(CUDA_PATHS["int8"])[64] == "mma"
    weight = Int4Weight.quantize(torch.randn(40, 256, generator=_gen(10)), 32).to(DEVICE)
    x = _x(16, 256)  # 16 rows: the table's "mma", through the weight's own operands
    y = quantized_linear(x, **weight.kernel_operands()._asdict())
    close(y, _expected(x, weight.dequantize(torch.float32)), x.dtype)


#: The H100 probe's best launch per linear at M = 64: [block_m, block_n, block_k, warps, stages, split_k].
PROBE_BEST = {
    (3072, 2048): ([64, 32, 256, 4, 4, 1], [64, 32, 256, 4, 3, 1]),  # 1B qkv: int4, int8
    (2048, 2048): ([64, 32, 128, 4, 4, 4], [64, 32, 256, 4, 3, 2]),  # 1B o
    (16384, 2048): ([64, 64, 128, 4, 3, 1], [64, 64, 128, 4, 3, 1]),  # 1B gate_up
    (2048, 8192): ([64, 32, 128, 4, 4, 4], [64, 64, 128, 4, 3, 4]),  # 1B down
    (960, 576): ([64, 32, 64, 4, 4, 1], [64, 64, 64, 4, 4, 1]),  # 135M qkv
    (3072, 576): ([64, 32, 64, 4, 4, 1], [64, 64, 64, 4, 4, 1]),  # 135M gate_up
    (576, 1536): ([64, 32, 256, 4, 3, 4], [64, 32, 256, 4, 3, 4]),  # 135M down
}


@pytest.mark.parametrize(("n", "k"), list(PROBE_BEST))
def test_the_heuristic_gives_the_probes_best_launches(n: int, k: int) -> None:
    int4, int8 = PROBE_BEST[(n, k)]
    assert list(mma_config(64, n, k, bits=4, sms=132)) == int4
    assert list(mma_config(64, n, k, bits=8, sms=132)) == int8
    for m in (5, 16, 32):  # fewer rows: the same launch, BLOCK_M covering them
        assert list(mma_config(m, n, k, bits=8, sms=132)) == [{5: 16, 16: 16, 32: 32}[m], *int8[1:]]


def test_the_heuristic_generalises() -> None:
    """Any K that is a multiple of 32 gets a K step that divides it; wide weights take BLOCK_N 64; short K is
    never split; long K over few tiles is, up to 16 ways and never past its steps."""
    for k in (32, 96, 160, 576, 1056, 4000 // 32 * 32):
        for bits in (4, 8):
            cfg = mma_config(64, 100, k, bits=bits, sms=132)
            assert k % cfg.block_k == 0 and cfg.split_k <= k // cfg.block_k
    assert mma_config(16, 32768, 4096, bits=4, sms=132).block_n == 64
    assert mma_config(16, 256, 768, bits=8, sms=132).split_k == 1
    assert mma_config(16, 64, 65536, bits=8, sms=132).split_k == 16
    q, scale = torch.zeros(8, 96, dtype=torch.int8, device=DEVICE), torch.ones(8, device=DEVICE)
    with pytest.raises(ValueError, match="block_k must divide K=96"):
        int8_channel_gemm(_x(4, 96), q, scale, config=Config(32, 64, block_m=16))
