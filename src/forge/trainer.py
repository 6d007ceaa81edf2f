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

from forge.config import DTYPE_ALIASES, ModelConfig, bounded, check_specs, choice, documented, get_preset
from forge.core.checkpoint import check_replaceable
from forge.core.device import autocast_dtype, resolve_device
from forge.core.lora import apply_lora, has_lora, lora_rank, merge_lora
from forge.core.optim import build_adamw, clip_grad_norm
from forge.core.quantize import dequantize_model, has_quantized
from forge.core.schedule import Schedule, ScheduleKind
from forge.core.transformer import Transformer
from forge.data import Corpus, DataSource, TokenDataset, cache_dir
from forge.errors import ConfigError, DataError
from forge.events import CheckpointEvent, EndEvent, EvalEvent, Event, StartEvent, StepEvent
from forge.models import create_model, load, padded_vocab, save
from forge.tokenizer import Tokenizer, TokenizerKind

__all__ = ["PreparedRun", "TrainConfig", "TrainResult", "Trainer", "prepare_run", "train"]

log = logging.getLogger("forge")
#: Training precision in the one dtype vocabulary (``bf16`` and ``fp32`` are accepted as aliases).
Precision = Literal["auto", "float32", "bfloat16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
Listener = Callable[[Event], None]


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainConfig:
    """How to train. ``steps`` counts optimizer steps in total, across resumes.

    Each field is defined once, with its bounds (``forge.config.bounded``); ``forge train``'s flags are built
    from them.

    >>> TrainConfig(steps=100).warmup_steps
    10
    """

    steps: int = bounded(1000, integer=True, ge=1, doc="Optimizer steps in total, counting a resumed run's.")
    batch_size: int = bounded(16, integer=True, ge=1, doc="Sequences per micro-batch.")
    context: int | None = bounded(None, integer=True, ge=1, doc="Tokens per window; unset: the model's context.")
    lr: float = bounded(1e-3, gt=0, doc="Peak learning rate.")
    min_lr: float | None = bounded(None, ge=0, doc="Learning rate at the end; unset: lr / 10.")
    warmup: int | None = bounded(None, integer=True, ge=0, doc="Warmup steps; unset: 10% of steps, at most 100.")
    schedule: ScheduleKind = choice("cosine", get_args(ScheduleKind), doc="Learning-rate schedule after warmup.")
    weight_decay: float = bounded(0.1, ge=0, doc="AdamW weight decay.")
    grad_clip: float | None = bounded(1.0, gt=0, optional=True, doc="Clip the gradient norm to this (None: off).")
    grad_accum: int = bounded(1, integer=True, ge=1, doc="Micro-batches per optimizer step.")
    eval_every: int = bounded(100, integer=True, ge=0, doc="Evaluate every N steps; 0: at the start and end only.")
    eval_batches: int = bounded(10, integer=True, ge=1, doc="Validation batches per evaluation.")
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
    #: None: on CUDA only (a CPU compile costs ~25 s).
    compile: bool | None = documented(None, doc="torch.compile the training step; None: on CUDA only.")
    lora_rank: int = bounded(0, integer=True, ge=0, doc="LoRA rank: > 0 trains adapters, merged at the end; 0: all.")
    lora_alpha: float | None = bounded(None, gt=0, doc="LoRA scale numerator; unset: 2 * lora_rank.")
    max_seconds: float | None = bounded(None, gt=0, doc="Stop (evaluate, save) at the first step end past this.")

    def __post_init__(self) -> None:
        check_specs(self)

    @property
    def warmup_steps(self) -> int:
        return self.warmup if self.warmup is not None else min(100, self.steps // 10)

    def schedule_for(self) -> Schedule:
        min_lr = self.min_lr if self.min_lr is not None else self.lr / 10
        return Schedule(kind=self.schedule, lr=self.lr, min_lr=min_lr, warmup=self.warmup_steps, total=self.steps)

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

    @property
    def train_loss(self) -> float | None:
        return self.losses[-1][1] if self.losses else None

    @property
    def val_loss(self) -> float | None:
        return self.evals[-1][1] if self.evals else None


class Trainer:
    """Runs optimizer steps on a model over a token dataset, emitting events."""

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
        self.compiled = config.compile if config.compile is not None else device.type == "cuda"
        self._build_step(model)
        self.schedule = config.schedule_for()
        self.data_rng = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.result = TrainResult(model=model, tokenizer=tokenizer, step=0)

    def _build_step(self, model: Transformer) -> None:
        """The optimizer and the loss function the steps call (a distributed trainer wraps the model first)."""
        self.optimizer = build_adamw(model, lr=self.config.lr, weight_decay=self.config.weight_decay)
        # Inductor fuses each block's norms, RoPE and activations; shapes are fixed (B, context) windows.
        self._loss = torch.compile(model.loss, dynamic=False) if self.compiled else model.loss

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
        """Train up to ``steps`` in total (or until ``max_seconds``), evaluating and saving on the way."""
        cfg = self.config
        if self.step >= cfg.steps:
            raise ConfigError(
                f"steps={cfg.steps} trains nothing: the checkpoint is already at step {self.step}; "
                f"steps counts in total, so pass a number above {self.step}",
                field="steps",
            )
        self.model.train()
        self.model.gradient_checkpointing = cfg.gradient_checkpointing
        self._emit_start()
        t0 = time.perf_counter()
        tf32 = torch.backends.cuda.matmul.allow_tf32
        # TF32 for any fp32 matmul left outside autocast (3x the fp32 rate on Ampere and later);
        # a process-wide flag, so only for the length of the run.
        torch.backends.cuda.matmul.allow_tf32 = self.device.type == "cuda" or tf32
        try:
            if self.step == 0:
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

    def _emit_start(self) -> None:
        self.emit(
            StartEvent(
                start_step=self.step,
                total_steps=self.config.steps,
                parameters=self.model.num_params(),
                device=str(self.device),
                precision=str(self.dtype).removeprefix("torch.") if self.dtype else "float32",
                compiled=self.compiled,
                train_tokens=self.dataset.split_size("train"),
                val_tokens=self.dataset.split_size("val"),
                tokens_per_step=self._tokens_per_step,
            )
        )

    def _steps(self, t0: float) -> None:
        """Optimizer steps up to the last, or until the time budget is spent; ``t0``: when the run started."""
        cfg = self.config
        first_step = self.step
        while self.step < cfg.steps:
            loss, lr, grad_norm = self._undoable_step()
            self.step += 1
            self.result.losses.append((self.step, loss))
            elapsed = time.perf_counter() - t0
            done = self.step - first_step
            self.emit(
                StepEvent(
                    step=self.step,
                    total_steps=cfg.steps,
                    loss=loss,
                    lr=lr,
                    grad_norm=grad_norm,
                    tokens_per_sec=done * self._tokens_per_step / max(elapsed, 1e-9),
                    elapsed=elapsed,
                    eta=elapsed / done * (cfg.steps - self.step),
                )
            )
            # A time budget is checked after every step, so a slow machine stops on time, not on a step count.
            out_of_time = cfg.max_seconds is not None and time.perf_counter() - t0 >= cfg.max_seconds
            last = self.step == cfg.steps or out_of_time
            if last or (cfg.eval_every and self.step % cfg.eval_every == 0):
                self._evaluate()
            if self.out and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and not last:
                self._save()
            if out_of_time:
                break

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
        if self.out:
            self._save()
        self.result.step = self.step
        self.result.state = self.state_dict()
        if has_lora(self.model):  # the result is a plain model: the adapters folded into its weights
            merge_lora(self.model)
        self.emit(
            EndEvent(
                step=self.step,
                train_loss=self.result.train_loss,
                val_loss=self.result.val_loss,
                elapsed=time.perf_counter() - t0,
                interrupted=self.result.interrupted,
            )
        )
        self.model.eval()
        return self.result

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def _train_step(self) -> tuple[float, float, float]:
        cfg = self.config
        lr = self.schedule(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            x, y = self._train_batch(micro)
            with self._gradient_sync(last=micro == cfg.grad_accum - 1):
                with self._autocast():
                    loss = self._loss(x, y) / cfg.grad_accum
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
                losses.append(float(self._loss(x.to(self.device), y.to(self.device))))
        self.model.train(was_training)
        return sum(losses) / len(losses)

    def _evaluate(self) -> None:
        val = self.evaluate()
        self.result.evals.append((self.step, val))
        self.emit(EvalEvent(step=self.step, val_loss=val, val_perplexity=math.exp(min(val, 50.0))))

    def _save(self) -> None:
        assert self.out is not None
        save(self.out, self.model, self.tokenizer, training_state=self.state_dict(), meta=self.meta)
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


def _tokenizer_for(corpus: Corpus, kind: TokenizerKind, vocab_size: int) -> Tokenizer:
    """Train a tokenizer on the corpus, cached by corpus content, kind and size."""
    path = cache_dir() / "tokenizers" / f"{corpus.fingerprint()[:32]}-{kind}-{vocab_size}.json"
    if path.exists():
        return Tokenizer.load(path)
    tokenizer = Tokenizer.train(corpus.chunks(), kind=kind, vocab_size=vocab_size)
    try:
        tokenizer.save(path)
    except OSError as e:  # a full disk: one line, not a traceback
        raise DataError(
            f"could not write the tokenizer cache {str(path)!r}: {e.strerror or e}; free some disk space, "
            "or point FORGE_CACHE_DIR at another disk"
        ) from None
    return tokenizer


def _resumed(
    path: str | os.PathLike[str], config: TrainConfig
) -> tuple[Transformer, Tokenizer, dict[str, Any] | None, TrainConfig]:
    """A checkpoint's model (with its LoRA adapters, if any), tokenizer and state, and the config to go on with."""
    loaded = load(path, with_state=True, keep_adapters=True)
    if has_lora(loaded.model) and not config.lora_rank:  # a LoRA run resumes as one
        config = dataclasses.replace(config, lora_rank=lora_rank(loaded.model))
    return loaded.model, loaded.tokenizer, loaded.training_state, config


def _fresh(
    corpus: Corpus,
    preset: str | ModelConfig,
    tokenizer: TokenizerKind | Tokenizer,
    vocab_size: int | None,
    config: TrainConfig,
) -> tuple[Transformer, Tokenizer]:
    """A new model of ``preset``, seeded by ``config.seed``, and its tokenizer (trained on the corpus unless given)."""
    cfg = get_preset(preset) if isinstance(preset, str) else preset
    if config.context is not None and config.context > cfg.context_length:
        raise ConfigError(
            f"context={config.context} is longer than the model's context of {cfg.context_length}; "
            f"use context={cfg.context_length} or less",
            field="context",
        )
    if isinstance(tokenizer, Tokenizer):
        tok = tokenizer
    else:
        tok = _tokenizer_for(corpus, tokenizer, vocab_size or cfg.vocab_size)
    torch.manual_seed(config.seed)
    return create_model(cfg, vocab_size=padded_vocab(tok.vocab_size)), tok


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
    """
    config = dataclasses.replace(config, **options) if config else TrainConfig(**options)
    dev = resolve_device(device)
    if out is not None:
        check_replaceable(Path(out))  # fail before tokenizing, not after training
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
    return trainer.run()


@dataclass
class PreparedRun:
    """What a run starts from: its model, tokenizer, token dataset, config, and the state to resume (if any)."""

    model: Transformer
    tokenizer: Tokenizer
    corpus: Corpus
    dataset: TokenDataset
    config: TrainConfig
    state: dict[str, Any] | None = None


def prepare_run(
    data: DataSource,
    *,
    preset: str | ModelConfig,
    resume: str | os.PathLike[str] | None,
    model: Transformer | None,
    tokenizer: TokenizerKind | Tokenizer,
    vocab_size: int | None,
    config: TrainConfig,
) -> PreparedRun:
    """The model (fresh from ``preset``, given, or resumed), its tokenizer and the corpus tokenized with it."""
    corpus = Corpus.from_source(data)
    state = None
    if resume is not None:
        model, tok, state, config = _resumed(resume, config)
    elif model is not None:
        if not isinstance(tokenizer, Tokenizer):
            raise ConfigError("train(model=...) needs the model's Tokenizer as tokenizer=...; got a tokenizer kind")
        tok = tokenizer
        if has_quantized(model):  # e.g. a GGUF kept quantized: train its float32 twin, in place
            dequantize_model(model, torch.float32).float()
    else:
        model, tok = _fresh(corpus, preset, tokenizer, vocab_size, config)
    dataset = TokenDataset.build(corpus, tok, val_fraction=config.val_fraction)
    return PreparedRun(model=model, tokenizer=tok, corpus=corpus, dataset=dataset, config=config, state=state)
