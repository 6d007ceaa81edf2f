"""Weight-only int8 and int4 on a GPU: decode tokens/s through Forge's real decode path, each linear's kernels, and
which kernel path wins at which batch, against bf16 in the same run.

Sections, in this order (each row in a try/except: a failure or a missing piece is recorded in the JSON, never
raised; a section that would run past ``--budget-s`` is skipped and listed under ``skipped``):

- ``decode``: greedy tokens/s of the random-init Forge Transformer (benchmarks/decode_gpu.py's SmolLM2-135M and
  1B Llama shapes) at batch 1 and 64, in bf16 and after ``quantize_model`` to int8 (per channel) and int4
  (groups of 32 and 64): ``generate_tokens`` with CUDA graphs, ``ops.linear`` dispatching to Forge's kernels
  (``forge.kernels.quant_linear``). ``batch64_alt`` re-times batch 64 with each other kernel path forced.
  ``logits_rel_err`` compares a prompt's logits with the bf16 model's.
- ``gguf``: the shipped SmolLM2-135M Q4_1 GGUF kept quantized (Q4_1 int4 linears, Q8_0 int8-group tied head)
  against the same file dequantized to bf16, if the model package is installed.
- ``kernels``: every linear of both shapes at M = 1 and 64: bf16 cuBLAS, Forge's int8 / int8 group 32 (Q8_0) /
  int4 g32 / g64 by the path table, tinygemm int4 (``aten._weight_int4pack_mm``) g32 / g64, torchao's int4 if
  installed. Each variant cycles through copies of its weight that together exceed the L2 cache, captured in one
  CUDA graph: weights from HBM, no launch overhead. ``gbps`` counts weight, scale, x and y bytes.
- ``paths``: the 1B linears at M = 1 ... 1024, each path of ``quant_matmul.PATHS`` (the GEMVs, gemm, mma, dequant)
  against bf16 ("mma" on a weight it can't take, int8 per group, times the "gemm" it falls back to);
  ``suggested_paths`` is the fastest path per M summed over the four linears: what ``CUDA_PATHS`` should say.

    PYTHONPATH=src python benchmarks/quant_gpu.py --out benchmarks/results/quant_gpu_NVIDIA_H200.json
    PYTHONPATH=src python benchmarks/quant_gpu.py --dry-run     # CPU, Triton's interpreter, tiny shapes
"""

from __future__ import annotations

import os
import sys

DRY_RUN = "--dry-run" in sys.argv
if DRY_RUN:  # read when Triton is imported: before anything imports it
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, save_gpu_result  # noqa: E402
from decode_gpu import SHAPES, shape_config  # noqa: E402
from forge import kernels  # noqa: E402
from forge.core.generate import generate_tokens  # noqa: E402
from forge.core.quantize import Int4Weight, Int8GroupWeight, Int8Weight, quantize_model, weight_bytes  # noqa: E402
from forge.core.sampling import SamplingParams  # noqa: E402
from forge.core.transformer import Transformer  # noqa: E402
from forge.kernels.quant_linear import CUDA_PATHS, choose_path, quantized_linear  # noqa: E402
from forge.kernels.quant_matmul import PATHS  # noqa: E402
from forge.kernels.quant_tinygemm import (  # noqa: E402
    int4_linear_tinygemm,
    pack_int4_cuda,
    scales_and_zeros_cuda,
    tinygemm_supports,
)

TINY = {"tiny": dict(d_model=64, n_layer=1, n_head=4, n_kv_head=2, d_ff=64, vocab_size=256, tie=True)}
#: Issue 17's targets: the 1B Llama shape at batch 1, tokens/s.
TARGETS = {"int4_g32": 1100.0, "int4_g64": 1100.0, "int8": 950.0}
#: Model schemes: (quantize_model's scheme, group size, the kernels' scheme name).
SCHEMES = {"int8": ("int8", 32, "int8"), "int4_g32": ("int4", 32, "int4"), "int4_g64": ("int4", 64, "int4")}
PATH_MS = (1, 16, 32, 64, 128, 256, 1024)

# A variant turns a bf16 weight into (fn, params, fp32 reference weight): fn(x, params) is x @ W.T.
Prepared = tuple[Callable[[torch.Tensor, tuple], torch.Tensor], tuple, torch.Tensor]


