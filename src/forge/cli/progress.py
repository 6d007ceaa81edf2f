"""Rich progress display for training events."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from forge.events import CheckpointEvent, EndEvent, EvalEvent, Event, StartEvent, StepEvent

__all__ = ["TrainingDisplay"]


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


class TrainingDisplay:
    """A listener that draws a progress bar with loss, lr and tokens/s, and logs evals."""

    def __init__(self, console: Console) -> None:
        self.console = console
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
                f"({event.precision}{', compiled' if event.compiled else ''}); "
                f"data {event.train_tokens:,} train / {event.val_tokens:,} val tokens; "
                f"{event.tokens_per_step:,} tokens per step"
            )
            self.progress.start()
            self.task = self.progress.add_task(
                "train", total=event.total_steps, completed=event.start_step, loss="-", lr="-", tps="-"
            )
        elif isinstance(event, StepEvent):
            self.progress.update(
                self.task,
                completed=event.step,
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
            self.progress.stop()
            if event.interrupted:
                self.console.print(f"[yellow]interrupted at step {event.step}[/]")
