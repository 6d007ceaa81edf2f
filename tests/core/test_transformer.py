"""The transformer: shapes, parameter counts, weight tying, GQA, checkpointing, causality."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from forge.config import ModelConfig, get_preset
from forge.core.attention import apply_rope, rope_tables
from forge.core.kv_cache import CacheWrite, KVCache
from forge.core.transformer import ROPE_INITIAL_LEN, Transformer
from forge.errors import GenerationError
from helpers import assert_cached_decode_matches_full

FAMILIES = ["gpt2", "llama"]


@pytest.fixture(params=FAMILIES)
def model(request: pytest.FixtureRequest, small_config: Callable[..., ModelConfig]) -> Transformer:
    torch.manual_seed(0)
    return Transformer(small_config(request.param)).eval()


def _tokens(vocab: int, shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def test_output_shape(model: Transformer) -> None:
    idx = _tokens(model.config.vocab_size, (3, 17))
    assert model(idx).shape == (3, 17, model.config.vocab_size)
    assert model(idx, last_only=True).shape == (3, 1, model.config.vocab_size)


def test_last_only_equals_the_last_position(model: Transformer) -> None:
    idx = _tokens(model.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(idx, last_only=True)[:, 0], model(idx)[:, -1])


def test_loss_is_cross_entropy_and_near_uniform_at_init(model: Transformer) -> None:
    idx = _tokens(model.config.vocab_size, (2, 16))
    targets = _tokens(model.config.vocab_size, (2, 16), seed=1)
    loss = model.loss(idx, targets)
    logits = model(idx)
    expected = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))
    torch.testing.assert_close(loss, expected)
    # GPT-2 init gives nearly uniform predictions: loss close to ln(vocab).
    assert abs(loss.item() - torch.log(torch.tensor(float(model.config.vocab_size))).item()) < 0.2


@pytest.mark.parametrize(
    ("name", "expected", "tolerance"),
    [("tiny", 1.05e6, 0.1), ("llama-tiny", 1.0e6, 0.1), ("small", 10e6, 0.1), ("llama-small", 10e6, 0.15)],
)
def test_small_preset_parameter_counts(name: str, expected: float, tolerance: float) -> None:
    with torch.device("meta"):
        n = Transformer(get_preset(name)).num_params()
    assert abs(n - expected) / expected < tolerance, n


@pytest.mark.parametrize(
    ("name", "expected"),
    [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168)],
)
def test_gpt2_parameter_counts_match_openai(name: str, expected: int) -> None:
    """The published GPT-2 counts (tied embeddings, vocab 50257, context 1024)."""
    with torch.device("meta"):
        model = Transformer(get_preset(name))
    assert model.num_params() == expected


@pytest.mark.parametrize(("name", "expected"), [("smollm2-135m", 134_515_008), ("smollm2-360m", 361_821_120)])
def test_smollm2_parameter_counts(name: str, expected: int) -> None:
    """SmolLM2's published shapes (tied embeddings, no biases)."""
    with torch.device("meta"):
        model = Transformer(get_preset(name))
    assert model.num_params() == expected


def test_num_params_counts_tied_weights_once(small_config: Callable[..., ModelConfig]) -> None:
    cfg = small_config("gpt2")
    tied, untied = Transformer(cfg), Transformer(cfg.replace(tie_embeddings=False))
    assert untied.num_params() - tied.num_params() == cfg.vocab_size * cfg.d_model
    assert tied.num_params(non_embedding=True) == tied.num_params() - cfg.vocab_size * cfg.d_model - 64 * 64


def test_weight_tying_shares_storage(model: Transformer) -> None:
    assert model.lm_head.weight is model.tok_emb.weight
    assert model.lm_head.weight.data_ptr() == model.tok_emb.weight.data_ptr()
    with torch.no_grad():
        model.tok_emb.weight[3, 5] = 42.0
    assert model.lm_head.weight[3, 5].item() == 42.0


def test_untied_weights_are_separate(small_config: Callable[..., ModelConfig]) -> None:
    model = Transformer(small_config("gpt2", tie_embeddings=False))
    assert model.lm_head.weight.data_ptr() != model.tok_emb.weight.data_ptr()


def test_grouped_query_attention(small_config: Callable[..., ModelConfig]) -> None:
    cfg = small_config("llama", n_head=4, n_kv_head=1)
    model = Transformer(cfg).eval()
    qkv = model.blocks[0].attn.qkv
    assert qkv.weight.shape == ((4 + 2 * 1) * cfg.head_dim, cfg.d_model)
    idx = _tokens(cfg.vocab_size, (2, 11))
    logits = model(idx)
    assert logits.shape == (2, 11, cfg.vocab_size)
    assert torch.isfinite(logits).all()


