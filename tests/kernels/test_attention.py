"""The Triton flash attention kernel against its PyTorch twin in ``forge.kernels.reference``.

On CPUs these run through Triton's interpreter, so the shapes are small; the ``tiles`` fixture also
shrinks the kernels' tiles to 16 so that even short sequences cross several tiles (the causal diagonal,
the ragged last tile and the unmasked middle all get exercised), and turns off the tensor-descriptor
loads so that the plain-pointer path (pre-Hopper GPUs, unaligned views) is checked too.
"""

from __future__ import annotations

import pytest
import torch
from kernel_checks import DEVICE, ON_GPU, close

from forge.kernels import attention as attn
from forge.kernels import reference
from forge.kernels.decode_attention import decode_attention


@pytest.fixture(params=["default tiles", "small tiles", "small tiles, pointer loads"])
def tiles(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param.endswith("pointer loads"):
        monkeypatch.setattr(attn, "_USE_TMA", False)
    else:  # descriptors wherever the hardware allows, however small the call
        monkeypatch.setattr(attn, "_TMA_MIN_WORK", 0)
    if request.param.startswith("small tiles"):
        small = lambda *_: attn.TileConfig(16, 16, 4, 2)
        monkeypatch.setattr(attn, "_fwd_config", small)
        monkeypatch.setattr(attn, "_bwd_dq_config", small)
        monkeypatch.setattr(attn, "_bwd_dkdv_config", small)
    return request.param


def _qkv(
    B: int, H: int, Hkv: int, Tq: int, Tk: int, D: int, dtype: torch.dtype, grad: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = torch.randn(B, H, Tq, D, device=DEVICE, dtype=dtype)
    k = torch.randn(B, Hkv, Tk, D, device=DEVICE, dtype=dtype)
    v = torch.randn(B, Hkv, Tk, D, device=DEVICE, dtype=dtype)
    return q.requires_grad_(grad), k.requires_grad_(grad), v.requires_grad_(grad)


# (B, H, Hkv, Tq, Tk, D, causal): self-attention, a prefill chunk after a cache (Tq < Tk), grouped
# heads, lengths off the tile size, a single query.
SHAPES = [
    (1, 2, 2, 17, 17, 16, True),
    (2, 4, 2, 33, 33, 32, True),
    (1, 4, 2, 33, 33, 32, False),
    (1, 4, 1, 20, 45, 64, True),
    (1, 2, 2, 7, 40, 16, False),
    (2, 4, 4, 1, 17, 16, True),
    (1, 2, 1, 1, 1, 32, False),
    (1, 2, 1, 9, 24, 128, True),
]
if ON_GPU:
    SHAPES += [
        (2, 8, 2, 1000, 1000, 128, True),
        (2, 8, 8, 300, 1029, 64, True),
        (1, 4, 4, 513, 513, 128, False),
        (1, 8, 1, 257, 2048, 128, True),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}kv{}q{}k{}D{}{}".format(*s[:6], "c" if s[6] else ""))
def test_attention_matches_reference(shape: tuple, dtype: torch.dtype, tiles: str) -> None:
    B, H, Hkv, Tq, Tk, D, causal = shape
    q, k, v = _qkv(B, H, Hkv, Tq, Tk, D, dtype)
    out = attn.attention(q, k, v, causal=causal)
    assert out.shape == (B, H, Tq, D) and out.dtype == dtype
    close(out, reference.attention(q, k, v, causal=causal), dtype, scale=5)


GRAD_SHAPES = [
    (1, 2, 2, 17, 17, 16, True),
    (1, 4, 2, 33, 33, 32, True),
    (2, 4, 2, 9, 40, 16, True),
    (1, 4, 1, 23, 31, 32, False),
    (1, 2, 1, 9, 20, 64, True),
]
if ON_GPU:
    GRAD_SHAPES += [
        (2, 8, 2, 1000, 1000, 128, True),
        (1, 8, 4, 300, 777, 64, True),
        (1, 4, 4, 513, 513, 64, False),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "shape", GRAD_SHAPES, ids=lambda s: "B{}H{}kv{}q{}k{}D{}{}".format(*s[:6], "c" if s[6] else "")
)
def test_attention_gradients_match_reference(shape: tuple, dtype: torch.dtype, tiles: str) -> None:
    B, H, Hkv, Tq, Tk, D, causal = shape
    q, k, v = _qkv(B, H, Hkv, Tq, Tk, D, dtype, grad=True)
    grad_out = torch.randn(B, H, Tq, D, device=DEVICE, dtype=dtype)
    got = torch.autograd.grad(attn.attention(q, k, v, causal=causal), (q, k, v), grad_out)
    want = torch.autograd.grad(reference.attention(q, k, v, causal=causal), (q, k, v), grad_out)
    for name, g, w in zip("qkv", got, want, strict=True):
        assert g.shape == w.shape and g.dtype == dtype, name
        close(g, w, dtype, scale=10)


def test_attention_takes_strided_views_and_a_scale(tiles: str) -> None:
    """q, k, v as the model makes them: views of one fused projection, heads interleaved in memory."""
    B, T, H, Hkv, D = 2, 24, 4, 2, 32
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D, device=DEVICE, requires_grad=True)
    q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
    q = q.view(B, T, H, D).transpose(1, 2)
    k = k.view(B, T, Hkv, D).transpose(1, 2)
    v = v.view(B, T, Hkv, D).transpose(1, 2)
    assert not q.is_contiguous()
    out = attn.attention(q, k, v, causal=True, scale=0.3)
    want = reference.attention(q, k, v, causal=True, scale=0.3)
    close(out, want, torch.float32, scale=5)
    (grad,) = torch.autograd.grad(out.square().sum(), qkv)
    (want_grad,) = torch.autograd.grad(want.square().sum(), qkv)
    close(grad, want_grad, torch.float32, scale=10)
    # The heads-last layout of the output makes merging the heads a view.
    merged = out.transpose(1, 2).reshape(B, T, H * D)
    assert merged.data_ptr() == out.data_ptr()


def test_attention_fp16(tiles: str) -> None:
    q, k, v = _qkv(1, 4, 2, 33, 50, 64, torch.float16, grad=True)
    out = attn.attention(q, k, v, causal=True)
    want = reference.attention(q, k, v, causal=True)
    close(out, want, torch.float16, scale=5)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    expected = torch.autograd.grad(want, (q, k, v), grad_out)
    for g, w in zip(got, expected, strict=True):
        close(g, w, torch.float16, scale=10)


def test_causal_queries_before_every_key_get_zeros() -> None:
    """With Tq > Tk, causal alignment leaves the first Tq - Tk queries no key: zeros there (the reference's
    softmax gives NaN), the usual result elsewhere, and finite gradients."""
    q, k, v = _qkv(1, 2, 2, 10, 6, 16, torch.float32, grad=True)
    out = attn.attention(q, k, v, causal=True)
    assert torch.all(out[:, :, :4] == 0)
    close(out[:, :, 4:], reference.attention(q, k, v, causal=True)[:, :, 4:], torch.float32, scale=5)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("D", [8, 48, 96, 256])
def test_attention_rejects_unsupported_head_dims(D: int) -> None:
    q, k, v = _qkv(1, 2, 2, 4, 4, D, torch.float32)
    with pytest.raises(ValueError, match=rf"head dim {D} is not supported.*power of two from 16 to 128"):
        attn.attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match=rf"head dim {D} is not supported"):
        decode_attention(q[:, :, :1], k, v, torch.ones(1, 4, dtype=torch.bool, device=DEVICE))


def test_attention_rejects_mismatched_heads() -> None:
    q, k, v = _qkv(1, 3, 2, 4, 4, 16, torch.float32)
    with pytest.raises(ValueError, match="multiple of the kv heads"):
        attn.attention(q, k, v, causal=False)