class Run:
    """Where and how long: the device, the activations' dtype, repetitions, and the time budget left."""

    def __init__(self, device: torch.device, reps: int, budget_s: float) -> None:
        self.device, self.reps, self.dtype = device, reps, torch.bfloat16
        self.batches = (1, 64) if device.type == "cuda" else (1, 3)  # decode batches, and the kernels' M
        self.prompt_tokens = 16 if device.type == "cuda" else 4
        self.end = time.perf_counter() + budget_s
        self.skipped: list[str] = []
        self.missing: dict[str, str] = {}

    def has_time(self, what: str) -> bool:
        if time.perf_counter() < self.end:
            return True
        self.skipped.append(what)
        return False

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:400]


# -- weights ---------------------------------------------------------------------------------------------


def q8_0(w: torch.Tensor) -> Int8GroupWeight:
    """GGUF's Q8_0 of w: int8 per group of 32 columns, an fp16 scale each, no minimum."""
    n, k = w.shape
    wg = w.float().reshape(n, k // 32, 32)
    scale = (wg.abs().amax(-1) / 127).clamp(min=1e-8).half()
    q = torch.round(wg / scale.float()[..., None]).clamp(-127, 127).to(torch.int8).reshape(n, k)
    return Int8GroupWeight(q, scale, None, w.dtype)


def forge_weights() -> dict[str, Callable[[torch.Tensor], object]]:
    """Forge's weight classes as quantize_model (or a GGUF) makes them, by the kernels' scheme."""
    return {
        "int8": Int8Weight.quantize,
        "int8_group32": q8_0,
        "int4_g32": lambda w: Int4Weight.quantize(w, 32),
        "int4_g64": lambda w: Int4Weight.quantize(w, 64),
    }


def bf16_variant(w: torch.Tensor) -> Prepared:
    return (lambda x, p: F.linear(x, p[0])), (w,), w.float()


def forge_variant(
    make: Callable[[torch.Tensor], object], path: str | None = None
) -> Callable[[torch.Tensor], Prepared]:
    def prepare(w: torch.Tensor) -> Prepared:
        weight = make(w)
        if isinstance(weight, Exception):  # quantizing failed: this variant's row records it
            raise weight

        def fn(x: torch.Tensor, p: tuple) -> torch.Tensor:
            return quantized_linear(x, path=path, **p[0].kernel_operands()._asdict())

        return fn, (weight,), weight.dequantize(torch.float32)  # type: ignore[attr-defined]

    return prepare


def tinygemm_variant(group: int) -> Callable[[torch.Tensor], Prepared]:
    def prepare(w: torch.Tensor) -> Prepared:
        if not tinygemm_supports(w.shape[0], w.shape[1], group):
            raise ValueError(f"tinygemm does not take shape {tuple(w.shape)} at group {group}")
        ref = Int4Weight.quantize(w, group)  # the same rounding as Forge's int4
        q, scale, minimum = ref.unpacked().to(torch.int32), ref.scale.float(), ref.min.float()
        sz = scales_and_zeros_cuda(scale, minimum)  # bf16 (K/g, N, 2): w = (q - 8) * scale + zero
        params = (pack_int4_cuda(q), sz)
        return (lambda x, p: int4_linear_tinygemm(x, p[0], group, p[1])), params, ref.dequantize(torch.float32)

    return prepare


def torchao_variant() -> Callable[[torch.Tensor], Prepared] | None:
    """torchao's int4 weight-only (tinygemm inside) on an nn.Linear, if torchao is installed."""
    try:
        import torchao.quantization as tq
    except Exception:
        return None

    def prepare(w: torch.Tensor) -> Prepared:
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        lin.weight.data.copy_(w)
        config = tq.Int4WeightOnlyConfig(group_size=32) if hasattr(tq, "Int4WeightOnlyConfig") else None
        tq.quantize_(lin, config if config is not None else tq.int4_weight_only(group_size=32))
        ref = lin(torch.eye(w.shape[1], device=w.device, dtype=w.dtype)).t().float()  # its dequantized weight
        return (lambda x, p: p[0](x)), (lin,), ref

    return prepare


def kernel_variants(run: Run) -> dict[str, Callable[[torch.Tensor], Prepared]]:
    out: dict[str, Callable[[torch.Tensor], Prepared]] = {"bf16_cublas": bf16_variant}
    out.update({f"forge_{name}": forge_variant(make) for name, make in forge_weights().items()})
    if run.device.type != "cuda":
        run.missing["tinygemm"] = "needs CUDA"
    elif not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
        run.missing["tinygemm"] = f"torch {torch.__version__} has no aten._weight_int4pack_mm"
    else:
        out.update({"tinygemm_g32": tinygemm_variant(32), "tinygemm_g64": tinygemm_variant(64)})
    torchao = torchao_variant() if run.device.type == "cuda" else None
    if torchao is None:
        run.missing["torchao"] = "not installed (or no CUDA)"
    else:
        out["torchao_int4_g32"] = torchao
    return out


# -- timing ----------------------------------------------------------------------------------------------


def nbytes(params: tuple) -> int:
    total = 0
    for t in params:
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
        elif hasattr(t, "kernel_operands"):
            total += t.nbytes
        elif isinstance(t, torch.nn.Module):
            total += sum(v.numel() * v.element_size() for v in t.state_dict().values())
    return total


def clone(params: tuple) -> tuple:
    return tuple(t.clone() if isinstance(t, torch.Tensor) else copy.deepcopy(t) for t in params)


def l2_copies(nbytes: int, device: torch.device | None = None) -> int:
    """Copies of a weight of ``nbytes`` that together make twice the L2 (2..256), so each call reads it from HBM."""
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return max(2, min(256, math.ceil(2 * l2 / max(1, nbytes))))


def graph_us(call: Callable[[object], object], bank: list, reps: int) -> float:
    """µs per call: one CUDA graph calling ``call`` once per item of ``bank`` (no launch overhead), replayed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: Triton compiles, cuBLAS workspaces
        for p in bank[:2]:
            call(p)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for p in bank:
            call(p)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / (reps * len(bank))


def time_us(run: Run, fn: Callable[[torch.Tensor, tuple], torch.Tensor], x: torch.Tensor, params: tuple) -> float:
    """µs per call. CUDA: a graph calling fn once per copy of params (together 2x the L2, at most 256), replayed."""
    if run.device.type != "cuda":  # the dry run: one call, to exercise the code
        t0 = time.perf_counter()
        fn(x, params)
        return (time.perf_counter() - t0) * 1e6
    copies = l2_copies(nbytes(params), run.device)
    bank = [params] + [clone(params) for _ in range(copies - 1)]
    return graph_us(lambda p: fn(x, p), bank, run.reps)


def kernel_row(run: Run, prepare: Callable[[torch.Tensor], Prepared] | Prepared, w: torch.Tensor, m: int) -> dict:
    """One variant at m rows: its error against the dequantized weight's fp32 matmul, µs, GB/s. ``prepare`` may be
    the prepared variant itself (weights quantized once, timed at several m)."""
    row: dict[str, object] = {}
    t0 = time.perf_counter()
    try:
        fn, params, ref_w = prepare(w) if callable(prepare) else prepare
        x = torch.randn(m, w.shape[1], device=run.device, dtype=run.dtype)
        y = fn(x, params).float()
        ref = F.linear(x.float(), ref_w)
        row["max_rel_err"] = ((y - ref).abs().max() / ref.abs().max()).item()
        us = time_us(run, fn, x, params)
        moved = nbytes(params) + x.numel() * 2 + m * w.shape[0] * 2
        row.update(us=us, gbps=moved / us / 1e3, weight_bytes=nbytes(params))
    except Exception as e:  # recorded, not raised: one variant's failure leaves the others' numbers
        row["error"] = _error(e)
    row["wall_s"] = round(time.perf_counter() - t0, 2)
    return row


def linear_shapes(shape: dict) -> dict[str, tuple[int, int]]:
    """(out, in) of each linear of one block, as Forge's Transformer fuses them."""
    d, ff, heads, kv = shape["d_model"], shape["d_ff"], shape["n_head"], shape["n_kv_head"]
    hd = d // heads
    return {"qkv": ((heads + 2 * kv) * hd, d), "out": (d, d), "gate_up": (2 * ff, d), "down": (d, ff)}


def kernel_rows(run: Run, shapes: dict[str, dict]) -> list[dict]:
    rows = []
    table = kernel_variants(run)
    for name, shape in shapes.items():
        for layer, (n, k) in linear_shapes(shape).items():
            w = torch.randn(n, k, device=run.device, dtype=run.dtype) * 0.02
            for m in run.batches:
                if not run.has_time(f"kernels {name} {layer} m={m}"):
                    return rows
                row: dict[str, object] = {"shape": name, "linear": layer, "n": n, "k": k, "m": m}
                for label, prepare in table.items():
                    row[label] = kernel_row(run, prepare, w, m)
                    if label.startswith("forge_"):
                        scheme = "int4" if "int4" in label else "int8_group" if "group" in label else "int8"
                        row[label]["path"] = choose_path(scheme, m)  # type: ignore[index]
                base = row["bf16_cublas"].get("us")  # type: ignore[union-attr]
                for label in table:
                    us = row[label].get("us")  # type: ignore[union-attr]
                    if base and us:
                        row[label]["speedup_vs_bf16"] = base / us  # type: ignore[index]
                print(json.dumps(row), file=sys.stderr)
                rows.append(row)
    return rows


def path_rows(run: Run, shapes: dict[str, dict], ms: tuple[int, ...]) -> list[dict]:
    """Each kernel path's time per scheme and M on the given shapes' linears, with bf16 cuBLAS alongside."""
    rows = []
    makes = forge_weights()
    schemes = {"int4_g32": "int4", "int8": "int8", "int8_group32": "int8_group"}
    for name, shape in shapes.items():
        for layer, (n, k) in linear_shapes(shape).items():
            w = torch.randn(n, k, device=run.device, dtype=run.dtype) * 0.02
            weights = {label: quantize_or_error(makes[label], w) for label in schemes}  # once for every path and M
            for m in ms:
                if not run.has_time(f"paths {name} {layer} m={m}"):
                    return rows
                bf16_us = kernel_row(run, bf16_variant(w), w, m).get("us")
                for label, scheme in schemes.items():
                    row: dict[str, object] = {"shape": name, "linear": layer, "scheme": label, "m": m, "n": n, "k": k}
                    row.update(table=choose_path(scheme, m), bf16_us=bf16_us)
                    gemv_most = 64 if run.device.type == "cuda" else max(ms)  # the GEMV of many rows is hopeless
                    for path in PATHS:
                        if path != "gemv" or m <= gemv_most:
                            r = kernel_row(run, forge_variant(lambda _, q=weights[label]: q, path), w, m)
                            row[path] = r.get("us", r.get("error"))
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr)
    return rows


