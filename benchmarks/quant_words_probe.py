"""Probe: int4 GEMMs at M = 64 whose weight tiles are read as int32 words and unpacked eight nibbles at a time,
with Marlin's PTX tricks, against bf16 cuBLAS and Forge's int4 "mma" kernel in the same run.

Issue 17 asks for no loss against bf16 at batch 64. Forge's ``"mma"`` int4 kernel (``forge.kernels.quant_gemm``)
addresses each value's byte by itself. This probe asks whether the unpacking is what costs, with two layouts and
three ways of unpacking, swept over launch configs (BLOCK_N, stages, operand order, K splits) for Llama-1B's four
linears (groups of 32):

* ``words``: a layout made for the kernel (a Marlin-like pre-shuffle). Row n's tile t of 256 columns is 32 words;
  nibble i of word j is column ``256 t + 32 i + j``. Nibble i of a (BLOCK_N, 32) word tile is then one group's
  (BLOCK_N, 32) tile: its scale and minimum are one vector, and it meets x's 32 columns from ``256 t + 32 i``.
* ``gguf``: GGUF's own blocks (what ``Int4Weight`` stores) read as words: nibble i of word q of a tile is column
  ``32 (q // 4) + 4 (q % 4) + i // 2 + 16 (i % 2)``; x's columns are gathered to match, scales loaded per word.

Unpacking (``asm``): 0, shifts and masks in Triton, then the OR into bf16 128.0 and ``(v - 128) * s + z``;
1, one inline-PTX block per pair of words (``prmt`` gathers a byte of each, ``lop3`` masks and ORs two bf16
``128 + code`` at once: 1 instruction a value), then the same scaling in Triton; 2, also the scaling in PTX on
packed pairs (``fma.rn.bf16x2`` then ``add.rn.bf16x2``: the same two roundings as 1).

Results (kernel us summed over qkv, o, gate_up and down at M = 64; CUDA-graph replays over weight copies that
leave L2; ``results/quant_words_probe_<GPU>.json``):

* H200: bf16 cuBLAS 47.4, Forge's mma 72.4; words 68.1 (asm 0), 67.5 (asm 1), 69.6 (asm 2); gguf 107.6 and 109.0.
* H100 (asm 0 only, the first version): bf16 59.1, mma 71.9, words 67.9.

Those figures came from earlier forms of this script, with the two layouts as two kernels; this form joins them,
with the same loads, unpacking and sweep.

Cheaper unpacking changed nothing: the kernel is bound by neither the unpacking nor memory (gate_up reads 8 MB in
28 us). What Triton makes of a dot whose operand is computed in registers (no overlap of the dequantization with
the tensor cores) is the likely limit; a kernel written below Triton (Marlin's) would be needed. Nothing here
was moved into Forge.

    python benchmarks/quant_words_probe.py           # an NVIDIA GPU (Hopper: the PTX needs sm_90)
    python benchmarks/quant_words_probe.py --check   # Triton's interpreter on the CPU: the layouts, asm 0 only
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

if "--check" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, save_gpu_result
from forge.kernels.quant_gemm import _finish, _sum_splits

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SHAPES = {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192)}


@triton.jit
def _nibbles(words):
    """8 bf16 tiles of words' shape, tile i holding 128 + nibble i of each word: per pair of words, ``prmt``
    gathers byte i // 2 of both, and ``lop3`` masks a nibble of each and ORs in bf16 128.0 (0x4300)."""
    return tl.inline_asm_elementwise(
        """{
        .reg .b32 t;
        prmt.b32 t, $8, $9, 0x0400;
        lop3.b32 $0, t, 0x000F000F, 0x43004300, 0xEA;
        shr.u32 t, t, 4;
        lop3.b32 $1, t, 0x000F000F, 0x43004300, 0xEA;
        prmt.b32 t, $8, $9, 0x0501;
        lop3.b32 $2, t, 0x000F000F, 0x43004300, 0xEA;
        shr.u32 t, t, 4;
        lop3.b32 $3, t, 0x000F000F, 0x43004300, 0xEA;
        prmt.b32 t, $8, $9, 0x0602;
        lop3.b32 $4, t, 0x000F000F, 0x43004300, 0xEA;
        shr.u32 t, t, 4;
        lop3.b32 $5, t, 0x000F000F, 0x43004300, 0xEA;
        prmt.b32 t, $8, $9, 0x0703;
        lop3.b32 $6, t, 0x000F000F, 0x43004300, 0xEA;
        shr.u32 t, t, 4;
        lop3.b32 $7, t, 0x000F000F, 0x43004300, 0xEA;
        }""",
        "=r,=r,=r,=r,=r,=r,=r,=r,r,r",
        [words],
        dtype=(tl.bfloat16,) * 8,
        is_pure=True,
        pack=2,
    )


