"""Learning-rate schedules: a step in, a learning rate out."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from forge.errors import ConfigError

__all__ = ["SCHEDULE_KINDS", "Schedule", "ScheduleKind"]

ScheduleKind = Literal["constant", "cosine", "linear", "wsd"]
SCHEDULE_KINDS: tuple[str, ...] = ("constant", "cosine", "linear", "wsd")


@dataclass(frozen=True, slots=True, kw_only=True)
class Schedule:
    """``constant``; ``cosine``: linear warmup then cosine decay to ``min_lr``;
    ``linear``: linear warmup then linear decay to ``min_lr``; ``wsd`` (warmup, stable, decay, as in the
    modded-nanogpt speedrun): linear warmup, the peak held, then a linear warm-down to ``min_lr`` over the last
    ``cooldown`` of the steps. Each reaches ``min_lr`` at step ``total``.

    >>> s = Schedule(kind="cosine", lr=1e-3, min_lr=1e-4, warmup=10, total=110)
    >>> s(0) < s(9) == 1e-3 > s(60) > s(110) == 1e-4
    True
    >>> w = Schedule(kind="wsd", lr=1e-3, min_lr=0.0, warmup=10, total=110, cooldown=0.5)
    >>> w(40) == w(60) == 1e-3 > w(85) > w(110) == 0.0
    True
    """

    kind: ScheduleKind = "cosine"
    lr: float
    total: int
    warmup: int = 0
    min_lr: float = 0.0
    cooldown: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ConfigError.for_field("Schedule", "kind", self.kind, f"use one of {', '.join(SCHEDULE_KINDS)}")
        if not 0 < self.cooldown <= 1:
            raise ConfigError.for_field("Schedule", "cooldown", self.cooldown, "must be in (0, 1]")
        if not self.lr > 0:
            raise ConfigError.for_field("Schedule", "lr", self.lr, "must be > 0")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError.for_field("Schedule", "min_lr", self.min_lr, f"must be in [0, lr={self.lr}]")
        if not isinstance(self.total, int) or self.total < 1:
            raise ConfigError.for_field("Schedule", "total", self.total, "must be a positive integer (total steps)")
        if self.warmup < 0:
            raise ConfigError.for_field("Schedule", "warmup", self.warmup, "must be >= 0")

    def __call__(self, step: int) -> float:
        """Learning rate for the optimizer step with index ``step`` (0-based)."""
        if self.kind == "constant":
            return self.lr
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        if self.kind == "cosine":
            return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress))
        if self.kind == "wsd":  # the peak until the warm-down starts, then linear to the end
            progress = max(0.0, 1.0 - (1.0 - progress) / self.cooldown)
        return self.lr - (self.lr - self.min_lr) * progress
