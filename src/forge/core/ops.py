"""The tensor ops every model calls: the one place where kernels are chosen per device.

Each op has the plain PyTorch implementation here. ``forge.kernels`` holds
Forge's Triton kernels and registers, per device type, the ones measured to
beat this PyTorch path (benchmarks/kernels_gpu.py); ``ops`` asks the registry
first, so models never know which kernel ran.

Inside ``torch.compile`` the PyTorch path is always taken: Inductor fuses
these ops into its own kernels, and tracing through a hand-written kernel
would only cut its graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from forge import kernels
from forge.core.quantize import KERNEL_DTYPES, QuantizedWeight

__all__ = [
    "add_layer_norm",
    "add_rms_norm",
    "attention",
    "decode_attention",
    "embedding",
    "gelu",
    "linear",
    "linear_cross_entropy",
    "rope",
    "softmax",
    "swiglu",
]


#: Head dims the attention kernels are built for; others take PyTorch's path.
KERNEL_HEAD_DIMS = (16, 32, 64, 128)
#: Where the decoding kernel beats SDPA (cuDNN's path with a mask) for a few queries a row over a KV cache, by
#: ``benchmarks/decode_attention_gpu.py`` on an H200 over 2,304 keys, (B, H, Hkv, W) of Llama-1B's heads (the
#: committed JSON):
#: - up to DECODE_MAX_ROWS rows of scores a program (queries a row times query heads a kv head), any batch: a
#:   5-token verify took 36.2 us against 79.4 at batch 8, 179 against 558 at batch 64;
#: - up to DECODE_TAIL_MAX_ROWS a program (the kernel's MAX_ROWS) while the batch's rows stay within DECODE_TAIL_ROWS:
#:   a 32-token tail after a cached prefix took 18.4 us against 43.1 for one row, 36.6 against 43.6 for two, but
#:   46.8 against 44.2 for four and 85.2 against 80.6 for eight.
DECODE_MAX_ROWS = 32
DECODE_TAIL_MAX_ROWS = 128
DECODE_TAIL_ROWS = 256


def _kernel(op: str, x: torch.Tensor) -> Callable[..., Any] | None:
    if torch.compiler.is_compiling():
        return None
    return kernels.lookup(op, x.device.type)


def linear(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias``; weight is (out, in) as in ``nn.Linear``, or a quantized weight.

    A quantized weight runs the device's registered ``quantized_linear`` kernel on its own buffers (on CUDA,
    Forge's Triton dequant-GEMV/GEMM: ``forge.kernels.quant_linear``), else its own :meth:`~QuantizedWeight.linear`
    (the CPU's C++ kernels; elsewhere and inside ``torch.compile``, the dequantized reference). Where x needs a
    gradient, which the kernel doesn't give, the weight's own linear runs too.
    """
    if isinstance(weight, QuantizedWeight):
        plain = x.dtype in KERNEL_DTYPES and not (x.requires_grad and torch.is_grad_enabled())
        fast = _kernel("quantized_linear", x) if plain else None
        operands = weight.kernel_operands() if fast else None
        if operands is not None:
            return fast(x, bias=bias, **operands._asdict())
        return weight.linear(x, bias)
    return F.linear(x, weight, bias)


