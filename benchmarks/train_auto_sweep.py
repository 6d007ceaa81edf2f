"""The sweep that chose ``preset="auto"``'s rule: model shape, vocabulary, batch, LR and schedule for a time budget.

Each arm trains on the Shakespeare corpus for the same wall clock (``forge.train(..., time=...)``, the budget
mechanism itself) and is scored in bits per byte on a TUNING text (the GNU FDL 1.3 and the Apache 2.0 licence,
English prose that is not Shakespeare); the benchmark's held-out text (GPL-3, benchmarks/quality_cpu.py) is never
used here. Arms are interleaved round by round, so CPU contention hits all alike. The baseline arm is the old
default (the tiny preset, BPE 2048, cosine). Results are written after every arm.

    python benchmarks/train_auto_sweep.py [--seconds 60] [--rounds 1] [--arms base,d128l4,...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import forge
from _common import SHAKESPEARE, environment, save_result
from forge.config import ModelConfig, get_preset
from forge.evaluate import evaluate

LICENSES = Path("/usr/share/common-licenses")
TUNING = (LICENSES / "GFDL-1.3", LICENSES / "Apache-2.0")


def _shape(width: int, layers: int, context: int, heads: int = 4) -> ModelConfig:
    return ModelConfig(vocab_size=1024, context_length=context, n_layer=layers, n_head=heads, d_model=width)


#: name -> (model shape, BPE vocabulary, train options)
ARMS: dict[str, tuple[ModelConfig, int, dict[str, Any]]] = {
    "base_tiny": (get_preset("tiny"), 2048, {}),
    "d128l2c128": (_shape(128, 2, 128), 1024, {}),
    "d128l4c128": (_shape(128, 4, 128), 1024, {}),
    "d192l4c128": (_shape(192, 4, 128, 6), 1024, {}),
    "d256l4c128": (_shape(256, 4, 128), 1024, {}),
    "d128l4c64": (_shape(128, 4, 64), 1024, {}),
    "d128l4c128_v512": (_shape(128, 4, 128), 512, {}),
    "d128l4c128_v2048": (_shape(128, 4, 128), 2048, {}),
    "d128l4c128_lr3e-3": (_shape(128, 4, 128), 1024, {"lr": 3e-3}),
    "d128l4c128_wsd": (_shape(128, 4, 128), 1024, {"schedule": "wsd"}),
    "d128l4c128_b32": (_shape(128, 4, 128), 1024, {"batch_size": 32}),
    "d128l4c128_b8": (_shape(128, 4, 128), 1024, {"batch_size": 8}),
}


def tuning_text() -> str:
    return "\n\n".join(p.read_text() for p in TUNING)


def run_arm(name: str, seconds: float, text: str) -> dict[str, Any]:
    shape, vocab, options = ARMS[name]
    started = time.perf_counter()
    result = forge.train(
        SHAKESPEARE,
        preset=shape,
        vocab_size=vocab,
        time=seconds,
        eval_every=0,
        device="cpu",
        **{"batch_size": 16, "lr": 2e-3, **options},
    )
    wall = time.perf_counter() - started
    score = evaluate(result.model, result.tokenizer, text)
    return {
        "arm": name,
        "bits_per_byte": round(score.bits_per_byte, 4),
        "steps": result.step,
        "val_loss": result.val_loss,
        "train_seconds": round(result.timing["total"] or 0.0, 2),
        "wall_seconds": round(wall, 2),
        "parameters": result.model.num_params(),
        "options": {"shape": shape.to_dict(), "vocab": vocab, "batch_size": 16, "lr": 2e-3, **options},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="Training budget of each arm.")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--arms", default=",".join(ARMS), help="Comma-separated arm names.")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (1 keeps a shared CPU from stalling every op)."
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    arms = args.arms.split(",")
    text = tuning_text()
    for name in arms:  # tokenizers trained (and cached) before any clock starts
        forge.train(SHAKESPEARE, preset=ARMS[name][0], vocab_size=ARMS[name][1], steps=1, eval_every=0, device="cpu")
    out: dict[str, Any] = {
        "benchmark": "train_auto_sweep",
        "seconds_per_arm": args.seconds,
        "tuning_text": [str(p) for p in TUNING],
        "environment": environment(torch.device("cpu")),
        "runs": [],
    }
    for _ in range(args.rounds):
        for name in arms:
            out["runs"].append(run_arm(name, args.seconds, text))
            print(out["runs"][-1], file=sys.stderr, flush=True)
            save_result(f"train_auto_sweep_{int(args.seconds)}s", out)


if __name__ == "__main__":
    main()
