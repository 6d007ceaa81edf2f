"""Training on several processes, GPUs and nodes, through torch.distributed's own launcher (DDP or FSDP2).

:func:`train` starts ``nproc`` workers on this node with ``torch.distributed``'s elastic launcher (what
``torchrun`` runs); each joins the process group (NCCL on CUDA, gloo on CPU) and runs a
:class:`DistributedTrainer`. ``torchrun -m forge train ...`` starts the same workers. Each rank reads its
own share of every global batch, drawn from the seed and the step alone, so a resumed run, on any number
of processes, sees the very batches the uninterrupted one would have.

A checkpoint is Forge's ordinary folder (``forge generate`` and ``Forge.load`` read it) with the sharded
training state beside the weights in ``shards/``, written by every rank through
``torch.distributed.checkpoint``; the whole folder is swapped in atomically, so a crash leaves the last
complete one. Rank 0 alone emits events; the others write their output to ``OUT.logs/rankN.log``.

>>> DistributedConfig(nproc=2).strategy
'auto'
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from forge.config import ModelConfig, bounded, check_specs, choice, documented
from forge.core import distributed as cd
from forge.core.checkpoint import STATE, atomic_directory, check_replaceable
from forge.core.device import resolve_device
from forge.core.transformer import Transformer
from forge.data import TokenDataset
from forge.errors import CheckpointError, ConfigError, ForgeError
from forge.events import CheckpointEvent
from forge.models import load, save
from forge.tokenizer import Tokenizer
from forge.trainer import Listener, TrainConfig, Trainer, TrainResult, prepare_run

__all__ = [
    "SHARDS",
    "DistributedConfig",
    "DistributedTrainer",
    "RunSpec",
    "last_checkpoint_step",
    "launch",
    "logs_dir",
    "run_worker",
    "train",
]

log = logging.getLogger("forge")
#: The sub-folder of a checkpoint that holds the sharded model and optimizer state (DCP's files).
SHARDS = "shards"


@dataclass(frozen=True, slots=True, kw_only=True)
class DistributedConfig:
    """How many processes, on how many nodes, and how the model is spread over them.

    >>> DistributedConfig(nproc=2, strategy="fsdp").nproc
    2
    """

    nproc: int | None = bounded(
        None, integer=True, ge=1, doc="Worker processes on this node (one per GPU); unset: one, no process group."
    )
    nnodes: int = bounded(1, integer=True, ge=1, doc="Nodes in the job; each runs the same command.")
    node_rank: int = bounded(0, integer=True, ge=0, doc="This node's rank, 0 to nnodes - 1 (node 0 hosts the store).")
    rdzv_endpoint: str | None = documented(None, doc="HOST:PORT of node 0, where the nodes meet (multi-node).")
    strategy: str = choice(
        "auto", cd.STRATEGIES, doc="ddp: a model copy per rank; fsdp: FSDP2 shards; auto: ddp if the model fits."
    )

    @property
    def launches(self) -> bool:
        """Whether this asks for worker processes (any ``nproc``, or several nodes)."""
        return self.nproc is not None or self.nnodes > 1

    def __post_init__(self) -> None:
        check_specs(self)
        if self.node_rank >= self.nnodes:
            raise ConfigError.for_field(
                "DistributedConfig", "node_rank", self.node_rank, f"must be below nnodes={self.nnodes}"
            )
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ConfigError(
                f"nnodes={self.nnodes} needs rdzv_endpoint=HOST:PORT, the address of node 0 that every node can "
                "reach (e.g. 10.0.0.1:29500)",
                field="rdzv_endpoint",
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class RunSpec:
    """Everything a worker needs to build its run; plain values, so it crosses to spawned processes."""

    data: str | tuple[str, ...]
    config: TrainConfig
    out: str
    preset: str | ModelConfig = "tiny"
    resume: str | None = None
    model: str | None = None
    tokenizer: str = "bpe"
    vocab_size: int | None = None
    device: str = "auto"
    strategy: str = "auto"


def logs_dir(out: str | os.PathLike[str]) -> Path:
    """Where ranks other than 0 write their output: ``OUT.logs`` beside the checkpoint (which is swapped whole)."""
    path = Path(out)
    return path.with_name(path.name + ".logs")


class DistributedTrainer(Trainer):
    """A :class:`Trainer` whose model is wrapped for DDP or FSDP2 and whose steps and checkpoints are collective."""

    keeps_best = False  # the ranks' copies (or shards) would have to agree on it: the last weights are kept

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        dataset: TokenDataset,
        config: TrainConfig,
        *,
        world: cd.World,
        device: torch.device,
        strategy: str = "auto",
        out: str | os.PathLike[str] | None = None,
        listeners: Iterable[Listener] = (),
        meta: dict[str, Any] | None = None,
    ) -> None:
        if config.lora_rank:
            raise ConfigError(
                "lora_rank with several processes is not supported yet: LoRA fine-tunes fit on one device; "
                "train it without nproc",
                field="lora_rank",
            )
        self.world, self.requested = world, strategy
        super().__init__(model, tokenizer, dataset, config, device=device, out=out, listeners=listeners, meta=meta)

    def _build_step(self, model: Transformer) -> None:
        if self.requested == "auto":
            local = int(os.environ.get("LOCAL_WORLD_SIZE", self.world.size))
            self.strategy, self.why = cd.choose_strategy(model, self.device, local)
        else:
            self.strategy, self.why = self.requested, f"{self.requested} was asked for"
        sharded = cd.shards(self.strategy)
        if self.strategy == "fsdp" and not sharded:
            self.why += "; one process holds the whole model, so nothing is sharded"
        if self.compiled and sharded:
            # As torchtitan does: each block compiled before fully_shard, so FSDP2's all-gather and
            # reduce-scatter hooks stay outside the compiled graphs (compiling the whole sharded module
            # broke its graph at every hook: 0.42x the plain trainer on one H200).
            for block in model.blocks:
                block.compile(dynamic=False)
        self.wrapped = cd.wrap(model, self.strategy, self.device)
        # After fully_shard: the optimizer holds (and updates) this rank's shards only.
        super()._build_step(model)
        whole = self.compiled and not sharded
        self._loss = torch.compile(self.wrapped, dynamic=False) if whole else self.wrapped

    @property
    def _tokens_per_step(self) -> int:
        return super()._tokens_per_step * self.world.size

    def _batch(self, split: str, index: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.dataset.shard_batch(
            split,  # type: ignore[arg-type]
            self.config.batch_size,
            self.context,
            seed=seed,
            index=index,
            rank=self.world.rank,
            world_size=self.world.size,
        )
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _train_batch(self, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        # This rank's share of the step's global micro-batch, from the seed and the step alone.
        return self._batch("train", self.step * self.config.grad_accum + micro, self.config.seed)

    def _gradient_sync(self, *, last: bool) -> contextlib.AbstractContextManager[None]:
        # Gradients cross ranks once a step, on the last micro-batch's backward.
        return cd.gradient_sync(self.wrapped, last)

    def _clip(self, max_norm: float) -> torch.Tensor:
        return cd.clip_grad_norm(self.model, max_norm)

    def _step_loss(self, total: torch.Tensor) -> torch.Tensor:
        return cd.all_mean(total)

    def _planned_total(self, t0: float) -> int:
        # Under a time budget each rank plans from its own clock; all stop at the earliest plan.
        return cd.all_min(super()._planned_total(t0), self.device)

    def _replan(self, t0: float, step_seconds: float) -> int:
        total = super()._replan(t0, step_seconds)
        agreed = cd.all_min(total, self.device)
        if agreed != total:  # warm down to the step every rank stops at
            self.schedule = self.config.schedule_for(max(1, agreed - self.schedule_origin))
        return agreed

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over ``eval_batches`` fixed global batches, each rank its share. Collective."""
        was_training = self.model.training
        self.model.eval()
        losses = []
        for i in range(self.config.eval_batches):
            x, y = self._batch("val", i, self.config.seed + 1)
            with self._autocast():
                losses.append(self._loss(x, y).float())
        self.model.train(was_training)
        return float(cd.all_mean(torch.stack(losses).mean()))

    def state_dict(self) -> dict[str, Any]:
        """What the ordinary checkpoint records; the optimizer's state is in the shards."""
        return {
            "step": self.step,
            "train_config": self.config.to_dict(),
            "metrics": {"train_loss": self.result.train_loss, "val_loss": self.result.val_loss},
            "distributed": {"world_size": self.world.size, "strategy": self.strategy},
        }

    def load_sharded(self, checkpoint: str | os.PathLike[str]) -> None:
        """Continue from a checkpoint a distributed run wrote, whatever its number of processes. Collective."""
        shards = Path(checkpoint) / SHARDS
        if not (shards / ".metadata").is_file():
            raise CheckpointError(
                f"checkpoint {str(checkpoint)!r} has no sharded training state ({SHARDS}/); it was not written by "
                "a distributed run: resume it without nproc, or start from its weights "
                f"(`forge train DATA --model {checkpoint}`)"
            )
        self.step = cd.load_sharded(shards, self.wrapped, self.optimizer, {"step": 0})["step"]
        self.result.step = self.step

    def _finish(self, t0: float) -> TrainResult:
        if self.result.interrupted:  # ranks stop at different points: no collective save, the last one stands
            raise KeyboardInterrupt
        return super()._finish(t0)

    def _save(self) -> None:
        """Every rank writes its shards into one temporary folder, rank 0 the weights; then it is swapped in."""
        assert self.out is not None
        with contextlib.ExitStack() as stack:
            tmp = stack.enter_context(atomic_directory(self.out)) if self.world.is_main else None
            names = [str(tmp) if tmp is not None else None]
            dist.broadcast_object_list(names, src=0)
            folder = Path(str(names[0]))
            cd.save_sharded(folder / SHARDS, self.wrapped, self.optimizer, {"step": self.step})
            weights = cd.full_model_state(self.wrapped)
            if self.world.is_main:
                self._write_plain(folder, weights)
        cd.barrier()  # every rank returns with the checkpoint in place
        self.result.checkpoint = self.out
        self.emit(CheckpointEvent(step=self.step, path=str(self.out)))

    def _write_plain(self, folder: Path, weights: dict[str, torch.Tensor]) -> None:
        """Forge's ordinary checkpoint files (weights, tokenizer, manifest) into ``folder``."""
        plain = Transformer(self.model.config)
        plain.load_state_dict(weights)
        staged = folder / ".plain"
        save(staged, plain, self.tokenizer, training_state=self.state_dict(), meta=self.meta)
        for file in staged.iterdir():
            os.replace(file, folder / file.name)
        staged.rmdir()


