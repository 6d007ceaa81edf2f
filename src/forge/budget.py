"""Training against a wall-clock budget: durations, the step plan, and the ``auto`` preset's rule.

A budget (``forge train DATA --time 2m``, ``train(..., time="2m")``) is turned into a number of steps from the
measured step time, so that the learning-rate schedule warms down exactly at the last step; the plan is made
again after every step, so a machine that speeds up or slows down still ends on time. Time for the final
evaluation and checkpoint is held back from the start.

>>> parse_duration("1m30s"), parse_duration("2m"), parse_duration(90)
(90.0, 120.0, 90.0)
>>> plan = TimePlan(budget=10.0, start_step=0)
>>> plan.observe(0.5); plan.observe(0.1); plan.total(step=2, elapsed=1.0)
92
"""

from __future__ import annotations

import math
import os
import re
import shutil
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forge.config import ModelConfig
from forge.errors import ConfigError

__all__ = [
    "DEFAULT_BUDGET",
    "AutoPick",
    "TimePlan",
    "auto_pick",
    "compile_pays",
    "format_duration",
    "parse_duration",
]

#: The budget ``preset="auto"`` assumes when neither a time nor a step count is given (seconds).
DEFAULT_BUDGET = 300.0
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|h|m|s)")


def parse_duration(value: str | float, *, field: str = "time") -> float:
    """Seconds in ``value``: a number of seconds, or ``90s``, ``2m``, ``1h``, ``1m30s``, ``1.5h``, ``500ms``."""
    hint = "write a duration such as 90s, 2m, 1h or 1m30s (a bare number is seconds)"
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigError(f"{field}={value!r} is not a duration; {hint}", field=field)
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        try:
            seconds = float(text)
        except ValueError:
            parts = _PART.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text or len({u for _, u in parts}) < len(parts):
                raise ConfigError(f"{field}={value!r} is not a duration; {hint}", field=field) from None
            seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    else:
        seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"{field}={value!r} is not a positive duration; {hint}", field=field)
    return seconds


def format_duration(seconds: float) -> str:
    """``90.0`` -> ``'1m30s'``; under a minute, seconds with one decimal where they have one.

    >>> format_duration(90), format_duration(3600), format_duration(4.25)
    ('1m30s', '1h', '4.2s')
    """
    if seconds < 60:
        return f"{seconds:.1f}s".replace(".0s", "s")
    whole = round(seconds)
    h, rest = divmod(whole, 3600)
    m, s = divmod(rest, 60)
    return "".join(f"{v}{u}" for v, u in ((h, "h"), (m, "m"), (s, "s")) if v)


@dataclass
class TimePlan:
    """How many steps fit in what is left of a budget, from an average of the measured step times.

    ``reserve``: seconds kept for the final evaluation and checkpoint; ``eval_cost`` and ``eval_every``: the
    evaluations on the way, whose time comes out of the budget too; ``cap``: a total step count not to pass.
    """

    budget: float
    start_step: int
    cap: int | None = None
    reserve: float = 0.0
    eval_cost: float = 0.0
    eval_every: int = 0
    step_time: float | None = None
    timed: int = field(default=0, init=False)

    def observe(self, seconds: float) -> None:
        """One more step took ``seconds``: the first (warm-up) only stands in until the second comes."""
        self.timed += 1
        if self.step_time is None or self.timed == 2:
            self.step_time = seconds
        else:  # an average over about the last 20 steps: follows a drift, shrugs off one slow step
            self.step_time += (seconds - self.step_time) / min(self.timed - 1, 20)

    def total(self, *, step: int, elapsed: float) -> int:
        """The last step of the run as planned now: never before ``step``, and one step at least per run."""
        if self.step_time is None:
            return self.cap if self.cap is not None else step + 1
        per_step = self.step_time + (self.eval_cost / self.eval_every if self.eval_every else 0.0)
        left = self.budget - elapsed - self.reserve
        total = step + max(0, int(left / per_step))
        # One step at least; and while only the first (warm-up) step is timed, a second, for a real measurement.
        total = max(total, self.start_step + (2 if self.timed < 2 and elapsed < self.budget else 1))
        return min(total, self.cap) if self.cap is not None else total


@dataclass(frozen=True, slots=True)
class AutoPick:
    """What ``preset="auto"`` chose: the model shape, the tokenizer's size, and why, in one line."""

    config: ModelConfig
    vocab_size: int
    reason: str
    #: The peak learning rate for a new model of this shape (AdamW's; Muon keeps its own ``muon_lr``).
    lr: float = 1e-3
    #: TrainConfig.label_smoothing for a new model of this shape.
    label_smoothing: float = 0.0


