"""The sweep that chose ``preset="auto"``'s rule: model shape, vocabulary, batch, LR and schedule for a time budget.

Each arm trains on the Shakespeare corpus for the same wall clock (``forge.train(..., time=...)``, the budget
mechanism itself) and is scored in bits per byte on a TUNING text (the GNU FDL 1.3 and the Apache 2.0 licence,
English prose that is not Shakespeare); the benchmark's held-out text (GPL-3, benchmarks/quality_cpu.py) is never
used here. Arms are interleaved round by round, so CPU contention hits all alike. Each arm is one change to
Forge's defaults; the baseline arm, "defaults", changes nothing. Results are written after every arm. (Until
the label-smoothing sweep's second round, ``_ls2``, included, every arm trained at TrainConfig's lr of 1e-3, not
the 3e-3 that ``forge train`` uses for the auto shape of a 120 s budget.)

    python benchmarks/train_auto_sweep.py [--seconds 120] [--rounds 1] [--arms defaults,b32,...]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import forge
import forge.data
from _common import SHAKESPEARE, environment, save_result
from forge.config import ModelConfig
from forge.evaluate import evaluate
from forge.runs import MEASURED, auto_preset
from forge.tokenizer import Tokenizer
from forge.trainer import TrainConfig

LICENSES = Path("/usr/share/common-licenses")
TUNING = (LICENSES / "GFDL-1.3", LICENSES / "Apache-2.0")
SHAKESPEARE_BYTES = sum(p.stat().st_size for p in SHAKESPEARE.rglob("*.txt"))


#: name -> changes to what ``forge train DATA --time SECONDS`` does by default (the auto preset's shape and
#: vocabulary, TrainConfig's options as the CLI sets them): {"shape": ModelConfig fields, "vocab": int,
#: "tokenizer": "bpe" or "char", "train": TrainConfig fields}. "defaults" changes nothing: it is the baseline every
#: arm is read against.
ARMS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "adamw": {"train": {"optimizer": "adamw"}},
    "compile": {"train": {"compile": True}},
    "b8": {"train": {"batch_size": 8}},
    "b32": {"train": {"batch_size": 32}},
    "lr1e-3": {"train": {"lr": 1e-3}},
    "lr3e-3": {"train": {"lr": 3e-3}},
    "muon_lr0.04": {"train": {"muon_lr": 0.04}},
    "v512": {"vocab": 512},
    "v2048": {"vocab": 2048},
    "ctx64": {"shape": {"context_length": 64}},
    "rope": {"shape": {"position": "rope"}},
    "llama": {"shape": {"position": "rope", "norm": "rmsnorm", "activation": "swiglu", "bias": False}},
    "l6": {"shape": {"n_layer": 6}},
    "d192": {"shape": {"d_model": 192, "n_head": 6}},
    "ctx256": {"shape": {"context_length": 256}},
    "char": {"tokenizer": "char"},
    "dropout0.1": {"shape": {"dropout": 0.1}},
    "wd0.3": {"train": {"weight_decay": 0.3}},
    "wsd": {"train": {"schedule": "wsd"}},
    "ls0": {"train": {"label_smoothing": 0.0}},
    "ls0.05": {"train": {"label_smoothing": 0.05}},
    "ls0.1": {"train": {"label_smoothing": 0.1}},
    "ls0.15": {"train": {"label_smoothing": 0.15}},
    "ls0.2": {"train": {"label_smoothing": 0.2}},
    # BPE-dropout (Provilkov et al., 2020): the training text tokenized with 10% of merges skipped, so the model
    # sees the rarer splits that text unlike its corpus gets; scoring tokenizes as usual.
    "bpe_dropout0.1": {"bpe_dropout": 0.1},
}


def arm_setup(name: str, seconds: float) -> tuple[ModelConfig, int, dict[str, Any]]:
    """The shape, vocabulary and train options of arm ``name`` for a budget of ``seconds``: what ``forge train
    DATA --time SECONDS`` picks (:func:`forge.runs.auto_preset`: the shape, and the lr, optimizer and label
    smoothing measured for it), then the arm's changes."""
    arm = ARMS[name]
    base = TrainConfig(time=seconds, eval_every=0)
    config, pick = auto_preset(SHAKESPEARE, base, "cpu", tokenizer=arm.get("tokenizer", "bpe"), chosen={})
    vocab = arm.get("vocab", pick.vocab_size)
    shape = dataclasses.replace(pick.config, vocab_size=vocab, **arm.get("shape", {}))
    measured = {k: getattr(config, k) for k in MEASURED}
    return shape, vocab, {**measured, **arm.get("train", {})}


def tuning_text() -> str:
    return "\n\n".join(p.read_text() for p in TUNING)


@contextlib.contextmanager
def bpe_dropout(p: float | None) -> Iterator[None]:
    """Within: training data is tokenized with BPE-dropout ``p`` (into a token cache of its own); None: as usual."""
    if p is None:
        yield
        return
    build, write = forge.data.TokenDataset.build.__func__, forge.data._write_tokens

    def dropped(corpus: Any, tokenizer: Tokenizer, path: Path, dtype: Any) -> None:
        spec = json.loads(tokenizer.to_str())
        spec["model"]["dropout"] = p
        write(corpus, Tokenizer.from_str(json.dumps(spec), tokenizer.config()), path, dtype)

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        forge.data.TokenDataset.build = classmethod(
            lambda cls, c, t, **k: build(cls, c, t, **{**k, "directory": cache})
        )
        forge.data._write_tokens = dropped
        try:
            yield
        finally:
            forge.data.TokenDataset.build, forge.data._write_tokens = classmethod(build), write


def run_arm(name: str, seconds: float, text: str) -> dict[str, Any]:
    shape, vocab, options = arm_setup(name, seconds)
    started = time.perf_counter()
    tokenizer = ARMS[name].get("tokenizer", "bpe")
    with bpe_dropout(ARMS[name].get("bpe_dropout")):
        result = forge.train(
            SHAKESPEARE, preset=shape, tokenizer=tokenizer, vocab_size=vocab, time=seconds, eval_every=0,
            device="cpu", **options,
        )  # fmt: skip
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
        "options": {"shape": shape.to_dict(), "vocab": vocab, "tokenizer": tokenizer, **options},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="Training budget of each arm.")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--arms", default=",".join(ARMS), help="Comma-separated arm names.")
    parser.add_argument("--tag", default="", help="appended to the result's file name (a re-sweep beside the old)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (1 keeps a shared CPU from stalling every op)."
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    arms = args.arms.split(",")
    text = tuning_text()
    for name in arms:  # tokenizers trained (and cached) before any clock starts
        shape, vocab, _ = arm_setup(name, args.seconds)
        kind = ARMS[name].get("tokenizer", "bpe")
        forge.train(SHAKESPEARE, preset=shape, tokenizer=kind, vocab_size=vocab, steps=1, eval_every=0, device="cpu")
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
            save_result(f"train_auto_sweep_{int(args.seconds)}s{args.tag}", out)


if __name__ == "__main__":
    main()
