"""Distributed training throughput: the plain trainer, then 1 and N worker processes, in the same run.

Prints JSON and saves it under benchmarks/results/. Every run trains the same preset on the same text
with the same per-process batch (weak scaling: N processes see N times the tokens a step); tokens/s is
timed from rank 0's step events after the warmup steps.

- ``--device cpu`` (gloo): ``scaling_efficiency = tok/s(N processes) / (N * tok/s(1 process))``, where the
  1-process run has all the cores; and ``per_core_scaling_efficiency``, against 1 process given the
  threads each of the N has (cores / N). On a machine whose cores the single process already keeps
  busy, only the second says what the processes' communication costs.
- ``--device cuda`` (NCCL, one GPU): FSDP2 on one process against the plain trainer, same model,
  batch, bf16 autocast and torch.compile; target ``fsdp_vs_plain >= 0.95``.

    python benchmarks/train_dist.py --device cpu --nproc 2
    python benchmarks/train_dist.py --device cuda --preset gpt2 --batch-size 16 --context 1024
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import forge
from _common import SHAKESPEARE, environment, save_gpu_result, save_result
from forge.distributed import DistributedConfig, RunSpec, launch, run_worker
from forge.events import Event, StepEvent
from forge.trainer import TrainConfig


def _config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        steps=args.warmup + args.steps,
        batch_size=args.batch_size,
        context=args.context,
        eval_every=0,
        eval_batches=1,
        compile=args.device == "cuda",
        precision="auto",
    )


def _tokens_per_sec(times: list[float], tokens_per_step: int, warmup: int) -> float:
    """Steady throughput: the steps after the warmup, between their step events."""
    return (len(times) - warmup) * tokens_per_step / (times[-1] - times[warmup - 1])


def _timed_worker(spec: RunSpec) -> list[float]:
    """A rank: train, recording on rank 0 when each step ended."""
    times: list[float] = []

    def record(event: Event) -> None:
        if isinstance(event, StepEvent):
            times.append(event.elapsed)

    run_worker(spec, listeners=[record])
    return times


def plain(data: Path, args: argparse.Namespace) -> float:
    times: list[float] = []
    forge.train(
        data,
        preset=args.preset,
        device=args.device,
        config=_config(args),
        listeners=[lambda e: times.append(e.elapsed) if isinstance(e, StepEvent) else None],
    )
    return _tokens_per_sec(times, args.batch_size * args.context, args.warmup)


def distributed(data: Path, args: argparse.Namespace, nproc: int, strategy: str, out: Path) -> float:
    spec = RunSpec(
        data=str(data),
        config=_config(args),
        out=str(out),
        preset=args.preset,
        device=args.device,
        strategy=strategy,
    )
    times = launch(_timed_worker, (spec,), DistributedConfig(nproc=nproc, strategy=strategy), out=out)[0]
    return _tokens_per_sec(times, args.batch_size * args.context * nproc, args.warmup)


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """Workers launched inside get ``n`` threads each (the launcher keeps an OMP_NUM_THREADS it finds)."""
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(n)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = old


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--nproc", type=int, default=2, help="processes of the scaled run (cpu)")
    p.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp", help="of the cpu runs")
    p.add_argument("--preset", default="small")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=1, help="runs of each; the median is reported")
    p.add_argument("--data", type=Path, default=SHAKESPEARE / "hamlet.txt")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible")
    runs: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):  # interleaved, so machine noise hits every side alike
            runs.setdefault("plain", []).append(plain(args.data, args))
            if args.device == "cuda":
                runs.setdefault("fsdp_1", []).append(distributed(args.data, args, 1, "fsdp", Path(tmp, f"f{r}")))
                continue
            runs.setdefault(f"{args.strategy}_1", []).append(
                distributed(args.data, args, 1, args.strategy, Path(tmp, f"a{r}"))
            )
            runs.setdefault(f"{args.strategy}_{args.nproc}", []).append(
                distributed(args.data, args, args.nproc, args.strategy, Path(tmp, f"b{r}"))
            )
            with _threads(max(1, (os.cpu_count() or 1) // args.nproc)):
                runs.setdefault(f"{args.strategy}_1_same_threads", []).append(
                    distributed(args.data, args, 1, args.strategy, Path(tmp, f"c{r}"))
                )
    tok_s = {k: statistics.median(v) for k, v in runs.items()}
    out: dict[str, Any] = {
        "benchmark": "train_dist",
        "env": environment(torch.device(args.device)),
        "args": {k: str(v) for k, v in vars(args).items()},
        "tokens_per_sec": {k: round(v, 1) for k, v in tok_s.items()},
        "runs": runs,
    }
    if args.device == "cuda":
        out["fsdp_vs_plain"] = round(tok_s["fsdp_1"] / tok_s["plain"], 3)
        out["target"] = "fsdp_vs_plain >= 0.95"
        save_gpu_result("train_dist", out)
    else:
        one, many = tok_s[f"{args.strategy}_1"], tok_s[f"{args.strategy}_{args.nproc}"]
        out["speedup"] = round(many / one, 3)
        out["scaling_efficiency"] = round(many / (args.nproc * one), 3)
        out["dist_1_vs_plain"] = round(one / tok_s["plain"], 3)
        per_core = tok_s[f"{args.strategy}_1_same_threads"]
        out["per_core_scaling_efficiency"] = round(many / (args.nproc * per_core), 3)
        save_result("train_dist_cpu", out)


if __name__ == "__main__":
    main()
