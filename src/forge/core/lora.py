"""LoRA: low-rank adapters on a frozen model (Hu et al., 2021).

Each adapted weight becomes ``W + (alpha / r) * B @ A`` through a
``torch.nn.utils.parametrize`` parametrization, so every call site that
reads ``module.weight`` (Forge's ops take weights, not modules) sees the
adapted weight without change. ``B`` starts at zero, so an adapted model
starts exactly where the pretrained one was. Only ``A`` and ``B`` train:
for a rank-8 adapter on SmolLM2-135M that is about 1.6% of the parameters.

>>> import torch
>>> from forge.config import get_preset
>>> from forge.core.transformer import Transformer
>>> model = Transformer(get_preset("llama-tiny"))
>>> trainable = apply_lora(model, rank=4)
>>> has_lora(model), trainable < model.num_params() // 10
(True, True)
>>> merge_lora(model); has_lora(model)
False
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from forge.core.transformer import Transformer
from forge.errors import ConfigError

__all__ = [
    "DEFAULT_TARGETS",
    "LoRA",
    "adapter_tensors",
    "apply_lora",
    "attach_adapters",
    "base_copy",
    "has_lora",
    "lora_rank",
    "merge_lora",
    "merged_copy",
    "merged_state_dict",
]

_ORIGINAL = ".parametrizations.weight.original"

#: The linear layers adapted by default: attention in and out, and the MLP.
DEFAULT_TARGETS = ("attn.qkv", "attn.proj", "mlp.up", "mlp.down")


class LoRA(nn.Module):
    """The parametrization ``W -> W + scale * B @ A`` with ``A`` (r, in) and ``B`` (out, r)."""

    def __init__(
        self,
        out_features: int,
        in_features: int,
        rank: int,
        alpha: float,
        *,
        device: torch.device,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        # Drawn on the CPU from ``generator`` (seeded by the run), so a seed gives the same adapters on any device.
        a = torch.empty(rank, in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # as nn.Linear initialises its weight
        self.A = nn.Parameter(a.to(device))
        self.B = nn.Parameter(torch.zeros(out_features, rank, device=device))  # zero: no change at step 0
        self.alpha = alpha
        self.scale = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.B @ self.A * self.scale).to(weight.dtype)  # (out, in)


def apply_lora(
    model: nn.Module,
    *,
    rank: int,
    alpha: float | None = None,
    targets: tuple[str, ...] = DEFAULT_TARGETS,
    generator: torch.Generator | None = None,
) -> int:
    """Freeze ``model`` and adapt its ``targets`` linear layers; returns the number of trainable parameters.

    ``alpha`` defaults to ``2 * rank``, a common choice (scale 2). The adapters'
    ``A`` are drawn from ``generator`` (a CPU generator; the trainer seeds it
    with its ``seed``), else from the global RNG.
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ConfigError(f"LoRA rank must be a positive integer, got {rank!r}; try lora_rank=8", field="lora_rank")
    if has_lora(model):
        raise ConfigError("the model already has LoRA adapters; merge them (merge_lora) before adding new ones")
    alpha = float(2 * rank if alpha is None else alpha)
    for p in model.parameters():
        p.requires_grad_(False)
    adapted = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.endswith(targets):
            out_features, in_features = module.weight.shape
            if rank > min(out_features, in_features):
                raise ConfigError(f"LoRA rank {rank} is larger than layer {name} ({out_features}x{in_features})")
            lora = LoRA(out_features, in_features, rank, alpha, device=module.weight.device, generator=generator)
            parametrize.register_parametrization(module, "weight", lora)
            adapted += 1
    if not adapted:
        raise ConfigError(f"no linear layer matches the LoRA targets {targets}; the defaults are {DEFAULT_TARGETS}")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def has_lora(model: nn.Module) -> bool:
    return any(parametrize.is_parametrized(m, "weight") for m in model.modules() if isinstance(m, nn.Linear))


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its weight and unfreeze the model: a plain model again."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and parametrize.is_parametrized(module, "weight"):
            with torch.no_grad():
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    for p in model.parameters():
        p.requires_grad_(True)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict with every adapter folded in, under the plain parameter names."""
    out: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    for key, value in model.state_dict().items():
        if ".parametrizations.weight." not in key:
            out[key] = value
        elif key.endswith(".parametrizations.weight.original"):
            owner = key.removesuffix(".parametrizations.weight.original")
            with torch.no_grad():
                out[f"{owner}.weight"] = modules[owner].weight.detach()  # the parametrization's W + scale * B @ A
    return out


def merged_copy(model: Transformer) -> Transformer:
    """A plain copy of ``model`` with its adapters merged; ``model`` keeps them (for saving mid-training).

    Not ``copy.deepcopy``: a parametrized module's class is shared with its
    deep copy, and merging the copy would break the original.
    """
    return _plain_copy(model, merged_state_dict(model)) if has_lora(model) else model


def base_copy(model: Transformer) -> Transformer:
    """A plain copy of ``model`` with its frozen weights, the adapters left out (see :func:`adapter_tensors`)."""
    if not has_lora(model):
        return model
    base = {}
    for key, value in model.state_dict().items():
        if key.endswith(_ORIGINAL):
            base[key.removesuffix(_ORIGINAL) + ".weight"] = value
        elif ".parametrizations.weight." not in key:
            base[key] = value
    return _plain_copy(model, base)


def _plain_copy(model: Transformer, state_dict: dict[str, torch.Tensor]) -> Transformer:
    device = next(model.parameters()).device
    with torch.device("meta"):
        clone = Transformer(model.config)
    clone.to_empty(device=device)
    clone.load_state_dict(state_dict)
    clone.tie_weights()
    clone.reset_buffers()
    return clone.train(model.training)


def _adapted(model: nn.Module) -> dict[str, LoRA]:
    return {
        name: module.parametrizations.weight[0]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and parametrize.is_parametrized(module, "weight")
    }


def adapter_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], float]:
    """The adapters of ``model`` as ``{layer}.lora_A`` (r, in) and ``{layer}.lora_B`` (out, r), and their alpha.

    With :func:`base_copy` they are the whole adapted model, exactly: a LoRA run saves both, so a
    resumed run continues the same adapters from the same frozen weights.
    """
    tensors: dict[str, torch.Tensor] = {}
    alpha = 0.0
    for name, lora in _adapted(model).items():
        tensors[f"{name}.lora_A"] = lora.A.detach()
        tensors[f"{name}.lora_B"] = lora.B.detach()
        alpha = lora.alpha
    return tensors, alpha


def attach_adapters(model: nn.Module, tensors: dict[str, torch.Tensor], *, alpha: float) -> None:
    """Adapt ``model`` with saved adapters (from :func:`adapter_tensors`): the inverse of :func:`base_copy` + them."""
    layers = sorted({key.rsplit(".", 1)[0] for key in tensors})
    modules = dict(model.named_modules())
    keys = set(tensors)
    bad = [n for n in layers if not isinstance(modules.get(n), nn.Linear) or {f"{n}.lora_A", f"{n}.lora_B"} - keys]
    ranks = {tensors[f"{n}.lora_A"].shape[0] for n in layers if f"{n}.lora_A" in tensors}
    if bad or len(ranks) != 1:
        raise ConfigError(f"saved LoRA adapters do not fit the model (layers {bad[:3]}, ranks {sorted(ranks)})")
    apply_lora(model, rank=ranks.pop(), alpha=alpha, targets=tuple(layers))
    adapted = _adapted(model)
    if sorted(adapted) != layers:  # a target suffix matched more layers than were saved
        raise ConfigError(f"saved LoRA adapters cover {len(layers)} layers, but they match {len(adapted)}")
    with torch.no_grad():
        for name, lora in adapted.items():
            a, b = tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"]
            if a.shape != lora.A.shape or b.shape != lora.B.shape:
                raise ConfigError(f"saved LoRA adapter of {name} has shapes {tuple(a.shape)}, {tuple(b.shape)}")
            lora.A.copy_(a)
            lora.B.copy_(b)


def lora_rank(model: nn.Module) -> int:
    """The rank of ``model``'s adapters; 0 without any."""
    return next((lora.A.shape[0] for lora in _adapted(model).values()), 0)
