"""Muon: the orthogonalised update, which parameters it takes, and its state across a save and resume."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from forge.config import ModelConfig
from forge.core.lora import apply_lora
from forge.core.optim import Muon, MuonAdamW, build_optimizer, muon_params, orthogonalize
from forge.core.transformer import Transformer
from forge.errors import ConfigError
from forge.trainer import TrainConfig


def _names(model: nn.Module, params: list[torch.Tensor]) -> set[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(p)] for p in params}


@pytest.mark.parametrize("shape", [(16, 48), (48, 16), (32, 32)])
def test_newton_schulz_pushes_singular_values_near_one(shape: tuple[int, int]) -> None:
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 5.0
    before = torch.linalg.svdvals(g)
    assert before.max() / before.min() > 3  # far from orthogonal to start with
    s = torch.linalg.svdvals(orthogonalize(g))
    big = s[before > before.max() * 0.05]  # the iteration leaves near-null directions small
    assert big.min() > 0.5 and s.max() < 1.5


def test_muon_step_is_the_scaled_orthogonal_update() -> None:
    """One step from zero momentum: p -= lr * sqrt(max(1, rows/cols)) * NS(g) (Nesterov: lerp(g, m, beta))."""
    p = nn.Parameter(torch.randn(24, 8, generator=torch.Generator().manual_seed(1)))
    g = torch.randn(24, 8, generator=torch.Generator().manual_seed(2))
    start = p.detach().clone()
    opt = Muon([p], lr=0.1, momentum=0.9)
    p.grad = g.clone()
    opt.step()
    nesterov = g.lerp(0.1 * g, 0.9)  # momentum after one step is (1 - beta) * g
    expected = start - 0.1 * 3**0.5 * orthogonalize(nesterov)
    torch.testing.assert_close(p.detach(), expected)
    assert torch.linalg.svdvals((start - p.detach()) / (0.1 * 3**0.5)).max() < 1.5


def test_muon_refuses_non_matrices() -> None:
    with pytest.raises(ConfigError, match=r"2-D matrices only.*\(5,\)"):
        Muon([nn.Parameter(torch.zeros(5))])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("tie", [True, False])
def test_grouping_hidden_matrices_to_muon(small_config: Callable[..., ModelConfig], family: str, tie: bool) -> None:
    model = Transformer(small_config(family, tie_embeddings=tie, qk_norm=True))
    opt = build_optimizer(model, "muon", lr=1e-3, weight_decay=0.1)
    assert isinstance(opt, MuonAdamW)
    by_kind = {
        kind: _names(model, [p for g in opt.param_groups if g["optimizer"] == kind for p in g["params"]])
        for kind in ("muon", "adamw")
    }
    hidden = {f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.up", "mlp.down")}
    assert by_kind["muon"] == hidden
    assert not by_kind["muon"] & by_kind["adamw"]
    assert by_kind["muon"] | by_kind["adamw"] == {n for n, _ in model.named_parameters()}
    assert "tok_emb.weight" in by_kind["adamw"] and "blocks.0.attn.q_norm" in by_kind["adamw"]
    assert ("lm_head.weight" in by_kind["adamw"]) == (not tie)
    scales = {g["optimizer"]: g["lr_scale"] for g in opt.param_groups}
    assert scales == {"muon": pytest.approx(0.02 / 1e-3), "adamw": 1.0}


def test_lora_adapters_stay_on_adamw(small_config: Callable[..., ModelConfig]) -> None:
    model = Transformer(small_config("llama"))
    for p in model.parameters():
        p.requires_grad_(False)
    apply_lora(model, rank=4, alpha=8, generator=torch.Generator().manual_seed(0))
    assert muon_params(model) == []
    opt = build_optimizer(model, "muon", lr=1e-3, weight_decay=0.1)
    assert {g["optimizer"] for g in opt.param_groups} == {"adamw"}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == trainable


def _steps(model: Transformer, opt: torch.optim.Optimizer, n: int, seed: int) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(n):
        x = torch.randint(0, model.config.vocab_size, (2, 17), generator=gen)
        loss = model.loss(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_save_and_resume_continues_identically(small_config: Callable[..., ModelConfig]) -> None:
    torch.manual_seed(0)
    model = Transformer(small_config("llama"))
    opt = build_optimizer(model, "muon", lr=1e-3, weight_decay=0.1)
    _steps(model, opt, 2, seed=0)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = copy.deepcopy(opt.state_dict())  # state_dict() holds the live buffers
    expected = _steps(model, opt, 3, seed=1)

    resumed = Transformer(small_config("llama"))
    resumed.load_state_dict(saved_model)
    opt2 = build_optimizer(resumed, "muon", lr=1e-3, weight_decay=0.1)
    opt2.load_state_dict(saved_opt)
    assert any("momentum_buffer" in s for s in opt2.state.values())
    assert any("exp_avg" in s for s in opt2.state.values())
    assert _steps(resumed, opt2, 3, seed=1) == expected
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_resume_with_another_optimizer_is_refused(small_config: Callable[..., ModelConfig]) -> None:
    model = Transformer(small_config("gpt2"))
    adamw_state = build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.1).state_dict()
    with pytest.raises(ConfigError, match=r"saved by another optimizer.*TrainConfig.optimizer"):
        build_optimizer(model, "muon", lr=1e-3, weight_decay=0.1).load_state_dict(adamw_state)


def test_unknown_optimizer_is_refused(small_config: Callable[..., ModelConfig]) -> None:
    with pytest.raises(ConfigError, match=r"optimizer = 'sgd' is invalid: use one of adamw, muon"):
        build_optimizer(Transformer(small_config("gpt2")), "sgd", lr=1e-3, weight_decay=0.1)
    with pytest.raises(ConfigError, match=r"TrainConfig.optimizer = 'lion'"):
        TrainConfig(optimizer="lion")  # type: ignore[arg-type]


def test_trainer_schedules_muon_at_its_own_peak(hamlet_text: str) -> None:
    from forge.trainer import train

    result = train(
        [hamlet_text[:4000]],
        preset="tiny",
        steps=3,
        batch_size=2,
        context=16,
        tokenizer="char",
        eval_every=0,
        optimizer="muon",
        muon_lr=0.05,
        lr=2e-3,
        warmup=0,
        schedule="constant",
    )
    groups = result.state["optimizer"]["param_groups"]  # type: ignore[index]
    lrs = {g["optimizer"]: g["lr"] for g in groups}
    assert lrs == {"muon": pytest.approx(0.05), "adamw": pytest.approx(2e-3)}
    assert result.train_loss is not None and result.train_loss == result.train_loss  # finite, not NaN
