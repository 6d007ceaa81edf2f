"""The torch side of distributed training: process groups, DDP and FSDP2 wrapping, sharded checkpoints.

One process per device. :func:`init_process_group` reads torchrun's environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...) and joins the group: NCCL on CUDA, gloo on CPU.
:func:`wrap` puts a :class:`LossModule` around the model and wraps it for a strategy:

- ``ddp``: every rank holds the whole model; gradients are all-reduced in buckets during backward.
- ``fsdp``: FSDP2's ``fully_shard`` on every block, then on the root: each rank holds 1/N of the
  weights, gradients and optimizer state; a block's weights are gathered just before it runs.

Checkpoints go through ``torch.distributed.checkpoint`` (DCP): every rank writes its own shard, and a
checkpoint saved by N processes loads on M (DCP reshards by parameter name).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from forge.core.transformer import Transformer

__all__ = [
    "STRATEGIES",
    "LossModule",
    "Strategy",
    "World",
    "all_mean",
    "all_min",
    "barrier",
    "choose_strategy",
    "clip_grad_norm",
    "destroy_process_group",
    "full_model_state",
    "gradient_sync",
    "init_process_group",
    "load_sharded",
    "save_sharded",
    "shards",
    "training_bytes",
    "unwrap",
    "wrap",
]

Strategy = Literal["auto", "ddp", "fsdp"]
STRATEGIES: tuple[str, ...] = ("auto", "ddp", "fsdp")
#: Bytes per parameter while training in fp32 with AdamW: weights, gradients, and two moments.
_BYTES_PER_PARAM = 16
#: Share of a device's memory the weights, gradients and optimizer may take under DDP; the rest is for activations.
_FIT_SHARE = 0.6


@dataclass(frozen=True, slots=True)
class World:
    """This process's place in the job: its global rank, how many processes, and its rank on this node."""

    rank: int
    size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> World | None:
        """The world torchrun (or ``forge train --nproc``) set up for this process; None outside one.

        >>> World.from_env() is None or World.from_env().size >= 1
        True
        """
        if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
            return None
        rank = int(os.environ["RANK"])
        return cls(rank=rank, size=int(os.environ["WORLD_SIZE"]), local_rank=int(os.environ.get("LOCAL_RANK", rank)))


def init_process_group(world: World, device: torch.device) -> torch.device:
    """Join the process group (NCCL on CUDA, gloo elsewhere); this rank's device."""
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        # NVLink multicast (NVLS) stays off: on shared hosts it has hung collectives (see the device README).
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return device


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class LossModule(nn.Module):
    """The model with ``forward(x, y) -> loss``: DDP and FSDP2 hook a module's forward, not ``model.loss``."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        return self.model.loss(idx, targets, label_smoothing)


def training_bytes(model: nn.Module) -> int:
    """What fp32 AdamW training holds per model copy: weights, gradients and two moments."""
    return _BYTES_PER_PARAM * sum(p.numel() for p in model.parameters() if p.requires_grad)


def _device_bytes(device: torch.device, local_size: int) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    # Processes on one host share its memory.
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(1, local_size)


def choose_strategy(model: nn.Module, device: torch.device, local_size: int) -> tuple[str, str]:
    """``auto``'s pick, and why: DDP when a whole copy of the training state fits on one device, else FSDP2."""
    need, have = training_bytes(model), _device_bytes(device, local_size)
    fits = need <= _FIT_SHARE * have
    verb = "fit" if fits else "do not fit"
    why = (
        f"the model's weights, gradients and optimizer state ({need / 1e9:.2f} GB) {verb} in "
        f"{_FIT_SHARE:.0%} of one {device.type} device's {have / 1e9:.0f} GB"
    )
    return ("ddp" if fits else "fsdp"), why


