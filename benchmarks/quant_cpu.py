"""Quantized inference on the CPU: SmolLM2-135M from its shipped Q4_1 GGUF, Forge against llama.cpp, same run.

Prints JSON and writes benchmarks/results/quant_cpu.json (quant_cpu_promptN.json for another --prompt-tokens N).
Every variant runs in its own process (so its resident memory is its own), with 2 threads, on one 64-token
prompt and 128 greedy new tokens:

- ``llama.cpp``: llama-cpp-python on the same file (the baseline; run first and last, to see drift);
- ``forge-int4``: Forge's default for this file, weights kept quantized (Q4_1 -> int4, Q8_0 -> int8);
- ``forge-bf16``: the same file dequantized to bf16 (``dtype="bfloat16"``);
- ``forge-int4-compiled``: as forge-int4, with the decode step compiled (``compile=True``).

Each reports prefill tok/s (prompt tokens / time to the first token), decode tok/s (the next 127 tokens),
end-to-end ``app.generate`` tok/s (what a user runs: tokenizing, middleware and detokenizing included),
the resident bytes of the weights and the process's peak RSS. Ratios are against llama.cpp's mean.
Without llama-cpp-python the script says so and still measures Forge.

    python benchmarks/quant_cpu.py [--new-tokens 128] [--prompt-tokens 64] [--repeats 3] [--variants ...]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHAKESPEARE, environment, save_result

THREADS = 2
VARIANTS = ("llama.cpp", "forge-int4", "forge-bf16", "forge-int4-compiled")


def prompt_text() -> str:
    return (SHAKESPEARE / "hamlet.txt").read_text(encoding="utf-8")[20000:24000]


def run_llama(path: Path, prompt_tokens: int, new_tokens: int, repeats: int) -> dict[str, object]:
    try:
        from llama_cpp import Llama
    except ImportError:
        return {"skipped": "llama-cpp-python is not installed (pip install llama-cpp-python builds it, ~7 min)"}
    t0 = time.perf_counter()
    n_ctx = max(512, prompt_tokens + new_tokens + 16)
    llm = Llama(model_path=str(path), n_threads=THREADS, n_threads_batch=THREADS, n_ctx=n_ctx, verbose=False)
    load_s = time.perf_counter() - t0
    ids = llm.tokenize(prompt_text().encode(), add_bos=False)[:prompt_tokens]
    prefill, decode, out = [], [], []
    for _ in range(repeats + 1):
        llm.reset()
        t = time.perf_counter()
        out, first = [], 0.0
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            out.append(token)
            if len(out) == 1:
                first = time.perf_counter()
            if len(out) == new_tokens:
                break
        end = time.perf_counter()
        prefill.append(len(ids) / (first - t))
        decode.append((len(out) - 1) / (end - first))
    return {
        "load_s": load_s,
        "prefill_tok_s": statistics.median(prefill[1:]),
        "decode_tok_s": statistics.median(decode[1:]),
        "prompt_tokens": len(ids),
        "ids": out,
        "weight_bytes": path.stat().st_size,  # llama.cpp maps the file: its weights are the file
    }


def run_forge(path: Path, variant: str, prompt_tokens: int, new_tokens: int, repeats: int) -> dict[str, object]:
    from forge import Forge, compute
    from forge.core.generate import generate_tokens
    from forge.core.sampling import SamplingParams

    compile_ = variant.endswith("compiled")
    options: dict[str, object] = {"dtype": "bfloat16"} if variant == "forge-bf16" else {"compile": compile_}
    t0 = time.perf_counter()
    app = Forge.load(path, **options)
    load_s = time.perf_counter() - t0
    model, tok = app.model, app.tokenizer
    assert model is not None and tok is not None
    ids = tok.encode(prompt_text())[:prompt_tokens]
    params = SamplingParams(temperature=0)
    prefill, decode, out, first_s, first_run_s = [], [], [], 0.0, 0.0

    def core_loop() -> tuple[list[int], float, float]:
        t = time.perf_counter()
        out, first = [], 0.0
        for step in generate_tokens(
            model, [ids], max_new_tokens=new_tokens, params=params, compile=compile_, vocab_limit=tok.vocab_size
        ):
            out.append(int(step[0]))
            if len(out) == 1:
                first = time.perf_counter()
        return out, first - t, time.perf_counter() - t

    for i in range(repeats + 1):  # the first run warms up (and compiles)
        # On the compute thread, where the app loaded the model and runs its own generations (forge.compute).
        out, first, end = compute.call(core_loop)
        if i == 0:
            first_s, first_run_s = first, end  # the first run pays the compile, if any
        prefill.append(len(ids) / first)
        decode.append((len(out) - 1) / (end - first))
    text = tok.decode(ids)
    e2e = []
    for _ in range(3):
        t = time.perf_counter()
        reply = app.sync.generate(text, max_tokens=new_tokens, temperature=0)
        e2e.append(len(tok.encode(reply)) / (time.perf_counter() - t))  # it may stop early, at an end token
    info = app.info()
    return {
        "load_s": load_s,
        "first_run_time_to_first_token_s": first_s,
        "first_run_s": first_run_s,
        "prefill_tok_s": statistics.median(prefill[1:]),
        "decode_tok_s": statistics.median(decode[1:]),
        "app_generate_tok_s": max(e2e),
        "prompt_tokens": len(ids),
        "ids": out,
        "weight_bytes": info["weight_bytes"],
        "dtype": info["dtype"],
    }


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(THREADS)
    from forge.models import locate

    path = locate(args.model)
    if args.child == "llama.cpp":
        result = run_llama(path, args.prompt_tokens, args.new_tokens, args.repeats)
    else:
        result = run_forge(path, args.child, args.prompt_tokens, args.new_tokens, args.repeats)
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(result))


def spawn(variant: str, args: argparse.Namespace) -> dict[str, object]:
    cmd = [sys.executable, __file__, "--child", variant, "--model", args.model, "--new-tokens", str(args.new_tokens)]
    cmd += ["--prompt-tokens", str(args.prompt_tokens), "--repeats", str(args.repeats)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    from forge.models import locate

    path = locate(args.model)
    runs: dict[str, dict[str, object]] = {}
    order = [v for v in args.variants if v != "llama.cpp"]
    if "llama.cpp" in args.variants:  # first and last: drift on a noisy machine shows in the two baselines
        order = ["llama.cpp", *order, "llama.cpp#2"]
    for variant in order:
        runs[variant] = spawn(variant.split("#")[0], args)
    base = [r for k, r in runs.items() if k.startswith("llama.cpp") and "decode_tok_s" in r]
    file_bytes = path.stat().st_size
    out: dict[str, object] = {"benchmark": "quant_cpu", "model": path.name, "file_bytes": file_bytes}
    out["threads"], out["new_tokens"], out["prompt_tokens"] = THREADS, args.new_tokens, args.prompt_tokens
    reference = next((r.get("ids") for r in base), None)
    for name, r in runs.items():
        if "weight_bytes" in r:
            r["weights_vs_file"] = r["weight_bytes"] / file_bytes  # type: ignore[operator]
        if base and name.startswith("forge") and "decode_tok_s" in r:
            for key in ("decode_tok_s", "prefill_tok_s"):
                r[f"{key}_vs_llama_cpp"] = r[key] / statistics.mean(b[key] for b in base)  # type: ignore[operator]
            ids = r["ids"]
            r["same_greedy_tokens_as_llama_cpp"] = next(
                (i for i, (a, b) in enumerate(zip(ids, reference, strict=False)) if a != b),
                len(ids),  # type: ignore[arg-type]
            )
        r.pop("ids", None)
    out["runs"] = runs
    out["env"] = environment(torch.device("cpu"))
    # The figure is at a 64-token prompt; other prompt lengths (a long prompt's prefill) go beside it.
    save_result("quant_cpu" if args.prompt_tokens == 64 else f"quant_cpu_prompt{args.prompt_tokens}", out)


if __name__ == "__main__":
    main()