def quantize_or_error(make: Callable[[torch.Tensor], object], w: torch.Tensor) -> object:
    try:
        return make(w)
    except Exception as e:
        return e


def suggested_paths(rows: list[dict]) -> dict[str, dict[int, str]]:
    """Per scheme and M, the path with the least time summed over the linears (what CUDA_PATHS should pick)."""
    totals: dict[tuple[str, int], dict[str, float]] = {}
    for r in rows:
        t = totals.setdefault((r["scheme"], r["m"]), {})
        for path in PATHS:
            if isinstance(r.get(path), float):
                t[path] = t.get(path, 0.0) + r[path]
            elif path in r:
                t[path] = math.inf  # failed somewhere: not a candidate
    out: dict[str, dict[int, str]] = {}
    for (scheme, m), t in sorted(totals.items()):
        if t:
            out.setdefault(scheme, {})[m] = min(t, key=t.__getitem__)
    return out


# -- end to end ------------------------------------------------------------------------------------------


def build(run: Run, shape: dict, context: int) -> Transformer:
    """The random-init bf16 model of benchmarks/decode_gpu.py, initialised on the device (seconds, not a minute)."""
    cfg = shape_config(shape, context)
    torch.manual_seed(0)
    with torch.device(run.device):
        model = Transformer(cfg)
    return model.to(run.dtype).eval()


