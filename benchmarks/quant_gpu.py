"""Weight-only int8 and int4 on a GPU: each linear's kernels, then decode tokens/s, against bf16 in the same run.

Kernel level: every linear of the SmolLM2-135M and 1B Llama shapes (fused qkv, attention output, fused
gate|up, down) at M = 1 (one sequence decoding) and M = 64 (a batch of 64): bf16 cuBLAS; int8 through
cuBLAS (``F.linear(x, q.to(bf16)) * scale``, eager and, unless --quick, torch.compiled); Forge's Triton
int8 and int4 (groups of 32 and 128, and group 32 reading tinygemm's [scale, zero] buffer: ``_sz``);
tinygemm int4 (the same groups); torchao's int4 weight-only where torchao is installed. Each variant
cycles through copies of its weight that together exceed the L2 cache, captured in one CUDA graph, so a
time is what a decode step sees: weights from HBM, no launch overhead. ``gbps`` counts the bytes of
weights, scales, x and y; ``max_rel_err`` checks each output
against the matmul with the dequantized weight.

End to end: greedy decode tokens/s of the random-init Forge Transformer (as benchmarks/decode_gpu.py
builds it) at batch 1 and 64, in bf16 and after ``quantize_model(model, "int8" | "int4")``, CUDA graphs
and Forge's kernels on; ``logits_rel_err`` compares a prompt's logits with the bf16 model's.

--sweep also times the Triton GEMV over a grid of launch configs at M = 1, and the GEMM at M = 64, and
reports the best next to the heuristic's choice (``forge.kernels.quant_matmul.gemv_config`` and
``gemm_config``). Every variant runs in a try/except:
a failure is recorded in the JSON, not raised.

    python benchmarks/quant_gpu.py [--quick] [--sweep] [--new-tokens 256] [--shapes smollm2-135m,llama-1b]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, save_gpu_result
from decode_gpu import SHAPES, shape_config
from forge.core.generate import generate_tokens
from forge.core.quantize import quantize_model
from forge.core.sampling import SamplingParams
from forge.core.transformer import Transformer
from forge.kernels.quant_matmul import (
    Config,
    dequantize_int4,
    dequantize_int8,
    gemv_config,
    int4_linear,
    int4_linear_sz,
    int4_linear_tinygemm,
    int8_linear,
    int8_linear_cuda,
    pack_int4,
    pack_int4_cuda,
    scales_and_zeros_cuda,
    tinygemm_supports,
)

BF16 = torch.bfloat16
DEV = torch.device("cuda")
#: Targets from issue 17: 1B Llama shape, batch 1, tokens/s.
TARGETS = {"int4": 1100.0, "int8": 950.0}

# A variant turns a bf16 weight into (fn, params, fp32 reference weight): fn(x, params) is x @ W.T.
Prepared = tuple[Callable[[torch.Tensor, tuple], torch.Tensor], tuple, torch.Tensor]


def linear_shapes(shape: dict) -> dict[str, tuple[int, int]]:
    """(out, in) of each linear of one block, as Forge's Transformer fuses them."""
    d, ff, heads, kv = shape["d_model"], shape["d_ff"], shape["n_head"], shape["n_kv_head"]
    hd = d // heads
    return {"qkv": ((heads + 2 * kv) * hd, d), "out": (d, d), "gate_up": (2 * ff, d), "down": (d, ff)}


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel symmetric round-to-nearest: q int8 (N, K), scale fp32 (N,)."""
    scale = w.float().abs().amax(dim=1).clamp(min=1e-12) / 127
    return torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric round-to-nearest: q int32 0..15 (N, K), scale and minimum (N, K/g) fp32."""
    n, k = w.shape
    wg = w.float().reshape(n, k // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = (hi - lo).clamp(min=1e-12) / 15
    q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    return q.reshape(n, k), scale, lo


def sz_reference(q: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    """The fp32 weight of int4 values with tinygemm's (K/g, N, 2) [scale, zero]: (q - 8) * scale + zero."""
    n, k = q.shape
    w = (q.float().reshape(n, -1, group) - 8) * sz[:, :n, 0].t().float()[..., None]
    return (w + sz[:, :n, 1].t().float()[..., None]).reshape(n, k)


def variants(quick: bool) -> dict[str, Callable[[torch.Tensor], Prepared]]:
    def bf16(w: torch.Tensor) -> Prepared:
        return (lambda x, p: F.linear(x, p[0])), (w,), w.float()

    def int8_cublas(w: torch.Tensor, compiled: bool = False) -> Prepared:
        q, s = quantize_int8(w)
        fn = torch.compile(int8_linear_cuda, dynamic=False) if compiled else int8_linear_cuda
        return (lambda x, p: fn(x, *p)), (q, s), dequantize_int8(q, s)

    def int8_triton(w: torch.Tensor) -> Prepared:
        q, s = quantize_int8(w)
        return (lambda x, p: int8_linear(x, *p)), (q, s), dequantize_int8(q, s)

    def int4_triton(w: torch.Tensor, group: int) -> Prepared:
        q, s, z = quantize_int4(w, group)
        params = (pack_int4(q), s.to(BF16), z.to(BF16))
        return (lambda x, p: int4_linear(x, *p)), params, dequantize_int4(*params)

    def int4_triton_sz(w: torch.Tensor, group: int) -> Prepared:
        q, s, z = quantize_int4(w, group)
        params = (pack_int4(q), scales_and_zeros_cuda(s, z))  # tinygemm's [scale, zero] buffer, read in place
        return (lambda x, p: int4_linear_sz(x, *p)), params, sz_reference(q, params[1], group)

    def int4_tinygemm(w: torch.Tensor, group: int) -> Prepared:
        if not tinygemm_supports(w.shape[0], w.shape[1], group):
            raise ValueError(f"tinygemm does not take shape {tuple(w.shape)} at group {group}")
        q, s, z = quantize_int4(w, group)
        sz = scales_and_zeros_cuda(s, z)  # bf16 (K/g, N, 2): w = (q - 8) * scale + zero
        fn = int4_linear_tinygemm
        return (lambda x, p: fn(x, p[0], group, p[1])), (pack_int4_cuda(q), sz), sz_reference(q, sz, group)

    out: dict[str, Callable[[torch.Tensor], Prepared]] = {
        "bf16_cublas": bf16,
        "int8_cublas_eager": int8_cublas,
        "int8_triton": int8_triton,
        "int4_triton_g32": lambda w: int4_triton(w, 32),
        "int4_triton_g128": lambda w: int4_triton(w, 128),
        "int4_triton_sz_g32": lambda w: int4_triton_sz(w, 32),
        "int4_tinygemm_g32": lambda w: int4_tinygemm(w, 32),
        "int4_tinygemm_g128": lambda w: int4_tinygemm(w, 128),
    }
    if not quick:
        out["int8_cublas_compiled"] = lambda w: int8_cublas(w, compiled=True)
    torchao = torchao_variant()
    if torchao is not None:
        out["int4_torchao_g32"] = torchao
    return out


def torchao_variant() -> Callable[[torch.Tensor], Prepared] | None:
    """torchao's int4 weight-only (tinygemm inside) on an nn.Linear, if torchao is installed."""
    try:
        import torchao.quantization as tq
    except ImportError:
        return None

    def prepare(w: torch.Tensor) -> Prepared:
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=DEV, dtype=BF16)
        lin.weight.data.copy_(w)
        config = tq.Int4WeightOnlyConfig(group_size=32) if hasattr(tq, "Int4WeightOnlyConfig") else None
        tq.quantize_(lin, config if config is not None else tq.int4_weight_only(group_size=32))
        ref = lin(torch.eye(w.shape[1], device=DEV, dtype=BF16)).t().float()  # its dequantized weight
        return (lambda x, p: p[0](x)), (lin,), ref

    return prepare


def nbytes(params: tuple) -> int:
    return sum(t.numel() * t.element_size() for t in params if isinstance(t, torch.Tensor)) or sum(
        t.numel() * t.element_size() for m in params if isinstance(m, torch.nn.Module) for t in m.state_dict().values()
    )


def clone(params: tuple) -> tuple:
    return tuple(t.clone() if isinstance(t, torch.Tensor) else copy.deepcopy(t) for t in params)


def graph_time_us(
    fn: Callable[[torch.Tensor, tuple], torch.Tensor], x: torch.Tensor, params: tuple, reps: int
) -> float:
    """µs per call, replaying a CUDA graph that calls fn once per copy of params (together 2x the L2, or 256)."""
    l2 = torch.cuda.get_device_properties(DEV).L2_cache_size
    copies = max(2, min(256, math.ceil(2 * l2 / max(1, nbytes(params)))))
    bank = [params] + [clone(params) for _ in range(copies - 1)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles, cuBLAS workspaces
        for p in bank[:2]:
            fn(x, p)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for p in bank:
            fn(x, p)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    us = start.elapsed_time(end) * 1000 / (reps * copies)
    del graph, bank
    return us


def kernel_row(label: str, prepare: Callable[[torch.Tensor], Prepared], w: torch.Tensor, m: int, reps: int) -> dict:
    row: dict[str, object] = {}
    t0 = time.perf_counter()
    try:
        fn, params, ref_w = prepare(w)
        x = torch.randn(m, w.shape[1], device=DEV, dtype=BF16)
        y = fn(x, params).float()
        ref = F.linear(x.float(), ref_w)
        row["max_rel_err"] = ((y - ref).abs().max() / ref.abs().max()).item()
        us = graph_time_us(fn, x, params, reps)
        moved = nbytes(params) + x.numel() * 2 + m * w.shape[0] * 2
        row.update(us=us, gbps=moved / us / 1e3, weight_bytes=nbytes(params))
    except Exception as e:  # recorded, not raised: one variant's failure leaves the others' numbers
        row["error"] = f"{type(e).__name__}: {e}"[:400]
    row["wall_s"] = round(time.perf_counter() - t0, 2)
    return row


def kernel_rows(shapes: list[str], quick: bool) -> list[dict]:
    rows = []
    table = variants(quick)
    for name in shapes:
        for layer, (n, k) in linear_shapes(SHAPES[name]).items():
            w = torch.randn(n, k, device=DEV, dtype=BF16) * 0.02
            for m in (1, 64):
                row: dict[str, object] = {"shape": name, "linear": layer, "n": n, "k": k, "m": m}
                for label, prepare in table.items():
                    row[label] = kernel_row(label, prepare, w, m, reps=5 if quick else 20)
                base = row["bf16_cublas"].get("us")  # type: ignore[union-attr]
                if base:
                    for label in table:
                        us = row[label].get("us")  # type: ignore[union-attr]
                        if us:
                            row[label]["speedup_vs_bf16"] = base / us  # type: ignore[index]
                print(json.dumps(row), file=sys.stderr)
                rows.append(row)
    return rows


def sweep_rows(shapes: list[str]) -> list[dict]:
    """The Triton GEMV at M = 1 over a grid of launch configs, int4 (group 32) and int8 (per channel)."""
    rows = []
    for name in shapes:
        for layer, (n, k) in linear_shapes(SHAPES[name]).items():
            w = torch.randn(n, k, device=DEV, dtype=BF16) * 0.02
            x = torch.randn(1, k, device=DEV, dtype=BF16)
            q4, s4, z4 = quantize_int4(w, 32)
            p4 = (pack_int4(q4), s4.to(BF16), z4.to(BF16))
            p8 = quantize_int8(w)
            for bits, params, fn in ((4, p4, int4_linear), (8, p8, int8_linear)):
                row = {"shape": name, "linear": layer, "n": n, "k": k, "bits": bits}
                times = {}
                blocks_k = (512, 1024, 2048) if bits == 4 else (256, 512, 1024)
                for bn, bk, warps, grouped in itertools.product((2, 4, 8, 16, 32), blocks_k, (4, 8), (True, False)):
                    if (bits == 8 and not grouped) or bk > 2 * triton_next_pow2(k):
                        continue
                    cfg = Config(block_n=bn, block_k=bk, warps=warps, grouped=grouped)
                    try:
                        times[cfg] = graph_time_us(lambda x, p, c=cfg, f=fn: f(x, *p, config=c), x, params, reps=10)
                    except Exception as e:
                        row.setdefault("errors", []).append(f"{cfg}: {type(e).__name__}: {e}"[:200])  # type: ignore[union-attr]
                heuristic = gemv_config(1, n, k, bits, 32 if bits == 4 else 0, DEV)
                best = min(times, key=times.__getitem__)
                row.update(best=best._asdict(), best_us=times[best], heuristic=heuristic._asdict())
                row["heuristic_us"] = times.get(heuristic) or graph_time_us(
                    lambda x, p, f=fn: f(x, *p), x, params, reps=10
                )
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
    return rows


def gemm_sweep_rows(shapes: list[str], m: int = 64) -> list[dict]:
    """The Triton GEMM at M = 64 over a grid of launch configs, int4 (group 32) and int8 (per channel)."""
    rows = []
    for name in shapes:
        for layer, (n, k) in linear_shapes(SHAPES[name]).items():
            w = torch.randn(n, k, device=DEV, dtype=BF16) * 0.02
            x = torch.randn(m, k, device=DEV, dtype=BF16)
            q4, s4, z4 = quantize_int4(w, 32)
            for bits, params, fn in (
                (4, (pack_int4(q4), s4.to(BF16), z4.to(BF16)), int4_linear),
                (8, quantize_int8(w), int8_linear),
            ):
                row: dict[str, object] = {"shape": name, "linear": layer, "n": n, "k": k, "m": m, "bits": bits}
                times = {}
                for bn, bk, warps, stages in itertools.product((16, 32, 64, 128), (64, 128, 256), (4, 8), (2, 4)):
                    cfg = Config(block_n=bn, block_k=bk, warps=warps, block_m=64, stages=stages)
                    try:
                        times[cfg] = graph_time_us(lambda x, p, c=cfg, f=fn: f(x, *p, config=c), x, params, reps=10)
                    except Exception as e:
                        row.setdefault("errors", []).append(f"{cfg}: {type(e).__name__}: {e}"[:200])  # type: ignore[union-attr]
                best = min(times, key=times.__getitem__)
                row.update(best=best._asdict(), best_us=times[best])
                row["heuristic_us"] = graph_time_us(lambda x, p, f=fn: f(x, *p), x, params, reps=10)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
    return rows


def triton_next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


# -- end to end ------------------------------------------------------------------------------------------


def build(shape: dict, context: int) -> Transformer:
    """The random-init bf16 model of benchmarks/decode_gpu.py, initialised on the GPU (seconds, not a minute)."""
    cfg = shape_config(shape, context)
    torch.manual_seed(0)
    with torch.device(DEV):
        model = Transformer(cfg)
    return model.to(BF16).eval()


def quantized(base: Transformer, scheme: str) -> tuple[Transformer, dict]:
    """A quantized copy of ``base``: quantized on the GPU, or (if that fails) on the CPU and moved back."""
    info: dict[str, object] = {}
    t0 = time.perf_counter()
    graphs = base.__dict__.pop("_decode_graphs", None)  # captured CUDA graphs kept on the model can't be copied
    try:
        model = quantize_model(copy.deepcopy(base), scheme)
        info["quantized_on"] = "cuda"
    except Exception as e:
        info["cuda_quantize_error"] = f"{type(e).__name__}: {e}"[:300]
        model = quantize_model(copy.deepcopy(base).cpu(), scheme).to(DEV)
        info["quantized_on"] = "cpu, then .to('cuda')"
    finally:
        if graphs is not None:
            base.__dict__["_decode_graphs"] = graphs
    info["quantize_s"] = time.perf_counter() - t0
    return model, info


def weight_bytes(model: torch.nn.Module) -> int:
    seen = {t.data_ptr(): t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers())}
    return sum(seen.values())


def decode_tps(model: Transformer, prompts: torch.Tensor, new_tokens: int) -> float:
    greedy = SamplingParams(temperature=0)
    ids = prompts.tolist()

    def run() -> None:
        for _ in generate_tokens(model, ids, max_new_tokens=new_tokens, params=greedy, cuda_graphs=True):
            pass

    run()  # warm-up: graph capture, kernel compiles
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    run()
    torch.cuda.synchronize()
    return prompts.shape[0] * new_tokens / (time.perf_counter() - t0)


def decode_rows(name: str, new_tokens: int, prompt_tokens: int = 16) -> list[dict]:
    shape = SHAPES[name]
    base = build(shape, prompt_tokens + new_tokens + 8)
    probe = torch.randint(0, shape["vocab_size"], (1, 32), device=DEV, generator=torch.Generator(DEV).manual_seed(2))
    with torch.no_grad():
        base_logits = base(probe).float()
    rows = []
    for scheme in ("bf16", "int8", "int4"):
        row: dict[str, object] = {"shape": name, "scheme": scheme, "new_tokens": new_tokens}
        try:
            model, info = (base, {}) if scheme == "bf16" else quantized(base, scheme)
            row.update(info, weight_bytes=weight_bytes(model))
            with torch.no_grad():
                logits = model(probe).float()
            row["logits_rel_err"] = ((logits - base_logits).norm() / base_logits.norm()).item()
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:400]
            row["traceback"] = traceback.format_exc(limit=4)[-1500:]
            rows.append(row)
            continue
        for batch in (1, 64):
            g = torch.Generator().manual_seed(1)
            prompts = torch.randint(0, shape["vocab_size"], (batch, prompt_tokens), generator=g)
            try:
                row[f"batch{batch}_tokens_per_s"] = decode_tps(model, prompts, new_tokens)
            except Exception as e:
                row[f"batch{batch}_error"] = f"{type(e).__name__}: {e}"[:400]
        if model is not base:
            del model
        torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    return rows