#: (the least budget, in seconds of this reference CPU, for which the shape pays off; width, layers, heads, context).
#: Measured by benchmarks/train_auto_sweep.py (benchmarks/results/train_auto_sweep_40s.json and _45s.json);
#: the rungs past 90 s are extrapolated, not measured.
_LADDER: tuple[tuple[float, int, int, int, int], ...] = (
    (0.0, 128, 2, 4, 128),
    (90.0, 128, 4, 4, 128),
    (600.0, 192, 6, 6, 256),
    (3600.0, 256, 8, 8, 256),
    (4 * 3600.0, 384, 10, 6, 512),
    (24 * 3600.0, 512, 12, 8, 1024),
)
#: The blocks of every auto shape: Llama-style (RMSNorm, SwiGLU, rotary positions, no biases). In 120 s on the
#: reference CPU, at equal steps, they scored 3.036 bits per byte on the tuning text against 3.078 for GPT-2-style
#: blocks (LayerNorm, GELU, learned positions), and rotary positions alone 3.047 in equal time
#: (benchmarks/results/train_auto_sweep_120s.json).
_BLOCKS: dict[str, Any] = {"norm": "rmsnorm", "activation": "swiglu", "position": "rope", "bias": False}
#: The peak learning rate of the measured rungs (up to 90 s): 3e-3 scored 3.078 against 1e-3's 3.113 at equal
#: steps, and 6e-3 3.038 against 3e-3's 3.036; bigger shapes, not measured, keep TrainConfig's 1e-3.
_SMALL_LR, _SMALL_RUNGS = 3e-3, 2
#: The label smoothing of the measured rungs. A model trained on one text is over-confident on any other: the
#: 120 s model scored 3.016 bits per byte on the tuning text, and 2.951 with its logits divided by 1.2 after
#: training. Smoothing in training buys most of that and costs a little on text like the training text. On the
#: tuning text (benchmarks/results/train_auto_sweep_120s_ls*.json): 0.05 scored 2.961 against no smoothing's
#: 3.004; 0.1 2.930, 2.958 and 2.979 against 3.004, 2.997 and 3.055 (the last at the shape's lr of 3e-3, the
#: others at 1e-3); 0.15 2.980, 0.2 2.996. On a play left out of training (The Tempest,
#: quality_domain_gap_cpu_smoothing*.json): 0.05 cost 0.013 bits per byte (2.302 against 2.290, means of its runs)
#: and 0.1 cost 0.033 (2.322). 0.05: most of the gain for less than half the cost. Bigger shapes, not measured,
#: train without.
_SMALL_SMOOTHING = 0.05
#: How much more a CUDA GPU computes than the reference CPU in the same time, roughly: it moves its budget up.
_CUDA_SPEEDUP = 200.0
#: The most hidden-layer parameters (12 * width^2 * layers) per byte of corpus a shape may have. nanoGPT's
#: shakespeare-char config trains 10 per byte (10.6M on 1.1 MB) with dropout 0.2; without dropout, 2 stays well
#: clear of memorising the corpus. Bounding parameters, not compute, lets a fast device grow the model as far as
#: the data allows (5 MB of text: 256 x 8 on a GPU), where a compute cap kept it at the CPU's size.
_PARAMS_PER_BYTE = 2.0


#: The least CPU budget (seconds) for which ``TrainConfig(compile=None)`` compiles the training step. The auto
#: shape's step took 45 ms compiled against 70 ms eager (forward and backward, bf16, 2 cores), after a cold
#: compile of 25 s (4 s with Inductor's cache warm): even at 25 s the compile pays off past about 70 s. At 120 s
#: on the tuning text (benchmarks/results/train_auto_sweep_120s_compile.json), compiled runs took 1818 steps
#: (cold) and 2021 (warm) against 1438 and 1533 eager, and scored 2.944 and 2.954 bits per byte against 2.956
#: and 2.975.
COMPILE_PAYS_AT = 90.0


def compile_pays(device: str, budget: float | None) -> bool:
    """Whether ``compile=None`` compiles the training step: always on CUDA; on a CPU for a time budget of at least
    ``COMPILE_PAYS_AT``, where Inductor can build its kernels (a C++ compiler, and Python's headers, which its CPU
    kernels' bindings include); never elsewhere, nor for a step count."""
    if device.startswith("cuda"):
        return True
    if device != "cpu" or budget is None or budget < COMPILE_PAYS_AT:
        return False
    cxx = os.environ.get("CXX") or "g++"
    has_compiler = shutil.which(cxx) is not None or shutil.which("clang++") is not None
    return has_compiler and (Path(sysconfig.get_path("include")) / "Python.h").is_file()


def auto_pick(
    *, budget: float, corpus_bytes: int, device: str, assumed: bool = False, tokenizer: str = "bpe"
) -> AutoPick:
    """The model shape and BPE vocabulary for ``budget`` seconds on ``device`` and a corpus of ``corpus_bytes``.

    Bigger shapes only pay off once the budget lets them see enough tokens; the vocabulary grows with the corpus
    (a small corpus cannot fill a large vocabulary's embeddings), and a bigger model is not built for a corpus
    too small to feed it.

    >>> pick = auto_pick(budget=120, corpus_bytes=5_000_000, device="cpu")
    >>> pick.config.n_layer, pick.vocab_size
    (4, 1024)
    """
    effective = budget * (_CUDA_SPEEDUP if device.startswith("cuda") else 1.0)
    by_time = max(i for i, (least, *_) in enumerate(_LADDER) if least <= effective)
    fits = [i for i, (_, w, n, *_) in enumerate(_LADDER) if 12 * w * w * n <= _PARAMS_PER_BYTE * corpus_bytes]
    rung = min(by_time, max(fits, default=0))
    _, width, layers, heads, context = _LADDER[rung]
    vocab = 512 if corpus_bytes < 1_000_000 else 1024 if corpus_bytes < 20_000_000 else 2048 if rung < 3 else 8192
    config = ModelConfig(
        vocab_size=vocab, context_length=context, n_layer=layers, n_head=heads, d_model=width, **_BLOCKS
    )
    source = "assumed (no --time or --steps)" if assumed else "budget"
    words = f", BPE vocabulary {vocab}" if tokenizer == "bpe" else ""
    reason = (
        f"auto preset: {layers} Llama-style layers x {width} wide, context {context}{words}, for a "
        f"{format_duration(budget)} {source} on {device} and {corpus_bytes / 1e6:.1f} MB of text"
        + (" (the most this much text supports; more text would grow it)" if rung < by_time else "")
    )
    small = rung < _SMALL_RUNGS
    return AutoPick(
        config=config,
        vocab_size=vocab,
        reason=reason,
        lr=_SMALL_LR if small else 1e-3,
        label_smoothing=_SMALL_SMOOTHING if small else 0.0,
    )
