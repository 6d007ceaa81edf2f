"""Learning-rate schedules: a step in, a learning rate out."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from forge.errors import ConfigError

__all__ = ["Schedule", "ScheduleKind"]

ScheduleKind = Literal["constant", "cosine", "linear"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Schedule:
    """``constant``; ``cosine``: linear warmup then cosine decay to ``min_lr``;
    ``linear``: linear warmup then linear decay to ``min_lr``.

    >>> s = Schedule(kind="cosine", lr=1e-3, min_lr=1e-4, warmup=10, total=110)
    >>> s(0) < s(9) == 1e-3 > s(60) > s(110) == 1e-4
    True
    """

    kind: ScheduleKind = "cosine"
    lr: float
    total: int
    warmup: int = 0
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "cosine", "linear"):
            raise ConfigError.for_field("Schedule", "kind", self.kind, "use 'constant', 'cosine' or 'linear'")
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
        return self.lr - (self.lr - self.min_lr) * progress
