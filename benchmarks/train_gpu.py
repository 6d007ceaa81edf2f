"""GPT-2 124M training throughput on one GPU: Forge's trainer against HF transformers, same run.

B=16, T=1024, bf16 autocast, fused AdamW, gradient clipping, random tokens.
Forge runs exactly what ``forge train`` runs (the ``Trainer`` loop, compiled
by default on CUDA); HF's ``GPT2LMHeadModel`` runs with SDPA attention and
``torch.compile``, the way a user would write it. MFU uses the PaLM formula,
6N + 12·L·H·Q·T FLOPs per token (N without position embeddings), against a
dense bf16 peak (989 TFLOP/s on an H100 SXM).

    python benchmarks/train_gpu.py [--steps 30] [--peak 989e12]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, save_gpu_result
from forge import kernels
from forge.core.optim import clip_grad_norm
from forge.data import TokenDataset
from forge.events import StepEvent
from forge.models import create_model, padded_vocab
from forge.tokenizer import Tokenizer
from forge.trainer import TrainConfig, Trainer

B, T, VOCAB = 16, 1024, 50257
PRESET = "gpt2"
DEVICE = torch.device("cuda")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE.type == "cuda" else float("nan")


def flops_per_token(n_params: int, layers: int, d_model: int) -> float:
    return 6 * n_params + 12 * layers * d_model * T  # H·Q = d_model


def forge_run(dataset: TokenDataset, steps: int, warmup: int, *, compile: bool) -> dict:
    torch.manual_seed(0)
    model = create_model(PRESET, vocab_size=padded_vocab(VOCAB))
    tok = Tokenizer.train(["abc"], kind="char", vocab_size=8)
    times: list[float] = []

    def on_step(event: object) -> None:
        if isinstance(event, StepEvent):
            sync()
            times.append(time.perf_counter())

    config = TrainConfig(
        steps=warmup + steps, batch_size=B, context=T, lr=6e-4, eval_every=0, eval_batches=1, compile=compile
    )
    trainer = Trainer(model, tok, dataset, config, device=DEVICE, listeners=[on_step])
    t0 = time.perf_counter()
    result = trainer.run()
    timed = times[warmup:]
    seconds = timed[-1] - timed[0]
    return {
        "tokens_per_s": B * T * (len(timed) - 1) / seconds,
        "first_steps_s": times[warmup - 1] - t0,
        "final_loss": result.train_loss,
        "peak_mem_gib": peak_gib(),
    }


def hf_run(dataset: TokenDataset, steps: int, warmup: int, *, compile: bool) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    ours = create_model(PRESET).config
    cfg = GPT2Config(
        vocab_size=VOCAB, n_positions=ours.context_length, n_embd=ours.d_model, n_layer=ours.n_layer, n_head=ours.n_head
    )
    cfg._attn_implementation = "sdpa"
    model = GPT2LMHeadModel(cfg).to(DEVICE).train()
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.1, fused=DEVICE.type == "cuda")
    fn = torch.compile(model) if compile else model
    rng = torch.Generator().manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    times = []
    t0 = time.perf_counter()
    for _ in range(warmup + steps):
        x, y = dataset.batch("train", B, T, rng)
        x, y = x.to(DEVICE, non_blocking=True), y.to(DEVICE, non_blocking=True)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            logits = fn(input_ids=x).logits
            loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        clip_grad_norm(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_value = loss.item()  # one sync per step, as Forge's trainer does
        times.append(time.perf_counter())
    timed = times[warmup:]
    return {
        "tokens_per_s": B * T * (len(timed) - 1) / (timed[-1] - timed[0]),
        "first_steps_s": times[warmup - 1] - t0,
        "final_loss": loss_value,
        "peak_mem_gib": peak_gib(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="timed steps (after the warm-up)")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--peak", type=float, default=989e12, help="dense bf16 FLOP/s (H100 SXM: 989e12)")
    p.add_argument("--only", default="", help="comma-separated subset of the variants")
    p.add_argument("--smoke", action="store_true", help="a tiny CPU run that only checks the script works")
    args = p.parse_args()
    global B, T, PRESET, DEVICE
    if args.smoke:
        B, T, PRESET, DEVICE = 2, 64, "tiny", torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokens.bin"
        rng = np.random.default_rng(0)
        rng.integers(0, VOCAB, size=(B * T * 400,), dtype=np.uint16).tofile(path)
        dataset = TokenDataset(path, np.dtype(np.uint16), val_fraction=0.01)
        reference = create_model(PRESET, vocab_size=VOCAB)
        n_params = reference.num_params() - reference.pos_emb.weight.numel()  # type: ignore[union-attr]
        fpt = flops_per_token(n_params, reference.config.n_layer, reference.config.d_model)
        del reference
        variants = {
            "forge_compiled": lambda: forge_run(dataset, args.steps, args.warmup, compile=True),
            "forge_compiled_no_kernels": lambda: _without_kernels(
                lambda: forge_run(dataset, args.steps, args.warmup, compile=True)
            ),
            "forge_eager": lambda: forge_run(dataset, args.steps, args.warmup, compile=False),
            "transformers_compiled": lambda: hf_run(dataset, args.steps, args.warmup, compile=True),
            "transformers_eager": lambda: hf_run(dataset, args.steps, args.warmup, compile=False),
        }
        chosen = [v for v in args.only.split(",") if v] or list(variants)
        results: dict[str, dict] = {}
        for name in chosen:
            if DEVICE.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            row = variants[name]()
            row["mfu"] = row["tokens_per_s"] * fpt / args.peak
            results[name] = row
            print(name, json.dumps(row), file=sys.stderr)
            if DEVICE.type == "cuda":
                torch.cuda.empty_cache()
    out = {
        "benchmark": "train_gpu",
        "model": "gpt2-124M",
        "batch": B,
        "context": T,
        "flops_per_token": fpt,
        "peak_flops": args.peak,
        "results": results,
        "env": environment(DEVICE),
    }
    if args.smoke:
        print(json.dumps(out, indent=2))
        return
    if "forge_compiled" in results and "transformers_compiled" in results:
        out["speedup_vs_transformers_compiled"] = (
            results["forge_compiled"]["tokens_per_s"] / results["transformers_compiled"]["tokens_per_s"]
        )
    save_gpu_result("train_gpu", out)


def _without_kernels(fn: object) -> dict:
    """The compiled step with Inductor's own cross-entropy instead of Forge's fused linear + CE kernel."""
    with kernels.disabled():
        return fn()  # type: ignore[operator]


if __name__ == "__main__":
    if not torch.cuda.is_available() and "--smoke" not in sys.argv:
        sys.exit("train_gpu.py needs an NVIDIA GPU (or --smoke for a CPU check of the script)")
    main()