def quantized(base: Transformer, scheme: str, group: int) -> tuple[Transformer, dict]:
    """A quantized copy of ``base``: quantized on its device, or (if that fails) on the CPU and moved back."""
    info: dict[str, object] = {}
    t0 = time.perf_counter()
    graphs = base.__dict__.pop("_decode_graphs", None)  # captured CUDA graphs kept on the model can't be copied
    try:
        model = quantize_model(copy.deepcopy(base), scheme, group_size=group)
        info["quantized_on"] = str(base.lm_head.weight.device)
    except Exception as e:
        info["device_quantize_error"] = _error(e)
        device = base.lm_head.weight.device
        model = quantize_model(copy.deepcopy(base).cpu(), scheme, group_size=group).to(device)
        info["quantized_on"] = "cpu, then moved"
    finally:
        if graphs is not None:
            base.__dict__["_decode_graphs"] = graphs
    info["quantize_s"] = round(time.perf_counter() - t0, 2)
    return model, info


@contextmanager
def forced_path(model: Transformer, scheme: str, path: str) -> Iterator[None]:
    """Every call of ``scheme`` takes ``path``. Graphs captured under the old table are dropped, before and after:
    their key does not say which kernels they launch."""
    saved = CUDA_PATHS[scheme]
    CUDA_PATHS[scheme] = ((1 << 62, path),)
    model.__dict__.pop("_decode_graphs", None)
    try:
        yield
    finally:
        CUDA_PATHS[scheme] = saved
        model.__dict__.pop("_decode_graphs", None)


