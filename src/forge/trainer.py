"""The training loop and its events.

>>> result = train(["to be or not to be, that is the question. " * 200], preset="tiny",
...                steps=2, batch_size=2, context=16, tokenizer="char", eval_every=0)
>>> result.step
2
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from forge.config import ModelConfig, get_preset
from forge.core.checkpoint import check_replaceable
from forge.core.device import autocast_dtype, resolve_device
from forge.core.lora import apply_lora, has_lora, lora_rank, merge_lora
from forge.core.optim import build_adamw, clip_grad_norm
from forge.core.schedule import Schedule, ScheduleKind
from forge.core.transformer import Transformer
from forge.data import Corpus, DataSource, TokenDataset, cache_dir
from forge.errors import ConfigError, DataError
from forge.events import CheckpointEvent, EndEvent, EvalEvent, Event, StartEvent, StepEvent
from forge.models import create_model, load, padded_vocab, save
from forge.tokenizer import Tokenizer, TokenizerKind

__all__ = ["TrainConfig", "TrainResult", "Trainer", "train"]

log = logging.getLogger("forge")
Precision = Literal["auto", "bf16", "fp32"]
Listener = Callable[[Event], None]


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainConfig:
    """How to train. ``steps`` counts optimizer steps in total, across resumes.

    >>> TrainConfig(steps=100).warmup_steps
    10
    """

    steps: int = 1000
    batch_size: int = 16
    context: int | None = None  # None: the model's context length
    lr: float = 1e-3
    min_lr: float | None = None  # None: lr / 10
    warmup: int | None = None  # None: 10% of steps, at most 100
    schedule: ScheduleKind = "cosine"
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0
    grad_accum: int = 1
    eval_every: int = 100  # 0: only at the start and the end
    eval_batches: int = 10
    val_fraction: float = 0.1
    checkpoint_every: int = 0  # 0: only at the end (and on Ctrl-C)
    seed: int = 1337
    precision: Precision = "auto"
    gradient_checkpointing: bool = False
    compile: bool | None = None  # torch.compile the training step; None: on CUDA only (a CPU compile costs ~25 s)
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank on a frozen model, merged at the end
    lora_alpha: float | None = None  # None: 2 * lora_rank
    max_seconds: float | None = None  # stop (evaluate, save) at the first step end past this many seconds

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "grad_accum", "eval_batches")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError.for_field("TrainConfig", name, value, "must be a positive integer")
        for name in ("eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ConfigError.for_field("TrainConfig", name, getattr(self, name), "must be >= 0 (0 disables)")
        if self.context is not None and self.context < 1:
            raise ConfigError.for_field("TrainConfig", "context", self.context, "must be a positive integer")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError.for_field("TrainConfig", "lr", self.lr, "must be a positive number, e.g. 1e-3")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError.for_field("TrainConfig", "grad_clip", self.grad_clip, "must be > 0, or None to disable")
        if self.weight_decay < 0:
            raise ConfigError.for_field("TrainConfig", "weight_decay", self.weight_decay, "must be >= 0")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError.for_field("TrainConfig", "precision", self.precision, "use 'auto', 'bf16' or 'fp32'")
        if not isinstance(self.lora_rank, int) or isinstance(self.lora_rank, bool) or self.lora_rank < 0:
            raise ConfigError.for_field("TrainConfig", "lora_rank", self.lora_rank, "must be >= 0 (0: full fine-tune)")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError.for_field("TrainConfig", "val_fraction", self.val_fraction, "must be in (0, 1)")
        if self.max_seconds is not None and not (math.isfinite(self.max_seconds) and self.max_seconds > 0):
            raise ConfigError.for_field("TrainConfig", "max_seconds", self.max_seconds, "must be > 0, or None")

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
                f"--context {self.context} is longer than the model's context of {model.config.context_length}; "
                f"use --context {model.config.context_length} or less"
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
                f"continue them with --lora {lora_rank(model)}, or merge them (merge_lora) first"
            )
        if config.lora_rank and not self.resumed_adapters:
            # Seeded by the run, not the global RNG: the same seed gives the same adapters and losses.
            generator = torch.Generator().manual_seed(config.seed)
            apply_lora(model, rank=config.lora_rank, alpha=config.lora_alpha, generator=generator)
        self.optimizer = build_adamw(model, lr=config.lr, weight_decay=config.weight_decay)
        self.compiled = config.compile if config.compile is not None else device.type == "cuda"
        # Inductor fuses each block's norms, RoPE and activations; shapes are fixed (B, context) windows.
        self._loss = torch.compile(model.loss, dynamic=False) if self.compiled else model.loss
        self.schedule = config.schedule_for()
        self.data_rng = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.result = TrainResult(model=model, tokenizer=tokenizer, step=0)

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
        cfg = self.config
        if self.step >= cfg.steps:
            raise ConfigError(
                f"--steps {cfg.steps} trains nothing: the checkpoint is already at step {self.step}; "
                f"--steps counts in total, so pass a number above {self.step}"
            )
        self.model.train()
        self.model.gradient_checkpointing = cfg.gradient_checkpointing
        tokens_per_step = cfg.batch_size * self.context * cfg.grad_accum
        self.emit(
            StartEvent(
                start_step=self.step,
                total_steps=cfg.steps,
                parameters=self.model.num_params(),
                device=str(self.device),
                precision=str(self.dtype).removeprefix("torch.") if self.dtype else "float32",
                compiled=self.compiled,
                train_tokens=self.dataset.split_size("train"),
                val_tokens=self.dataset.split_size("val"),
                tokens_per_step=tokens_per_step,
            )
        )
        t0 = time.perf_counter()
        first_step = self.step
        tf32 = torch.backends.cuda.matmul.allow_tf32
        # TF32 for any fp32 matmul left outside autocast (3x the fp32 rate on Ampere and later);
        # a process-wide flag, so only for the length of the run.
        torch.backends.cuda.matmul.allow_tf32 = self.device.type == "cuda" or tf32
        try:
            if self.step == 0:
                self._evaluate()
            while self.step < cfg.steps:
                data_state = self.data_rng.get_state()
                try:
                    loss, lr, grad_norm = self._train_step()
                except KeyboardInterrupt:
                    # Undo the half-drawn batches so a resume sees exactly the next step's data.
                    self.data_rng.set_state(data_state)
                    self.optimizer.zero_grad(set_to_none=True)
                    raise
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
                        tokens_per_sec=done * tokens_per_step / max(elapsed, 1e-9),
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
        except KeyboardInterrupt:
            self.result.interrupted = True
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
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
        for _ in range(cfg.grad_accum):
            x, y = self.dataset.batch("train", cfg.batch_size, self.context, self.data_rng)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self._autocast():
                loss = self._loss(x, y) / cfg.grad_accum
            loss.backward()
            total += loss.detach()
        if cfg.grad_clip:
            grad_norm = clip_grad_norm(self.model, cfg.grad_clip)
        else:
            grad_norm = torch.full((), float("nan"), device=self.device)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # One host-device sync per step, after the optimizer's kernels are queued.
        loss, norm = torch.stack([total, grad_norm.to(total.dtype)]).tolist()
        return loss, lr, norm

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
    if precision == "fp32":
        return None
    if precision == "bf16":
        if native is None:
            raise ConfigError(f"precision 'bf16' is not supported natively on {device}; use 'fp32' or 'auto'")
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
    further; add the ``state`` of an earlier :class:`TrainResult` to continue
    its run. ``options`` are :class:`TrainConfig` fields.
    """
    config = dataclasses.replace(config, **options) if config else TrainConfig(**options)
    dev = resolve_device(device)
    if out is not None:
        check_replaceable(Path(out))  # fail before tokenizing, not after training
    corpus = Corpus.from_source(data)
    if resume is not None:
        model, tok, state, config = _resumed(resume, config)
    elif model is not None:
        if not isinstance(tokenizer, Tokenizer):
            raise ConfigError("train(model=...) needs the model's Tokenizer as tokenizer=...; got a tokenizer kind")
        tok = tokenizer
    else:
        cfg = get_preset(preset) if isinstance(preset, str) else preset
        if config.context is not None and config.context > cfg.context_length:
            raise ConfigError(
                f"--context {config.context} is longer than the model's context of {cfg.context_length}; "
                f"use --context {cfg.context_length} or less"
            )
        if isinstance(tokenizer, Tokenizer):
            tok = tokenizer
        else:
            tok = _tokenizer_for(corpus, tokenizer, vocab_size or cfg.vocab_size)
        torch.manual_seed(config.seed)
        model = create_model(cfg, vocab_size=padded_vocab(tok.vocab_size))
    dataset = TokenDataset.build(corpus, tok, val_fraction=config.val_fraction)
    trainer = Trainer(
        model,
        tok,
        dataset,
        config,
        device=dev,
        out=out if out is not None else resume,
        listeners=listeners,
        meta={"data": corpus.label},
    )
    if state is not None:
        trainer.load_state_dict(state)
    return trainer.run()
