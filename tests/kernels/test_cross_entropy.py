"""The chunked LM-head + cross-entropy kernel against autograd through its PyTorch twin."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import DEVICE, ON_GPU, close
from torch.utils._python_dispatch import TorchDispatchMode

from forge.kernels import reference
from forge.kernels.cross_entropy import _LOGITS_BUDGET_BYTES, _chunk_rows, linear_cross_entropy

DTYPES = [torch.float32, torch.bfloat16]
# (N, d, V, chunk_size): V off the block size (17, 1000, 50304), N off the chunk, several chunks.
SHAPES = [(37, 16, 17, 8), (64, 32, 1000, 24), (50, 24, 130, None), (19, 8, 50304, 7)]
if ON_GPU:
    SHAPES += [(4096, 768, 50304, None), (3001, 512, 49152, 1024), (2048, 256, 1000, 333), (8192, 1024, 32007, None)]


def _inputs(
    n: int, d: int, v: int, dtype: torch.dtype, *, ignore_every: int = 5, ignore_index: int = -100, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(DEVICE, dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) * d**-0.5 * 4).to(DEVICE, dtype).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        t[::ignore_every] = ignore_index
    return x, w, t.to(DEVICE)


def _loss_and_grads(fn, x: torch.Tensor, w: torch.Tensor, t: torch.Tensor, **kw) -> list[torch.Tensor]:
    loss = fn(x, w, t, **kw)
    live = [a for a in (x, w) if a.requires_grad]
    return [loss, *torch.autograd.grad(loss, live)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(shape: tuple[int, int, int, int | None], dtype: torch.dtype) -> None:
    n, d, v, chunk = shape
    x, w, t = _inputs(n, d, v, dtype)
    got = _loss_and_grads(linear_cross_entropy, x, w, t, chunk_size=chunk)
    want = _loss_and_grads(reference.linear_cross_entropy, x, w, t)
    assert got[0].dtype == torch.float32 and got[0].dim() == 0
    assert got[1].dtype == dtype and got[2].dtype == dtype
    close(got[0], want[0], dtype)
    close(got[1], want[1], dtype, scale=2)
    close(got[2], want[2], dtype, scale=2)


@pytest.mark.parametrize("chunk", [1, 5, 16, None])
def test_chunking_does_not_change_the_result(chunk: int | None) -> None:
    x, w, t = _inputs(16, 8, 33, torch.float32, ignore_every=3)
    got = _loss_and_grads(linear_cross_entropy, x, w, t, chunk_size=chunk)
    want = _loss_and_grads(reference.linear_cross_entropy, x, w, t)
    for a, e in zip(got, want, strict=True):
        close(a, e, torch.float32)


def test_custom_ignore_index() -> None:
    x, w, t = _inputs(24, 8, 40, torch.float32, ignore_every=4, ignore_index=3)
    got = _loss_and_grads(linear_cross_entropy, x, w, t, ignore_index=3, chunk_size=10)
    want = _loss_and_grads(reference.linear_cross_entropy, x, w, t, ignore_index=3)
    for a, e in zip(got, want, strict=True):
        close(a, e, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_rows_ignored_gives_zero_not_nan(dtype: torch.dtype) -> None:
    x, w, _ = _inputs(9, 8, 21, dtype)
    t = torch.full((9,), -100, device=DEVICE)
    loss, gx, gw = _loss_and_grads(linear_cross_entropy, x, w, t, chunk_size=4)
    assert loss.item() == 0.0
    assert not gx.any() and not gw.any()
    assert gx.dtype == dtype and gw.dtype == dtype


def test_no_rows() -> None:
    x, w, t = _inputs(0, 8, 21, torch.float32)
    loss, gx, gw = _loss_and_grads(linear_cross_entropy, x, w, t)
    assert loss.item() == 0.0 and gx.shape == (0, 8) and not gw.any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_x_without_grad(dtype: torch.dtype) -> None:
    x, w, t = _inputs(30, 16, 77, dtype)
    x = x.detach()
    got = _loss_and_grads(linear_cross_entropy, x, w, t, chunk_size=8)
    want = _loss_and_grads(reference.linear_cross_entropy, x, w, t)
    assert len(got) == 2
    close(got[0], want[0], dtype)
    close(got[1], want[1], dtype, scale=2)


def test_frozen_weight() -> None:
    x, w, t = _inputs(30, 16, 77, torch.float32)
    w = w.detach()
    got = _loss_and_grads(linear_cross_entropy, x, w, t, chunk_size=8)
    want = _loss_and_grads(reference.linear_cross_entropy, x, w, t)
    for a, e in zip(got, want, strict=True):
        close(a, e, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_grad_gives_the_loss_alone(dtype: torch.dtype) -> None:
    x, w, t = _inputs(30, 16, 77, dtype)
    with torch.no_grad():
        loss = linear_cross_entropy(x, w, t, chunk_size=8)
        want = reference.linear_cross_entropy(x, w, t)
    assert not loss.requires_grad
    close(loss, want, dtype)
    detached = linear_cross_entropy(x.detach(), w.detach(), t, chunk_size=8)
    assert not detached.requires_grad
    close(detached, want, dtype)


def test_backward_scales_by_grad_output_and_can_run_twice() -> None:
    x, w, t = _inputs(20, 8, 50, torch.float32)
    loss = linear_cross_entropy(x, w, t, chunk_size=6)
    (3.0 * loss).backward(retain_graph=True)
    loss.backward()  # the stored grads must not have been scaled in place
    ref = reference.linear_cross_entropy(x, w, t)
    gx, gw = torch.autograd.grad(ref, [x, w])
    close(x.grad, 4.0 * gx, torch.float32)
    close(w.grad, 4.0 * gw, torch.float32)


def test_bf16_activations_with_fp32_master_weights() -> None:
    """What autocast leaves for the LM head: bf16 x, fp32 weight; the matmuls run in bf16."""
    x, w, t = _inputs(40, 16, 300, torch.bfloat16)
    w32 = w.detach().float().requires_grad_()
    loss, gx, gw = _loss_and_grads(linear_cross_entropy, x, w32, t, chunk_size=16)
    want, wgx, wgw = _loss_and_grads(lambda x, w, t: reference.linear_cross_entropy(x, w.bfloat16(), t), x, w32, t)
    assert gx.dtype == torch.bfloat16 and gw.dtype == torch.float32
    close(loss, want, torch.bfloat16)
    close(gx, wgx, torch.bfloat16, scale=2)
    close(gw, wgw, torch.bfloat16, scale=2)


def test_under_autocast() -> None:
    """fp32 x and weight under bf16 autocast: logits in bf16 as F.linear gives them, grads in fp32."""
    x, w, t = _inputs(40, 16, 300, torch.float32)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got = _loss_and_grads(linear_cross_entropy, x, w, t, chunk_size=16)
        want = _loss_and_grads(reference.linear_cross_entropy, x, w, t)
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    for a, e in zip(got, want, strict=True):
        close(a, e, torch.bfloat16, scale=2)


def test_bad_shapes_are_refused() -> None:
    x, w, t = _inputs(8, 16, 30, torch.float32)
    with pytest.raises(ValueError):
        linear_cross_entropy(x, w[:, :8], t)
    with pytest.raises(ValueError):
        linear_cross_entropy(x, w, t[:4])
    with pytest.raises(ValueError):
        linear_cross_entropy(x, w, t, chunk_size=0)


# ---- the full logits are never materialised ------------------------------------------------------------------------


def test_chunk_rows_bounds_the_logits_buffer() -> None:
    gpt2 = dict(n=16 * 1024, v=50304)
    for dtype in (torch.float32, torch.bfloat16):
        rows = _chunk_rows(gpt2["n"], gpt2["v"], dtype)
        assert rows * gpt2["v"] * dtype.itemsize <= _LOGITS_BUDGET_BYTES
        assert rows * gpt2["v"] * dtype.itemsize < gpt2["n"] * gpt2["v"] * 4 / 6  # vs the 3.3 GB fp32 logits
        assert rows % 8 == 0 and rows >= 512  # still big enough for efficient GEMMs
    assert _chunk_rows(10, 1000, torch.bfloat16) == 10  # a small batch is one chunk
    assert _chunk_rows(10**6, 10**9, torch.float32) == 1  # never zero rows
    assert _chunk_rows(100, 1000, torch.float32, chunk_size=7) == 7
    assert _chunk_rows(5, 1000, torch.float32, chunk_size=7) == 5
    # evened out: the last chunk is no sliver
    n, v = 10_000, 128_256
    rows = _chunk_rows(n, v, torch.bfloat16)
    chunks = -(-n // rows)
    assert n - (chunks - 1) * rows > rows // 2


class _LargestAllocation(TorchDispatchMode):
    """Records the size in bytes of the largest tensor any ATen op returns while active.

    In bytes, because Triton's interpreter moves kernel arguments as byte views of their storage.
    """

    def __init__(self) -> None:
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.nbytes = max(self.nbytes, o.numel() * o.element_size())
        return out


def test_full_logits_never_allocated() -> None:
    n, d, v, chunk = 48, 8, 500, 16
    x, w, t = _inputs(n, d, v, torch.float32)
    with _LargestAllocation() as seen:
        linear_cross_entropy(x, w, t, chunk_size=chunk).backward()
    assert seen.nbytes <= chunk * v * 4 < n * v * 4
    with _LargestAllocation() as seen:
        reference.linear_cross_entropy(x, w, t)
    assert seen.nbytes >= n * v * 4  # the check does see a materialised (N, V)


@pytest.mark.skipif(not ON_GPU, reason="measures CUDA memory")
def test_peak_memory_is_a_fraction_of_the_logits() -> None:
    n, d, v = 16 * 1024, 768, 50304  # GPT-2's LM head at B=16, T=1024
    x, w, t = _inputs(n, d, v, torch.bfloat16, ignore_every=0)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    linear_cross_entropy(x, w, t).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    full_logits = n * v * 4
    # one chunk of logits + the fp32 weight-grad accumulator + the grads themselves
    assert extra < full_logits / 4, f"peak {extra / 2**20:.0f} MiB vs full logits {full_logits / 2**20:.0f} MiB"