def test_gqa_equals_full_attention_with_repeated_kv_heads(small_config: Callable[..., ModelConfig]) -> None:
    """A GQA model computes what a full-head model does with each kv head copied to its query group."""
    torch.manual_seed(0)
    gqa = Transformer(small_config("llama", n_kv_head=2)).eval()
    full = Transformer(small_config("llama", n_kv_head=None)).eval()
    H, Hkv, D, d = 4, 2, 16, 64
    state = gqa.state_dict()
    for i, _ in enumerate(gqa.blocks):
        w = state[f"blocks.{i}.attn.qkv.weight"]
        q, k, v = w.split([H * D, Hkv * D, Hkv * D])
        k = k.view(Hkv, D, d).repeat_interleave(H // Hkv, dim=0).reshape(H * D, d)
        v = v.view(Hkv, D, d).repeat_interleave(H // Hkv, dim=0).reshape(H * D, d)
        state[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q, k, v])
    full.load_state_dict(state)
    idx = _tokens(96, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(full(idx), gqa(idx), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_gives_the_same_loss_and_grads(
    family: str, small_config: Callable[..., ModelConfig]
) -> None:
    torch.manual_seed(0)
    reference = Transformer(small_config(family)).train()
    checkpointed = Transformer(small_config(family)).train()
    checkpointed.load_state_dict(reference.state_dict())
    checkpointed.gradient_checkpointing = True
    idx, targets = _tokens(96, (2, 16)), _tokens(96, (2, 16), seed=1)
    loss_ref = reference.loss(idx, targets)
    loss_ref.backward()
    loss_ckpt = checkpointed.loss(idx, targets)
    loss_ckpt.backward()
    torch.testing.assert_close(loss_ckpt, loss_ref)
    grads = dict(reference.named_parameters())
    for name, p in checkpointed.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, grads[name].grad, msg=name)


@pytest.mark.parametrize("position", [0, 5, 12])
def test_causal_future_tokens_do_not_change_earlier_logits(model: Transformer, position: int) -> None:
    vocab = model.config.vocab_size
    idx = _tokens(vocab, (2, 16))
    changed = idx.clone()
    changed[:, position] = (changed[:, position] + 1) % vocab
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :position], b[:, :position], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, position:], b[:, position:])


def test_positions_matter(model: Transformer) -> None:
    """Shifting the positions changes the logits (learned embeddings or RoPE are applied)."""
    idx = _tokens(model.config.vocab_size, (1, 8))
    with torch.no_grad():
        base = model(idx)
        shifted = model(idx, positions=torch.arange(5, 13))
    assert not torch.allclose(base, shifted)


def test_dropout_only_in_training(small_config: Callable[..., ModelConfig]) -> None:
    model = Transformer(small_config("gpt2", dropout=0.5))
    idx = _tokens(96, (2, 8))
    model.eval()
    torch.testing.assert_close(model(idx), model(idx))
    model.train()
    assert not torch.allclose(model(idx), model(idx))


def test_kv_cache_prefill_and_decode_match_full_forward(model: Transformer) -> None:
    assert_cached_decode_matches_full(model, _tokens(model.config.vocab_size, (2, 12)))
    assert all(block.attn.cache is None for block in model.blocks)


def test_kv_cache_buffers() -> None:
    cache = KVCache(batch=2, n_kv_head=3, max_len=10, head_dim=4, dtype=torch.float32, device="cpu")
    k1, v1 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    k, v = cache.write(CacheWrite(rows=slice(0, 2), pos=0, length=4), k1, v1)
    assert k.shape == (2, 3, 4, 4)
    torch.testing.assert_close(k, k1)
    k2, v2 = torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4)
    k, v = cache.write(CacheWrite(rows=slice(0, 2), pos=4, length=5), k2, v2)
    assert k.shape == (2, 3, 5, 4)
    torch.testing.assert_close(k[:, :, :4], k1)
    torch.testing.assert_close(v[:, :, 4:], v2)
    k3, v3 = torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4)  # one token per row, each at its own position
    pos = torch.tensor([5, 7])
    k, v = cache.write(CacheWrite(rows=slice(0, 2), pos=pos, length=8), k3, v3)
    torch.testing.assert_close(k[0, :, 5], k3[0, :, 0])
    torch.testing.assert_close(v[1, :, 7], v3[1, :, 0])
    assert cache.max_len == 10