def _mixed_precision(device: torch.device) -> MixedPrecisionPolicy:
    """bf16 weights and compute on CUDA, gradients reduced in fp32; fp32 everywhere else (exact parity on CPU)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def wrap(model: Transformer, strategy: str, device: torch.device) -> nn.Module:
    """The model (already on ``device``) inside a :class:`LossModule`, wrapped for ``strategy``."""
    root = LossModule(model)
    if strategy == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        # Parameters are all used every step, so no unused-parameter search; the buckets' views alias the grads.
        return DistributedDataParallel(root, device_ids=ids, gradient_as_bucket_view=True)
    if strategy == "fsdp":
        if not shards(strategy):
            # One process has nothing to shard (torchtitan applies FSDP only when dp_shard > 1): FSDP2's
            # per-block copy-in/copy-out and DTensor dispatch made a GPT-2 124M step on one H200 3.6x slower.
            return root
        policy = _mixed_precision(device)
        for block in model.blocks:
            fully_shard(block, mp_policy=policy)
        # The root holds what no block does: the (tied) embedding and output head, and the final norm.
        # Its backward comes first, so it is never resharded in between.
        fully_shard(root, mp_policy=policy, reshard_after_forward=False)
        return root
    raise ValueError(f"unknown strategy {strategy!r}")


def shards(strategy: str) -> bool:
    """Whether ``strategy`` shards the model in this job: FSDP2 with more than one process."""
    return strategy == "fsdp" and dist.is_initialized() and dist.get_world_size() > 1


def unwrap(wrapped: nn.Module) -> LossModule:
    """The :class:`LossModule` under the wrapper; its names (``model.blocks.0...``) are the same for both."""
    inner = wrapped.module if isinstance(wrapped, DistributedDataParallel) else wrapped
    assert isinstance(inner, LossModule)
    return inner


@contextlib.contextmanager
def gradient_sync(wrapped: nn.Module, sync: bool) -> Iterator[None]:
    """Backward passes inside reduce gradients across ranks only if ``sync``: accumulation skips the
    all-reduce (DDP) or reduce-scatter (FSDP2) on every micro-batch but the last."""
    if isinstance(wrapped, DistributedDataParallel):
        with contextlib.nullcontext() if sync else wrapped.no_sync():
            yield
    elif isinstance(wrapped, FSDPModule):
        wrapped.set_requires_gradient_sync(sync)
        yield
    else:
        yield


def all_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` over the ranks (each rank's equal share of the batch counts the same)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= dist.get_world_size()
    return values


def all_min(value: int, device: torch.device) -> int:
    """The smallest ``value`` over the ranks (e.g. the last step each rank's clock allows). Collective."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm, across shards under FSDP2; the norm before clipping, a plain 0-d tensor."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads or not isinstance(grads[0], DTensor):
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    # FSDP2 shards every gradient on dim 0 (Shard(0)), so the global sum of squares is the sum of the
    # ranks' local ones: one all-reduce over plain local tensors. clip_grad_norm_ on the DTensors
    # dispatched each op through DTensor and took 80 ms a step for GPT-2 124M on an H200.
    local = [g.to_local() for g in grads]  # type: ignore[union-attr]
    squares = torch.stack([n.float() for n in torch._foreach_norm(local)]).square().sum()
    dist.all_reduce(squares, group=grads[0].device_mesh.get_group())  # type: ignore[union-attr]
    norm = squares.sqrt()
    torch._foreach_mul_(local, (max_norm / (norm + 1e-6)).clamp(max=1.0))
    return norm


def _state(wrapped: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    model_state, optim_state = get_state_dict(unwrap(wrapped), optimizer)
    return {"model": model_state, "optimizer": optim_state}


def save_sharded(directory: Path, wrapped: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]) -> None:
    """Every rank writes its shard of the model and optimizer (and rank 0 ``extra``) to ``directory``. Collective."""
    state = _state(wrapped, optimizer)
    state["trainer"] = {k: torch.tensor(v) for k, v in extra.items()}
    dcp.save(state, checkpoint_id=str(directory))


def load_sharded(
    directory: Path, wrapped: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, int]
) -> dict[str, int]:
    """Load a checkpoint :func:`save_sharded` wrote, on any number of ranks; its ``extra`` (int values). Collective."""
    state = _state(wrapped, optimizer)
    state["trainer"] = {k: torch.tensor(v) for k, v in extra.items()}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(unwrap(wrapped), optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return {k: int(v) for k, v in state["trainer"].items()}


def full_model_state(wrapped: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU of rank 0 (empty elsewhere), named as the plain model's. Collective."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(unwrap(wrapped), options=options)
    return {k.removeprefix("model."): v for k, v in state.items()}