def _redirect_output(out: str, rank: int) -> None:
    """Send this process's stdout and stderr (Python's and C's) to ``OUT.logs/rankN.log``."""
    folder = logs_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for stream in (1, 2):
        os.dup2(fd, stream)
    os.close(fd)


def run_worker(
    spec: RunSpec, *, listeners: Iterable[Listener] = (), announce: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """One rank's share of a run (called in each process torchrun or :func:`launch` started); a summary.

    ``listeners`` and ``announce`` (told the strategy chosen) are used on rank 0 only.
    """
    world = cd.World.from_env()
    if world is None:
        raise ConfigError("run_worker runs in a process torchrun started (RANK and WORLD_SIZE are not set)")
    if not world.is_main:
        _redirect_output(spec.out, world.rank)
    # Forge's blocks return (x, delta) views that are only ever used out of place, which FSDP2 warns of on
    # every step; the parity tests check the gradients. A worker process is ours, so its filter is too.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    device = cd.init_process_group(world, resolve_device(spec.device))
    try:
        return _run(spec, world, device, list(listeners) if world.is_main else [], announce)
    finally:
        cd.destroy_process_group()


def _run(
    spec: RunSpec,
    world: cd.World,
    device: torch.device,
    listeners: list[Listener],
    announce: Callable[[str], None] | None,
) -> dict[str, Any]:
    data: Any = spec.data if isinstance(spec.data, str) else list(spec.data)
    pretrained = load(spec.model) if spec.model is not None else None
    prepared = None
    for turn in range(2):  # rank 0 first: it writes the tokenizer and token caches the others then read
        if (turn == 0) == world.is_main:
            prepared = prepare_run(
                data,
                preset=spec.preset,
                resume=spec.resume,
                model=pretrained.model if pretrained else None,
                tokenizer=pretrained.tokenizer if pretrained else spec.tokenizer,  # type: ignore[arg-type]
                vocab_size=spec.vocab_size,
                config=spec.config,
            )
        cd.barrier()
    assert prepared is not None
    trainer = DistributedTrainer(
        prepared.model,
        prepared.tokenizer,
        prepared.dataset,
        prepared.config,
        world=world,
        device=device,
        strategy=spec.strategy,
        out=spec.out,
        listeners=listeners,
        meta={"data": prepared.corpus.label},
    )
    if world.is_main and announce is not None:
        backend = dist.get_backend() if dist.is_initialized() else "none"
        announce(f"{world.size} processes ({backend}), strategy {trainer.strategy}: {trainer.why}")
    if spec.resume is not None:
        trainer.load_sharded(spec.resume)
    result = trainer.run()
    return {
        "step": result.step,
        "losses": result.losses,
        "evals": result.evals,
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        "strategy": trainer.strategy,
    }


def _launch_config(config: DistributedConfig, run_id: str | None) -> LaunchConfig:
    if config.rdzv_endpoint:  # several nodes, each started with the same command: node 0 hosts the store
        backend, endpoint, rdzv = "static", config.rdzv_endpoint, {"rank": config.node_rank}
    else:  # one node: a store on a free local port, as `torchrun --standalone`
        backend, endpoint, rdzv = "c10d", "localhost:0", {}
    return LaunchConfig(
        min_nodes=config.nnodes,
        max_nodes=config.nnodes,
        nproc_per_node=config.nproc or 1,
        run_id=run_id or f"forge-{uuid.uuid4().hex[:8]}",
        role="forge",
        rdzv_endpoint=endpoint,
        rdzv_backend=backend,
        rdzv_configs=rdzv,
        max_restarts=0,  # a crashed rank ends the run; resume from the last checkpoint
        monitor_interval=0.1,
        start_method="spawn",
    )


@contextlib.contextmanager
def _worker_environment(nproc: int) -> Iterator[None]:
    """Threads split between the workers (as torchrun does) and NVLink multicast off, for the launch only."""
    cores = os.cpu_count() or 1
    wanted = {"OMP_NUM_THREADS": str(max(1, cores // nproc)), "NCCL_NVLS_ENABLE": "0"}
    added = {k: v for k, v in wanted.items() if k not in os.environ}
    os.environ.update(added)
    # The agent's chatter ("Received 2 death signal, shutting down workers"): failures come back as one line.
    names = [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed.elastic")]
    quiet = [logging.getLogger(n) for n in ["torch.distributed.elastic", *names]]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for q, level in zip(quiet, levels, strict=True):
            q.setLevel(level)
        for k in added:
            os.environ.pop(k, None)


def launch(
    entry: Callable[..., Any], args: tuple[Any, ...], config: DistributedConfig, *, out: str | os.PathLike[str]
) -> dict[int, Any]:
    """Run ``entry(*args)`` in ``config.nproc`` processes through torch.distributed's launcher; each rank's value.

    A rank that crashes (or is killed) ends the run: the others are stopped and a :class:`ForgeError` says
    which rank, where its log is, and the last checkpoint to resume from. Ctrl-C raises KeyboardInterrupt.
    """
    with _worker_environment(config.nproc or 1):
        try:
            return elastic_launch(_launch_config(config, None), entry)(*args)
        except ChildFailedError as e:
            raise ForgeError(_failure_message(e, Path(out))) from None
        except Exception as e:  # the agent's SignalException: the launcher was signalled (Ctrl-C, SIGTERM)
            if type(e).__name__ == "SignalException":
                raise KeyboardInterrupt from None
            raise


def last_checkpoint_step(out: Path) -> int | None:
    """The step of the checkpoint at ``out``, or None if there is none."""
    try:
        return int(torch.load(out / STATE, weights_only=True)["step"])
    except Exception:
        return None


def _failure_message(error: Any, out: Path) -> str:
    failures = error.failures
    if all(f.exitcode == 130 for f in failures.values()):
        raise KeyboardInterrupt

    # The cause, not its echoes: a rank killed by a signal other than the agent's SIGTERM, else the first.
    def rank_of(item: tuple[int, Any]) -> tuple[bool, float]:
        f = item[1]
        return (not (f.exitcode < 0 and f.exitcode != -signal.SIGTERM), f.timestamp)

    rank, failure = min(failures.items(), key=rank_of)
    how = f"was killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exited with code {failure.exitcode}"
    where = f"its output is in {logs_dir(out) / f'rank{rank}.log'}" if rank else "its error is above"
    step = last_checkpoint_step(out)
    last = (
        f"the last checkpoint (step {step}) is intact in {out}: continue with --resume {out}, on any number of "
        "processes"
        if step is not None
        else "no checkpoint had been saved yet (set checkpoint_every to save during the run)"
    )
    return f"the distributed run stopped: rank {rank} {how} ({where}); {last}"


def _entry(spec: RunSpec) -> dict[str, Any]:
    """The worker of :func:`train`: no listeners cross processes, so rank 0 logs the strategy and that is all."""
    try:
        return run_worker(spec, announce=log.info)
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def train(
    data: str | os.PathLike[str] | list[str],
    *,
    out: str | os.PathLike[str],
    nproc: int = 2,
    strategy: str = "auto",
    preset: str | ModelConfig = "tiny",
    resume: str | os.PathLike[str] | None = None,
    tokenizer: str = "bpe",
    vocab_size: int | None = None,
    device: str = "auto",
    config: TrainConfig | None = None,
    **options: Any,
) -> TrainResult:
    """Train on ``nproc`` processes of this machine; the result, its model loaded from the checkpoint at ``out``.

    ``options`` are :class:`TrainConfig` fields. The global batch is ``batch_size * nproc * grad_accum``
    sequences. For several nodes, use ``forge train --nnodes`` or torchrun.
    """
    dist_config = DistributedConfig(nproc=nproc, strategy=strategy)
    config = dataclasses.replace(config, **options) if config else TrainConfig(**options)
    resolve_device(device)
    check_replaceable(Path(out))
    spec = RunSpec(
        data=str(data) if isinstance(data, (str, os.PathLike)) else tuple(data),
        config=config,
        out=str(out),
        preset=preset,
        resume=str(resume) if resume is not None else None,
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        device=device,
        strategy=strategy,
    )
    summary = launch(_entry, (spec,), dist_config, out=out)[0]
    loaded = load(out, with_state=True)
    return TrainResult(
        model=loaded.model,
        tokenizer=loaded.tokenizer,
        step=summary["step"],
        losses=[tuple(x) for x in summary["losses"]],  # type: ignore[misc]
        evals=[tuple(x) for x in summary["evals"]],  # type: ignore[misc]
        checkpoint=Path(out),
        state=loaded.training_state,
    )