def summary(decode: list[dict]) -> dict:
    """Issue 17's targets: the 1B shape at batch 1, and no loss against bf16 at batch 64."""
    by = {(r["shape"], r["scheme"]): r for r in decode}
    out: dict[str, object] = {}
    bf16 = by.get(("llama-1b", "bf16"), {})
    for scheme, target in TARGETS.items():
        r = by.get(("llama-1b", scheme), {})
        tps1, tps64 = r.get("batch1_tokens_per_s"), r.get("batch64_tokens_per_s")
        out[f"llama-1b_{scheme}_batch1_tokens_per_s"] = tps1
        out[f"llama-1b_{scheme}_batch1_meets_{int(target)}"] = tps1 is not None and tps1 >= target
        base64 = bf16.get("batch64_tokens_per_s")
        if tps64 is not None and base64:
            out[f"llama-1b_{scheme}_batch64_vs_bf16"] = tps64 / base64
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions and tokens, no torch.compile")
    p.add_argument("--sweep", action="store_true", help="also sweep the Triton GEMV's launch configs at M = 1")
    p.add_argument("--new-tokens", type=int, default=None, help="decode tokens per run (256; --quick: 64)")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--skip", default="", help="comma-separated parts to leave out: kernels, decode")
    args = p.parse_args()
    shapes = args.shapes.split(",")
    new_tokens = args.new_tokens or (64 if args.quick else 256)
    skip = set(filter(None, args.skip.split(",")))
    out: dict[str, object] = {"benchmark": "quant_gpu", "quick": args.quick}
    t0 = time.perf_counter()
    if "kernels" not in skip:
        out["kernels"] = kernel_rows(shapes, args.quick)
    if args.sweep:
        out["sweep"] = sweep_rows(shapes)
        out["gemm_sweep"] = gemm_sweep_rows(shapes)
    if "decode" not in skip:
        out["decode"] = [row for name in shapes for row in decode_rows(name, new_tokens)]
        out["summary"] = summary(out["decode"])  # type: ignore[arg-type]
    out["seconds"] = time.perf_counter() - t0
    out["env"] = environment(DEV)
    save_gpu_result("quant_gpu", out)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("quant_gpu.py needs an NVIDIA GPU")
    main()
