"""Forge's quantized weights through the CUDA kernels ``ops.linear`` dispatches to, against their dequantized matmul.

Every path (dequant-GEMV, tiled dequant-GEMM, the "mma" GEMMs, dequantize then matmul) runs on each weight
class's own buffers: int4 in GGUF's blocks at groups of 32/64/128, int8 per channel, int8 per group of 16/32 with
and without a minimum, at M = 1 and M = 5. On a CPU the kernels run in Triton's interpreter (shapes kept small),
registered for "cpu" only for the length of a test.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from kernel_checks import DEVICE, ON_GPU, close

from forge import kernels
from forge.config import ModelConfig
from forge.core import ops
from forge.core.generate import generate_tokens
from forge.core.quantize import (
    Int4Weight,
    Int8GroupWeight,
    Int8Weight,
    QuantizedWeight,
    dequantize_model,
    from_gguf,
    quantize_model,
)
from forge.core.sampling import SamplingParams
from forge.core.transformer import Transformer
from forge.errors import ConfigError
from forge.kernels import quant_linear, reference
from forge.kernels.quant_linear import CUDA_PATHS, choose_path, quantized_linear
from forge.kernels.quant_matmul import PATHS, dequantize, dequantize_int4, int4_linear, pack_int4
from forge.models import locate

cuda = pytest.mark.skipif(not ON_GPU, reason="needs an NVIDIA GPU")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _x(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=_gen(seed)).to(DEVICE, dtype)


def _check(weight: QuantizedWeight, x: torch.Tensor, path: str | None, bias: torch.Tensor | None = None) -> None:
    """The kernel on the weight's own buffers against the fp32 matmul with its exact dequantized weight."""
    operands = weight.kernel_operands()._asdict()
    y = quantized_linear(x, bias=bias, path=path, **operands)
    assert y.shape == (*x.shape[:-1], weight.shape[0]) and y.dtype == x.dtype
    scheme, scale, gguf_blocks = operands["scheme"], operands["scale"], operands["gguf_blocks"]
    q8 = path in ("gemv_q8", "gemv_q16") and reference.rounded_gemv_applies(scheme, x.shape[-1], scale, gguf_blocks)
    # The twin: the exact dequantized weight in fp32, times x rounded per 32 where the path rounds it.
    expected = reference.quantized_linear(x, bias=bias, path=path, **operands)
    # dequant: the weight rounded to x's dtype, then one matmul; the others accumulate the exact weight in fp32.
    # gemv_q8/16: a GPU's fast fp32 division can round a value of x to the neighbouring integer.
    close(y, expected, x.dtype, scale=4 if path == "dequant" else 50 if q8 else 1)


