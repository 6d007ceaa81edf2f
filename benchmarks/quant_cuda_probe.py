"""Probe: Forge's CUDA quantized GEMM (``forge.kernels.quant_cuda``, NVRTC) against bf16 cuBLAS and the Triton
``"mma"`` kernels, Llama-1B's four linears at M = 64 (and 32, 16), int4 in GGUF blocks of 32 and int8 per channel.

First a correctness pass (groups of 32/64/128, fp32/fp16/bf16 scales, M = 1/5/17/64, N not a multiple of the
CTA's rows, bias, split K) against the fp32 product with the exact weight; then kernel times (CUDA-graph replays
over weight copies that leave L2) for the default config and a sweep of launch configs.

Results (H100, kernel us of the four linears summed at M = 64, each form at its best launch;
``results/quant_cuda_probe_NVIDIA_H100_80GB_HBM3.json``): bf16 cuBLAS 57.4; int4: Triton "mma" 71.9, this kernel
62.3 (mma.sync; the wgmma form within 3-17% of it on qkv, o and down, outside the four best on gate_up); int8:
Triton "mma" 54.2, this kernel 62.3 (the wgmma form). At M = 32 (an earlier run): int4 50.2 against Triton's
72.9 and bf16's 56.0. Summing a K split in a cluster through distributed shared memory never made a linear's best
four.

    python benchmarks/quant_cuda_probe.py            # an NVIDIA GPU
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, save_gpu_result

SHAPES = {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192)}


def int4_weight(n: int, k: int, dev: torch.device, group: int = 32, sdtype=torch.bfloat16):
    """GGUF int4 blocks (N, K/2) uint8, scale and minimum (N, K/group), and the exact fp32 weight."""
    codes = torch.randint(0, 16, (n, k), device=dev, dtype=torch.uint8)
    s = (torch.rand(n, k // group, device=dev) * 0.01 + 0.001).to(sdtype)
    z = (-8 * s.float() + torch.randn(n, k // group, device=dev) * 1e-3).to(sdtype)
    w = (codes.float().view(n, -1, group) * s.float()[..., None] + z.float()[..., None]).view(n, k)
    c = codes.view(n, k // 32, 2, 16)
    q = (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, k // 2).contiguous()
    return q, s, z, w


def int8_weight(n: int, k: int, dev: torch.device, sdtype=torch.float32):
    q = torch.randint(-128, 128, (n, k), device=dev, dtype=torch.int8)
    s = (torch.rand(n, device=dev) * 0.01 + 0.001).to(sdtype)
    return q, s, q.float() * s.float()[:, None]


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).abs().max() / ref.abs().max()).item()


def check(dev: torch.device) -> list[dict]:
    from forge.kernels.quant_cuda import CudaMmaConfig, cuda_mma_linear

    rows = []
    hopper = torch.cuda.get_device_capability(dev) == (9, 0)
    for bits, group, sdt, m, n, k, bias, split, wg in itertools.product(
        (4, 8), (32, 128), (torch.float32, torch.float16, torch.bfloat16), (1, 5, 17, 64), (200,), (1024,),
        (False, True), (1, 4), (0, 1) if hopper else (0,),
    ):  # fmt: skip
        if bits == 8 and group != 32:
            continue
        torch.manual_seed(m + n + k)
        if bits == 4:
            q, s, z, w = int4_weight(n, k, dev, group, sdt)
        else:
            q, s, w = int8_weight(n, k, dev, sdt)
            z = None
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        b = torch.randn(n, device=dev, dtype=torch.bfloat16) if bias else None
        ref = x.float() @ w.T + (b.float() if bias else 0)
        cfg = CudaMmaConfig(warps=8 if wg else 4, pd=1 + m % 2 if wg else 2, split_k=split, wgmma=wg, cluster=wg)
        err = rel_err(cuda_mma_linear(x, q, s, z, b, bits=bits, config=cfg), ref)
        rows.append(
            dict(bits=bits, group=group, scale=str(sdt), m=m, bias=bias, split=split, wgmma=wg, err=round(err, 5))
        )
    bad = [r for r in rows if not r["err"] < 1e-2]
    print(
        f"check: {len(rows)} cases, worst rel err {max(r['err'] for r in rows):.5f}, {len(bad)} over 1e-2", flush=True
    )
    return bad or rows[:3]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, nargs="*", default=[64, 32, 16])
    p.add_argument("--budget-s", type=float, default=240.0)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("quant_cuda_probe.py needs an NVIDIA GPU")
    from quant_gpu import graph_us, l2_copies  # noqa: I001 (benchmarks/ on the path)
    from forge.kernels.quant_cuda import CudaMmaConfig, cuda_config, cuda_mma_linear
    from forge.kernels.quant_gemm import int4_gguf_gemm, int8_channel_gemm
    from forge.kernels.attention_tiles import sm_count

    dev, t0 = torch.device("cuda"), time.time()
    out: dict = {"benchmark": "quant_cuda_probe", "check": check(dev), "rows": []}
    sms = sm_count(dev)
    grid = [
        CudaMmaConfig(1, warps, stages, 2, split, 1, cluster)
        for warps, stages, split, cluster in itertools.product((4, 8), (3, 4), (1, 2, 4, 8), (0, 1))
        if split > 1 or not cluster
    ]
    grid += [CudaMmaConfig(1, 8, 3, 1, split, 1) for split in (1, 2, 4, 8)]
    grid += [CudaMmaConfig(at, 8 // at, 3, 1, split) for at, split in itertools.product((1, 2), (1, 2, 4, 8))]
    for m in args.m:
        for name, (n, k) in SHAPES.items():
            torch.manual_seed(n + k)
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            q4, s4, z4, w4 = int4_weight(n, k, dev)
            q8, s8, w8 = int8_weight(n, k, dev)
            bf16 = [w4.to(torch.bfloat16) for _ in range(l2_copies(n * k * 2, dev))]
            b4 = [(q4.clone(), s4.clone(), z4.clone()) for _ in range(l2_copies(n * k // 2, dev))]
            b8 = [(q8.clone(), s8.clone()) for _ in range(l2_copies(n * k, dev))]
            row = {"m": m, "linear": name, "n": n, "k": k}
            row["bf16_us"] = graph_us(lambda p, x=x: F.linear(x, p), bf16, 50)
            row["triton_int4_us"] = graph_us(lambda p, x=x: int4_gguf_gemm(x, *p), b4, 50)
            row["triton_int8_us"] = graph_us(lambda p, x=x: int8_channel_gemm(x, *p), b8, 50)
            ref4, ref8 = x.float() @ w4.T, x.float() @ w8.T
            for bits, bank, ref in ((4, b4, ref4), (8, b8, ref8)):

                def call(p, cfg, bits=bits, x=x):
                    return (
                        cuda_mma_linear(x, *p, bits=bits, config=cfg)
                        if bits == 4
                        else cuda_mma_linear(x, p[0], p[1], None, bits=8, config=cfg)
                    )

                default = cuda_config(m, n, k, bits=bits, sms=sms)
                row[f"cuda_int{bits}_default"] = {
                    "cfg": default._asdict(),
                    "us": round(graph_us(lambda p, c=default: call(p, c), bank, 50), 2),
                    "err": round(rel_err(call(bank[0], default), ref), 5),
                }
                found = []
                for cfg in grid:
                    if time.time() - t0 > args.budget_s:
                        break
                    try:
                        err = rel_err(call(bank[0], cfg), ref)
                        us = graph_us(lambda p, c=cfg: call(p, c), bank, 30)
                        found.append({**cfg._asdict(), "us": round(us, 2), "err": round(err, 5)})
                    except Exception as e:  # a config the compiler or launch refuses: recorded
                        found.append({**cfg._asdict(), "error": repr(e)[:200]})
                ok = sorted((f for f in found if "us" in f and f["err"] < 1e-2), key=lambda f: f["us"])
                row[f"cuda_int{bits}_best"] = ok[:4]
                row[f"cuda_int{bits}_failed"] = [f for f in found if "us" not in f or f["err"] >= 1e-2][:3]
            print({k_: v for k_, v in row.items() if not k_.endswith("failed")}, flush=True)
            out["rows"].append(row)
    totals = {}
    for m in args.m:
        rs = [r for r in out["rows"] if r["m"] == m]
        if len(rs) != len(SHAPES):
            continue
        t = {"bf16": sum(r["bf16_us"] for r in rs)}
        t["triton_int4"] = sum(r["triton_int4_us"] for r in rs)
        t["triton_int8"] = sum(r["triton_int8_us"] for r in rs)
        for bits in (4, 8):
            t[f"cuda_int{bits}_default"] = sum(r[f"cuda_int{bits}_default"]["us"] for r in rs)
            bests = [r[f"cuda_int{bits}_best"] for r in rs]
            t[f"cuda_int{bits}_best"] = sum(b[0]["us"] for b in bests) if all(bests) else None
        totals[f"m{m}"] = {k_: round(v, 2) if v else v for k_, v in t.items()}
    out["totals_us"] = totals
    out["environment"] = environment(dev)
    print(totals)
    save_gpu_result("quant_cuda_probe", out)


if __name__ == "__main__":
    main()
