"""Architecture options: QK-norm, ReLU², logit soft-capping, untied head: train, decode, save and load, export."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from forge import models
from forge.config import ModelConfig
from forge.core.transformer import Transformer
from forge.errors import ConfigError
from forge.tokenizer import Tokenizer
from helpers import assert_cached_decode_matches_full

OPTIONS: dict[str, dict[str, Any]] = {
    "qk_norm": {"qk_norm": True},
    "relu2": {"activation": "relu2"},
    "softcap": {"logit_softcap": 5.0},
    "untied": {"tie_embeddings": False},
}


@pytest.fixture(params=[(f, o) for f in ("gpt2", "llama") for o in OPTIONS], ids=lambda p: f"{p[0]}-{p[1]}")
def model(request: pytest.FixtureRequest, small_config: Callable[..., ModelConfig]) -> Transformer:
    family, option = request.param
    torch.manual_seed(0)
    return Transformer(small_config(family, **OPTIONS[option]))


def test_forward_backward_reach_every_parameter(model: Transformer) -> None:
    idx = torch.randint(0, model.config.vocab_size, (2, 12))
    loss = model.loss(idx[:, :-1], idx[:, 1:])
    loss.backward()
    assert torch.isfinite(loss)
    logits = model(idx[:, :-1]).float()
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-5)  # the loss and the head agree (soft-cap included)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_label_smoothing_is_torchs_definition_without_the_logits(model: Transformer) -> None:
    """The fused head's smoothed loss (cross-entropy plus e times the target's margin over the mean logit) equals
    F.cross_entropy(label_smoothing=e) on the materialised logits, value and gradients."""
    idx = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    x, y = idx[:, :-1], idx[:, 1:].reshape(-1)
    for e in (0.1, 0.3):
        model.zero_grad()
        loss = model.loss(x, idx[:, 1:], label_smoothing=e)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        logits = model(x).float()
        ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y, label_smoothing=e)
        ref.backward()
        torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-5)
        for n, p in model.named_parameters():
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-3, atol=1e-5, msg=n)
    assert model.loss(x, idx[:, 1:], label_smoothing=0.3) != model.loss(x, idx[:, 1:])


def test_kv_cache_decode_equals_full_forward(model: Transformer) -> None:
    idx = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    model.eval()
    assert_cached_decode_matches_full(model, idx)


def test_options_change_the_model(small_config: Callable[..., ModelConfig]) -> None:
    idx = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    base = Transformer(small_config("gpt2"))  # GELU: the same MLP shapes as ReLU²
    for option in ("qk_norm", "relu2", "softcap"):
        torch.manual_seed(0)
        other = Transformer(small_config("gpt2", **OPTIONS[option]))
        other.load_state_dict(base.state_dict(), strict=False)
        assert not torch.allclose(other(idx), base(idx)), option


def test_softcap_bounds_the_logits(small_config: Callable[..., ModelConfig]) -> None:
    model = Transformer(small_config("gpt2", logit_softcap=2.0))
    with torch.no_grad():
        model.lm_head.weight.mul_(1000)
    logits = model(torch.randint(0, 96, (1, 8)))
    assert logits.abs().max() <= 2.0 and logits.abs().max() > 1.9


def test_qk_norm_parameters(small_config: Callable[..., ModelConfig]) -> None:
    model = Transformer(small_config("llama", qk_norm=True))
    names = {n for n, _ in model.named_parameters()}
    assert {"blocks.0.attn.q_norm", "blocks.0.attn.k_norm"} <= names
    assert model.blocks[0].attn.q_norm.shape == (model.config.head_dim,)


def test_config_validation_and_old_configs_load(small_config: Callable[..., ModelConfig]) -> None:
    old = small_config("gpt2").to_dict()
    for name in ("qk_norm", "logit_softcap"):
        del old[name]  # a config.json written before these fields existed
    cfg = ModelConfig.from_dict(old)
    assert (cfg.qk_norm, cfg.logit_softcap, cfg.activation) == (False, None, "gelu")
    assert cfg == small_config("gpt2")
    with pytest.raises(ConfigError, match=r"logit_softcap = 0 is invalid: must be > 0"):
        small_config("gpt2", logit_softcap=0)
    with pytest.raises(ConfigError, match=r"activation = 'relu' is invalid.*relu2"):
        small_config("gpt2", activation="relu")
    assert small_config("gpt2", activation="relu2").ff_dim == 4 * 64


def test_save_load_and_generate(tmp_path: Path, small_config: Callable[..., ModelConfig]) -> None:
    tok = Tokenizer.train(["abcdefgh ijklmnop " * 20], kind="char")
    cfg = small_config("llama", vocab_size=tok.vocab_size, qk_norm=True, activation="relu2", logit_softcap=10.0)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    path = models.save(tmp_path / "ckpt", model, tok)
    loaded = models.load(path)
    assert loaded.model.config == cfg
    idx = torch.tensor([tok.encode("abc def")])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(idx), model(idx))
    from forge.core.generate import generate_tokens
    from forge.core.sampling import SamplingParams

    greedy = SamplingParams(temperature=0.0)
    cached = [t.tolist() for t in generate_tokens(model, [idx[0].tolist()], max_new_tokens=6, params=greedy)]
    full = [
        t.tolist() for t in generate_tokens(model, [idx[0].tolist()], max_new_tokens=6, params=greedy, use_cache=False)
    ]
    assert cached == full


@pytest.mark.parametrize("fmt", ["gguf", "hf", "onnx"])
@pytest.mark.parametrize("option", ["qk_norm", "relu2", "softcap"])
def test_export_refuses_what_the_format_cannot_hold(
    tmp_path: Path, small_config: Callable[..., ModelConfig], fmt: str, option: str
) -> None:
    tok = Tokenizer.train(["abcdefgh ijklmnop " * 20], kind="char")
    model = Transformer(small_config("llama", vocab_size=tok.vocab_size, **OPTIONS[option]))
    shown = {"qk_norm": "qk_norm=True", "relu2": "activation='relu2'", "softcap": "logit_softcap=5.0"}[option]
    with pytest.raises(ConfigError, match=rf"export can't represent this model's {shown}.*without"):
        models.export(model, tok, tmp_path / "out", format=fmt)
    assert not (tmp_path / "out").exists()


def test_untied_head_exports(tmp_path: Path, small_config: Callable[..., ModelConfig]) -> None:
    tok = Tokenizer.train(["abcdefgh ijklmnop " * 20], kind="char")
    model = Transformer(small_config("llama", vocab_size=tok.vocab_size, tie_embeddings=False))
    out = models.export(model, tok, tmp_path / "hf", format="hf", dtype="float32")
    back = models.load(out)
    assert back.model.config.tie_embeddings is False
