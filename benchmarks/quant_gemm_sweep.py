"""Launch configs of Forge's quantized Triton GEMM at batch 16 and 64, against bf16 cuBLAS in the same run.

Issue 17's "no loss at batch 64" on the H200: at M = 16 the GEMM path took 18.8 us on the 1B qkv shape where
dequantize-then-cuBLAS took 10.8 and bf16 6.6 (``quant_gpu_NVIDIA_H200.json``, ``paths``), with the config
``gemm_config`` picks (BLOCK_N shrunk to 16 to fill the SMs). This sweeps BLOCK_M, BLOCK_N, BLOCK_K, warps and
stages for the Llama 1B linears, int4 (groups of 32, GGUF blocks) and int8, and reports per shape and batch the
bf16 time, the dequant path, the default config and the best configs, each timed as CUDA-graph replays over
enough weight copies to leave L2 (as quant_gpu.py times kernels).

    python benchmarks/quant_gemm_sweep.py            # an NVIDIA GPU; writes quant_gemm_sweep_<GPU>.json
    python benchmarks/quant_gemm_sweep.py --dry-run  # Triton's interpreter on the CPU, two configs: checks it
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quant_gpu as qg
from _common import environment, save_gpu_result
from forge.kernels.attention_tiles import sm_count
from forge.kernels.quant_gemm import MmaConfig, mma_config
from forge.kernels.quant_matmul import Config, gemm_config, int4_linear, int8_linear


def call(x: torch.Tensor, ops: dict, cfg: Config | None, path: str) -> torch.Tensor:
    ops = dict(ops)
    scheme, bias = ops.pop("scheme"), ops.pop("bias", None)
    if scheme == "int4":
        gguf = ops.get("gguf_blocks", False)
        return int4_linear(x, ops["q"], ops["scale"], ops["minimum"], bias, gguf_blocks=gguf, path=path, config=cfg)
    return int8_linear(x, ops["q"], ops["scale"], ops["minimum"], bias, path=path, config=cfg)


def measure(run: qg.Run, x: torch.Tensor, weight, ref: torch.Tensor, cfg: Config | None, path: str):
    """(microseconds per call, max relative error against ``ref``) of ``path`` with ``cfg``, timed as quant_gpu
    times its kernels (:func:`quant_gpu.time_us`: graph replays over copies of the weight that leave L2)."""

    def fn(x: torch.Tensor, p: tuple) -> torch.Tensor:
        return call(x, p[0].kernel_operands()._asdict(), cfg, path)

    y = fn(x, (weight,)).float()
    return qg.time_us(run, fn, x, (weight,)), ((y - ref).abs().max() / ref.abs().max()).item()


def grid_for(m: int, k: int) -> list[Config]:
    """BLOCK_M covering the rows (re-reading weights per row block costs bandwidth), and split-K (runtime: no new
    compile) where K is long enough to share out. (A first run also tried loading each value's word by its own lane
    and shifting it, gemlite's load, instead of unpacking words in registers: 5-10x slower everywhere, dropped.)"""
    block_m = min(64, max(16, 1 << (m - 1).bit_length()))
    splits = (1, 2, 4) if k >= 4096 else (1, 2)
    return [
        Config(bn, bk, w, block_m=block_m, stages=3, split_k=sk)
        for bn in (32, 64, 128)
        for bk in (128, 256)
        for w in (4, 8)
        for sk in splits
    ]


def mma_grid_for(m: int) -> list[MmaConfig]:
    """The "mma" path's launches: BLOCK_M covering the rows. (Its first run also swept two other ways of unpacking
    int4, one GGUF block at a time: slower on every 1B linear, dropped; quant_mma_sweep_NVIDIA_H100_80GB_HBM3.json.)"""
    block_m = min(64, max(16, 1 << (m - 1).bit_length()))
    return [
        MmaConfig(block_m, bn, bk, w, st, sk)
        for bn in (32, 64)
        for bk in (128, 256)
        for w in (4,)  # mma_config's 4 warps: the probe's 8 never won a 1B linear at M = 64
        for st in (3, 4)
        for sk in (1, 2, 4)
    ]


def _knobs(cfg: Config | MmaConfig) -> list:
    return [cfg.block_m, cfg.block_n, cfg.block_k, cfg.warps, cfg.stages, cfg.split_k]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, Triton's interpreter, the 135M shapes, two configs")
    p.add_argument("--m", default="64", help="rows of x, comma-separated (default: 64, issue 17's batch)")
    p.add_argument("--budget-s", type=float, default=400.0, help="stop sweeping after this long, keeping the rows")
    p.add_argument("--path", choices=["gemm", "mma"], default="mma", help="which kernels' launches to sweep")
    args = p.parse_args()
    ms = tuple(int(v) for v in args.m.split(","))
    dry = args.dry_run
    if dry:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        sys.exit("quant_gemm_sweep.py needs an NVIDIA GPU (or --dry-run)")
    dev = torch.device("cpu" if dry else "cuda")
    run = qg.Run(dev, reps=10, budget_s=float("inf"))
    shape = qg.SHAPES["smollm2-135m" if dry else "llama-1b"]
    makes = qg.forge_weights()
    schemes = ("int4_g32",) if dry else ("int4_g32", "int8")
    rows, t0 = [], time.time()
    for lin, (n, k) in qg.linear_shapes(shape).items():
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        for m in (16,) if dry else ms:
            if time.time() - t0 > args.budget_s:
                break
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            base = qg.time_us(run, lambda x, p: F.linear(x, p[0]), x, (w,))
            for label in schemes:
                weight = makes[label](w)
                ref = F.linear(x.float(), weight.dequantize(torch.float32))

                row = {"linear": lin, "m": m, "n": n, "k": k, "scheme": label, "bf16_us": base}
                for path in ("dequant", args.path):
                    row[f"{path}_us"], row[f"{path}_err"] = measure(run, x, weight, ref, None, path)
                if args.path == "mma":
                    bits = 4 if label.startswith("int4") else 8
                    row["default_config"] = list(mma_config(m, n, k, bits=bits, sms=sm_count(dev)))
                    grid = mma_grid_for(m)
                else:
                    row["default_config"] = list(gemm_config(m, n, k))
                    grid = grid_for(m, k)
                found = []
                for cfg in (grid[:1] + grid[-1:]) if dry else grid:
                    if time.time() - t0 > args.budget_s:
                        break  # out of time: keep what this row has
                    try:
                        us, err = measure(run, x, weight, ref, cfg, args.path)
                        found.append([us, err, *_knobs(cfg)])
                    except Exception as e:  # a config the compiler refuses (shared memory): say so, go on
                        found.append([None, str(e)[:100], *_knobs(cfg)])
                timed_ok = sorted((f for f in found if f[0] is not None), key=lambda f: f[0])
                # [us, max rel err, block_m, block_n, block_k, warps, stages, split_k]
                row["best"] = timed_ok[:8]
                by_split = {sk: next((f for f in timed_ok if f[7] == sk), None) for sk in (1, 2, 4)}
                row["best_by_split"] = {f"split{sk}": f for sk, f in by_split.items()}
                row["best_vs_bf16"] = base / timed_ok[0][0] if timed_ok else None
                print(json.dumps(row), flush=True)
                rows.append(row)
    out = {"benchmark": "quant_gemm_sweep", "path": args.path, "dry_run": dry, "m": ms, "rows": rows}
    out["seconds"] = time.time() - t0
    out["env"] = environment(dev)
    if dry:
        print(json.dumps(out, indent=2))
    else:
        save_gpu_result("quant_gemm_sweep" if args.path == "gemm" else "quant_mma_sweep", out)


if __name__ == "__main__":
    main()
