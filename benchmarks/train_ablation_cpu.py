"""Which training features buy quality per wall-clock second on a CPU: Muon (and its LR), QK-norm, ReLU², logit
soft-capping and an untied head, each against the baseline (the ``tiny`` preset under AdamW), at equal wall clock.

Every arm trains a byte-level model (vocabulary 256, so the loss in bits is bits per byte) on the Shakespeare corpus
less one play, for ``--seconds`` of training each, with the same time-based schedule (warm-up, flat, linear
warm-down to 0 at the end of the budget). The arms are interleaved and the whole round repeated ``--rounds`` times,
so that load from other processes falls on every arm alike. Scored (bits per byte) on the held-out play and on a
text that is not Shakespeare (the Apache License 2.0): tuning texts, not the final benchmark's held-out text.

    python benchmarks/train_ablation_cpu.py --seconds 40 --rounds 2

Prints JSON and saves it to benchmarks/results/train_ablation_cpu.json. Under heavy load from other processes the
step counts within one budget vary several-fold, so ``--steps N`` compares quality per step instead (saved as
train_ablation_cpu_steps<N>.json); each arm's seconds show its cost per step.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHAKESPEARE, environment, save_result
from forge.config import get_preset
from forge.core.optim import build_optimizer
from forge.core.transformer import Transformer

CORPUS = SHAKESPEARE
HELD_OUT_PLAY = "tempest.txt"
OTHER_TEXT = Path("/usr/share/common-licenses/Apache-2.0")

#: name -> (ModelConfig changes, optimizer, lr for AdamW, Muon's lr)
ARMS: dict[str, tuple[dict[str, Any], str, float, float]] = {
    "baseline": ({}, "adamw", 1e-3, 0.0),
    "muon_lr0.01": ({}, "muon", 1e-3, 0.01),
    "muon_lr0.02": ({}, "muon", 1e-3, 0.02),
    "muon_lr0.04": ({}, "muon", 1e-3, 0.04),
    "qk_norm": ({"qk_norm": True}, "adamw", 1e-3, 0.0),
    "relu2": ({"activation": "relu2"}, "adamw", 1e-3, 0.0),
    "softcap30": ({"logit_softcap": 30.0}, "adamw", 1e-3, 0.0),
    "untied": ({"tie_embeddings": False}, "adamw", 1e-3, 0.0),
    "muon0.02+qk_norm+relu2": ({"qk_norm": True, "activation": "relu2"}, "muon", 1e-3, 0.02),
}


def _bytes(paths: list[Path]) -> torch.Tensor:
    data = b"\n".join(p.read_bytes() for p in paths)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def _lr_factor(frac: float, warmup: float = 0.05, cooldown: float = 0.4) -> float:
    """Warm-up over the first 5% of the budget, flat, then linear to 0 over the last 40%."""
    if frac < warmup:
        return max(frac / warmup, 0.02)
    return min(1.0, max(0.0, (1.0 - frac) / cooldown))


def _train(arm: str, train: torch.Tensor, args: argparse.Namespace, seed: int) -> Transformer:
    changes, kind, lr, muon_lr = ARMS[arm]
    seconds, batch, context = args.seconds, args.batch, args.context
    torch.manual_seed(seed)
    shape = {"n_layer": args.layers, "d_model": args.d_model, "vocab_size": 256, "context_length": context}
    model = Transformer(get_preset("tiny").replace(**shape, **changes))
    opt = build_optimizer(model, kind, lr=lr, weight_decay=0.1, muon_lr=muon_lr or 0.02)
    gen = torch.Generator().manual_seed(seed)
    start, steps = time.perf_counter(), 0
    while (frac := steps / args.steps if args.steps else (time.perf_counter() - start) / seconds) < 1.0:
        scale = _lr_factor(frac)
        for group in opt.param_groups:
            group["lr"] = lr * scale * group.get("lr_scale", 1.0)
        starts = torch.randint(0, len(train) - context - 1, (batch,), generator=gen)
        x = torch.stack([train[s : s + context] for s in starts.tolist()])
        y = torch.stack([train[s + 1 : s + context + 1] for s in starts.tolist()])
        loss = model.loss(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps += 1
    model.steps_done = steps  # type: ignore[attr-defined]
    model.seconds = time.perf_counter() - start  # type: ignore[attr-defined]
    return model


@torch.inference_mode()
def _bpb(model: Transformer, ids: torch.Tensor, context: int, limit: int = 12_000) -> float:
    """Bits per byte over non-overlapping windows (each predicts its own next bytes)."""
    model.eval()
    ids = ids[: limit + 1]
    n = (len(ids) - 1) // context
    x = ids[: n * context].view(n, context)
    y = ids[1 : n * context + 1].view(n, context)
    total = 0.0
    for i in range(0, n, 32):
        logits = model(x[i : i + 32]).float()
        total += F.cross_entropy(logits.reshape(-1, 256), y[i : i + 32].reshape(-1), reduction="sum").item()
    model.train()
    return total / (n * context) / math.log(2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=40.0, help="training wall clock per arm")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--steps", type=int, default=0, help="train this many steps per arm instead (quality per step, immune to load)"
    )
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--d-model", type=int, default=64, help="width (the tiny preset's is 128)")
    ap.add_argument("--layers", type=int, default=2, help="depth (the tiny preset's is 4)")
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ",".join(ARMS))
    args = ap.parse_args()
    torch.set_num_threads(2)
    arms = args.arms.split(",")
    train = _bytes(sorted(p for p in CORPUS.glob("*.txt") if p.name != HELD_OUT_PLAY))
    play, other = _bytes([CORPUS / HELD_OUT_PLAY]), _bytes([OTHER_TEXT])
    name = "train_ablation_cpu" + (f"_steps{args.steps}" if args.steps else "")
    runs: dict[str, list[dict[str, float]]] = {a: [] for a in arms}
    for r in range(args.rounds):
        for arm in arms:
            model = _train(arm, train, args, seed=1337 + r)
            row = {
                "steps": model.steps_done,  # type: ignore[attr-defined]
                "seconds": round(model.seconds, 1),  # type: ignore[attr-defined]
                "bpb_play": round(_bpb(model, play, args.context), 4),
                "bpb_other": round(_bpb(model, other, args.context), 4),
            }
            runs[arm].append(row)
            print(json.dumps({"round": r, "arm": arm, **row}), flush=True)
    summary = {}
    for arm, rows in runs.items():
        summary[arm] = {
            key: round(statistics.mean(row[key] for row in rows), 4)
            for key in ("steps", "seconds", "bpb_play", "bpb_other")
        }
    base = summary.get("baseline")
    if base:
        for s in summary.values():
            s["delta_play_vs_baseline"] = round(s["bpb_play"] - base["bpb_play"], 4)
            s["delta_other_vs_baseline"] = round(s["bpb_other"] - base["bpb_other"], 4)
    out = {
        "benchmark": "train_ablation_cpu",
        "env": environment(torch.device("cpu")),
        "settings": {
            **vars(args),
            "model": "tiny preset at --d-model/--layers, byte vocabulary",
            "held_out_play": HELD_OUT_PLAY,
        },
        "summary": summary,
        "runs": runs,
    }
    save_result(name, out)


if __name__ == "__main__":
    main()
