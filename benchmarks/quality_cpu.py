"""Model quality per second: Forge's defaults against a plain PyTorch character-level GPT, same wall clock each.

Both train on the Shakespeare corpus for ``--seconds`` of wall clock and are scored in bits per byte on a
held-out English text that is not Shakespeare and was never tuned on: the GNU GPL v3 (/usr/share/common-licenses,
shipped by every Debian system). Forge's arm is ``forge train DATA --time SECONDS`` through the Python API, all
defaults (``preset="auto"``); its tokenizer is trained (and cached) before the clock starts, as the plain loop's
byte vocabulary needs no training. Where the defaults compile the training step (a CPU budget of 90 s or more),
the compile is cold, as on a user's first run: Inductor's cache is a fresh directory unless
TORCHINDUCTOR_CACHE_DIR is set. The baseline is a nanoGPT-style loop over bytes (AdamW, fixed shape, warm-up
then a constant LR, stopped by the clock). Target (CPU, 120 s): Forge <= 2.6 bits per byte and <= 0.85x the
plain loop's figure.

    python benchmarks/quality_cpu.py [--seconds 120]
    python benchmarks/quality_cpu.py --device cuda --seconds 600   # against HF transformers' Trainer, defaults
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="forge-quality-inductor-"))
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import forge
from _common import SHAKESPEARE, environment, save_gpu_result, save_result
from forge.evaluate import evaluate

HELD_OUT = Path("/usr/share/common-licenses/GPL-3")


def corpus_bytes(data: Path) -> torch.Tensor:
    files = sorted(data.rglob("*.txt")) if data.is_dir() else [data]
    return torch.frombuffer(bytearray(b"\n\n".join(f.read_bytes() for f in files)), dtype=torch.uint8).long()


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj, self.heads = nn.Linear(d, 3 * d), nn.Linear(d, d), heads
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.mlp(self.ln2(x))


class CharGPT(nn.Module):
    """nanoGPT's shape over bytes: learned positions, pre-LayerNorm blocks, a tied head."""

    def __init__(self, d: int = 128, layers: int = 4, heads: int = 4, block: int = 128) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(256, d), nn.Embedding(block, d)
        self.blocks = nn.Sequential(*(Block(d, heads) for _ in range(layers)))
        self.ln, self.block = nn.LayerNorm(d), block
        for module in self.modules():  # nanoGPT's initialisation: N(0, 0.02) weights, zero biases
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.ln(self.blocks(x)) @ self.tok.weight.T


def plain_arm(
    data: torch.Tensor, seconds: float, device: torch.device, batch: int = 32, also: tuple[Path, ...] = ()
) -> dict[str, Any]:
    """The plain loop: random windows, AdamW at 1e-3 after 50 warm-up steps, until the clock runs out. Scored on
    the held-out text, and on each of ``also`` (under ``also``, by file name)."""
    torch.manual_seed(0)
    model = CharGPT().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    started, step = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        for group in opt.param_groups:
            group["lr"] = 1e-3 * min(1.0, (step + 1) / 50)
        ix = torch.randint(len(data) - model.block - 1, (batch,))
        x = torch.stack([data[i : i + model.block] for i in ix]).to(device)
        y = torch.stack([data[i + 1 : i + 1 + model.block] for i in ix]).to(device)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
    train_seconds = time.perf_counter() - started
    bpb = byte_bits(lambda ids: model(ids), HELD_OUT.read_bytes(), model.block, device)
    out: dict[str, Any] = {"bits_per_byte": round(bpb, 4), "steps": step, "train_seconds": round(train_seconds, 1)}
    if also:
        out["also"] = {p.name: round(byte_bits(model, p.read_bytes(), model.block, device), 4) for p in also}
    return out


@torch.no_grad()
def byte_bits(logits: Any, text: bytes, block: int, device: torch.device) -> float:
    """Bits per byte of a byte-level model: windows of ``block`` moving by half of it, each byte scored once."""
    ids = torch.tensor(list(text), device=device)
    stride, total, scored = block // 2, 0.0, 0
    for start in range(0, len(ids) - 1, stride):
        window = ids[max(0, start + stride - block) : start + stride + 1]
        if len(window) < 2:
            break
        out = logits(window[None, :-1])[0].float()
        new = min(stride, len(window) - 1) if start else len(window) - 1
        total += F.cross_entropy(out[-new:], window[1:][-new:], reduction="sum").item()
        scored += new
    return total / math.log(2) / scored