def embedding(ids: torch.Tensor, weight: torch.Tensor | QuantizedWeight) -> torch.Tensor:
    """Rows ``ids`` of an embedding table (vocab, d); a quantized table dequantizes only the rows it is asked for."""
    if isinstance(weight, QuantizedWeight):
        return weight.embedding(ids)
    return F.embedding(ids, weight)


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over ``dim``, in x's dtype."""
    fast = _kernel("softmax", x)
    return fast(x, dim) if fast else torch.softmax(x, dim=dim)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation, as GPT-2 was trained."""
    fast = _kernel("gelu", x)
    return fast(x) if fast else F.gelu(x, approximate="tanh")


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` where h (..., 2F) is [gate | up] from one fused projection; returns (..., F)."""
    fast = _kernel("swiglu", h)
    if fast:
        return fast(h)
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def add_layer_norm(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer_norm(x + delta), x + delta): a block's residual add fused with the next norm."""
    fast = _kernel("add_layer_norm", x)
    if fast:
        return fast(x, delta, weight, bias, eps)
    s = x if delta is None else x + delta
    return F.layer_norm(s, (s.shape[-1],), weight, bias, eps), s


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + delta) * weight, x + delta): a block's residual add fused with the next norm."""
    fast = _kernel("add_rms_norm", x)
    if fast:
        return fast(x, delta, weight, eps)
    s = x if delta is None else x + delta
    # Normalise in fp32: the mean of squares loses precision in bf16.
    sf = s.float()
    out = sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps)
    return (out * weight.float()).to(s.dtype), s


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by cos/sin broadcastable to (B, 1, T, D), "rotate half" layout."""
    fast = _kernel("rope", x)
    if fast:
        return fast(x, cos, sin)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(-1)``, the same indices (the first of equal maxima); on CUDA a wide row is reduced in two passes.

    CUDA's argmax reduces a row in one block: 36 us for one row of a 128k vocabulary on an H200, longer than a
    layer of a 1B model's decode step. Chunk maxima over up to 256 blocks, then the best chunk's index, take a
    few microseconds.
    """
    v = x.shape[-1]
    chunks = 256
    while chunks > 1 and v % chunks:
        chunks //= 2
    if not x.is_cuda or v < 16384 or chunks < 16:
        return x.argmax(-1)
    values, within = x.unflatten(-1, (chunks, v // chunks)).max(-1)  # (..., chunks): each chunk's first maximum
    best = values.argmax(-1, keepdim=True)  # the first chunk holding the maximum
    return (best * (v // chunks) + within.gather(-1, best)).squeeze(-1)


def rope_cache(
    qk: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    index: torch.Tensor,
) -> torch.Tensor | None:
    """The rotated queries (B, H, T, D) of ``qk`` (B, H + Hkv, T, D), its rotated keys and ``v`` written into the
    cache buffers ``keys``/``values`` at the flat slots ``index`` (see ``KVCache.flat_index``), in one fused kernel;
    None where the device has none (the caller rotates with :func:`rope` and writes the cache itself)."""
    fast = _kernel("rope_cache", qk)
    return fast(qk, v, cos, sin, keys, values, index) if fast else None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention; q is (B, H, Tq, D), k and v are (B, Hkv, Tk, D).

    ``mask`` is a boolean (B, 1, Tq, Tk) where True means "may attend"; it
    replaces ``causal``. Grouped-query attention is handled when Hkv < H. ``causal`` aligns the last
    query with the last key (query i sees keys up to i + Tk - Tq), as Forge's attention kernel does: a
    block of queries after a cached prefix attends causally with no mask.
    """
    if q.shape[2] == 1 and (mask is not None or q.is_cuda):  # a decode step: one query per row
        keep = mask.reshape(mask.shape[0], -1) if mask is not None else q.new_ones(1, k.shape[2], dtype=torch.bool)
        return decode_attention(q, k, v, keep)
    B, Tq, Tk = q.shape[0], q.shape[2], k.shape[2]
    inference = not (torch.is_grad_enabled() and q.requires_grad)  # the decoding kernel has no backward
    rows = Tq * (q.shape[1] // k.shape[1])
    if mask is not None and q.is_cuda and inference and _few_queries(B, rows):
        # A few queries a row over the cache (a speculative verify, a prompt's tail after a cached prefix): the
        # decoding kernel reads the keys once for all of them, where SDPA with a mask takes cuDNN's path.
        fast = _kernel("decode_attention", q) if q.shape[-1] in KERNEL_HEAD_DIMS else None
        if fast:
            return fast(q, k, v, mask[:, 0].expand(B, Tq, Tk))
    fast = _kernel("attention", q) if mask is None and q.shape[-1] in KERNEL_HEAD_DIMS else None
    if fast:
        return fast(q, k, v, causal=causal)
    gqa = k.shape[1] != q.shape[1]
    if causal and mask is None and Tq != Tk:  # SDPA's is_causal aligns the first query with the first key
        if q.is_cuda:
            # The lower-right causal bias runs the flash / memory-efficient kernels with no mask tensor. A
            # materialised mask takes cuDNN's path, which plans every new (Tq, Tk) anew: on an H200, 70 ms
            # (median; up to 1.2 s) for each new length of the part after a cached prefix, against 0.2 ms.
            from torch.nn.attention.bias import causal_lower_right  # here: it imports torch._dynamo

            bias = causal_lower_right(Tq, Tk)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=gqa)  # type: ignore[arg-type]
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril_(diagonal=Tk - Tq)
    dtype = q.dtype
    # Training on a CPU: SDPA's fused CPU kernel runs its backward ~5x slower in bf16 than in fp32 (measured, torch
    # 2.13: 11.4 ms against 2.3 ms for (16, 4, 128, 32)), so it runs in fp32, outside autocast (which would cast
    # the inputs back), and the output returns to bf16.
    upcast = dtype == torch.bfloat16 and q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    with torch.autocast("cpu", enabled=False) if upcast else contextlib.nullcontext():
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, enable_gqa=gqa)
    return y.to(dtype) if upcast else y


def _few_queries(batch: int, rows: int) -> bool:
    """Whether a batch of ``rows`` rows of scores a program goes to the decoding kernel (see DECODE_MAX_ROWS)."""
    return rows <= DECODE_MAX_ROWS or (rows <= DECODE_TAIL_MAX_ROWS and batch * rows <= DECODE_TAIL_ROWS)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One query per row over a padded cache; q (B, H, 1, D), k and v (B, Hkv, Tk, D), mask (B or 1, Tk) bool."""
    fast = _kernel("decode_attention", q) if q.shape[-1] in KERNEL_HEAD_DIMS else None
    if fast:
        return fast(q, k, v, mask.expand(q.shape[0], -1))
    if q.device.type != "cuda":  # on CPUs SDPA's fused kernel is faster (measured)
        gqa = k.shape[1] != q.shape[1]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], enable_gqa=gqa)
    # Without the kernel on a GPU: a few plain kernels, no SDPA dispatch (with a mask, SDPA's slow path).
    # Grouped heads are a view of the query heads as (Hkv, group): keys and values are never repeated.
    B, H, _, D = q.shape
    Hkv = k.shape[1]
    qg = q.view(B, Hkv, H // Hkv, D)  # (B, Hkv, G, D)
    scores = torch.matmul(qg, k.transpose(-1, -2)) * (D**-0.5)  # (B, Hkv, G, Tk)
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))  # broadcasts over B
    weights = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    return torch.matmul(weights, v).view(B, H, 1, D)  # (B, H, 1, D)


def linear_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100
) -> torch.Tensor:
    """Mean cross-entropy of ``x @ weight.T`` (x (N, d), weight (V, d)) against targets (N,), in fp32.

    The fused kernel never holds the full (N, V) logits; the PyTorch path does.
    """
    fast = kernels.lookup("linear_cross_entropy", x.device.type)
    if fast:
        # Run eagerly even inside torch.compile (a graph break at the loss): Inductor's own
        # cross-entropy would materialise the logits this kernel exists to avoid.
        return torch.compiler.disable(fast)(x, weight, targets, ignore_index=ignore_index)
    logits = F.linear(x, weight)
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)
