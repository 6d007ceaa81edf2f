"""The optimizers: AdamW with decoupled weight decay applied only where it helps, and Muon for hidden matrices.

Muon (Keller Jordan, 2024; the modded-nanogpt speedrun) updates a 2-D weight by the orthogonalised Nesterov
momentum of its gradient (five Newton–Schulz iterations), scaled by ``sqrt(max(1, rows / cols))``. It suits the
hidden matrices only: embeddings, the output head, norm gains and biases (and LoRA adapters, low-rank by design)
stay on AdamW. PyTorch 2.9+ ships ``torch.optim.Muon`` with the same update, but it always iterates in bfloat16,
which CPUs without native bf16 run about 5x slower than float32, so :class:`Muon` here is the reference algorithm
with the iteration in bfloat16 where the hardware runs it natively (GPUs, CPUs with AVX512-BF16 or AMX: on this
project's 2-core CPU the auto preset's matrices orthogonalise in 7 ms against 12 in float32, and 1024 x 512 ones
3.7x faster) and float32 elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from forge.core.device import autocast_dtype
from forge.core.lora import LoRA
from forge.errors import ConfigError

__all__ = [
    "MUON_DEFAULT_LR",
    "OPTIMIZERS",
    "Muon",
    "MuonAdamW",
    "OptimizerKind",
    "build_adamw",
    "build_optimizer",
    "clip_grad_norm",
    "muon_params",
    "orthogonalize",
    "param_groups",
]

OptimizerKind = Literal["adamw", "muon"]
OPTIMIZERS: tuple[str, ...] = ("adamw", "muon")
#: Muon's peak learning rate (Keller Jordan's default; the update's RMS is about 0.2 * lr per entry).
MUON_DEFAULT_LR = 0.02


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """Two groups: matrices decay; norms, biases and embeddings do not.

    Decaying a norm gain or a bias pulls it towards 0 for no regularising
    benefit, and decaying embeddings shrinks rarely-seen tokens' vectors.
    """
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # tied weights appear once
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embedding_params else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_adamw(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; the fused CUDA kernel when every parameter is on CUDA."""
    fused = all(p.is_cuda for p in model.parameters())
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, fused=fused or None)


def muon_params(model: nn.Module) -> list[nn.Parameter]:
    """The hidden matrices Muon updates: trainable 2-D weights that are not an embedding, the output head or LoRA."""
    excluded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Linear):
        excluded.add(id(head.weight))
    for module in model.modules():
        if isinstance(module, LoRA):
            excluded.update(id(p) for p in module.parameters())
    return [p for p in model.parameters() if p.requires_grad and p.dim() == 2 and id(p) not in excluded]