def forge_arm(
    seconds: float, device: str, data: Path = SHAKESPEARE, also: tuple[Path, ...] = (), **options: Any
) -> dict[str, Any]:
    """Forge's defaults, ``forge train DATA --time SECONDS`` (and ``options``); the tokenizer is cached by a
    first, 1-step run. Scored on the held-out text, and on each of ``also`` (under ``also``, by file name)."""
    forge.train(data, preset="auto", steps=1, time=seconds, eval_every=0, device=device, compile=False)
    started = time.perf_counter()
    result = forge.train(data, preset="auto", time=seconds, device=device, **options)
    wall = time.perf_counter() - started
    score = evaluate(result.model, result.tokenizer, HELD_OUT)
    extra = {p.name: round(evaluate(result.model, result.tokenizer, p).bits_per_byte, 4) for p in also}
    return {
        **({"also": extra} if extra else {}),
        "bits_per_byte": round(score.bits_per_byte, 4),
        "steps": result.step,
        "auto": result.auto,
        "kept_step": result.kept[0] if result.kept else None,
        "timing": {k: round(v, 2) for k, v in result.timing.items() if v is not None},
        "wall_seconds": round(wall, 1),
    }


def hf_arm(data: Path, seconds: float) -> dict[str, Any]:
    """HF transformers' Trainer with its defaults (lr 5e-5, linear decay), GPT-2's default config over bytes,
    stopped by a callback when the clock runs out."""
    import transformers  # lazily: installed on the GPU machine, not on the CPU one
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    block = 256
    ids = corpus_bytes(data)
    windows = ids[: len(ids) // block * block].view(-1, block)
    dataset = [{"input_ids": w, "labels": w} for w in windows]

    class Clock(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.started = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            control.should_training_stop = time.perf_counter() - self.started >= seconds
            return control

    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=block, bos_token_id=0, eos_token_id=0))
    args = TrainingArguments(output_dir="/tmp/quality_hf", num_train_epochs=100, report_to=[], save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[Clock()])
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started
    model.eval()
    device = next(model.parameters()).device
    bpb = byte_bits(lambda x: model(x).logits, HELD_OUT.read_bytes(), block, device)
    return {
        "bits_per_byte": round(bpb, 4),
        "train_seconds": round(train_seconds, 1),
        "transformers": transformers.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="Wall clock of each arm's training.")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (1 keeps a shared CPU from stalling every op)."
    )
    parser.add_argument(
        "--compare-optimizers",
        action="store_true",
        help="also train Forge with AdamW (the auto preset trains a new model with Muon)",
    )
    parser.add_argument(
        "--compare-keep-best",
        action="store_true",
        help="also train Forge ending with its last weights (--no-keep-best), to see what keep_best saves",
    )
    parser.add_argument("--data", type=Path, default=SHAKESPEARE, help="the training text (default: all 42 texts)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.device == "cuda":
        baseline = {"hf_trainer": hf_arm(args.data, args.seconds)}
    else:
        baseline = {"plain_char_gpt": plain_arm(corpus_bytes(args.data), args.seconds, device)}
    ours = forge_arm(args.seconds, args.device, args.data)
    others: dict[str, Any] = {}
    if args.compare_optimizers:  # the auto preset's is Muon
        others["forge_adamw"] = forge_arm(args.seconds, args.device, args.data, optimizer="adamw")
    if args.compare_keep_best:
        others["forge_last_weights"] = forge_arm(args.seconds, args.device, args.data, keep_best=False)
    base_bpb = next(iter(baseline.values()))["bits_per_byte"]
    out: dict[str, Any] = {
        "benchmark": "quality_cpu",
        "seconds": args.seconds,
        "data": str(args.data),
        "held_out": str(HELD_OUT),
        "forge": ours,
        **others,
        **baseline,
        "ratio": round(ours["bits_per_byte"] / base_bpb, 3),
        "target": {"bits_per_byte": 2.6, "ratio": 0.85} if args.device == "cpu" else None,
        "environment": environment(device),
    }
    suffix = "" if args.data == SHAKESPEARE else f"_{args.data.stem}"
    if args.device == "cuda":
        save_gpu_result(f"quality{suffix}", out)
    else:
        save_result(f"quality_cpu{suffix}", out)


if __name__ == "__main__":
    main()