def _int8_group(n: int, k: int, group: int, with_min: bool, seed: int = 3) -> Int8GroupWeight:
    """GGUF's Q8_0 (fp16 scales, no minimum) or a 5-bit type with an offset (fp32 scales and minimums)."""
    g = _gen(seed)
    q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    scale = 0.001 + 0.01 * torch.rand(n, k // group, generator=g)
    minimum = -0.1 * torch.rand(n, k // group, generator=g) if with_min else None
    return Int8GroupWeight(q, scale if with_min else scale.half(), minimum, torch.float32)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_weights_in_gguf_blocks_on_every_path(group: int, m: int, path: str) -> None:
    weight = Int4Weight.quantize(torch.randn(24, 256, generator=_gen(group)), group).to(DEVICE)
    assert weight.kernel_operands().gguf_blocks and weight.qs.shape == (24, 128)
    _check(weight, _x((m, 256), seed=m), path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize(("group", "with_min"), [(32, False), (32, True), (16, False), (16, True)])
def test_int8_group_weights_on_every_path(group: int, with_min: bool, m: int, path: str) -> None:
    _check(_int8_group(20, 160, group, with_min).to(DEVICE), _x((m, 160), seed=m), path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("m", [1, 5])
def test_int8_per_channel_weights_on_every_path(m: int, path: str) -> None:
    weight = Int8Weight.quantize(torch.randn(20, 192, generator=_gen(4))).to(DEVICE)
    _check(weight, _x((m, 192), seed=m), path)


def test_bf16_activations_a_bias_and_leading_dims() -> None:
    weight = Int4Weight.quantize(torch.randn(40, 256, generator=_gen(5)), 64).to(DEVICE)
    bias = torch.randn(40, generator=_gen(6)).to(DEVICE)
    for path in PATHS:
        _check(weight, _x((2, 3, 256), torch.bfloat16), path, bias)


def test_int8_widths_of_no_whole_word_take_the_gemm() -> None:
    """570 columns are no whole number of int32 words: asked for the GEMV, the byte-reading GEMM answers."""
    weight = Int8Weight.quantize(torch.randn(16, 570, generator=_gen(7))).to(DEVICE)
    for path in PATHS:
        _check(weight, _x((1, 570)), path)


def test_widths_that_are_not_whole_gguf_blocks_are_refused() -> None:
    q = torch.randint(0, 16, (8, 48), generator=_gen(8), dtype=torch.int32)
    packed, scale = pack_int4(q).to(DEVICE), torch.ones(8, 3, device=DEVICE)  # groups of 16: no GGUF block
    with pytest.raises(ValueError, match=r"input width 48 must be a multiple of 32 \(GGUF's blocks"):
        int4_linear(_x((1, 48)), packed, scale, scale, gguf_blocks=True)
    with pytest.raises(ValueError, match="multiple of 32"):
        dequantize(packed, scale, scale, bits=4, gguf_blocks=True)
    with pytest.raises(ConfigError, match="int4 group size 32 does not divide the input width 48"):
        Int4Weight.quantize(torch.randn(8, 48), 32)
    with pytest.raises(ValueError, match="unknown quantized matmul path 'tiled'"):
        int4_linear(_x((1, 48)), packed, scale, scale, path="tiled")


def test_the_dequantize_kernel_matches_its_twin() -> None:
    weight = Int4Weight.quantize(torch.randn(24, 256, generator=_gen(9)), 32).to(DEVICE)
    w = dequantize(weight.qs, weight.scale, weight.min, bits=4, dtype=torch.float32, gguf_blocks=True)
    twin = dequantize_int4(weight.qs, weight.scale, weight.min, gguf_blocks=True)
    assert torch.equal(twin.cpu(), weight.dequantize(torch.float32).cpu())  # the twin reads GGUF's blocks right
    close(w, twin, torch.float32)


def test_the_path_table() -> None:
    assert [choose_path("int4", m) for m in (1, 4, 5, 64, 4096)] == ["gemv_q16"] * 2 + ["cuda_mma"] * 2 + ["dequant"]
    assert [choose_path("int8", m) for m in (1, 4, 5, 64, 65)] == ["gemv_q16"] * 2 + ["mma"] * 2 + ["dequant"]
    assert set(CUDA_PATHS) == set(quant_linear.SCHEMES)
    with pytest.raises(ValueError, match="no quantized CUDA kernels for scheme 'int3'"):
        choose_path("int3", 1)
    with pytest.raises(ValueError, match="scheme 'int3'"):
        quantized_linear(_x((1, 64)), torch.zeros(8, 64, dtype=torch.int8), torch.ones(8), scheme="int3")


def test_an_edited_table_changes_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str | None] = []
    real = quant_linear.int8_linear
    monkeypatch.setattr(quant_linear, "int8_linear", lambda *a, path=None, **kw: calls.append(path) or real(*a, **kw))
    monkeypatch.setitem(CUDA_PATHS, "int8", ((1, "dequant"), (1 << 30, "gemv")))
    weight = Int8Weight.quantize(torch.randn(8, 64, generator=_gen(10))).to(DEVICE)
    for m in (1, 3):
        quantized_linear(_x((m, 64)), **weight.kernel_operands()._asdict())
    assert calls == ["dequant", "gemv"]


@pytest.fixture
def spied_kernel() -> Iterator[list[dict]]:
    """The quantized_linear kernel registered for DEVICE, through a spy that records each call's scheme."""
    seen: list[dict] = []
    kernels.lookup("quantized_linear", DEVICE)  # CUDA's kernels load on first lookup: before the spy, not over it

    def spy(x: torch.Tensor, **kw: object) -> torch.Tensor:
        seen.append({"scheme": kw["scheme"], "gguf_blocks": kw["gguf_blocks"], "rows": x.numel() // x.shape[-1]})
        return quantized_linear(x, **kw)  # type: ignore[arg-type]

    kernels.register("quantized_linear", DEVICE, spy)
    yield seen
    if DEVICE == "cpu":
        kernels.unload("cpu")
    else:
        kernels.load(["quantized_linear"], DEVICE)


def test_ops_linear_dispatches_quantized_weights_to_the_kernel(spied_kernel: list[dict]) -> None:
    weights = [Int4Weight.quantize(torch.randn(24, 128, generator=_gen(11)), 32), _int8_group(24, 128, 32, False)]
    weights.append(Int8Weight.quantize(torch.randn(24, 128, generator=_gen(12))))
    x = _x((2, 3, 128))
    for weight in weights:
        weight = weight.to(DEVICE)
        y = ops.linear(x, weight)
        close(y, F.linear(x, weight.dequantize(torch.float32)), torch.float32)
        close(y, reference.quantized_linear(x, **weight.kernel_operands()._asdict()), torch.float32)  # the twin
        with kernels.disabled():  # the weight's own linear: the C++ kernels on a CPU, the reference elsewhere
            close(ops.linear(x, weight), y, torch.float32, scale=4)
    assert [s["scheme"] for s in spied_kernel] == ["int4", "int8_group", "int8"]
    assert [s["gguf_blocks"] for s in spied_kernel] == [True, False, False] and spied_kernel[0]["rows"] == 6
    ops.linear(x.requires_grad_(), weights[0].to(DEVICE))  # the kernel gives no gradient: the weight's own path
    assert len(spied_kernel) == 3


def test_a_quantized_model_decodes_through_the_kernels(
    spied_kernel: list[dict],
    small_config: Callable[..., ModelConfig],
    peaked_model: Callable[..., Transformer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Greedy tokens and logits of a quantized llama through the Triton kernels: its dequantized twin's."""
    # The decode steps (2 rows) take the GEMV, the forward and the prefill the GEMM (fewer programs to interpret).
    monkeypatch.setitem(CUDA_PATHS, "int4", ((2, "gemv"), (1 << 30, "gemm")))
    model = quantize_model(peaked_model(small_config("llama")), "int4", group_size=32).to(DEVICE)
    twin = dequantize_model(copy.deepcopy(model), torch.float32)
    prompts = [[1, 2, 3, 4], [7, 5]]

    def run(m: Transformer) -> tuple[torch.Tensor, list[list[int]]]:
        with torch.no_grad():
            logits = m(torch.tensor([[1, 2, 3, 4, 5]], device=DEVICE))
        steps = generate_tokens(m, prompts, max_new_tokens=3, params=SamplingParams(temperature=0))
        return logits, torch.stack(list(steps), dim=1).tolist()

    fast, slow = run(model), run(twin)
    assert {s["rows"] for s in spied_kernel} >= {2, 5}  # the forward, the prefill and the decode steps
    close(fast[0], slow[0], torch.float32, scale=10)
    assert fast[1] == slow[1]


def test_a_real_q4_1_layer_of_smollm2() -> None:
    """48 rows of the shipped GGUF's blk.0.ffn_down, kept in its blocks: the kernels against gguf's dequantization."""
    try:
        path = locate("smollm2")
    except Exception as e:
        pytest.skip(f"SmolLM2 is not installed: {e}")
    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.ffn_down.weight")
    rows = np.ascontiguousarray(t.data[:48])
    weight = from_gguf(int(t.tensor_type), rows, (48, 1536))
    expected = torch.from_numpy(gguf.quants.dequantize(rows, t.tensor_type).astype(np.float32))
    assert isinstance(weight, Int4Weight) and torch.equal(weight.dequantize(torch.float32), expected)
    weight = weight.to(DEVICE)
    for m, path in ((1, "gemv"), (5, "gemv"), (20, "gemm"), (20, "dequant")):
        x = _x((m, 1536), torch.bfloat16, seed=m)
        y = quantized_linear(x, path=path, **weight.kernel_operands()._asdict())
        close(y, F.linear(x.float(), expected.to(DEVICE)).to(x.dtype), torch.bfloat16, scale=2)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("path", PATHS)
def test_every_path_replays_in_a_cuda_graph(path: str) -> None:
    weight = Int4Weight.quantize(torch.randn(2048, 2048, generator=_gen(13)), 32).cuda()
    x = _x((4, 2048), torch.bfloat16)
    call = lambda: quantized_linear(x, path=path, **weight.kernel_operands()._asdict())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    x.copy_(_x((4, 2048), torch.bfloat16, seed=14))
    graph.replay()
    torch.cuda.synchronize()
    close(out, F.linear(x.float(), weight.dequantize(torch.float32)).bfloat16(), torch.bfloat16, scale=4)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_decoding_in_cuda_graphs_equals_eager_and_the_twin(
    scheme: str, small_config: Callable[..., ModelConfig], peaked_model: Callable[..., Transformer]
) -> None:
    """40 greedy tokens (graph chunks replayed) of a quantized llama in bf16: eager steps and the dequantized twin."""
    model = quantize_model(peaked_model(small_config("llama")), scheme, group_size=32).cuda().to(torch.bfloat16)
    twin = dequantize_model(copy.deepcopy(model), torch.bfloat16)
    prompts, params = [[1, 2, 3, 4, 5], [7, 8]], SamplingParams(temperature=0)

    def tokens(m: Transformer, graphs: bool) -> list[list[int]]:
        steps = generate_tokens(m, prompts, max_new_tokens=40, params=params, cuda_graphs=graphs)
        return torch.stack(list(steps), dim=1).tolist()

    graphed = tokens(model, True)
    assert graphed == tokens(model, False)
    with torch.no_grad():
        ids = torch.tensor(prompts[:1], device="cuda")
        close(model(ids), twin(ids), torch.bfloat16, scale=2)


@pytest.mark.parametrize(("path", "most"), [("gemv_q16", 1e-4), ("gemv_q8", 1e-2)])
def test_the_rounded_gemvs_round_x_and_stay_close_to_the_exact_gemv(path: str, most: float) -> None:
    """The decode paths' price: x rounded per 32 moves the output by little (but it does move)."""
    for weight in (Int4Weight.quantize(torch.randn(64, 512, generator=_gen(11)), 32), Int8Weight.quantize(
        torch.randn(64, 512, generator=_gen(12))
    )):  # fmt: skip
        operands = weight.to(DEVICE).kernel_operands()._asdict()
        x = _x((1, 512), seed=13)
        rounded = quantized_linear(x, path=path, **operands)
        exact = quantized_linear(x, path="gemv", **operands)
        rel = ((rounded - exact).norm() / exact.norm()).item()
        assert most / 1000 < rel < most, rel
