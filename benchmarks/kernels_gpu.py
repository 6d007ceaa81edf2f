"""Each Forge Triton kernel against PyTorch's path for the same op, same run, same GPU.

This decides ``forge.kernels.CUDA_KERNELS``: a kernel is registered on CUDA
only where it beats PyTorch (cuDNN/SDPA flash attention included). Shapes are
GPT-2 124M and Llama-1B training shapes (B=16, T=1024) and single-token
decode shapes. Times are medians of ``triton.testing.do_bench`` (CUDA events),
forward alone and forward+backward where training needs the backward.

    python benchmarks/kernels_gpu.py
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, save_gpu_result
from forge.core import ops
from forge.kernels import disabled, load

BF16 = torch.bfloat16
dev = torch.device("cuda")


def rand(*shape: int, grad: bool = False, dtype: torch.dtype = BF16) -> torch.Tensor:
    return torch.randn(*shape, device=dev, dtype=dtype).requires_grad_(grad)


def bench(fn: Callable[[], object], backward: bool) -> float:
    """Median ms of fn() (and its backward through a fixed random cotangent)."""
    if not backward:
        with torch.no_grad():
            return do_bench(fn, return_mode="median")
    out = fn()
    first = out[0] if isinstance(out, tuple) else out
    grad = torch.randn_like(first)

    def step() -> None:
        y = fn()
        (y[0] if isinstance(y, tuple) else y).backward(grad)

    return do_bench(step, return_mode="median", grad_to_none=None)


def compare(name: str, shape: str, fn: Callable[[], object], *, backward: bool, peak_memory: bool = False) -> dict:
    row: dict[str, object] = {"op": name, "shape": shape, "pass": "fwd+bwd" if backward else "fwd"}
    for label, ctx in (("forge_ms", None), ("pytorch_ms", disabled)):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        if ctx is None:
            row[label] = bench(fn, backward)
        else:
            with ctx():
                row[label] = bench(fn, backward)
        if peak_memory:
            row[label.replace("_ms", "_peak_mib")] = (torch.cuda.max_memory_allocated() - base) / 2**20
    row["speedup"] = row["pytorch_ms"] / row["forge_ms"]  # type: ignore[operator]
    print(json.dumps(row), file=sys.stderr)
    return row


def main() -> None:
    load(
        [
            "add_rms_norm",
            "add_layer_norm",
            "gelu",
            "swiglu",
            "softmax",
            "rope",
            "attention",
            "decode_attention",
            "linear_cross_entropy",
        ],
        "cuda",
    )
    rows = []
    N = 16 * 1024
    # Norms, fused with the residual add (the PyTorch path: an add and the norm's kernels).
    for d in (768, 2048):
        x, r, w, b = rand(N, d, grad=True), rand(N, d, grad=True), rand(d, grad=True), rand(d, grad=True)
        rows.append(
            compare("add_rms_norm", f"({N}, {d})", lambda x=x, r=r, w=w: ops.add_rms_norm(x, r, w, 1e-5), backward=True)
        )
        rows.append(
            compare(
                "add_layer_norm",
                f"({N}, {d})",
                lambda x=x, r=r, w=w, b=b: ops.add_layer_norm(x, r, w, b, 1e-5),
                backward=True,
            )
        )
    x1, r1, w1 = rand(1, 576), rand(1, 576), rand(576)
    rows.append(compare("add_rms_norm", "(1, 576) decode", lambda: ops.add_rms_norm(x1, r1, w1, 1e-5), backward=False))
    # Activations.
    h = rand(N, 3072, grad=True)
    rows.append(compare("gelu", f"({N}, 3072)", lambda: ops.gelu(h), backward=True))
    for f in (1536, 8192):
        g = rand(N if f == 1536 else N // 2, 2 * f, grad=True)
        rows.append(compare("swiglu", f"({g.shape[0]}, 2x{f})", lambda g=g: ops.swiglu(g), backward=True))
    g1 = rand(1, 2 * 1536)
    rows.append(compare("swiglu", "(1, 2x1536) decode", lambda: ops.swiglu(g1), backward=False))
    for shape in ((16 * 12 * 128, 1024), (2048, 50304)):
        s = rand(*shape, grad=True)
        rows.append(compare("softmax", str(shape), lambda s=s: ops.softmax(s), backward=True))
    # RoPE on the query and key heads of a fused qkv projection (a strided view).
    for B, T, H, Hkv, D in ((16, 1024, 32, 8, 64), (1, 1, 9, 3, 64)):
        qkv = rand(B, T, (H + 2 * Hkv) * D, grad=T > 1)
        qk = qkv[..., : (H + Hkv) * D].view(B, T, H + Hkv, D).transpose(1, 2)
        cos, sin = torch.randn(1, 1, T, D, device=dev), torch.randn(1, 1, T, D, device=dev)
        rows.append(
            compare(
                "rope", f"({B}, {H}+{Hkv}, {T}, {D})", lambda qk=qk, c=cos, s=sin: ops.rope(qk, c, s), backward=T > 1
            )
        )
    # Attention: causal training shapes against SDPA (flash / cuDNN), then decode against the plain-kernel path.
    for B, H, Hkv, T, D in ((16, 12, 12, 1024, 64), (16, 32, 8, 1024, 64), (4, 16, 16, 2048, 128)):
        q, k, v = rand(B, H, T, D, grad=True), rand(B, Hkv, T, D, grad=True), rand(B, Hkv, T, D, grad=True)
        rows.append(
            compare(
                "attention",
                f"({B}, {H}/{Hkv}, {T}, {D}) causal",
                lambda q=q, k=k, v=v: ops.attention(q, k, v, causal=True),
                backward=True,
            )
        )
    for B, H, Hkv, Tk, D in ((1, 9, 3, 280, 64), (1, 32, 8, 280, 64), (64, 32, 8, 1024, 64)):
        q, k, v = rand(B, H, 1, D), rand(B, Hkv, Tk, D), rand(B, Hkv, Tk, D)
        mask = torch.ones(B, Tk, dtype=torch.bool, device=dev)
        mask[:, Tk // 2 :] = False
        rows.append(
            compare(
                "decode_attention",
                f"({B}, {H}/{Hkv}, Tk={Tk}, {D})",
                lambda q=q, k=k, v=v, m=mask: ops.decode_attention(q, k, v, m),
                backward=False,
            )
        )
    # The output head and loss: GPT-2's vocabulary, B=16, T=1024.
    for d, V in ((768, 50304), (2048, 128256)):
        n = N if V < 100_000 else N // 4
        x, w = rand(n, d, grad=True), rand(V, d, grad=True, dtype=torch.float32)
        t = torch.randint(0, V, (n,), device=dev)

        def head(x: torch.Tensor = x, w: torch.Tensor = w, t: torch.Tensor = t) -> torch.Tensor:
            with torch.autocast("cuda", dtype=BF16):
                return ops.linear_cross_entropy(x, w, t)

        rows.append(compare("linear_cross_entropy", f"({n}, {d}) x V={V}", head, backward=True, peak_memory=True))
    out = {
        "benchmark": "kernels_gpu",
        "note": "speedup = PyTorch's path time / Forge kernel time; > 1 means the kernel wins",
        "results": rows,
        "env": environment(dev),
    }
    save_gpu_result("kernels_gpu", out)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("kernels_gpu.py needs an NVIDIA GPU")
    main()
