"""Quantized weights: each matmul against its dequantized reference, round-trip error, the exact GGUF Q4_0/Q4_1
mapping, a quantized model decoding like its dequantized twin, and the bad inputs."""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from forge.config import ModelConfig
from forge.core import ops
from forge.core.generate import generate_tokens
from forge.core.quantize import (
    GGUF_Q4_0,
    GGUF_Q4_1,
    Int4Weight,
    Int8GroupWeight,
    Int8Weight,
    QuantizedWeight,
    from_gguf,
    quantize_model,
    quantize_weight,
)
from forge.core.quantize.base import CPU_DEQUANT_ROWS, _kernel_rows, pack_int4
from forge.core.sampling import SamplingParams
from forge.core.transformer import Transformer
from forge.errors import ConfigError
from forge.kernels import cpu_quant

DTYPES = [torch.float32, torch.bfloat16]


def _weight(out: int = 96, width: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randn(out, width, generator=torch.Generator().manual_seed(seed))


def _close(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    # bf16 rounds the activations, the scales and the accumulation: compare against the output's scale.
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert y.dtype == dtype and y.shape == ref.shape
    assert (y.float() - ref.float()).abs().max() <= tol * ref.float().abs().max()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme,group_size", [("int8", 32), ("int4", 32), ("int4", 64), ("int4", 128)])
def test_quantized_matmul_matches_its_dequantized_reference(scheme: str, group_size: int, dtype: torch.dtype) -> None:
    qw = quantize_weight(_weight(), scheme, group_size)
    x = torch.randn(2, 5, 128).to(dtype)  # 3-D, as the model calls it
    bias = torch.randn(96).to(dtype)
    ref = torch.nn.functional.linear(x.float(), qw.dequantize(torch.float32), bias.float())
    _close(ops.linear(x, qw, bias), ref, dtype)
    _close(ops.linear(x[:, :1], qw), torch.nn.functional.linear(x[:, :1].float(), qw.dequantize(torch.float32)), dtype)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_round_trip_error_is_within_half_a_step(group_size: int) -> None:
    w = _weight()
    qw = Int4Weight.quantize(w, group_size)
    step = qw.scale.repeat_interleave(group_size, dim=1)
    assert torch.all((qw.dequantize() - w).abs() <= step / 2 + 1e-6)
    assert qw.unpacked().min() >= 0 and qw.unpacked().max() <= 15
    assert qw.dequantize().dtype == torch.float32 and qw.nbytes < w.numel() * w.element_size()


def test_int8_round_trip_error_is_within_half_a_step() -> None:
    w = _weight()
    qw = Int8Weight.quantize(w.bfloat16())
    assert qw.dequantize().dtype == torch.bfloat16
    err = (qw.dequantize(torch.float32) - w.bfloat16().float()).abs()
    assert torch.all(err <= qw.scale[:, None] / 2 + 1e-6)
    assert qw.nbytes < w.numel() * 2


def _gguf() -> object:
    return pytest.importorskip("gguf")


@pytest.mark.parametrize("qtype", [GGUF_Q4_0, GGUF_Q4_1])
def test_gguf_q4_blocks_map_into_int4_bit_for_bit(qtype: int) -> None:
    gguf = _gguf()
    kind = gguf.GGMLQuantizationType(qtype)
    data = np.random.default_rng(0).standard_normal((48, 256)).astype(np.float32)
    data[:, :32] *= 1e-3  # a block of small values: its scale is far from the others
    blocks = gguf.quants.quantize(data, kind)
    expected = gguf.quants.dequantize(blocks, kind)
    qw = Int4Weight.from_gguf(qtype, blocks, (48, 256))
    assert torch.equal(qw.dequantize(), torch.from_numpy(expected))
    x = torch.randn(3, 256)
    _close(ops.linear(x, qw), x @ torch.from_numpy(expected).T, torch.float32)


def test_the_shipped_smollm2_q4_1_tensor_maps_bit_for_bit() -> None:
    gguf = _gguf()
    from forge import models

    try:
        path = models.locate("smollm2")
    except Exception as e:
        pytest.skip(f"SmolLM2 is not installed: {e}")
    reader = gguf.GGUFReader(path)
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
    assert tensor.tensor_type == GGUF_Q4_1
    shape = tuple(reversed(tensor.shape.tolist()))
    expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)
    assert torch.equal(Int4Weight.from_gguf(GGUF_Q4_1, tensor.data, shape).dequantize(), torch.from_numpy(expected))


def _dequantized_twin(model: Transformer) -> Transformer:
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if isinstance(module, nn.Linear) and isinstance(module.weight, QuantizedWeight):
            weight = module.weight.dequantize()
            del module.weight
            module.weight = nn.Parameter(weight)
    return twin


def _greedy(model: Transformer, n: int = 8) -> list[list[int]]:
    steps = generate_tokens(model, [[1, 2, 3, 4], [7, 5]], max_new_tokens=n, params=SamplingParams(temperature=0))
    return torch.stack(list(steps), dim=1).tolist()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_quantized_model_decodes_like_its_dequantized_twin(
    family: str,
    scheme: str,
    small_config: Callable[..., ModelConfig],
    peaked_model: Callable[..., Transformer],
) -> None:
    model = quantize_model(peaked_model(small_config(family)), scheme, group_size=32)
    quantized = [m for m in model.modules() if isinstance(m, QuantizedWeight)]
    assert len(quantized) == 4 * 2  # qkv, proj, up, down in each of the two blocks; the head stays float
    assert isinstance(model.lm_head.weight, nn.Parameter) and isinstance(model.tok_emb.weight, nn.Parameter)
    twin = _dequantized_twin(model)
    assert _greedy(model) == _greedy(twin)  # Forge's C++ kernels, where they are built
    with pytest.MonkeyPatch.context() as mp:  # and aten's
        mp.setattr(cpu_quant, "available", lambda: False)
        assert _greedy(model) == _greedy(twin)


def test_unknown_scheme_is_a_config_error(
    small_config: Callable[..., ModelConfig], peaked_model: Callable[..., Transformer]
) -> None:
    with pytest.raises(ConfigError, match=r"'int3'.*int8, int4"):
        quantize_model(peaked_model(small_config("gpt2")), "int3")
    with pytest.raises(ConfigError, match="'fp4'"):
        quantize_weight(_weight(), "fp4")


def test_group_size_that_does_not_divide_the_width_is_a_config_error_and_changes_nothing(
    small_config: Callable[..., ModelConfig], peaked_model: Callable[..., Transformer]
) -> None:
    model = peaked_model(small_config("gpt2"))  # d_model 64
    with pytest.raises(ConfigError, match="group size 128 does not divide the input width 64"):
        quantize_model(model, "int4", group_size=128)
    assert not any(isinstance(m, QuantizedWeight) for m in model.modules())
    with pytest.raises(ConfigError, match="group size 48 is not supported"):
        Int4Weight.quantize(_weight(), 48)


def test_from_gguf_refuses_other_block_types() -> None:
    with pytest.raises(ConfigError, match="type 8 does not map exactly into int4"):
        Int4Weight.from_gguf(8, b"", (32, 32))


# -- every GGUF block type Forge keeps quantized, bit for bit (issue 17) -------------------------------------------

#: type -> (Forge class, group size). gguf-py quantizes the first five; the K-quants come from random blocks.
GGUF_MAPPED = {
    "Q4_0": (Int4Weight, 32),
    "Q4_1": (Int4Weight, 32),
    "Q8_0": (Int8GroupWeight, 32),
    "Q5_0": (Int8GroupWeight, 32),
    "Q5_1": (Int8GroupWeight, 32),
    "Q2_K": (Int8GroupWeight, 16),
    "Q3_K": (Int8GroupWeight, 16),
    "Q4_K": (Int4Weight, 32),
    "Q5_K": (Int8GroupWeight, 32),
    "Q6_K": (Int8GroupWeight, 16),
}
#: Byte offsets of each K-quant block's fp16 super-block scales (d, dmin), per gguf/quants.py's layouts.
K_SCALES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def _gguf_blocks(kind: str, out: int, width: int, seed: int = 0) -> np.ndarray:
    """Blocks of type ``kind`` for an (out, width) matrix, one row of blocks per output row."""
    gguf = _gguf()
    qtype = gguf.GGMLQuantizationType[kind]
    rng = np.random.default_rng(seed)
    if kind not in K_SCALES:
        data = rng.standard_normal((out, width)).astype(np.float32)
        data[:, :32] = data[:, :32] * 1e-3 + 0.5  # a block of small values around an offset: far from the others
        return gguf.quants.quantize(data, qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (out * width // block, size), dtype=np.uint8)  # every bit pattern of the values
    for at in K_SCALES[kind]:  # finite, varied super-block scales; the 4-8 bit sub-scales stay random
        d = rng.uniform(1e-3, 5e-2, (len(blocks), 1)).astype(np.float16)
        blocks[:, at : at + 2] = d.view(np.uint8)
    return blocks.reshape(out, -1)


@pytest.mark.parametrize("kind", list(GGUF_MAPPED))
def test_every_kept_gguf_type_maps_bit_for_bit(kind: str) -> None:
    gguf = _gguf()
    qtype = gguf.GGMLQuantizationType[kind]
    out, width = 40, 512  # 40 rows: not a multiple of the kernel's 16, so the padding is exercised too
    blocks = _gguf_blocks(kind, out, width)
    expected = torch.from_numpy(gguf.quants.dequantize(blocks, qtype).reshape(out, width))
    qw = from_gguf(int(qtype), blocks, (out, width))
    cls, group = GGUF_MAPPED[kind]
    assert type(qw) is cls and qw.group_size == group and qw.shape == (out, width)
    assert torch.equal(qw.dequantize(torch.float32), expected)
    rows = torch.tensor([[39, 0], [17, 17]])
    assert torch.equal(qw.embedding(rows).float(), expected[rows])  # dtype float32: the rows exactly
    for dtype in DTYPES:
        x = torch.randn(2, 3, width).to(dtype)
        _close(ops.linear(x, qw), x.float() @ expected.T, dtype)
    x = torch.randn(3, width, dtype=torch.float64)  # no CPU kernel for it: the dequantized reference path
    torch.testing.assert_close(qw.linear(x), x @ expected.double().T)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("group", "with_min"), [(32, False), (32, True), (16, False), (16, True)])
def test_int8_groups_match_their_dequantized_reference(group: int, with_min: bool, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(group + with_min)
    q = torch.randint(-128, 128, (56, 128), generator=gen, dtype=torch.int8)  # the whole int8 range
    scale = (torch.rand(56, 128 // group, generator=gen) * 0.05 + 1e-3).half()
    minimum = (torch.randn(56, 128 // group, generator=gen) * 0.5).half() if with_min else None
    qw = Int8GroupWeight(q, scale, minimum, torch.float32)
    want = (q.float().reshape(56, -1, group) * scale.float()[..., None]).reshape(56, 128)
    if minimum is not None:
        want = want + minimum.float().repeat_interleave(group, dim=1)
    assert torch.equal(qw.unpacked(), q.int()) and torch.equal(qw.dequantize(), want)
    x, bias = torch.randn(4, 128).to(dtype), torch.randn(56).to(dtype)
    _close(qw.linear(x, bias), x.float() @ want.T + bias.float(), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme", ["int8", "int4", "q8_0"])
def test_a_prefill_on_the_cpu_dequantizes_and_decoding_takes_the_kernel(
    scheme: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CPU kernels read the weight once per few rows: a prompt's prefill (CPU_DEQUANT_ROWS rows and more; 16 for
    int8 per channel in fp32, whose aten kernel is slow) dequantizes and runs the float matmul instead."""
    w = _weight(out=64, width=128)
    qw = from_gguf(8, _gguf_blocks("Q8_0", 64, 128), (64, 128)) if scheme == "q8_0" else quantize_weight(w, scheme)
    dequantized: list[int] = []
    real = qw._reference

    def reference(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        dequantized.append(x.numel() // x.shape[-1])
        return real(x, bias)

    monkeypatch.setattr(qw, "_reference", reference)
    rows = 16 if scheme == "int8" and dtype == torch.float32 else CPU_DEQUANT_ROWS
    for n in (1, rows - 1, rows, 300):
        x = torch.randn(1, n, 128).to(dtype)
        _close(ops.linear(x, qw), torch.nn.functional.linear(x.float(), qw.dequantize(torch.float32)), dtype)
    assert dequantized == [rows, 300]


def test_int4_values_are_read_back_as_aten_packs_them() -> None:
    qw = Int4Weight.quantize(_weight(out=80, width=96))  # 80 rows: two blocks of 32 and one of 16
    assert torch.equal(qw.unpacked(), _kernel_rows(pack_int4(qw.unpacked()), 96, torch.arange(80)))


def test_without_forge_kernels_aten_computes_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    w = _weight(out=64, width=128)
    x = torch.randn(3, 128)
    for qw in (Int4Weight.quantize(w), from_gguf(8, _gguf_blocks("Q8_0", 64, 128), (64, 128))):
        fast = qw.linear(x)
        monkeypatch.setattr(cpu_quant, "available", lambda: False)
        before = qw.nbytes
        slow = qw.linear(x)
        monkeypatch.undo()
        assert qw.nbytes > before  # aten's packing, made on first use, counts
        _close(fast, x @ qw.dequantize(torch.float32).T, torch.float32)
        torch.testing.assert_close(slow, x @ qw.dequantize(torch.float32).T, rtol=1e-4, atol=1e-4)


def test_weights_report_the_bytes_they_hold() -> None:
    out, width = 64, 256
    rtn = Int4Weight.quantize(_weight(out, width))
    assert rtn.scale.dtype == rtn.min.dtype == torch.float16  # its scale and minimum are chosen in fp16
    assert rtn.nbytes == out * width * 0.625  # half a byte a value, fp16 scale and minimum a group of 32
    q41 = from_gguf(GGUF_Q4_1, _gguf_blocks("Q4_1", out, width), (out, width))
    assert q41.nbytes == out * width * 0.625  # GGUF's own block: the file's size
    q80 = from_gguf(8, _gguf_blocks("Q8_0", out, width), (out, width))
    assert q80.nbytes == out * width * (1 + 2 / 32)
    before = q41.nbytes
    for dtype in (torch.float32, torch.bfloat16):  # the C++ kernel reads the blocks as they are, in either dtype
        q41.to(dtype).linear(torch.randn(1, width, dtype=dtype))
        assert q41.nbytes == before and q41.dtype == dtype


def test_bad_group_weights_and_block_types_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match="2 int8 groups do not split the input width 96 into groups of 16 or 32") as e:
        Int8GroupWeight(torch.zeros(16, 96, dtype=torch.int8), torch.ones(16, 2), None, torch.float32)  # 48
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"GGUF tensor type IQ2_XXS \(16\) can't be kept quantized.*dtype='float32'"):
        from_gguf(16, b"", (32, 256))
    with pytest.raises(ConfigError, match="do not fill a tensor of shape"):
        from_gguf(8, b"\0" * 34, (2, 32))
