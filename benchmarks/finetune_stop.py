"""Do chat replies still end after a LoRA fine-tune on plain text? Baseline (22a8872) and current, same run.

Fine-tunes SmolLM2-135M-Instruct with LoRA on a Shakespeare play (plain text), exports it to
GGUF, loads the export and asks a few chat questions as `forge chat` would (its sampling
defaults, one seed). Counts the replies that end on a stop token before ``max_tokens``
(finish_reason "stop"). Each side runs in a subprocess with its own ``src`` and token cache.

    python benchmarks/finetune_stop.py [--steps 30] [--max-tokens 512]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "shakespeare" / "macbeth.txt"
BASELINE = "22a8872"
PROMPTS = (
    "Who is Macbeth?",
    "Write two lines about the sea.",
    "What is the capital of France?",
    "Give me a tip for learning to cook.",
    "Say hello in one sentence.",
)


def worker(args: argparse.Namespace) -> dict[str, object]:
    """Fine-tune, export, reload and chat; what finished how. Runs against whichever ``forge`` is on the path."""
    import torch

    from forge import models
    from forge.chat import render_chat
    from forge.generator import Generator
    from forge.trainer import train

    torch.manual_seed(0)
    work = Path(args.work)
    base = models.load("smollm2")
    t0 = time.perf_counter()
    result = train(
        str(DATA),
        model=base.model,
        tokenizer=base.tokenizer,
        steps=args.steps,
        batch_size=args.batch_size,
        context=args.context,
        lr=args.lr,
        lora_rank=8,
        eval_every=0,
        eval_batches=1,  # the loss is not what is measured here
        device="cpu",
    )
    train_s = time.perf_counter() - t0
    gguf = models.export(result.model, result.tokenizer, work / "tuned.gguf", format="gguf", dtype="f16")
    loaded = models.load(gguf)
    tok = loaded.tokenizer
    special = {"bos_token": tok.bos, "eos_token": tok.eos}
    prompts = [
        render_chat(tok.chat_template, [{"role": "user", "content": p}], special_tokens=special) for p in PROMPTS
    ]
    gen = Generator(loaded.model, tok)
    # `forge chat`'s defaults: temperature 0.2, top_p 0.9.
    done = gen.complete(prompts, max_tokens=args.max_tokens, temperature=0.2, top_p=0.9, seed=0)
    return {
        "train_seconds": round(train_s, 1),
        "train_loss": result.train_loss,
        "stop_tokens": sorted(loaded.tokenizer.stop),
        "stopped": sum(c.finish_reason == "stop" for c in done),
        "replies": len(done),
        "reply_tokens": [c.completion_tokens for c in done],
        "first_reply": done[0].text[:200],
    }


def run_side(src: Path, args: argparse.Namespace, work: Path) -> dict[str, object]:
    cmd = [sys.executable, __file__, "--worker", "--work", str(work)]
    cmd += ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--context", str(args.context)]
    cmd += ["--lr", str(args.lr), "--max-tokens", str(args.max_tokens)]
    env = {**os.environ, "PYTHONPATH": str(src), "FORGE_CACHE_DIR": str(work / "cache")}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{src} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)  # `forge train`'s default
    parser.add_argument("--max-tokens", type=int, default=512)  # `forge chat`'s default
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--work", default=None)
    parser.add_argument("--only", choices=["baseline", "current"], default=None)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        sides = {"current": ROOT / "src"}
        if args.only != "current":
            base = Path(tmp) / "baseline"
            base.mkdir()
            archive = subprocess.run(["git", "archive", BASELINE, "src"], cwd=ROOT, capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", str(base)], input=archive.stdout, check=True)
            sides = {"baseline": base / "src", **({} if args.only == "baseline" else sides)}
        results = {}
        for name, src in sides.items():
            work = Path(tmp) / name
            work.mkdir(exist_ok=True)
            results[name] = run_side(src, args, work)
    setup = {k: getattr(args, k) for k in ("steps", "batch_size", "context", "lr", "max_tokens")}
    print(json.dumps({"benchmark": "finetune_stop", "baseline_commit": BASELINE, "setup": setup, **results}, indent=2))


if __name__ == "__main__":
    main()
