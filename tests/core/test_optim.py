"""AdamW parameter groups and gradient clipping."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from forge.config import ModelConfig
from forge.core.optim import build_adamw, clip_grad_norm, param_groups
from forge.core.transformer import Transformer


def _names(model: nn.Module, params: list[torch.Tensor]) -> set[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(p)] for p in params}


@pytest.fixture(params=["gpt2", "llama", "gpt2-untied"])
def model(request: pytest.FixtureRequest, small_config: Callable[..., ModelConfig]) -> Transformer:
    if request.param == "gpt2-untied":
        return Transformer(small_config("gpt2", tie_embeddings=False))
    return Transformer(small_config(request.param))


def test_groups_split_decay_from_no_decay(model: Transformer) -> None:
    decay_group, no_decay_group = param_groups(model, 0.1)
    assert decay_group["weight_decay"] == 0.1
    assert no_decay_group["weight_decay"] == 0.0
    decay = _names(model, decay_group["params"])  # type: ignore[arg-type]
    no_decay = _names(model, no_decay_group["params"])  # type: ignore[arg-type]

    linear_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    linear_weights &= {n for n, _ in model.named_parameters()}  # the tied lm_head is listed as tok_emb
    norms = {n for n, _ in model.named_parameters() if ".norm" in n or n.startswith("norm.")}
    biases = {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    embeddings = {n for n, _ in model.named_parameters() if n.startswith(("tok_emb", "pos_emb"))}

    assert decay == linear_weights
    assert norms | biases | embeddings == no_decay
    assert norms and embeddings
    if model.config.bias:
        assert biases
    assert all(model.get_parameter(n).dim() == 2 for n in decay)


def test_tied_lm_head_is_not_decayed(small_config: Callable[..., ModelConfig]) -> None:
    model = Transformer(small_config("gpt2"))
    decay_group, no_decay_group = param_groups(model, 0.1)
    assert any(p is model.lm_head.weight for p in no_decay_group["params"])  # type: ignore[union-attr]
    assert not any(p is model.lm_head.weight for p in decay_group["params"])  # type: ignore[union-attr]


def test_untied_lm_head_is_decayed(small_config: Callable[..., ModelConfig]) -> None:
    model = Transformer(small_config("gpt2", tie_embeddings=False))
    decay_group, _ = param_groups(model, 0.1)
    assert any(p is model.lm_head.weight for p in decay_group["params"])  # type: ignore[union-attr]


def test_every_parameter_appears_exactly_once(model: Transformer) -> None:
    groups = param_groups(model, 0.1)
    ids = [id(p) for g in groups for p in g["params"]]  # type: ignore[union-attr]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    assert sum(p.numel() for g in groups for p in g["params"]) == model.num_params()  # type: ignore[union-attr]


def test_frozen_parameters_are_left_out(small_config: Callable[..., ModelConfig]) -> None:
    model = Transformer(small_config("gpt2"))
    model.tok_emb.weight.requires_grad_(False)
    ids = {id(p) for g in param_groups(model, 0.1) for p in g["params"]}  # type: ignore[union-attr]
    assert id(model.tok_emb.weight) not in ids


def test_weight_decay_only_shrinks_the_decay_group(small_config: Callable[..., ModelConfig]) -> None:
    """With zero gradients, AdamW changes only decayed weights (by lr * wd * w)."""
    model = Transformer(small_config("gpt2"))
    opt = build_adamw(model, lr=0.1, weight_decay=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    decay = _names(model, opt.param_groups[0]["params"])
    for name, p in model.named_parameters():
        if name in decay:
            torch.testing.assert_close(p.detach(), before[name] * (1 - 0.1 * 0.5))
        else:
            assert torch.equal(p.detach(), before[name]), name


def test_build_adamw_settings(small_config: Callable[..., ModelConfig]) -> None:
    model = Transformer(small_config("llama"))
    opt = build_adamw(model, lr=3e-4, weight_decay=0.01, betas=(0.8, 0.9))
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    assert all(g["lr"] == 3e-4 and g["betas"] == (0.8, 0.9) for g in opt.param_groups)


def test_clip_grad_norm_returns_the_norm_before_clipping() -> None:
    layer = nn.Linear(3, 2, bias=False)
    layer.weight.grad = torch.full((2, 3), 2.0)  # norm sqrt(6 * 4)
    norm = clip_grad_norm(layer, 1.0)
    assert float(norm) == pytest.approx(24**0.5)
    assert layer.weight.grad.norm().item() == pytest.approx(1.0, rel=1e-5)


def test_clip_grad_norm_leaves_small_gradients() -> None:
    layer = nn.Linear(3, 2, bias=False)
    layer.weight.grad = torch.full((2, 3), 0.1)
    clip_grad_norm(layer, 1.0)
    torch.testing.assert_close(layer.weight.grad, torch.full((2, 3), 0.1))