@triton.jit
def _scaled(v, s, z, ASM: tl.constexpr, UPCAST: tl.constexpr):
    """v = 128 + code (bf16): ``code * s + z`` in bf16, in Triton (ASM < 2) or PTX on packed pairs (ASM 2)."""
    if UPCAST:  # the interpreter's bf16 arithmetic is on raw integers
        return ((v.to(tl.float32) - 128.0) * s.to(tl.float32) + z.to(tl.float32)).to(tl.bfloat16)
    sb = s.to(tl.bfloat16)
    if ASM == 2:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t; fma.rn.bf16x2 t, $1, $2, $3; add.rn.bf16x2 $0, t, $4; }",
            "=r,r,r,r,r",
            [v, sb, (s.to(tl.float32) * -128.0).to(tl.bfloat16), z.to(tl.bfloat16)],
            dtype=tl.bfloat16,
            is_pure=True,
            pack=2,
        )
    return (v - 128.0) * sb + z.to(tl.bfloat16)


@triton.jit
def _words_gemm(
    X, QW, S, Z, Y, WS, M, N, K, stride_xm, stride_sn, stride_sg, t_split,
    G: tl.constexpr, GGUF: tl.constexpr, ASM: tl.constexpr, SWAP: tl.constexpr, WT: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """y's tile over K tiles [program_id(1) * t_split, + t_split) of WT words (8 WT columns) each: the word tile
    loaded once, then 8 dots of K = WT, one a nibble. SWAP: ``acc^T = w @ x^T`` (the weight as wgmma's A)."""
    m_tiles = tl.cdiv(M, BLOCK_M)
    rm = (tl.program_id(0) % m_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (tl.program_id(0) // m_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm64 = tl.minimum(rm, M - 1).to(tl.int64)
    rn64 = tl.minimum(rn, N - 1).to(tl.int64)
    q = tl.arange(0, WT)
    if GGUF:  # nibble i of word q: column 32 (q // 4) + 4 (q % 4) + i // 2 + 16 (i % 2); a group per 4 words
        col0 = 32 * (q // 4) + 4 * (q % 4)
        group0 = 32 * (q // 4)
    else:  # nibble i of word q: column WT i + q; one group per nibble
        col0 = q
        group0 = q * 0
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        w_ptrs = QW + rn64[:, None] * (K // 8) + q[None, :]
        x_ptrs = X + rm64[None, :] * stride_xm + col0[:, None]
        s_offs = rn64[:, None] * stride_sn + (group0 // G)[None, :] * stride_sg
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        w_ptrs = QW + rn64[None, :] * (K // 8) + q[:, None]
        x_ptrs = X + rm64[:, None] * stride_xm + col0[None, :]
        s_offs = rn64[None, :] * stride_sn + (group0 // G)[:, None] * stride_sg
    TILE: tl.constexpr = 8 * WT
    t_lo = tl.program_id(1) * t_split
    for t in range(t_lo, tl.minimum(K // TILE, t_lo + t_split)):
        words = tl.load(w_ptrs + t * WT)
        if ASM > 0:
            vs = _nibbles(words)
        if GGUF:  # each word's group: one load of scales and minimums for the 8 nibbles
            s_tile = tl.load(S + s_offs + ((t * TILE) // G) * stride_sg)
            z_tile = tl.load(Z + s_offs + ((t * TILE) // G) * stride_sg)
        for i in tl.static_range(8):
            if GGUF:
                off = t * TILE + i // 2 + 16 * (i % 2)
                s, z = s_tile, z_tile
            else:
                off = t * TILE + i * WT
                s = tl.load(S + s_offs + ((t * TILE + i * WT) // G) * stride_sg)
                z = tl.load(Z + s_offs + ((t * TILE + i * WT) // G) * stride_sg)
            v = vs[i] if ASM > 0 else (((words >> (4 * i)) & 0xF) | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
            w = _scaled(v, s, z, ASM, UPCAST)
            xv = tl.load(x_ptrs + off)
            if UPCAST:
                w, xv = w.to(tl.float32), xv.to(tl.float32)
            acc = tl.dot(w, xv, acc) if SWAP else tl.dot(xv, w, acc)
    _finish(acc, S, Y, WS, rm, rn, M, N, False, SWAP)  # no bias (S: any pointer)


def words_gemm(
    x: torch.Tensor, qw: torch.Tensor, s: torch.Tensor, z: torch.Tensor, *, gguf: bool, asm: int, wt: int = 32,
    bn: int = 64, stages: int = 2, swap: bool = True, split: int = 1,
) -> torch.Tensor:  # fmt: skip
    """``x @ W.T`` for W as int32 words (N, K/8) in the ``words`` (wt 32 only) or ``gguf`` layout."""
    (m, k), n = x.shape, qw.shape[0]
    bm = min(64, max(16, triton.next_power_of_2(m)))
    tiles = k // (8 * wt)
    t_split = triton.cdiv(tiles, min(split, tiles))
    splits = triton.cdiv(tiles, t_split)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    ws = y if splits == 1 else torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
    _words_gemm[(triton.cdiv(m, bm) * triton.cdiv(n, bn), splits)](
        x, qw, s, z, y, ws, m, n, k, x.stride(0), s.stride(0), s.stride(1), t_split,
        G=k // s.shape[1], GGUF=gguf, ASM=asm, SWAP=swap, WT=wt, UPCAST=INTERPRET, BLOCK_M=bm, BLOCK_N=bn,
        num_warps=4, num_stages=stages,
    )  # fmt: skip
    if splits > 1:
        _sum_splits[(triton.cdiv(m * n, 1024),)](ws, s, y, n, m * n, splits, HAS_BIAS=False, BLOCK=1024)
    return y


def to_words(codes: torch.Tensor) -> torch.Tensor:
    """codes (N, K), 0..15 -> the ``words`` layout: int32 (N, K/8), tile t word j nibble i = column 256 t + 32 i + j."""
    n, k = codes.shape
    c = codes.to(torch.int32).view(n, k // 256, 8, 32)
    return sum(c[:, :, i] << (4 * i) for i in range(8)).view(n, k // 8)


def to_gguf_words(codes: torch.Tensor) -> torch.Tensor:
    """codes (N, K) -> GGUF's blocks (byte b of 32 columns: column b low, b + 16 high) read as int32 (N, K/8)."""
    n, k = codes.shape
    c = codes.view(n, k // 32, 2, 16)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, k // 2).contiguous().view(torch.int32)


def weight(n: int, k: int, device: torch.device, group: int = 32) -> tuple[torch.Tensor, ...]:
    """Random int4 codes (N, K), bf16 scales and minimums (N, K/group), and the exact fp32 weight."""
    torch.manual_seed(n + k)
    codes = torch.randint(0, 16, (n, k), device=device, dtype=torch.uint8)
    s = (torch.rand(n, k // group, device=device) * 0.01 + 0.001).to(torch.bfloat16)
    z = (-8 * s.float()).to(torch.bfloat16)
    w = (codes.float().view(n, -1, group) * s.float()[..., None] + z.float()[..., None]).view(n, k)
    return codes, s, z, w


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).abs().max() / ref.abs().max()).item()


def check() -> None:
    """Both layouts against the fp32 weight, asm 0, both operand orders, groups of 32 and 64, split K."""
    for group, gguf, swap in itertools.product((32, 64), (False, True), (False, True)):
        codes, s, z, w = weight(96, 512, torch.device("cpu"), group)
        x = torch.randn(5, 512).to(torch.bfloat16)
        qw = to_gguf_words(codes) if gguf else to_words(codes)
        for wt in (16, 32) if gguf else (32,):
            err = rel_err(words_gemm(x, qw, s, z, gguf=gguf, asm=0, wt=wt, bn=32, swap=swap, split=2), x.float() @ w.T)
            print(f"group {group} gguf {gguf} wt {wt} swap {swap}: rel err {err:.4f}")
            assert err < 2e-2, err


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="correctness in Triton's interpreter (CPU)")
    p.add_argument("--m", type=int, default=64)
    p.add_argument("--budget-s", type=float, default=280.0, help="stop sweeping after this long, keeping the rows")
    args = p.parse_args()
    if args.check:
        check()
        return
    if not torch.cuda.is_available():
        sys.exit("quant_words_probe.py needs an NVIDIA GPU (or --check)")
    from quant_gpu import graph_us, l2_copies  # noqa: I001 (benchmarks/ on the path)
    from forge.kernels.quant_gemm import int4_gguf_gemm

    dev, t0, rows = torch.device("cuda"), time.time(), []
    orders = ((2, 3), (True, False))  # stages, swap
    grid = [
        dict(gguf=True, asm=asm, wt=wt, bn=bn, stages=st, swap=sw)
        for asm, wt, bn, st, sw in itertools.product((2, 1), (16, 32), (64, 128), *orders)
    ] + [dict(gguf=False, asm=asm, bn=64, stages=st, swap=sw) for asm, st, sw in itertools.product((2, 1, 0), *orders)]
    for name, (n, k) in SHAPES.items():
        codes, s, z, w = weight(n, k, dev)
        layouts = {False: to_words(codes), True: to_gguf_words(codes)}
        copies = l2_copies(n * k // 2, dev)
        banks = {g: [(qw.clone(), s.clone(), z.clone()) for _ in range(copies)] for g, qw in layouts.items()}
        bf16 = [w.to(torch.bfloat16) for _ in range(l2_copies(n * k * 2, dev))]
        x = torch.randn(args.m, k, device=dev, dtype=torch.bfloat16)
        ref = x.float() @ w.T
        gguf_u8 = [(qw.view(torch.uint8), s, z) for qw, s, z in banks[True]]
        row = {
            "linear": name,
            "m": args.m,
            "n": n,
            "k": k,
            "bf16_us": graph_us(lambda p, x=x: F.linear(x, p), bf16, 50),
        }
        row["mma_us"] = graph_us(lambda p, x=x: int4_gguf_gemm(x, *p), gguf_u8, 50)
        found = []
        for cfg, split in itertools.product(grid, (1, 2, 4, 8)):
            if time.time() - t0 > args.budget_s:
                break
            try:
                err = rel_err(words_gemm(x, *banks[cfg["gguf"]][0], **cfg, split=split), ref)
                us = graph_us(lambda p, x=x, c=cfg, sp=split: words_gemm(x, *p, **c, split=sp), banks[cfg["gguf"]], 50)
                found.append({**cfg, "split": split, "us": round(us, 2), "err": round(err, 5)})
            except Exception as e:  # a config the compiler refuses: recorded, not fatal
                found.append({**cfg, "split": split, "error": repr(e)[:300]})
        ok = sorted((f for f in found if "us" in f and f["err"] < 2e-2), key=lambda f: f["us"])
        row["best"] = ok[:5]
        row["best_by"] = {
            f"{'gguf' if g else 'words'}/asm{a}": next((f for f in ok if f["gguf"] == g and f["asm"] == a), None)
            for g in (False, True)
            for a in (0, 1, 2)
        }
        row["failed"] = [f for f in found if "error" in f or f["err"] >= 2e-2][:3]
        print(row, flush=True)
        rows.append(row)
    totals = {"bf16": sum(r["bf16_us"] for r in rows), "mma": sum(r["mma_us"] for r in rows)}
    for key in rows[0]["best_by"]:
        totals[key] = sum(r["best_by"][key]["us"] if r["best_by"][key] else float("nan") for r in rows)
    out = {"benchmark": "quant_words_probe", "m": args.m, "rows": rows, "totals_us": totals}
    out["environment"] = environment(dev)
    print(totals)
    save_gpu_result("quant_words_probe", out)


if __name__ == "__main__":
    main()
