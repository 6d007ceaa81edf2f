"""Forge's C++ CPU quantized matmuls against the dequantized weight's plain matmul."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from forge.kernels import cpu_quant

pytestmark = pytest.mark.skipif(not cpu_quant.available(), reason="needs AVX2 and a C++ compiler")


def _int4(n: int, k: int, group: int, scale_dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    d = (torch.rand(n, k // group, generator=g) * 0.02 + 1e-3).to(scale_dtype)
    m = (torch.randn(n, k // group, generator=g) * 0.05).to(scale_dtype)
    blocks = q.view(n, k // 32, 32)
    qs = (blocks[..., :16] | (blocks[..., 16:] << 4)).reshape(n, k // 2).contiguous()
    w = q.float().view(n, k // group, group) * d.float()[..., None] + m.float()[..., None]
    return qs, d, m, w.view(n, k)


def _int8(n: int, k: int, group: int, scale_dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    d = (torch.rand(n, k // group, generator=g) * 0.01 + 1e-4).to(scale_dtype)
    w = q.float().view(n, k // group, group) * d.float()[..., None]
    return q, d, w.view(n, k)


def _close(y: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4) -> None:
    # By default the activations are rounded to int16 per block of 32: within 1/32767 of each block's largest.
    err = ((y.float() - ref).norm() / ref.norm()).item()
    assert err < tol, err


def _int8_acts(fn, *args, **kw):  # llama.cpp's method: activations rounded to int8 per block of 32, ~0.5% off
    return fn(*args, **kw, precise=False)


@pytest.fixture(params=[False, True], ids=["avx2", "vnni"])
def vnni(request: pytest.FixtureRequest):
    """Each path of the precise kernels in turn: AVX2, and AVX512-VNNI where the CPU has it."""
    default = cpu_quant.vnni()
    if request.param and not cpu_quant.vnni(True):
        pytest.skip("the CPU has no AVX512-VNNI")
    cpu_quant.vnni(request.param)
    yield request.param
    cpu_quant.vnni(default)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 9])
@pytest.mark.parametrize(("n", "k", "group"), [(96, 576, 32), (50, 1536, 64), (33, 256, 128), (7, 96, 32)])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
def test_int4_mm_matches_the_dequantized_weight(
    m: int, n: int, k: int, group: int, scale_dtype: torch.dtype, vnni: bool
) -> None:
    qs, d, mins, w = _int4(n, k, group, scale_dtype)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    ref = x @ w.T
    _close(cpu_quant.int4_mm(x, qs, d, mins, group), ref)
    _close(_int8_acts(cpu_quant.int4_mm, x, qs, d, mins, group), ref, 0.02)
    y = cpu_quant.int4_mm(x.bfloat16(), qs, d, mins, group)
    assert y.dtype == torch.bfloat16
    ref16 = x.bfloat16().float() @ w.T  # what bf16 activations stand for
    _close(y, ref16, 1e-2)  # the output rounded to bf16
    _close(_int8_acts(cpu_quant.int4_mm, x.bfloat16(), qs, d, mins, group), ref16, 0.02)


@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize(("n", "k", "group"), [(96, 576, 32), (40, 512, 512), (17, 192, 64)])
def test_int8_mm_matches_the_dequantized_weight(m: int, n: int, k: int, group: int, vnni: bool) -> None:
    q, d, w = _int8(n, k, group, torch.float16)
    x = torch.randn(m, k)
    _close(cpu_quant.int8_mm(x, q, d, group), x @ w.T)
    _close(_int8_acts(cpu_quant.int8_mm, x, q, d, group), x @ w.T, 0.02)
    _close(cpu_quant.int8_mm(x.bfloat16(), q, d, group), x.bfloat16().float() @ w.T, 1e-2)


def test_int8_mm_with_minimums() -> None:
    q, d, w = _int8(24, 128, 32, torch.float32)
    m = torch.randn(24, 4) * 0.1
    x = torch.randn(3, 128)
    ref = x @ (w + m.repeat_interleave(32, dim=1)).T
    _close(cpu_quant.int8_mm(x, q, d, 32, m), ref)
    _close(_int8_acts(cpu_quant.int8_mm, x, q, d, 32, m), ref, 0.02)


def test_the_vnni_and_avx2_paths_agree() -> None:
    """The VNNI path rounds x to max|x| / 32639 per block, the AVX2 path to / 32767: both within ~5e-5."""
    if not cpu_quant.vnni(True):
        pytest.skip("the CPU has no AVX512-VNNI")
    qs, d, mins, w = _int4(64, 576, 32, torch.float16, seed=3)
    x = torch.randn(3, 576, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 2, 576)  # blocks of
    # very different sizes
    try:
        on = cpu_quant.int4_mm(x, qs, d, mins, 32)
        cpu_quant.vnni(False)
        off = cpu_quant.int4_mm(x, qs, d, mins, 32)
    finally:
        cpu_quant.vnni(True)
    assert not torch.equal(on, off)  # two paths did run
    _close(on, off)
    _close(on, x @ w.T)


def test_a_zero_row_of_activations_gives_zero() -> None:
    q, d, _ = _int8(8, 64, 32, torch.float32)
    assert torch.equal(cpu_quant.int8_mm(torch.zeros(2, 64), q, d, 32), torch.zeros(2, 8))


def test_shapes_that_do_not_fit_are_refused() -> None:
    qs, d, m, _ = _int4(8, 64, 32, torch.float16)
    with pytest.raises(RuntimeError, match="weight width"):
        cpu_quant.int4_mm(torch.randn(1, 96), qs, d, m, 32)
    with pytest.raises(RuntimeError, match="group"):
        cpu_quant.int4_mm(torch.randn(1, 64), qs, d, m, 48)


def test_torch_compile_traces_through_the_ops() -> None:
    q, d, w = _int8(16, 64, 32, torch.float16)
    f = torch.compile(lambda x: torch.relu(cpu_quant.int8_mm(x, q, d, 32)) + 1, backend="eager", fullgraph=True)
    x = torch.randn(2, 64)
    _close(f(x), torch.relu(x @ w.T) + 1)


def test_int8_activations_are_exact_on_their_own_grid() -> None:
    # Rounding the activations to int8 is what makes llama.cpp's way inexact: activations already on the int8
    # grid of their block (whole numbers, each block's largest 127) give the dequantized weight's matmul.
    qs, d, mins, w = _int4(16, 64, 32, torch.float32)
    x = torch.randint(-127, 128, (2, 64)).float()
    x[:, 0], x[:, 32] = 127, 127
    _close(_int8_acts(cpu_quant.int4_mm, x, qs, d, mins, 32), x @ w.T, 1e-6)
    _close(cpu_quant.int4_mm(x, qs, d, mins, 32), x @ w.T)


def test_a_lock_left_by_a_killed_build_is_cleared_and_a_live_one_kept(tmp_path: Path) -> None:
    # torch waits on the build lock without end: a build killed on first use would hang every later process.
    lock = tmp_path / "lock"
    assert not cpu_quant._clear_stale_lock(tmp_path)  # no lock: nothing to do
    lock.touch()
    built = lock.stat().st_mtime
    assert not cpu_quant._clear_stale_lock(tmp_path, now=built + 30)  # a build under way: kept
    assert lock.exists()
    assert cpu_quant._clear_stale_lock(tmp_path, now=built + cpu_quant.STALE_LOCK_SECONDS + 1)
    assert not lock.exists()
