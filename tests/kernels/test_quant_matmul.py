"""Quantized matmuls against a matmul with the dequantized weight: Forge's Triton kernels, tinygemm's conventions.

On a CPU the Triton kernels run in Triton's interpreter (shapes kept small); tinygemm itself needs CUDA, but
its ``[scale, zero]`` convention is checked through PyTorch's CPU int4 kernel, which shares it.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from kernel_checks import DEVICE, ON_GPU, close

from forge.errors import ConfigError
from forge.kernels.quant_matmul import (
    Config,
    dequantize_int4,
    dequantize_int8,
    int4_linear,
    int4_linear_sz,
    int8_linear,
    pack_int4,
)
from forge.kernels.quant_tinygemm import (
    int4_linear_tinygemm,
    int8_linear_cuda,
    pack_int4_cuda,
    scales_and_zeros_cuda,
    tinygemm_inner_k_tiles,
    tinygemm_supports,
)
from forge.models import locate

cuda = pytest.mark.skipif(not ON_GPU, reason="needs an NVIDIA GPU")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _int4(n: int, k: int, group: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random int4 values (N, K) with a positive scale and a negative minimum per group, as quantization gives."""
    g = _gen(seed)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
    scale = 0.01 + 0.02 * torch.rand(n, k // group, generator=g)
    minimum = -8 * scale * (0.5 + torch.rand(n, k // group, generator=g))
    return q, scale, minimum


def _x(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=_gen(seed)).to(DEVICE, dtype)


def _expected(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 matmul with the fp32 dequantized weight, in x's dtype."""
    b = None if bias is None else bias.float().to(x.device)
    return F.linear(x.float(), w.to(x.device), b).to(x.dtype)


def _on(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(DEVICE) for t in tensors]


# (rows of x, out features, in features, group): non-power-of-two N, the 135M/1B widths; > 16 rows is the GEMM.
INT4_CASES = [(1, 40, 576, 32), (3, 24, 1536, 64), (1, 20, 2048, 128), (3, 12, 8192, 32), (20, 40, 576, 32)]
INT4_CASES += [(33, 24, 1536, 128)] + ([(1, 3072, 2048, 32), (64, 2048, 8192, 64)] if ON_GPU else [])


@pytest.mark.parametrize(("m", "n", "k", "group"), INT4_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int4_linear_matches_the_dequantized_matmul(m: int, n: int, k: int, group: int, dtype: torch.dtype) -> None:
    q, scale, minimum = _int4(n, k, group)
    packed, s, z = _on(pack_int4(q), scale.bfloat16(), minimum.bfloat16())
    x = _x((m, k), dtype)
    y = int4_linear(x, packed, s, z)
    assert y.shape == (m, n) and y.dtype == dtype
    close(y, _expected(x, dequantize_int4(packed, s, z)), dtype)


INT8_CASES = [(1, 40, 576), (3, 24, 1536), (1, 20, 2048), (20, 40, 576)] + ([(64, 2048, 8192)] if ON_GPU else [])


@pytest.mark.parametrize(("m", "n", "k", "group"), [(1, 40, 576, 32), (3, 20, 2048, 128), (20, 24, 1536, 64)])
def test_int4_with_tinygemms_scales_and_zeros(m: int, n: int, k: int, group: int) -> None:
    """The (K/g, N', 2) [scale, zero] buffer tinygemm reads, padded past N, serves the Triton kernels as it is."""
    q, scale, minimum = _int4(n, k, group, seed=18)
    sz = scales_and_zeros_cuda(scale, minimum)
    sz = torch.cat([sz, torch.full((k // group, 8, 2), float("nan"), dtype=sz.dtype)], dim=1)  # padding: never read
    packed, szd = _on(pack_int4(q), sz)
    w = (q.float().reshape(n, -1, group) - 8) * sz[:, :n, 0].t().float()[..., None] + sz[:, :n, 1].t().float()[
        ..., None
    ]
    x = _x((m, k), torch.bfloat16)
    close(int4_linear_sz(x, packed, szd), _expected(x, w.reshape(n, k)), torch.bfloat16)


@pytest.mark.parametrize(("m", "n", "k"), INT8_CASES)
@pytest.mark.parametrize("scheme", ["channel", "group32", "group64+min", "channel+min"])
def test_int8_linear_matches_the_dequantized_matmul(m: int, n: int, k: int, scheme: str) -> None:
    g = _gen(2)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    groups = 1 if scheme.startswith("channel") else k // int(scheme[5:7])
    scale = (0.001 + 0.01 * torch.rand(n, groups, generator=g)).squeeze(1) if groups == 1 else None
    if scale is None:
        scale = 0.001 + 0.01 * torch.rand(n, groups, generator=g)
    minimum = 0.1 * torch.randn(scale.shape, generator=g) if scheme.endswith("+min") else None
    qd, s = _on(q, scale)
    z = None if minimum is None else minimum.to(DEVICE)
    x = _x((m, k), torch.bfloat16)
    close(int8_linear(x, qd, s, z), _expected(x, dequantize_int8(qd, s, z)), torch.bfloat16)


@pytest.mark.parametrize("m", [1, 3, 20])
def test_bias_and_leading_dims(m: int) -> None:
    q, scale, minimum = _int4(24, 576, 32, seed=3)
    packed, s, z = _on(pack_int4(q), scale, minimum)  # fp32 scales work too
    bias = torch.randn(24, generator=_gen(4)).to(DEVICE)
    x = _x((2, m, 576), torch.bfloat16)
    y = int4_linear(x, packed, s, z, bias)
    assert y.shape == (2, m, 24)
    close(y, _expected(x, dequantize_int4(packed, s, z), bias), torch.bfloat16)
    q8 = torch.randint(-127, 128, (24, 576), generator=_gen(5), dtype=torch.int8).to(DEVICE)
    y8 = int8_linear(x, q8, s[:, 0], None, bias)
    close(y8, _expected(x, dequantize_int8(q8, s[:, 0]), bias), torch.bfloat16)


def test_non_contiguous_rows_of_x() -> None:
    q, scale, minimum = _int4(16, 576, 64, seed=6)
    packed, s, z = _on(pack_int4(q), scale.bfloat16(), minimum.bfloat16())
    wide = _x((3, 2 * 576), torch.bfloat16)
    x = wide[:, 576:]  # rows 2 * 576 apart
    close(int4_linear(x, packed, s, z), _expected(x, dequantize_int4(packed, s, z)), torch.bfloat16)


# Launch configs the heuristic would not pick: blocks wider than N, a K step that leaves a partial last step
# (512 over 576), scaling every element instead of each group's sum, one or eight warps.
GEMV_CONFIGS = [
    Config(block_n=64, block_k=512, warps=4, grouped=True),
    Config(block_n=2, block_k=512, warps=1, grouped=False),
    Config(block_n=8, block_k=64, warps=8, grouped=True),
    Config(block_n=8, block_k=128, warps=2, grouped=False),
]


@pytest.mark.parametrize("config", GEMV_CONFIGS, ids=str)
def test_every_gemv_config_gives_the_same_result(config: Config) -> None:
    q, scale, minimum = _int4(40, 576, 32, seed=7)
    packed, s, z = _on(pack_int4(q), scale.bfloat16(), minimum.bfloat16())
    x = _x((2, 576), torch.float32)
    close(int4_linear(x, packed, s, z, config=config), _expected(x, dequantize_int4(packed, s, z)), torch.float32)
    q8 = torch.randint(-127, 128, (40, 576), generator=_gen(8), dtype=torch.int8).to(DEVICE)
    expected = _expected(x, dequantize_int8(q8, s, z))
    close(int8_linear(x, q8, s, z, config=config), expected, torch.float32)


GEMM_CONFIGS = [
    Config(16, 128, block_m=16),
    Config(64, 256, warps=8, block_m=32, stages=2),
    Config(32, 64, block_m=16, split_k=3),  # K shared out: 9 steps of 64, 3 splits; fp32 partials summed
    Config(32, 64, block_m=32, split_k=4),
    Config(16, 256, block_m=16, split_k=8),  # more splits than steps: as many as there are
]


@pytest.mark.parametrize("config", GEMM_CONFIGS, ids=str)
def test_every_gemm_config_gives_the_same_result(config: Config) -> None:
    """Every launch of the tiled GEMM: int4 in pairs and in GGUF's blocks, int8 per group and per channel, bias."""
    q, scale, minimum = _int4(40, 576, 32, seed=9)
    packed, s, z = _on(pack_int4(q), scale.bfloat16(), minimum.bfloat16())
    bias = _x((40,), torch.float32, seed=3)
    x = _x((37, 576), torch.float32)
    w = dequantize_int4(packed, s, z)
    close(int4_linear(x, packed, s, z, bias, config=config), _expected(x, w, bias), torch.float32)
    blocks = q.reshape(40, 18, 2, 16)  # GGUF: byte b of a block holds columns b (low nibble) and b + 16
    gguf_q = (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).to(torch.uint8).reshape(40, 288).to(DEVICE)
    close(int4_linear(x, gguf_q, s, z, config=config, gguf_blocks=True), _expected(x, w), torch.float32)
    q8 = torch.randint(-127, 128, (40, 576), generator=_gen(10), dtype=torch.int8).to(DEVICE)
    close(int8_linear(x, q8, s, config=config), _expected(x, dequantize_int8(q8, s)), torch.float32)
    per_channel = s[:, 0].contiguous()
    xb = x.bfloat16()
    close(int8_linear(xb, q8, per_channel, config=config), _expected(xb, dequantize_int8(q8, per_channel)), xb.dtype)


@pytest.mark.parametrize("m", [1, 20])
def test_int8_of_any_width_and_unsigned_with_a_minimum(m: int) -> None:
    """570 columns are no whole number of int32 words: the GEMM (which reads bytes) serves every M."""
    g = _gen(17)
    q = torch.randint(-127, 128, (24, 570), generator=g, dtype=torch.int8).to(DEVICE)
    scale = (0.001 + 0.01 * torch.rand(24, generator=g)).to(DEVICE)
    x = _x((m, 570), torch.bfloat16)
    close(int8_linear(x, q, scale), _expected(x, dequantize_int8(q, scale)), torch.bfloat16)
    u = torch.randint(0, 256, (24, 576), generator=g, dtype=torch.uint8).to(DEVICE)  # w = u * scale + min
    s, z = (0.001 * torch.rand(24, 9, generator=g)).to(DEVICE), (-0.1 * torch.rand(24, 9, generator=g)).to(DEVICE)
    x = _x((m, 576), torch.bfloat16)
    close(int8_linear(x, u, s, z), _expected(x, dequantize_int8(u, s, z)), torch.bfloat16)


def test_bad_inputs_are_refused() -> None:
    q, scale, minimum = _int4(8, 64, 32)
    packed, s, z = _on(pack_int4(q), scale, minimum)
    with pytest.raises(ValueError, match="x has 32 features but the weight has 64"):
        int4_linear(_x((1, 32), torch.bfloat16), packed, s, z)
    with pytest.raises(ValueError, match="uint8"):
        int4_linear(_x((1, 64), torch.bfloat16), q.to(DEVICE), s, z)
    with pytest.raises(ValueError, match="bf16, fp16 or fp32"):
        int4_linear(torch.ones(1, 64, dtype=torch.float64, device=DEVICE), packed, s, z)
    with pytest.raises(ValueError, match="block_m and block_n >= 16"):
        int4_linear(_x((20, 64), torch.bfloat16), packed, s, z, config=Config(8, 128))
    with pytest.raises(ValueError, match="groups of a multiple of 8"):
        int4_linear(_x((1, 64), torch.bfloat16), packed, s[:, :1].expand(8, 16), z[:, :1].expand(8, 16))
    with pytest.raises(ValueError, match="differ in shape"):
        int8_linear(_x((1, 64), torch.bfloat16), q.to(torch.int8).to(DEVICE), s, z[:, :1])


@pytest.fixture(scope="module")
def smollm2_tensors() -> dict:
    """The tensors of the shipped SmolLM2-135M Q4_1 GGUF, by name (reading the file takes seconds: once)."""
    try:
        path = locate("smollm2")
    except Exception as e:
        pytest.skip(f"SmolLM2 is not installed: {e}")
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def test_real_q4_1_weights_of_smollm2(smollm2_tensors: dict) -> None:
    """A Q4_1 layer of the shipped GGUF: d, m and the nibbles taken apart give gguf's own dequantization."""
    t = smollm2_tensors["blk.0.ffn_down.weight"]  # (576, 1536), 20-byte blocks of 32: fp16 d, fp16 m, 16 bytes
    rows = t.data[:48]  # 48 output rows keep the interpreter quick
    expected = torch.from_numpy(gguf.quants.dequantize(rows, t.tensor_type).astype(np.float32))
    raw = torch.from_numpy(np.ascontiguousarray(rows).view(np.uint8).reshape(48, -1, 20).copy())
    d = torch.from_numpy(raw[..., 0:2].numpy().copy().view(np.float16)).squeeze(-1)
    m = torch.from_numpy(raw[..., 2:4].numpy().copy().view(np.float16)).squeeze(-1)
    qs = raw[..., 4:].to(torch.int32)
    q = torch.cat([qs & 0xF, qs >> 4], dim=-1).reshape(48, 1536)  # low nibbles: elements 0..15 of a block
    packed, s, z = _on(pack_int4(q), d, m)  # fp16 scales, as the file holds them
    assert torch.equal(dequantize_int4(packed, s, z).cpu(), expected)
    for rows_of_x in (1, 24):
        x = _x((rows_of_x, 1536), torch.bfloat16, seed=rows_of_x)
        close(int4_linear(x, packed, s, z), _expected(x, expected), torch.bfloat16)


def test_real_q8_0_weights_of_smollm2(smollm2_tensors: dict) -> None:
    """Rows of the Q8_0 token embedding (34-byte blocks of 32: fp16 d, 32 int8): int8 at group 32, no minimum."""
    t = smollm2_tensors["token_embd.weight"]
    rows = t.data[1000:1040]
    expected = torch.from_numpy(gguf.quants.dequantize(rows, t.tensor_type).astype(np.float32))
    raw = np.ascontiguousarray(rows).view(np.uint8).reshape(40, -1, 34)
    d = torch.from_numpy(raw[..., 0:2].copy().view(np.float16)).squeeze(-1)
    q = torch.from_numpy(raw[..., 2:].copy().view(np.int8)).reshape(40, 576)
    qd, s = _on(q, d)
    assert torch.equal(dequantize_int8(qd, s).cpu(), expected)
    for rows_of_x in (1, 24):
        x = _x((rows_of_x, 576), torch.bfloat16, seed=rows_of_x)
        close(int8_linear(x, qd, s), _expected(x, expected), torch.bfloat16)


# -- tinygemm ------------------------------------------------------------------------------------------------


def test_scales_and_zeros_follow_tinygemms_convention() -> None:
    """PyTorch's CPU int4 kernel reads [scale, zero] as tinygemm does: w = (q - 8) * scale + zero."""
    q, scale, minimum = _int4(32, 256, 64, seed=10)
    sz = scales_and_zeros_cuda(scale, minimum, dtype=torch.float32)
    assert sz.shape == (4, 32, 2)
    x = torch.randn(3, 256, generator=_gen(11))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 64, sz)
    close(y, _expected(x, dequantize_int4(pack_int4(q), scale, minimum)), torch.float32)


def test_tinygemm_shapes() -> None:
    assert tinygemm_inner_k_tiles(576) == 4 and tinygemm_inner_k_tiles(2048) == 8 and tinygemm_inner_k_tiles(40) is None
    assert tinygemm_supports(960, 576, 32) and tinygemm_supports(2048, 8192, 128)
    assert not tinygemm_supports(100, 576, 32)  # out features not a multiple of 8
    assert not tinygemm_supports(64, 576, 48)  # a group size tinygemm lacks
    with pytest.raises(ConfigError, match="multiple of 8"):
        pack_int4_cuda(torch.zeros(12, 64, dtype=torch.int32))
    with pytest.raises(ConfigError, match="inner_k_tiles=8"):
        pack_int4_cuda(torch.zeros(16, 64, dtype=torch.int32), inner_k_tiles=8)
    if not ON_GPU:
        with pytest.raises(ConfigError, match="CUDA device"):
            pack_int4_cuda(torch.zeros(16, 64, dtype=torch.int32))


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize(("m", "n", "k", "group"), [(1, 960, 576, 32), (64, 3072, 1536, 64), (3, 2048, 8192, 128)])
def test_tinygemm_matches_the_dequantized_matmul(m: int, n: int, k: int, group: int) -> None:
    q, scale, minimum = _int4(n, k, group, seed=12)
    q, scale, minimum = q.cuda(), scale.cuda(), minimum.cuda()
    x = _x((m, k), torch.bfloat16)
    y = int4_linear_tinygemm(x, pack_int4_cuda(q), group, scales_and_zeros_cuda(scale, minimum))
    close(y, _expected(x, dequantize_int4(pack_int4(q), scale, minimum)), torch.bfloat16, scale=2)


@cuda
@pytest.mark.cuda
def test_int8_through_cublas() -> None:
    q = torch.randint(-127, 128, (2048, 2048), generator=_gen(13), dtype=torch.int8).cuda()
    scale = (0.001 + 0.01 * torch.rand(2048, generator=_gen(14))).cuda()
    x = _x((4, 2048), torch.bfloat16)
    close(int8_linear_cuda(x, q, scale), _expected(x, dequantize_int8(q, scale)), torch.bfloat16, scale=2)


@cuda
@pytest.mark.cuda
def test_the_kernels_replay_in_a_cuda_graph() -> None:
    q, scale, minimum = _int4(2048, 2048, 32, seed=15)
    packed, s, z = pack_int4(q).cuda(), scale.bfloat16().cuda(), minimum.bfloat16().cuda()
    tg, sz = pack_int4_cuda(q.cuda()), scales_and_zeros_cuda(s, z)
    x = _x((1, 2048), torch.bfloat16)
    calls = [lambda: int4_linear(x, packed, s, z), lambda: int4_linear_tinygemm(x, tg, 32, sz)]
    for call in calls:
        call()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [call() for call in calls]
    x.copy_(_x((1, 2048), torch.bfloat16, seed=16))
    graph.replay()
    torch.cuda.synchronize()
    for out in outs:
        close(out, _expected(x, dequantize_int4(packed, s, z)), torch.bfloat16, scale=2)
