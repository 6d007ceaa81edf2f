"""Forge training throughput against a plain PyTorch loop of the same model and batch.

Prints JSON. Runs are interleaved (forge, plain, forge, plain, ...) and the
median of each is reported, so machine noise hits both sides alike. Target:
forge / plain(same precision) >= 1.0, i.e. Forge adds no overhead.

    python benchmarks/train_cpu.py [--preset small] [--context 256] [--batch-size 8] [--steps 12]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import forge
from _common import SHAKESPEARE, environment, sync
from forge.core.device import autocast_dtype, resolve_device
from forge.data import Corpus, TokenDataset
from forge.events import StepEvent
from forge.models import create_model, padded_vocab


def forge_run(data: Path, args: argparse.Namespace, device: str) -> float:
    """tokens/s of forge.train, timed from its step events after the warmup steps."""
    times: list[float] = []
    forge.train(
        data,
        preset=args.preset,
        steps=args.warmup + args.steps,
        batch_size=args.batch_size,
        context=args.context,
        eval_every=0,
        device=device,
        listeners=[lambda e: times.append(e.elapsed) if isinstance(e, StepEvent) else None],
    )
    elapsed = times[-1] - times[args.warmup - 1]
    return args.steps * args.batch_size * args.context / elapsed


def plain_run(tokens: torch.Tensor, vocab: int, args: argparse.Namespace, dev: torch.device, dtype) -> float:
    """tokens/s of a textbook PyTorch loop: same model class, AdamW, random windows, optional autocast."""
    torch.manual_seed(0)
    model = create_model(args.preset, vocab_size=vocab).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=dev.type == "cuda" or None)
    gen = torch.Generator().manual_seed(0)
    T, B = args.context, args.batch_size

    def step() -> None:
        starts = torch.randint(0, len(tokens) - T - 1, (B,), generator=gen)
        batch = torch.stack([tokens[s : s + T + 1] for s in starts.tolist()]).to(dev)
        x, y = batch[:, :-1], batch[:, 1:]
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()

    for _ in range(args.warmup):
        step()
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(dev)
    return args.steps * B * T / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", type=Path, default=SHAKESPEARE / "hamlet.txt")
    args = p.parse_args()
    dev = resolve_device(args.device)
    dtype = autocast_dtype(dev)

    # Tokenize once (forge caches it), then hand the same tokens to the plain loop.
    warm = forge.train(args.data, preset=args.preset, steps=1, batch_size=1, context=16, eval_every=0, device="cpu")
    ds = TokenDataset.build(Corpus.from_source(args.data), warm.tokenizer)
    tokens = torch.from_numpy(ds.tokens[: ds.split_at].astype("int64"))
    vocab = padded_vocab(warm.tokenizer.vocab_size)

    runs: dict[str, list[float]] = {"forge": [], "plain_same_precision": [], "plain_fp32": []}
    for i in range(args.repeats):
        # Alternate the order (ABBA...) so drift in machine speed hits both sides alike.
        order = ["forge", "plain_same_precision"] if i % 2 == 0 else ["plain_same_precision", "forge"]
        for name in order:
            if name == "forge":
                runs["forge"].append(forge_run(args.data, args, args.device))
            else:
                runs[name].append(plain_run(tokens, vocab, args, dev, dtype))
        if dtype is not None:
            runs["plain_fp32"].append(plain_run(tokens, vocab, args, dev, None))
    med = {k: statistics.median(v) for k, v in runs.items() if v}
    out = {
        "benchmark": "train_cpu",
        "preset": args.preset,
        "context": args.context,
        "batch_size": args.batch_size,
        "forge_precision": str(dtype).removeprefix("torch.") if dtype else "float32",
        "tokens_per_sec": {k: round(v, 1) for k, v in med.items()},
        "runs": {k: [round(x, 1) for x in v] for k, v in runs.items() if v},
        "ratio_forge_vs_plain_same_precision": round(med["forge"] / med["plain_same_precision"], 3),
        "environment": environment(dev),
    }
    if "plain_fp32" in med:
        out["ratio_forge_vs_plain_fp32"] = round(med["forge"] / med["plain_fp32"], 3)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