#: The quintic Newton–Schulz coefficients of Keller Jordan's reference (steepest slope at zero).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """About ``U V^T`` of ``g = U S V^T`` (singular values pushed into about [0.5, 1.5]) by Newton–Schulz.

    ``g`` is one matrix, or a stack of same-shape matrices (``(n, rows, cols)``) orthogonalised together in batched
    matmuls: one call for all of a model's blocks, not one per matrix.
    """
    a, b, c = NS_COEFFICIENTS
    x = g.to(autocast_dtype(g.device) or torch.float32)  # bf16 where the hardware runs it natively
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    # x <- a x + (b G + c G^2) x with G = x x^T, each sum fused into its matmul (addmm/baddbmm): on a CPU the
    # separate scalings and additions cost as much as the small matmuls themselves.
    fused_mm = torch.baddbmm if x.dim() == 3 else torch.addmm
    for _ in range(steps):
        gram = x @ x.mT
        x = fused_mm(x, fused_mm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.mT if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton–Schulz, for 2-D parameters (Keller Jordan's reference formulation).

    Per step: ``m = beta * m + (1 - beta) * g``; the update is ``orthogonalize(lerp(g, m, beta))`` (Nesterov)
    times ``sqrt(max(1, rows / cols))``; decoupled weight decay ``p *= 1 - lr * weight_decay``; ``p -= lr * update``.
    """

    def __init__(
        self,
        params: Any,
        *,
        lr: float = MUON_DEFAULT_LR,
        momentum: float = 0.95,
        weight_decay: float = 0.0,
        nesterov: bool = True,
        ns_steps: int = 5,
    ) -> None:
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "nesterov": nesterov}
        super().__init__(params, {**defaults, "ns_steps": ns_steps})
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ConfigError(f"Muon updates 2-D matrices only, but got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = _closure_loss(closure)
        for group in self.param_groups:
            lr, beta = group["lr"], group["momentum"]
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad)
            # Same-shape matrices (the same weight of every block) step together: a few batched kernels a
            # step instead of a few dozen small ones per matrix, which on a CPU cost more than the arithmetic.
            by_shape: dict[tuple[int | str, ...], list[torch.Tensor]] = {}
            for p in params:
                by_shape.setdefault((*p.shape, str(p.device), str(p.dtype)), []).append(p)
            for same in by_shape.values():
                grads = [p.grad for p in same]
                bufs = [self.state[p]["momentum_buffer"] for p in same]
                torch._foreach_lerp_(bufs, grads, 1 - beta)
                stacked = torch.stack(grads).lerp_(torch.stack(bufs), beta) if group["nesterov"] else torch.stack(bufs)
                updates = orthogonalize(stacked, group["ns_steps"]).unbind(0)
                if group["weight_decay"]:
                    torch._foreach_mul_(same, 1 - lr * group["weight_decay"])
                scale = max(1.0, same[0].shape[0] / same[0].shape[1]) ** 0.5
                torch._foreach_add_(same, updates, alpha=-lr * scale)
        return loss


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the hidden matrices and AdamW on everything else, as one optimizer.

    One object, so the trainer's schedule, clipping and checkpoints treat it as any optimizer: its
    ``param_groups`` are the Muon groups then the AdamW groups (each marked ``"optimizer"``), its ``state`` holds
    both kinds (a Muon momentum buffer or AdamW moments per parameter), and one ``state_dict`` saves them. Each
    group's ``"lr_scale"`` says what to multiply the scheduled learning rate by: ``muon_lr / lr`` for Muon,
    1 for AdamW, so that Muon's peak is ``muon_lr`` and both follow the same schedule. The steps themselves are
    :class:`Muon`'s and ``torch.optim.AdamW``'s, which share these groups and this state.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float,
        muon_lr: float = MUON_DEFAULT_LR,
        weight_decay: float = 0.1,
        muon_weight_decay: float = 0.0,
        momentum: float = 0.95,
        betas: tuple[float, float] = (0.9, 0.95),
    ) -> None:
        hidden = muon_params(model)
        ids = {id(p) for p in hidden}
        groups = [
            {**g, "params": [p for p in g["params"] if id(p) not in ids]}  # type: ignore[attr-defined]
            for g in param_groups(model, weight_decay)
        ]
        fused = all(p.is_cuda for p in model.parameters())
        self._inner: list[torch.optim.Optimizer] = []
        if hidden:  # none when only LoRA adapters train
            self._inner.append(Muon(hidden, lr=muon_lr, weight_decay=muon_weight_decay, momentum=momentum))
        self._inner.append(torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, fused=fused or None))
        for inner in self._inner:
            kind = "muon" if isinstance(inner, Muon) else "adamw"
            for group in inner.param_groups:
                group.update(optimizer=kind, lr_scale=muon_lr / lr if kind == "muon" else 1.0)
        super().__init__([g for inner in self._inner for g in inner.param_groups], {})
        self._link()

    def _link(self) -> None:
        """Point the inner optimizers at this one's groups and state (again after ``load_state_dict``)."""
        for inner in self._inner:
            kind = "muon" if isinstance(inner, Muon) else "adamw"
            inner.param_groups = [g for g in self.param_groups if g["optimizer"] == kind]
            inner.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        kinds = [g.get("optimizer") for g in state_dict["param_groups"]]
        mine = [g["optimizer"] for g in self.param_groups]
        if kinds != mine:
            raise ConfigError(
                f"the saved optimizer state has groups {kinds} but this run's optimizer has {mine}: it was saved "
                "by another optimizer; resume with the optimizer it was trained with (TrainConfig.optimizer)",
                field="optimizer",
            )
        super().load_state_dict(state_dict)
        self._link()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = _closure_loss(closure)
        for inner in self._inner:
            inner.step()
        return loss


def _closure_loss(closure: Callable[[], float] | None) -> float | None:
    """What torch optimizers' ``step(closure)`` returns: the closure's loss, computed with gradients on."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def build_optimizer(
    model: nn.Module, kind: str, *, lr: float, weight_decay: float, muon_lr: float = MUON_DEFAULT_LR
) -> torch.optim.Optimizer:
    """The optimizer a run asked for: ``"adamw"`` (:func:`build_adamw`) or ``"muon"`` (:class:`MuonAdamW`).

    Muon orthogonalises whole matrices, so it refuses FSDP2's sharded parameters (DDP is fine: every rank holds
    the whole model).
    """
    if kind == "adamw":
        return build_adamw(model, lr=lr, weight_decay=weight_decay)
    if kind != "muon":
        raise ConfigError.for_field("TrainConfig", "optimizer", kind, f"use one of {', '.join(OPTIMIZERS)}")
    if any(_is_sharded(p) for p in model.parameters()):
        raise ConfigError(
            "optimizer='muon' needs each weight matrix whole, but FSDP shards them across processes; "
            "train with strategy='ddp', or with optimizer='adamw' under FSDP",
            field="optimizer",
        )
    return MuonAdamW(model, lr=lr, muon_lr=muon_lr, weight_decay=weight_decay)


def _is_sharded(p: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support has no shards
        return False
    return isinstance(p, DTensor)


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm; returns the norm before clipping, as a 0-d tensor.

    A tensor, not a float: reading it would make the host wait for the GPU
    mid-step; the trainer reads it together with the loss, in one sync.
    """
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