def decode_tps(run: Run, model: Transformer, batch: int, prompt_tokens: int, new_tokens: int) -> float:
    """Greedy tokens/s of ``batch`` random prompts: generate_tokens with CUDA graphs, after one warm-up run."""
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, prompt_tokens), generator=torch.Generator().manual_seed(1)).tolist()
    greedy = SamplingParams(temperature=0)

    def go() -> None:
        for _ in generate_tokens(model, ids, max_new_tokens=new_tokens, params=greedy, cuda_graphs=True):
            pass

    go()  # warm-up: graph capture, kernel compiles
    run.sync()
    t0 = time.perf_counter()
    go()
    run.sync()
    return batch * new_tokens / (time.perf_counter() - t0)


def decode_model_row(
    run: Run, row: dict, model: Transformer, kernel_scheme: str | None, new_tokens: int, alternatives: bool
) -> None:
    """Fill ``row`` with tokens/s at batch 1 and 64 (and, with ``alternatives``, batch 64 on every other path)."""
    for batch in run.batches:
        if kernel_scheme is not None:
            row[f"batch{batch}_path"] = choose_path(kernel_scheme, batch)
        try:
            row[f"batch{batch}_tokens_per_s"] = decode_tps(run, model, batch, run.prompt_tokens, new_tokens)
        except Exception as e:
            row[f"batch{batch}_error"] = _error(e)
    if not (alternatives and kernel_scheme is not None and run.has_time(f"decode alternatives {row['shape']}")):
        return
    alt: dict[str, object] = {}
    big = run.batches[-1]
    for path in PATHS:
        if path != choose_path(kernel_scheme, big):
            try:
                with forced_path(model, kernel_scheme, path):
                    alt[path] = decode_tps(run, model, big, run.prompt_tokens, new_tokens)
            except Exception as e:
                alt[path] = _error(e)
    row[f"batch{big}_alt"] = alt


def decode_rows(run: Run, name: str, shape: dict, new_tokens: int) -> list[dict]:
    context = run.prompt_tokens + new_tokens + 8
    base = build(run, shape, context)
    probe = torch.randint(0, shape["vocab_size"], (1, min(32, context)), generator=torch.Generator().manual_seed(2))
    probe = probe.to(run.device)
    with torch.no_grad():
        base_logits = base(probe).float()
    rows = []
    labels = ("bf16", *SCHEMES) if run.device.type == "cuda" else ("bf16", "int4_g32")  # the dry run: quick
    for label in labels:
        if not run.has_time(f"decode {name} {label}"):
            break
        row: dict[str, object] = {"shape": name, "scheme": label, "new_tokens": new_tokens}
        try:
            scheme, group, kernel_scheme = SCHEMES.get(label, ("bf16", 0, None))
            model, info = (base, {}) if label == "bf16" else quantized(base, scheme, group)
            row.update(info, weight_bytes=weight_bytes(model))
            with torch.no_grad():
                logits = model(probe).float()
            row["logits_rel_err"] = ((logits - base_logits).norm() / base_logits.norm()).item()
            decode_model_row(run, row, model, kernel_scheme, new_tokens, alternatives=label in ("int8", "int4_g32"))
        except Exception as e:
            row["error"] = _error(e)
            row["traceback"] = traceback.format_exc(limit=4)[-1500:]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
        torch.cuda.empty_cache() if run.device.type == "cuda" else None
    return rows


