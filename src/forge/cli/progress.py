"""Rich progress display for training events."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from forge.events import CheckpointEvent, EndEvent, EvalEvent, Event, StartEvent, StepEvent

__all__ = ["TrainingDisplay"]


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class TrainingDisplay:
    """A listener that draws a progress bar with loss, lr and tokens/s, and logs evals.

    When the console is not a terminal (output to a log file or a pipe) there is
    no bar to redraw, so it prints a plain line every ``interval`` seconds instead
    (and at the first and last step): step/total, loss, lr, tok/s and the ETA.
    """

    def __init__(
        self, console: Console, *, interval: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.console = console
        self.plain = not console.is_terminal
        self.interval, self.clock = interval, clock
        self.last_line: float | None = None
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss [cyan]{task.fields[loss]}"),
            TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task: Any = None

    def __call__(self, event: Event) -> None:
        if isinstance(event, StartEvent):
            self.console.print(
                f"[bold]model[/] {_fmt_params(event.parameters)} params on {event.device} "
                f"({event.precision}{', compiled: the first step compiles it' if event.compiled else ''}); "
                f"data {event.train_tokens:,} train / {event.val_tokens:,} val tokens; "
                f"{event.tokens_per_step:,} tokens per step"
            )
            if self.plain:
                return
            self.progress.start()
            self.task = self.progress.add_task(
                "train", total=event.total_steps, completed=event.start_step, loss="-", lr="-", tps="-"
            )
        elif isinstance(event, StepEvent) and self.plain:
            self._plain_step(event)
        elif isinstance(event, StepEvent):
            self.progress.update(
                self.task,
                completed=event.step,
                total=event.total_steps,  # a time budget's plan moves as the measured speed does
                loss=f"{event.loss:.3f}",
                lr=f"{event.lr:.2e}",
                tps=f"{event.tokens_per_sec:,.0f}",
            )
        elif isinstance(event, EvalEvent):
            self.progress.console.print(
                f"  step {event.step:>6}  val loss [bold green]{event.val_loss:.4f}[/]  "
                f"perplexity {event.val_perplexity:.1f}"
            )
        elif isinstance(event, CheckpointEvent):
            self.progress.console.print(f"  step {event.step:>6}  saved checkpoint to {event.path}")
        elif isinstance(event, EndEvent):
            if not self.plain:
                self.progress.stop()
            if event.interrupted:
                self.console.print(f"[yellow]interrupted at step {event.step}[/]")
            if event.kept_step is not None:
                self.console.print(
                    f"kept the weights of step {event.kept_step}, the best validation loss ({event.val_loss:.4f}): "
                    "the steps after it overfit the training text (--no-keep-best keeps the last)",
                    markup=False,
                    highlight=False,
                )

    def _plain_step(self, event: StepEvent) -> None:
        now = self.clock()
        due = self.last_line is None or now - self.last_line >= self.interval or event.step == event.total_steps
        if not due:
            return
        self.last_line = now
        self.console.print(
            f"step {event.step}/{event.total_steps}  loss {event.loss:.4f}  lr {event.lr:.2e}  "
            f"{event.tokens_per_sec:,.0f} tok/s  eta {_fmt_duration(event.eta)}",
            markup=False,
            highlight=False,
        )