def test_rope_preserves_norms_and_relative_positions() -> None:
    cos, sin = rope_tables(8, 32, 10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def at(x: torch.Tensor, pos: int) -> torch.Tensor:
        return apply_rope(x, cos[pos][None, None, None], sin[pos][None, None, None])

    torch.testing.assert_close(at(q, 7).norm(), q.norm())
    # The score depends only on the distance between positions.
    s1 = (at(q, 10) * at(k, 7)).sum()
    s2 = (at(q, 23) * at(k, 20)).sum()
    torch.testing.assert_close(s1, s2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(at(q, 0), q)


def test_meta_device_model_can_be_materialised(small_config: Callable[..., ModelConfig]) -> None:
    cfg = small_config("llama")
    with torch.device("meta"):
        model = Transformer(cfg)
    assert model.tok_emb.weight.is_meta
    model.to_empty(device="cpu")
    model.reset_buffers()
    reference = Transformer(cfg)
    torch.testing.assert_close(model.rope_cos, reference.rope_cos)
    torch.testing.assert_close(model.rope_sin, reference.rope_sin)


def test_rope_tables_grow_with_the_positions_used(small_config: Callable[..., ModelConfig]) -> None:
    # A model file may declare 16M positions; tables for all of them would be GBs before the first token.
    cfg = small_config("llama", context_length=1 << 24)
    model = Transformer(cfg).eval()
    assert model.rope_cos.shape == (ROPE_INITIAL_LEN, cfg.head_dim)
    with torch.no_grad():
        model(torch.zeros(1, 3, dtype=torch.long))
        assert model.rope_cos.shape[0] == ROPE_INITIAL_LEN
        model.make_caches(1, ROPE_INITIAL_LEN + 5)  # a cache longer than the tables grows them first
    n = model.rope_cos.shape[0]
    assert ROPE_INITIAL_LEN + 5 <= n <= 2 * ROPE_INITIAL_LEN
    cos, sin = rope_tables(cfg.head_dim, n, cfg.rope_theta)
    torch.testing.assert_close(model.rope_cos, cos)
    torch.testing.assert_close(model.rope_sin, sin)


def test_rope_tables_never_pass_the_context(small_config: Callable[..., ModelConfig]) -> None:
    cfg = small_config("llama", context_length=ROPE_INITIAL_LEN + 100)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        logits = model(torch.zeros(1, ROPE_INITIAL_LEN + 1, dtype=torch.long), last_only=True)
    assert model.rope_cos.shape[0] == cfg.context_length and torch.isfinite(logits).all()


def test_a_cache_larger_than_free_memory_is_a_clear_error(
    small_config: Callable[..., ModelConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    # max_tokens near a declared 16M context once meant allocating until the process was killed.
    monkeypatch.setattr("forge.core.kv_cache.free_memory", lambda device: 1 << 30)
    model = Transformer(small_config("llama", context_length=1 << 24))
    with pytest.raises(GenerationError, match=r"needs 8\.0 GB, but only 1\.0 GB of memory is free"):
        model.make_caches(4, 1 << 22)
    assert len(model.make_caches(1, 64)) == len(model.blocks)


def test_bf16_attention_under_autograd_on_the_cpu_runs_in_fp32() -> None:
    # SDPA's CPU kernel runs its backward ~5x slower in bf16 than in fp32, so ops.attention trains in fp32 there:
    # the output is the fp32 attention of the bf16 inputs rounded once, and so are the gradients.
    import torch.nn.functional as F

    from forge.core import ops

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8, generator=g).bfloat16().requires_grad_() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the trainer runs it: autocast must not cast back
        y = ops.attention(q, k, v, causal=True)
    assert y.dtype == torch.bfloat16
    grad = torch.randn(y.shape, generator=g).bfloat16()
    y.backward(grad)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_in, is_causal=True)
    ref.backward(grad.float())
    assert torch.equal(y, ref.bfloat16())
    for ours, theirs in zip((q, k, v), ref_in, strict=True):
        assert ours.grad is not None and theirs.grad is not None
        assert torch.equal(ours.grad, theirs.grad.bfloat16())
    with torch.no_grad():  # inference keeps bf16 (its forward is faster in bf16)
        assert ops.attention(q, k, v, causal=True).dtype == torch.bfloat16