def gguf_rows(run: Run, new_tokens: int) -> list[dict]:
    """SmolLM2-135M from the shipped Q4_1 GGUF: kept quantized against the same file dequantized to bf16."""
    from forge.models import load  # the API layer: only this section needs it

    try:
        kept = load("smollm2", device=run.device).model
        plain = load("smollm2", device=run.device, quantized=False).model.to(run.dtype)
    except Exception as e:
        run.missing["gguf"] = _error(e)
        return []
    probe = torch.randint(0, kept.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = plain(probe.to(run.device)).float()
        err = ((kept(probe.to(run.device)).float() - ref).norm() / ref.norm()).item()
    rows = []
    for label, model in (("bf16", plain), ("gguf_kept", kept)):
        if not run.has_time(f"gguf {label}"):
            break
        row: dict[str, object] = {"shape": "smollm2-135m-q4_1.gguf", "scheme": label, "new_tokens": new_tokens}
        row.update(weight_bytes=weight_bytes(model), dtype=str(model.lm_head.weight.dtype))
        if label == "gguf_kept":
            row["logits_rel_err"] = err
        decode_model_row(run, row, model, "int4" if label == "gguf_kept" else None, new_tokens, alternatives=False)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    return rows


def summary(decode: list[dict]) -> dict:
    """Issue 17's targets: the 1B shape at batch 1, and no loss against bf16 at batch 64."""
    by = {(r["shape"], r["scheme"]): r for r in decode}
    out: dict[str, object] = {}
    bf16 = by.get(("llama-1b", "bf16"), {})
    out["llama-1b_bf16_batch1_tokens_per_s"] = bf16.get("batch1_tokens_per_s")
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
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--dry-run", action="store_true", help="CPU, Triton's interpreter, tiny shapes: checks the script")
    p.add_argument("--new-tokens", type=int, default=None, help="decode tokens per run (256; dry run: 2)")
    p.add_argument("--shapes", default=None, help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--skip", default="", help="comma-separated sections to leave out: decode, gguf, kernels, paths")
    p.add_argument("--budget-s", type=float, default=400.0, help="skip what would start after this many seconds")
    p.add_argument("--reps", type=int, default=20, help="graph replays per kernel timing")
    args = p.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("quant_gpu.py needs an NVIDIA GPU (or --dry-run)")
    device = torch.device("cpu" if args.dry_run else "cuda")
    run = Run(device, args.reps, args.budget_s)
    shapes = TINY if args.dry_run else {n: SHAPES[n] for n in (args.shapes or ",".join(SHAPES)).split(",")}
    new_tokens = args.new_tokens or (2 if args.dry_run else 256)
    if args.dry_run:  # the kernels in Triton's interpreter, registered for the CPU
        kernels.load(["quantized_linear"], "cpu")
    skip = set(filter(None, args.skip.split(",")))
    out: dict[str, object] = {"benchmark": "quant_gpu", "dry_run": args.dry_run, "new_tokens": new_tokens}
    out["cuda_paths"] = {k: [list(e) for e in v] for k, v in CUDA_PATHS.items()}
    t0 = time.perf_counter()
    if "decode" not in skip:
        out["decode"] = [row for name, shape in shapes.items() for row in decode_rows(run, name, shape, new_tokens)]
        out["summary"] = summary(out["decode"])  # type: ignore[arg-type]
    if "gguf" not in skip and not args.dry_run and run.has_time("gguf"):
        out["gguf"] = gguf_rows(run, new_tokens)
    if "kernels" not in skip:
        out["kernels"] = kernel_rows(run, shapes)
    if "paths" not in skip:
        path_shapes = {n: s for n, s in shapes.items() if n in ("llama-1b", "tiny")} or shapes
        out["paths"] = path_rows(run, path_shapes, (1, 5) if args.dry_run else PATH_MS)
        out["suggested_paths"] = suggested_paths(out["paths"])  # type: ignore[arg-type]
    out.update(missing=run.missing, skipped=run.skipped, seconds=time.perf_counter() - t0, env=environment(device))
    finish(out, args.out, args.dry_run)


def finish(out: dict, dest: Path | None, dry_run: bool) -> None:
    """Print the JSON; write it to ``dest`` and (a real run) to benchmarks/results/quant_gpu_<GPU>.json."""
    if dest is not None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(json.dumps(out, indent=2) + "\n")
    if dry_run:
        print(json.dumps(out, indent=2))
    else:
        save_gpu_result("quant_gpu", out)


if __name__ == "__main__":
    main()
