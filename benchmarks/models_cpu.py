"""SmolLM2-135M-Instruct (Q4_1 GGUF): load time and greedy tokens/s, Forge against transformers, same run.

Prints JSON. Both load the same GGUF file and dequantize it to float; both
decode greedily with a KV cache from the same chat prompt. The greedy token
ids of each Forge run are compared with transformers' (``same_tokens``).
Transformers is the baseline: ratios above 1 mean Forge is faster.

    python benchmarks/models_cpu.py [--new-tokens 64] [--repeats 3] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment
from forge.core.generate import generate_tokens
from forge.core.sampling import SamplingParams
from forge.models import load, locate

MESSAGES = [{"role": "user", "content": "Write a short paragraph about the history of the printing press."}]


def forge_run(path: Path, dtype: torch.dtype, new_tokens: int, repeats: int) -> dict[str, object]:
    t0 = time.perf_counter()
    loaded = load(path)
    model = loaded.model.to(dtype).eval()
    load_s = time.perf_counter() - t0
    tok = loaded.tokenizer
    from forge.chat import render_chat

    prompt = render_chat(tok.chat_template, MESSAGES, special_tokens={"bos_token": tok.bos, "eos_token": tok.eos})
    ids = tok.encode_prompt(prompt)
    speeds, out = [], []
    for _ in range(repeats + 1):  # the first run warms up
        t = time.perf_counter()
        out = [
            int(s[0])
            for s in generate_tokens(model, [ids], max_new_tokens=new_tokens, params=SamplingParams(temperature=0))
        ]
        speeds.append(len(out) / (time.perf_counter() - t))
    reply = next((i for i, t in enumerate(out) if t in tok.stop_ids), len(out))  # tokens before end-of-turn
    return {
        "load_s": load_s,
        "tokens_per_s": statistics.median(speeds[1:]),
        "prompt_tokens": len(ids),
        "reply_tokens": reply,
        "ids": out,
    }


def transformers_run(path: Path, dtype: torch.dtype, new_tokens: int, repeats: int) -> dict[str, object]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()
    load_s = time.perf_counter() - t0
    prompt = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    speeds, out = [], []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        with torch.no_grad():
            gen = model.generate(
                ids,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tok.eos_token_id,
            )
        out = gen[0, ids.shape[1] :].tolist()
        speeds.append(len(out) / (time.perf_counter() - t))
    return {"load_s": load_s, "tokens_per_s": statistics.median(speeds[1:]), "prompt_tokens": ids.shape[1], "ids": out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="a GGUF file or a known model name")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = p.parse_args()
    path = locate(args.model)
    dtype = getattr(torch, args.dtype)
    # transformers first, then Forge, then transformers again: drift on a noisy machine shows in the two baselines.
    base1 = transformers_run(path, dtype, args.new_tokens, args.repeats)
    forge = forge_run(path, dtype, args.new_tokens, args.repeats)
    base2 = transformers_run(path, dtype, args.new_tokens, args.repeats)
    base_tps = (base1["tokens_per_s"] + base2["tokens_per_s"]) / 2  # type: ignore[operator]
    base_load = (base1["load_s"] + base2["load_s"]) / 2  # type: ignore[operator]
    n = forge["reply_tokens"]  # past end-of-turn, transformers' min_new_tokens forbids what Forge may pick
    result = {
        "benchmark": "models_cpu",
        "model": str(path.name),
        "dtype": args.dtype,
        "new_tokens": args.new_tokens,
        "forge": {k: v for k, v in forge.items() if k != "ids"},
        "transformers": [{k: v for k, v in b.items() if k != "ids"} for b in (base1, base2)],
        "speedup_tokens_per_s": forge["tokens_per_s"] / base_tps,  # type: ignore[operator]
        "speedup_load": base_load / forge["load_s"],  # type: ignore[operator]
        "same_tokens": forge["ids"][:n] == base1["ids"][:n],  # type: ignore[index]
        "compared_tokens": n,
        "env": environment(torch.device("cpu")),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
