"""The training loop and its events.

>>> result = train(["to be or not to be, that is the question. " * 200], preset="tiny",
...                steps=2, batch_size=2, context=16, tokenizer="char", eval_every=0)
>>> result.step
2
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from forge.budget import TimePlan, compile_pays, parse_duration
from forge.config import DTYPE_ALIASES, ModelConfig, bounded, check_specs, choice, documented
from forge.core.checkpoint import check_replaceable
from forge.core.device import autocast_dtype, resolve_device
from forge.core.lora import apply_lora, has_lora, lora_rank, merge_lora
from forge.core.optim import MUON_DEFAULT_LR, OPTIMIZERS, OptimizerKind, build_optimizer, clip_grad_norm
from forge.core.schedule import Schedule, ScheduleKind
from forge.core.transformer import Transformer
from forge.data import DataSource, TokenDataset
from forge.errors import ConfigError
from forge.events import CheckpointEvent, EndEvent, EvalEvent, Event, StartEvent, StepEvent
from forge.models import save
from forge.runs import BestWeights, PreparedRun, auto_preset, prepare_run
from forge.tokenizer import Tokenizer, TokenizerKind

__all__ = [
    "DEFAULT_STEPS",
    "PreparedRun",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "auto_preset",
    "prepare_run",
    "train",
]

log = logging.getLogger("forge")
#: Training precision in the one dtype vocabulary (``bf16`` and ``fp32`` are accepted as aliases).
Precision = Literal["auto", "float32", "bfloat16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
Listener = Callable[[Event], None]
#: Steps in total when neither ``steps`` nor a time budget is given.
DEFAULT_STEPS = 1000


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainConfig:
    """How to train. ``steps`` counts optimizer steps in total, across resumes.

    Each field is defined once, with its bounds (``forge.config.bounded``); ``forge train``'s flags are built
    from them.

    A time budget (``time="2m"``, or ``max_seconds=120``) plans the steps from the measured step time; with
    ``steps`` too, the run ends at whichever comes first, and its schedule is planned for that.

    >>> TrainConfig(steps=100).warmup_steps, TrainConfig(time="1m30s").budget
    (10, 90.0)
    """

    steps: int | None = bounded(
        None,
        integer=True,
        ge=1,
        doc=f"Optimizer steps in total, counting a resumed run's; unset: as many as fit in time, else {DEFAULT_STEPS}.",
    )
    batch_size: int = bounded(16, integer=True, ge=1, doc="Sequences per micro-batch.")
    context: int | None = bounded(None, integer=True, ge=1, doc="Tokens per window; unset: the model's context.")
    lr: float = bounded(1e-3, gt=0, doc="Peak learning rate.")
    min_lr: float | None = bounded(None, ge=0, doc="Learning rate at the end; unset: lr / 10.")
    warmup: int | None = bounded(None, integer=True, ge=0, doc="Warmup steps; unset: 10% of steps, at most 100.")
    schedule: ScheduleKind = choice("cosine", get_args(ScheduleKind), doc="Learning-rate schedule after warmup.")
    weight_decay: float = bounded(0.1, ge=0, doc="AdamW weight decay.")
    optimizer: OptimizerKind = choice(
        "adamw", OPTIMIZERS, doc="adamw; or muon: Muon for the hidden matrices, AdamW for the rest."
    )
    muon_lr: float = bounded(MUON_DEFAULT_LR, gt=0, doc="Muon's peak learning rate (with optimizer=muon).")
    grad_clip: float | None = bounded(1.0, gt=0, optional=True, doc="Clip the gradient norm to this (None: off).")
    label_smoothing: float = bounded(0.0, ge=0, lt=1, doc="Target mass spread over the vocabulary (training loss).")
    grad_accum: int = bounded(1, integer=True, ge=1, doc="Micro-batches per optimizer step.")
    eval_every: int = bounded(100, integer=True, ge=0, doc="Evaluate every N steps; 0: at the start and end only.")
    eval_batches: int = bounded(10, integer=True, ge=1, doc="Validation batches per evaluation.")
    keep_best: bool = documented(
        True, doc="End with the weights of the best evaluation when later steps overfit (a small text, a long run)."
    )
    val_fraction: float = bounded(0.1, gt=0, lt=1, doc="Share of the corpus held out for validation.")
    checkpoint_every: int = bounded(0, integer=True, ge=0, doc="Save every N steps; 0: at the end (and on Ctrl-C).")
    seed: int = bounded(1337, integer=True, doc="Seeds the model, the batches and LoRA adapters.")
    precision: Precision = choice(
        "auto",
        PRECISIONS,
        aliases=DTYPE_ALIASES,
        doc="Autocast dtype (weights stay float32); auto: bfloat16 where the hardware runs it natively.",
    )
    gradient_checkpointing: bool = documented(False, doc="Recompute activations to save memory.")
    compile: bool | None = documented(None, doc="torch.compile the training step; None: CUDA, CPU budgets >= 90 s.")
    lora_rank: int = bounded(0, integer=True, ge=0, doc="LoRA rank: > 0 trains adapters, merged at the end; 0: all.")
    lora_alpha: float | None = bounded(None, gt=0, doc="LoRA scale numerator; unset: 2 * lora_rank.")
    max_seconds: float | None = bounded(None, gt=0, doc="Time budget in seconds (the same as time, as a number).")
    time: str | float | None = documented(
        None,
        doc="Wall-clock budget, e.g. 90s, 2m, 1h, 1m30s: the schedule is planned from the measured step time to "
        "warm down at the last step, and the run ends on time with its final evaluation and checkpoint.",
    )

    def __post_init__(self) -> None:
        check_specs(self)
        if self.time is not None:
            parse_duration(self.time)  # a bad duration fails here, naming the value
            if self.max_seconds is not None:
                raise ConfigError(
                    f"time={self.time!r} and max_seconds={self.max_seconds} both set the time budget; pass one",
                    field="time",
                )

    @property
    def budget(self) -> float | None:
        """The time budget in seconds, if any."""
        return parse_duration(self.time) if self.time is not None else self.max_seconds

    @property
    def total_steps(self) -> int | None:
        """The step count to stop at: ``steps``; unset, ``DEFAULT_STEPS`` without a budget and none with one."""
        if self.steps is not None:
            return self.steps
        return None if self.budget is not None else DEFAULT_STEPS

    @property
    def warmup_steps(self) -> int:
        return self.warmup_for(self.total_steps or DEFAULT_STEPS)

    def warmup_for(self, total: int) -> int:
        """Warm-up steps for a run of ``total`` steps: ``warmup``, else 10% of them, at most 100."""
        return self.warmup if self.warmup is not None else min(100, total // 10)

    def schedule_for(self, total: int | None = None) -> Schedule:
        """The schedule of a run of ``total`` steps (unset: ``total_steps``)."""
        total = total or self.total_steps or DEFAULT_STEPS
        min_lr = self.min_lr if self.min_lr is not None else self.lr / 10
        return Schedule(kind=self.schedule, lr=self.lr, min_lr=min_lr, warmup=self.warmup_for(total), total=total)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    """What a run did. ``losses`` holds (step, train loss); ``evals`` holds (step, val loss)."""

    model: Transformer
    tokenizer: Tokenizer
    step: int
    losses: list[tuple[int, float]] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)
    interrupted: bool = False
    checkpoint: Path | None = None
    #: The trainer's state at the end (optimizer, step, RNG): continue from it with ``train(state=...)``.
    state: dict[str, Any] | None = field(default=None, repr=False)
    #: Seconds: ``budget`` (or None), ``prepare`` (before the clock), ``steps``, ``eval``, ``checkpoint``, ``total``.
    timing: dict[str, float | None] = field(default_factory=dict)
    #: What ``preset="auto"`` picked and why (None for another preset).
    auto: str | None = None
    #: (step, val loss) of the weights the run ended with, when ``keep_best`` put an earlier step's back.
    kept: tuple[int, float] | None = None

    @property
    def train_loss(self) -> float | None:
        return self.losses[-1][1] if self.losses else None

    @property
    def val_loss(self) -> float | None:
        """The validation loss of the weights the run ended with."""
        if self.kept is not None:
            return self.kept[1]
        return self.evals[-1][1] if self.evals else None


class Trainer:
    """Runs optimizer steps on a model over a token dataset, emitting events."""

    #: Whether ``keep_best`` applies (a sharded model's weights are not this process's to copy whole).
    keeps_best = True

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        dataset: TokenDataset,
        config: TrainConfig,
        *,
        device: torch.device,
        out: str | os.PathLike[str] | None = None,
        listeners: Iterable[Listener] = (),
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.context = config.context or model.config.context_length
        if self.context > model.config.context_length:
            raise ConfigError(
                f"context={self.context} is longer than the model's context of {model.config.context_length}; "
                f"use context={model.config.context_length} or less",
                field="context",
            )
        dataset.check_context(self.context)
        self.model = model.to(device)
        self.tokenizer, self.dataset, self.device = tokenizer, dataset, device
        self.out = Path(out) if out is not None else None
        if self.out is not None:
            check_replaceable(self.out)  # before training, not at the first save: never the user's own folder
        self.listeners = list(listeners)
        self.meta = meta or {}
        self.dtype = _precision(config.precision, device)
        #: Whether the model came with adapters (a resumed LoRA run): their optimizer state then applies.
        self.resumed_adapters = has_lora(model)
        if self.resumed_adapters and lora_rank(model) != config.lora_rank:
            raise ConfigError(
                f"the model has rank-{lora_rank(model)} LoRA adapters but lora_rank is {config.lora_rank}; "
                f"continue them with lora_rank={lora_rank(model)}, or merge them (merge_lora) first",
                field="lora_rank",
            )
        if config.lora_rank and not self.resumed_adapters:
            # Seeded by the run, not the global RNG: the same seed gives the same adapters and losses.
            generator = torch.Generator().manual_seed(config.seed)
            apply_lora(model, rank=config.lora_rank, alpha=config.lora_alpha, generator=generator)
        self.compiled = config.compile if config.compile is not None else compile_pays(device.type, config.budget)
        self._build_step(model)
        self.schedule = config.schedule_for()
        #: The step the schedule counts from: a time-budgeted run warms up and down within its own budget.
        self.schedule_origin = 0
        self.plan: TimePlan | None = None
        self.timing: dict[str, float] = {"eval": 0.0, "checkpoint": 0.0}
        self.data_rng = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.result = TrainResult(model=model, tokenizer=tokenizer, step=0)
        self.best = BestWeights() if config.keep_best and self.keeps_best else None

    def _build_step(self, model: Transformer) -> None:
        """The optimizer and the loss function the steps call (a distributed trainer wraps the model first)."""
        cfg = self.config
        self.optimizer = build_optimizer(
            model, cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay, muon_lr=cfg.muon_lr
        )
        # Fixed-shape windows. Eval (no grad: a 2nd graph) compiles on CUDA only: on a CPU it costs more than it saves.
        self._loss = torch.compile(model.loss, dynamic=False) if self.compiled else model.loss
        self._eval_loss = self._loss if self.device.type == "cuda" else model.loss

    # -- state --------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "step": self.step,
            # A LoRA run's checkpoint holds its adapters, so their optimizer state resumes with them.
            "optimizer": self.optimizer.state_dict(),
            "lora_rank": self.config.lora_rank,
            "rng_torch": torch.get_rng_state(),
            "rng_data": self.data_rng.get_state(),
            "train_config": self.config.to_dict(),
            "metrics": {"train_loss": self.result.train_loss, "val_loss": self.result.val_loss},
        }
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        # Optimizer state fits only the same parameters: all weights, or the very adapters it was saved with.
        same_params = state.get("lora_rank", 0) == self.config.lora_rank and (
            not self.config.lora_rank or self.resumed_adapters
        )
        if "optimizer" in state and same_params:
            self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_torch"])
        self.data_rng.set_state(state["rng_data"])
        if "rng_cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)
        self.result.step = self.step

    # -- events -------------------------------------------------------------
    def emit(self, event: Event) -> None:
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:  # a listener's bug must never kill a training run
                log.exception("listener %r failed on %s event", listener, event.name)

    # -- loop -----------------------------------------------------------------
    def run(self) -> TrainResult:
        """Train up to ``steps`` in total, or for the time budget, evaluating and saving on the way."""
        cfg = self.config
        cap = cfg.total_steps
        if cap is not None and self.step >= cap:
            raise ConfigError(
                f"steps={cap} trains nothing: the checkpoint is already at step {self.step}; "
                f"steps counts in total, so pass a number above {self.step}",
                field="steps",
            )
        self.model.train()
        self.model.gradient_checkpointing = cfg.gradient_checkpointing
        t0 = time.perf_counter()
        budget = cfg.budget
        if budget is not None:  # the schedule counts from here, planned once the first step is timed
            self.plan = TimePlan(budget=budget, start_step=self.step, cap=cap, eval_every=cfg.eval_every)
            self.schedule_origin = self.step
            # Saving the weights and AdamW's two moments at the end: an estimate, in seconds.
            self._save_cost = self.model.num_params() * 4 * 3 / 2e8 + 0.05 if self.out else 0.0
        self._emit_start(self._planned_total(t0))
        tf32 = torch.backends.cuda.matmul.allow_tf32
        # TF32 for any fp32 matmul left outside autocast (3x the fp32 rate on Ampere and later);
        # a process-wide flag, so only for the length of the run.
        torch.backends.cuda.matmul.allow_tf32 = self.device.type == "cuda" or tf32
        try:
            if self.step == 0 and self.plan is None:  # a budget is better spent on steps
                self._evaluate()
            self._steps(t0)
        except KeyboardInterrupt:
            self.result.interrupted = True
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        return self._finish(t0)

    @property
    def _tokens_per_step(self) -> int:
        return self.config.batch_size * self.context * self.config.grad_accum

    def _emit_start(self, total: int) -> None:
        self.emit(
            StartEvent(
                start_step=self.step,
                total_steps=total,
                parameters=self.model.num_params(),
                device=str(self.device),
                precision=str(self.dtype).removeprefix("torch.") if self.dtype else "float32",
                compiled=self.compiled,
                train_tokens=self.dataset.split_size("train"),
                val_tokens=self.dataset.split_size("val"),
                tokens_per_step=self._tokens_per_step,
            )
        )

    def _planned_total(self, t0: float) -> int:
        """The step to end at: the step count, or as many steps as the time left holds (planned again each step)."""
        if self.plan is None:
            return self.config.total_steps or DEFAULT_STEPS
        return self.plan.total(step=self.step, elapsed=time.perf_counter() - t0)

    def _replan(self, t0: float, step_seconds: float) -> int:
        """Time the step just taken, and plan the schedule again so that it warms down at the new last step."""
        assert self.plan is not None
        plan = self.plan
        plan.observe(step_seconds)
        assert plan.step_time is not None  # the final evaluation and checkpoint: measured, or estimated
        evals = self.result.evals
        plan.eval_cost = self.timing["eval"] / len(evals) if evals else plan.step_time * self.config.eval_batches / 3
        plan.reserve = plan.eval_cost + self._save_cost
        total = plan.total(step=self.step, elapsed=time.perf_counter() - t0)
        self.schedule = self.config.schedule_for(max(1, total - self.schedule_origin))
        return total

    def _steps(self, t0: float) -> None:
        """Optimizer steps up to the last, or until the time budget is spent; ``t0``: when the run started."""
        cfg = self.config
        first_step = self.step
        total = self._planned_total(t0)
        while self.step < total:
            started = time.perf_counter()
            loss, lr, grad_norm = self._undoable_step()
            self.step += 1
            if self.plan is not None:
                total = self._replan(t0, time.perf_counter() - started)
            self.result.losses.append((self.step, loss))
            elapsed = time.perf_counter() - t0
            done = self.step - first_step
            self.emit(
                StepEvent(
                    step=self.step,
                    total_steps=total,
                    loss=loss,
                    lr=lr,
                    grad_norm=grad_norm,
                    tokens_per_sec=done * self._tokens_per_step / max(elapsed, 1e-9),
                    elapsed=elapsed,
                    eta=elapsed / done * (total - self.step),
                )
            )
            last = self.step >= total
            if last or (cfg.eval_every and self.step % cfg.eval_every == 0):
                self._evaluate()
            if self.out and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and not last:
                self._save()

    def _undoable_step(self) -> tuple[float, float, float]:
        """One optimizer step; Ctrl-C during it puts back the half-drawn batches, so that a resume sees exactly
        the next step's data."""
        data_state = self.data_rng.get_state()
        try:
            return self._train_step()
        except KeyboardInterrupt:
            self.data_rng.set_state(data_state)
            self.optimizer.zero_grad(set_to_none=True)
            raise

    def _finish(self, t0: float) -> TrainResult:
        """Save, fold the adapters in, and report the end; the result."""
        if self.best is not None and self.result.evals and self.result.evals[-1][0] == self.step:
            self.result.kept = self.best.restore(self.model, self.result.evals[-1][1])
        if self.out:
            self._save()
        self.result.step = self.step
        self.result.state = self.state_dict()
        total = time.perf_counter() - t0
        self.result.timing.update(
            budget=self.config.budget,
            total=total,
            steps=total - self.timing["eval"] - self.timing["checkpoint"],
            **self.timing,
        )
        if has_lora(self.model):  # the result is a plain model: the adapters folded into its weights
            merge_lora(self.model)
        self.emit(
            EndEvent(
                step=self.step,
                train_loss=self.result.train_loss,
                val_loss=self.result.val_loss,
                elapsed=time.perf_counter() - t0,
                interrupted=self.result.interrupted,
                kept_step=self.result.kept[0] if self.result.kept else None,
            )
        )
        self.model.eval()
        return self.result

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def _train_step(self) -> tuple[float, float, float]:
        cfg = self.config
        lr = self.schedule(self.step - self.schedule_origin)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's groups peak at muon_lr
        total = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            x, y = self._train_batch(micro)
            with self._gradient_sync(last=micro == cfg.grad_accum - 1):
                with self._autocast():
                    loss = self._loss(x, y, cfg.label_smoothing) / cfg.grad_accum
                loss.backward()
            total += loss.detach()
        grad_norm = self._clip(cfg.grad_clip) if cfg.grad_clip else torch.full((), float("nan"), device=self.device)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # One host-device sync per step, after the optimizer's kernels are queued.
        loss, norm = torch.stack([self._step_loss(total), grad_norm.to(total.dtype)]).tolist()
        return loss, lr, norm

    # Hooks of the step, which forge.distributed's trainer overrides.
    def _train_batch(self, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-batch ``micro`` of this step, on the device: random windows from the data RNG."""
        x, y = self.dataset.batch("train", self.config.batch_size, self.context, self.data_rng)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _gradient_sync(self, *, last: bool) -> contextlib.AbstractContextManager[None]:
        """Around a micro-batch's forward and backward (one process: nothing to synchronize)."""
        return contextlib.nullcontext()

    def _clip(self, max_norm: float) -> torch.Tensor:
        return clip_grad_norm(self.model, max_norm)

    def _step_loss(self, total: torch.Tensor) -> torch.Tensor:
        """The step's loss as reported (one process: its own)."""
        return total

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over ``eval_batches`` fixed windows (the same every time)."""
        was_training = self.model.training
        self.model.eval()
        rng = torch.Generator().manual_seed(self.config.seed + 1)
        losses = []
        for _ in range(self.config.eval_batches):
            x, y = self.dataset.batch("val", self.config.batch_size, self.context, rng)
            with self._autocast():
                losses.append(float(self._eval_loss(x.to(self.device), y.to(self.device))))
        self.model.train(was_training)
        return sum(losses) / len(losses)

    def _evaluate(self) -> None:
        started = time.perf_counter()
        val = self.evaluate()
        self.timing["eval"] += time.perf_counter() - started
        self.result.evals.append((self.step, val))
        if self.best is not None:
            self.best.offer(self.model, self.step, val)
        self.emit(EvalEvent(step=self.step, val_loss=val, val_perplexity=math.exp(min(val, 50.0))))

    def _save(self) -> None:
        assert self.out is not None
        started = time.perf_counter()
        save(self.out, self.model, self.tokenizer, training_state=self.state_dict(), meta=self.meta)
        self.timing["checkpoint"] += time.perf_counter() - started
        self.result.checkpoint = self.out
        self.emit(CheckpointEvent(step=self.step, path=str(self.out)))


def _precision(precision: Precision, device: torch.device) -> torch.dtype | None:
    native = autocast_dtype(device)
    if precision == "float32":
        return None
    if precision == "bfloat16":
        if native is None:
            raise ConfigError(
                f"precision='bfloat16' (bf16) is not supported natively on {device}; use precision='float32' or 'auto'",
                field="precision",
            )
        return torch.bfloat16
    return native


def train(
    data: DataSource,
    *,
    preset: str | ModelConfig = "tiny",
    out: str | os.PathLike[str] | None = None,
    resume: str | os.PathLike[str] | None = None,
    model: Transformer | None = None,
    state: dict[str, Any] | None = None,
    tokenizer: TokenizerKind | Tokenizer = "bpe",
    vocab_size: int | None = None,
    device: str = "auto",
    listeners: Iterable[Listener] = (),
    config: TrainConfig | None = None,
    announce: Callable[[str], None] | None = None,
    **options: Any,
) -> TrainResult:
    """Train a model on ``data`` (a file, a folder, or a list of strings).

    From scratch, a tokenizer is trained on the corpus and a model built from
    ``preset``; with ``resume``, both come from that checkpoint and training
    continues exactly where it stopped (saving back there unless ``out`` says
    otherwise). ``model`` with a ``Tokenizer`` instance trains that model
    further (a model with quantized weights, such as a GGUF kept quantized, is
    first dequantized to float32 in place); add the ``state`` of an earlier
    :class:`TrainResult` to continue its run. ``options`` are :class:`TrainConfig` fields.

    ``preset="auto"`` picks the model shape and the BPE vocabulary from the time budget (``time=``; with neither
    a budget nor ``steps``, a budget of ``DEFAULT_BUDGET`` seconds), the device and the corpus size
    (:func:`auto_preset`), and trains with Muon at the shape's measured ``lr`` unless ``options`` (or
    ``config``) say otherwise; ``result.auto`` says what it picked, and ``announce`` is told before training.
    """
    started = time.perf_counter()
    given = config is not None
    config = dataclasses.replace(config, **options) if config else TrainConfig(**options)
    dev = resolve_device(device)
    if out is not None:
        check_replaceable(Path(out))  # fail before tokenizing, not after training
    pick = None
    if preset == "auto" and resume is None and model is None:
        config, pick = auto_preset(data, config, str(dev), tokenizer=tokenizer, chosen=None if given else options)
        preset, vocab_size = pick.config, vocab_size or pick.vocab_size
        if announce is not None:
            announce(pick.reason)
    run = prepare_run(
        data, preset=preset, resume=resume, model=model, tokenizer=tokenizer, vocab_size=vocab_size, config=config
    )
    if run.state is None and state is not None:
        run.state = state
    if run.state is not None and "distributed" in run.state:
        raise ConfigError(
            f"the checkpoint {str(resume or 'loaded')!r} was written by a distributed run, whose optimizer state "
            "is sharded; "
            "resume it as one: `forge train ... --resume CHECKPOINT --nproc N` (any N, 1 too), or "
            "`forge.distributed.train(..., nproc=N)`"
        )
    trainer = Trainer(
        run.model,
        run.tokenizer,
        run.dataset,
        run.config,
        device=dev,
        out=out if out is not None else resume,
        listeners=listeners,
        meta={"data": run.corpus.label},
    )
    if run.state is not None:
        trainer.load_state_dict(run.state)
    prepared = time.perf_counter() - started
    result = trainer.run()
    result.timing["prepare"] = prepared
    result.auto = pick.reason if pick else None
    return result
