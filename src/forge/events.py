"""Typed event payloads for training and generation.

Listeners receive one of these dataclasses; ``event.name`` is the name they
were registered under (``"start"``, ``"step"``, ``"eval"``, ``"checkpoint"``,
``"end"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

__all__ = ["CheckpointEvent", "EndEvent", "EvalEvent", "Event", "StartEvent", "StepEvent"]


@dataclass(frozen=True, slots=True)
class Event:
    name: ClassVar[str] = "event"


@dataclass(frozen=True, slots=True)
class StartEvent(Event):
    """Training is about to run its first step (``start_step`` > 0 on resume)."""

    name: ClassVar[str] = "start"
    start_step: int
    total_steps: int
    parameters: int
    device: str
    precision: str
    train_tokens: int
    val_tokens: int
    tokens_per_step: int


@dataclass(frozen=True, slots=True)
class StepEvent(Event):
    """One optimizer step finished. ``step`` counts from 1."""

    name: ClassVar[str] = "step"
    step: int
    total_steps: int
    loss: float
    lr: float
    grad_norm: float
    tokens_per_sec: float
    elapsed: float
    eta: float


@dataclass(frozen=True, slots=True)
class EvalEvent(Event):
    """Validation loss and perplexity after ``step`` optimizer steps."""

    name: ClassVar[str] = "eval"
    step: int
    val_loss: float
    val_perplexity: float


@dataclass(frozen=True, slots=True)
class CheckpointEvent(Event):
    name: ClassVar[str] = "checkpoint"
    step: int
    path: str


@dataclass(frozen=True, slots=True)
class EndEvent(Event):
    """Training stopped: finished, or ``interrupted`` (Ctrl-C) after saving."""

    name: ClassVar[str] = "end"
    step: int
    train_loss: float | None
    val_loss: float | None
    elapsed: float
    interrupted: bool
