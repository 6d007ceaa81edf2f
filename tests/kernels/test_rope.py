"""The RoPE kernel against its PyTorch twin, on strided views of a fused qkv projection."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import DEVICE, close

from forge.core.attention import rope_tables
from forge.core.kv_cache import KVCache
from forge.kernels import reference
from forge.kernels.rope import rope, rope_cache


@pytest.mark.parametrize(("B", "T", "H", "Hkv", "D"), [(1, 1, 9, 3, 64), (2, 7, 4, 2, 32), (3, 5, 2, 2, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_row", [False, True])
def test_rope_matches_reference(B: int, T: int, H: int, Hkv: int, D: int, dtype: torch.dtype, per_row: bool) -> None:
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D, generator=g).to(DEVICE, dtype).requires_grad_()
    qk = qkv[..., : (H + Hkv) * D].view(B, T, H + Hkv, D).transpose(1, 2)  # (B, H + Hkv, T, D), strided
    cos, sin = (t.to(DEVICE) for t in rope_tables(D, 64, 10000.0))
    if per_row:  # each row at its own positions, as in batched decoding
        positions = torch.randint(0, 64 - T, (B, 1), generator=g).to(DEVICE) + torch.arange(T, device=DEVICE)
        c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)  # (B, 1, T, D)
    else:
        c, s = cos[:T][None, None], sin[:T][None, None]  # (1, 1, T, D)
    got, want = rope(qk, c, s), reference.rope(qk, c, s)
    assert got.is_contiguous() and got.shape == want.shape
    close(got, want, dtype)
    dy = torch.randn(want.shape, generator=g).to(DEVICE, dtype)
    close(torch.autograd.grad(got, qkv, dy)[0], torch.autograd.grad(want, qkv, dy)[0], dtype)


def test_rope_rejects_an_odd_head_dim() -> None:
    with pytest.raises(ValueError, match="even head dimension"):
        rope(torch.randn(1, 1, 1, 5, device=DEVICE), torch.ones(1, 1, 1, 5), torch.zeros(1, 1, 1, 5))


@pytest.mark.parametrize(("heads", "kv_heads", "tokens"), [(4, 2, 1), (9, 3, 1), (4, 4, 3)])
def test_rope_cache_rotates_and_writes_the_cache_as_unfused(heads: int, kv_heads: int, tokens: int) -> None:
    """The fused decode kernel against the unfused path: rope, then an index_copy_ of keys and values each."""
    B, D, L = 3, 16, 12
    g = torch.Generator().manual_seed(heads)
    qkv = torch.randn(B, tokens, (heads + 2 * kv_heads) * D, generator=g).to(DEVICE)  # a fused projection's output
    v = qkv[..., (heads + kv_heads) * D :].view(B, tokens, kv_heads, D).transpose(1, 2)
    qk = qkv[..., : (heads + kv_heads) * D].view(B, tokens, heads + kv_heads, D).transpose(1, 2)
    cos, sin = (torch.randn(B, 1, tokens, D, generator=g).to(DEVICE) for _ in range(2))
    pos = torch.tensor([0, 5, L - tokens], device=DEVICE)
    ref, fused = (KVCache(batch=B, n_kv_head=kv_heads, max_len=L, head_dim=D, dtype=torch.float32, device=DEVICE)
                  for _ in range(2))  # fmt: skip
    index = ref.flat_index(slice(0, B), pos, tokens)
    rotated = reference.rope(qk, cos, sin)
    ref.k.view(-1, D).index_copy_(0, index, rotated[:, heads:].reshape(-1, D))
    ref.v.view(-1, D).index_copy_(0, index, v.reshape(-1, D))
    q = rope_cache(qk, v, cos, sin, fused.k, fused.v, index)
    close(q, rotated[:, :heads], torch.float32)
    close(fused.k, ref.k, torch.float32)
    assert torch.equal(fused.v, ref.v)  # values are copied, not computed


def test_a_decode_with_the_fused_rope_and_cache_write_gives_the_same_tokens() -> None:
    """A Llama-style model decoding per-row positions (a batch of different prompt lengths): the fused kernel
    registered, as on CUDA, against PyTorch's rope and index_copy_."""
    from forge import kernels
    from forge.config import ModelConfig
    from forge.core.generate import generate_tokens
    from forge.core.sampling import SamplingParams
    from forge.core.transformer import Transformer

    cfg = ModelConfig(vocab_size=64, context_length=32, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                      norm="rmsnorm", activation="swiglu", position="rope", bias=False)  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(cfg).to(DEVICE).eval()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    greedy = SamplingParams(temperature=0)

    def run() -> tuple[list[list[int]], list[torch.Tensor]]:
        seen: list[torch.Tensor] = []
        steps = generate_tokens(model, prompts, max_new_tokens=6, params=greedy, cuda_graphs=False,
                                observe=lambda logits, _: seen.append(logits.float().cpu()))  # fmt: skip
        return torch.stack(list(steps), 1).tolist(), seen

    with kernels.disabled():
        want, want_logits = run()
    saved = kernels.registered()
    kernels.load(["rope_cache"], DEVICE)
    calls = []
    fused = kernels.lookup("rope_cache", DEVICE)
    kernels.register("rope_cache", DEVICE, lambda *a: calls.append(1) or fused(*a))  # type: ignore[misc]
    try:
        got, got_logits = run()
    finally:
        if ("rope_cache", DEVICE) not in saved:
            kernels._REGISTRY.pop(("rope_cache", DEVICE), None)
        else:
            kernels.register("rope_cache", DEVICE, fused)  # type: ignore[arg-type]
    assert calls, "the decode steps took the fused kernel"
    assert got == want
    for a, b in zip(got_logits, want_logits, strict=True):
        close(a, b, torch.float32)
