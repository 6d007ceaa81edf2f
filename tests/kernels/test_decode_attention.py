"""The Triton split-K decoding kernel against its PyTorch twin in ``forge.kernels.reference``.

On CPUs these run through Triton's interpreter, so the shapes are small; the ``tiles`` fixture also
shrinks the kernel's key tiles to 16 so that even short caches cross several tiles and splits.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import DEVICE, ON_GPU, close

from forge.kernels import decode_attention as dec
from forge.kernels import reference


@pytest.fixture(params=["default tiles", "small tiles", "small tiles, pointer loads"])
def tiles(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    # The same cases as test_attention.py's fixture. Decoding has no tensor-descriptor loads, so the
    # two small-tile cases launch the same way here.
    if request.param.startswith("small tiles"):
        monkeypatch.setattr(dec, "_decode_config", lambda *_: dec.TileConfig(16, 16, 4, 2))
    return request.param


def _qkv(
    B: int, H: int, Hkv: int, Tq: int, Tk: int, D: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = torch.randn(B, H, Tq, D, device=DEVICE, dtype=dtype)
    k = torch.randn(B, Hkv, Tk, D, device=DEVICE, dtype=dtype)
    v = torch.randn(B, Hkv, Tk, D, device=DEVICE, dtype=dtype)
    return q, k, v


def _decode_mask(B: int, Tk: int) -> torch.Tensor:
    """Rows of random holes, then: one allowed key; a left-padded prompt in a cache filled halfway; one
    allowed key at the very end; a cache filled only at its start, as early in a generation."""
    mask = torch.rand(B, Tk, device=DEVICE) > 0.3
    pos = torch.arange(Tk, device=DEVICE)
    if B > 1:
        mask[1] = pos == Tk // 3
    if B > 2:
        mask[2] = (pos >= Tk // 5) & (pos < max(Tk // 2, Tk // 5 + 1))
    if B > 3:
        mask[3] = pos == Tk - 1
    if B > 4:
        mask[4] = pos < 3
    mask[:, 0] |= ~mask.any(dim=1)  # every row attends somewhere
    return mask


# (B, H, Hkv, Tk, D): one split and several, grouped heads of 1, 2 and 4.
DECODE_SHAPES = [
    (5, 4, 2, 20, 32),
    (5, 4, 1, 300, 16),
    (3, 2, 2, 130, 64),
    (1, 8, 2, 64, 16),
]
if ON_GPU:  # the last has one split of 3000 keys, scanned for its mask in two pieces
    DECODE_SHAPES += [(8, 32, 8, 4096, 128), (5, 16, 16, 3000, 64), (1, 32, 4, 1024, 128), (64, 16, 8, 3000, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=lambda s: "B{}H{}kv{}k{}D{}".format(*s))
def test_decode_attention_matches_reference(shape: tuple, dtype: torch.dtype, tiles: str) -> None:
    B, H, Hkv, Tk, D = shape
    q, k, v = _qkv(B, H, Hkv, 1, Tk, D, dtype)
    mask = _decode_mask(B, Tk)
    out = dec.decode_attention(q, k, v, mask)
    assert out.shape == (B, H, 1, D) and out.dtype == dtype
    close(out, reference.decode_attention(q, k, v, mask), dtype, scale=5)


# (B, H, Hkv, W, Tk, D): several queries a row, each with its own mask row (a verify step, a prompt's tail).
MULTI_SHAPES = [(3, 4, 2, 5, 70, 32), (2, 6, 3, 8, 300, 16), (1, 4, 4, 32, 40, 16), (2, 2, 1, 1, 50, 16)]
if ON_GPU:
    MULTI_SHAPES += [(8, 32, 8, 32, 2304, 64), (1, 9, 3, 32, 2048, 64), (4, 32, 8, 5, 4096, 128)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", MULTI_SHAPES, ids=lambda s: "B{}H{}kv{}W{}k{}D{}".format(*s))
def test_several_queries_a_row_match_the_reference(shape: tuple, dtype: torch.dtype, tiles: str) -> None:
    """Each row's W queries attend causally after a prefix of its own length, as a tail after a cached prefix
    does (keys past the row's end are stale), and one row's middle query sees a single key."""
    B, H, Hkv, W, Tk, D = shape
    q, k, v = _qkv(B, H, Hkv, W, Tk, D, dtype)
    starts = torch.randint(0, Tk - W + 1, (B,), device=DEVICE)
    positions = starts[:, None] + torch.arange(W, device=DEVICE)  # (B, W)
    mask = torch.arange(Tk, device=DEVICE) <= positions[:, :, None]  # (B, W, Tk)
    mask[0, W // 2] = torch.arange(Tk, device=DEVICE) == Tk // 2
    out = dec.decode_attention(q, k, v, mask)
    assert out.shape == (B, H, W, D) and out.dtype == dtype
    close(out, reference.decode_attention(q, k, v, mask), dtype, scale=5)
    sdpa = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask[:, None], enable_gqa=True)
    close(out, sdpa.to(dtype), dtype, scale=5)  # and against PyTorch's own attention


def test_too_many_rows_are_refused_with_the_way_out() -> None:
    from forge.core import ops

    assert ops.DECODE_MAX_ROWS <= ops.DECODE_TAIL_MAX_ROWS <= dec.MAX_ROWS  # ops sends no more rows than it takes
    q, k, v = _qkv(1, 8, 1, 17, 20, 16, torch.float32)  # 8 heads a kv head x 17 queries: 136 rows
    with pytest.raises(ValueError, match=r"more than 128.*forge\.kernels\.attention"):
        dec.decode_attention(q, k, v, torch.ones(1, 17, 20, dtype=torch.bool, device=DEVICE))


def test_decode_attention_ignores_masked_garbage() -> None:
    """Masked cache slots may hold anything, even inf or NaN left by an earlier sequence."""
    B, H, Hkv, Tk, D = 2, 4, 2, 40, 32
    q, k, v = _qkv(B, H, Hkv, 1, Tk, D, torch.float32)
    mask = _decode_mask(B, Tk)
    want = reference.decode_attention(q, k, v, mask)
    k = k.masked_fill(~mask[:, None, :, None], float("nan"))
    v = v.masked_fill(~mask[:, None, :, None], float("inf"))
    close(dec.decode_attention(q, k, v, mask), want, torch.float32, scale=5)


def test_decode_attention_takes_a_broadcast_mask() -> None:
    """forge.core.ops expands one (1, Tk) mask over the batch: a stride-0 view."""
    B, H, Hkv, Tk, D = 3, 4, 2, 50, 16
    q, k, v = _qkv(B, H, Hkv, 1, Tk, D, torch.float32)
    mask = _decode_mask(1, Tk).expand(B, -1)
    close(dec.decode_attention(q, k, v, mask), reference.decode_attention(q, k, v, mask), torch.float32, scale=5)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_decode_attention_replays_in_a_cuda_graph() -> None:
    B, H, Hkv, Tk, D = 4, 16, 4, 2048, 128
    q, k, v = _qkv(B, H, Hkv, 1, Tk, D, torch.bfloat16)
    mask = _decode_mask(B, Tk)
    dec.decode_attention(q, k, v, mask)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = dec.decode_attention(q, k, v, mask)
    for _ in range(2):  # new contents in the same buffers, as a decode loop does
        q.copy_(torch.randn_like(q))
        mask.copy_(_decode_mask(B, Tk))
        graph.replay()
        torch.cuda.synchronize()
        close(out, reference.decode_attention(q, k, v, mask), torch.bfloat16, scale=5)
