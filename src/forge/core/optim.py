"""AdamW with decoupled weight decay applied only where it helps."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["build_adamw", "clip_grad_norm", "param_groups"]


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


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm; returns the norm before clipping, as a 0-d tensor.

    A tensor, not a float: reading it would make the host wait for the GPU
    mid-step; the trainer reads it together with the loss, in one sync.
    """
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
