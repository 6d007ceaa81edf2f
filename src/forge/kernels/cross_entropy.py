"""Fused LM-head + cross-entropy that never holds the full logits.

The last step of a language model multiplies the hidden states by the vocabulary matrix
and takes the cross-entropy of the result. Done plainly, that materialises the logits:
for GPT-2 at B=16, T=1024 they are 16 * 1024 * 50304 floats, about 3.3 GB in fp32, and
autograd keeps them (and a gradient of the same size) alive through the backward pass.
That one tensor is often the largest in a training step.

:func:`linear_cross_entropy` walks the rows in chunks instead. For each chunk it

1. computes ``logits = x_chunk @ weight.T`` with torch (cuBLAS), in the compute dtype;
2. runs one Triton kernel, one program per row, that makes an online max / sum-exp pass
   over the vocabulary in fp32, writes the row's loss, and makes a second pass that
   overwrites the logits in place with their gradient ``(softmax - onehot(target)) / n_valid``
   (zero for ignored rows);
3. turns that gradient into ``grad_x_chunk = grad_logits @ weight`` and
   ``grad_weight += grad_logits.T @ x_chunk`` (torch matmuls).

So only one chunk of logits exists at a time (:func:`_chunk_rows` bounds it to
``_LOGITS_BUDGET_BYTES``), and the gradients are computed eagerly in the forward pass,
as Liger-Kernel's fused linear cross-entropy does; the backward pass only scales them by
the incoming gradient. When neither input requires grad, only the loss is computed.

Same semantics as :func:`forge.kernels.reference.linear_cross_entropy`, except that a
batch in which every row is ignored gives a loss of 0 and zero gradients instead of NaN.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

__all__ = ["linear_cross_entropy"]

# Upper bound on one chunk's logits buffer (rows * V * itemsize). Every chunk also reads and
# writes the whole fp32 weight-grad accumulator (V * d * 4 bytes), so fewer, bigger chunks are
# faster: on an H200, GPT-2's head (N=16384, V=50304, bf16) took 10.3 / 8.1 / 7.4 / 7.2 ms
# forward+backward with 64 / 128 / 256 / 512 MiB chunks, and a Llama-3 head (N=8192, d=2048,
# V=128256) 41.5 / 28.9 / 26.5 / 22.9 ms (eager PyTorch: 15.5 and 32.2 ms, with 9 and 11 GB
# of logits). 512 MiB is still a small fraction of the full logits of a training batch.
_LOGITS_BUDGET_BYTES = 512 * 2**20
# Widest slice of the vocabulary one program holds in registers per loop step.
_MAX_BLOCK_V = 8192


@triton.jit
def _cross_entropy_rows_kernel(
    logits_ptr,  # (rows, V), overwritten with d(loss)/d(logits) when COMPUTE_GRAD
    stride_row,
    targets_ptr,  # (rows,) int64
    loss_ptr,  # (rows,) fp32: each row's un-normalised loss, 0 for ignored rows
    n_valid_ptr,  # () int64: rows in the whole batch whose target is not ignore_index
    ignore_index,
    V: tl.constexpr,  # one compile per vocabulary size: a model has one
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row)
    offs = tl.arange(0, BLOCK_V)

    if target == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        if COMPUTE_GRAD:
            zeros = tl.zeros([BLOCK_V], dtype=logits_ptr.dtype.element_ty)
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                tl.store(row_ptr + cols, zeros, mask=cols < V)
    else:
        # The target's logit, read before the second pass overwrites it. An out-of-range
        # target (undefined behaviour, as in PyTorch's kernels) reads 0 instead of faulting.
        z_target = tl.load(row_ptr + target, mask=(target >= 0) & (target < V), other=0.0).to(tl.float32)

        # Pass 1: running max and sum of exp(z - max), in fp32.
        m = float("-inf")
        d = 0.0
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            z = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        lse = m + tl.log(d)
        tl.store(loss_ptr + row, lse - z_target)

        # Pass 2: the row's gradient, (softmax - onehot) / n_valid, written over its logits.
        if COMPUTE_GRAD:
            inv_n = 1.0 / tl.maximum(tl.load(n_valid_ptr).to(tl.float32), 1.0)
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                mask = cols < V
                z = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
                p = tl.exp(z - lse)
                g = tl.where(cols == target, p - 1.0, p) * inv_n
                tl.store(row_ptr + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)


def _launch_config(v: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a vocabulary of ``v``: one program per row loops over it."""
    # Measured on an H200 over (rows, V) = (2560, 50304), (1024, 128256), (2048, 32000) in bf16:
    # 8192-wide blocks with 8 warps (32 elements a thread) run within 5% of the best of
    # 2048..32768 x 4..32 warps everywhere, at ~3.7-4.3 TB/s counting 2 reads + 1 write.
    block = min(triton.next_power_of_2(v), _MAX_BLOCK_V)
    num_warps = 4 if block <= 1024 else 8
    return block, num_warps


def _chunk_rows(n: int, v: int, dtype: torch.dtype, chunk_size: int | None = None) -> int:
    """Rows per chunk, so that a chunk's logits (rows, v) in ``dtype`` stay within the budget.

    With ``chunk_size`` given, that (clipped to n). Otherwise as many rows as fit in
    ``_LOGITS_BUDGET_BYTES`` (a multiple of 256 when that many fit, for the GEMMs), then
    evened out over the chunks so the last one is not a sliver.
    """
    n = max(n, 1)
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        return min(chunk_size, n)
    rows = max(_LOGITS_BUDGET_BYTES // (max(v, 1) * dtype.itemsize), 1)
    if rows >= 256:
        rows -= rows % 256
    if rows >= n:
        return n
    balanced = triton.cdiv(n, triton.cdiv(n, rows))
    return min(triton.cdiv(balanced, 8) * 8, rows)


@functools.cache
def _has_fp32_out_addmm(device_type: str, dtype: torch.dtype) -> bool:
    """Whether this torch can add a ``dtype`` matmul into an fp32 tensor (``addmm(..., out_dtype=)``, CUDA only)."""
    if device_type != "cuda":
        return False
    try:
        acc = torch.zeros(2, 2, device="cuda")
        a = torch.ones(2, 2, device="cuda", dtype=dtype)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        return bool((acc == 2).all())
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the logits: autocast's where it is on (as ``F.linear`` would), else x's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _fused(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    rows: int,
    dtype: torch.dtype,
    need_gx: bool,
    need_gw: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(loss, grad_x, grad_weight) for a loss of mean reduction; the grads are None where not needed.

    grad_x comes back in x's dtype and grad_weight in the weight's. grad_weight is accumulated in
    fp32 whatever the weight's dtype: it is a sum over every chunk, and adding many small partial
    products into a 16-bit accumulator would round each one to 8 bits of mantissa and let the
    running sum swamp later chunks; fp32 master weights want an fp32 gradient anyway. It is cast
    to the weight's dtype at the end, so that a 16-bit weight's gradient held until backward
    costs 2 bytes a parameter, not 4.
    """
    n, _ = x.shape
    v = weight.shape[0]
    device = x.device
    need_grad = need_gx or need_gw
    w = weight.to(dtype)  # once, not per chunk; no copy when the dtypes already agree
    targets = targets.contiguous()

    n_valid = (targets != ignore_index).sum()  # stays on the device: no host sync
    row_loss = torch.empty(n, dtype=torch.float32, device=device)
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format) if need_gx else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=device) if need_gw else None
    fp32_out_addmm = need_gw and dtype != torch.float32 and _has_fp32_out_addmm(device.type, dtype)

    block_v, num_warps = _launch_config(v)
    logits_buf = torch.empty(min(rows, n), v, dtype=dtype, device=device)
    device_ctx = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with device_ctx:
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            x_chunk = x[start:stop].to(dtype)
            logits = logits_buf[: stop - start]
            torch.mm(x_chunk, w.t(), out=logits)
            _cross_entropy_rows_kernel[(stop - start,)](
                logits,
                logits.stride(0),
                targets[start:stop],
                row_loss[start:stop],
                n_valid,
                ignore_index,
                V=v,
                COMPUTE_GRAD=need_grad,
                BLOCK_V=block_v,
                num_warps=num_warps,
            )
            if not need_grad:
                continue
            grad_logits = logits  # overwritten in place by the kernel
            if grad_x is not None:
                if grad_x.dtype == dtype:
                    torch.mm(grad_logits, w, out=grad_x[start:stop])
                else:
                    grad_x[start:stop] = grad_logits @ w
            if grad_w is not None:
                if dtype == torch.float32:
                    grad_w.addmm_(grad_logits.t(), x_chunk)
                elif fp32_out_addmm:
                    torch.addmm(grad_w, grad_logits.t(), x_chunk, out_dtype=torch.float32, out=grad_w)
                else:
                    grad_w += grad_logits.t() @ x_chunk

    loss = row_loss.sum() / n_valid.clamp(min=1)
    if grad_w is not None:
        grad_w = grad_w.to(weight.dtype)
    return loss, grad_x, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        ignore_index: int,
        rows: int,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        need_gx, need_gw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(x.device.type, enabled=False):
            loss, grad_x, grad_w = _fused(x, weight, targets, ignore_index, rows, dtype, need_gx, need_gw)
        ctx.save_for_backward(grad_x, grad_w)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_x, grad_w = ctx.saved_tensors
        # Out of place, so that a second backward (retain_graph=True) sees the stored grads unscaled.
        gx = None if grad_x is None else grad_x * grad_out.to(grad_x.dtype)
        gw = None if grad_w is None else grad_w * grad_out.to(grad_w.dtype)
        return gx, gw, None, None, None, None


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of ``x @ weight.T`` against ``targets``, without materialising the logits.

    x (N, d) in bf16/fp16/fp32, weight (V, d) (the LM head or tied embedding), targets (N,)
    int64. Rows whose target is ``ignore_index`` don't count; if all are ignored the loss
    is 0 (with zero gradients). Returns a 0-dim fp32 tensor.

    The logits are computed ``chunk_size`` rows at a time (default: as many as fit in
    512 MiB), in x's dtype, or in autocast's where autocast is on; the weight is cast to
    that dtype for the matmuls (e.g. fp32 master weights under bf16 autocast). Softmax and
    loss are in fp32. The gradients come back in each input's own dtype.
    """
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"expected x (N, d) and weight (V, d), got {tuple(x.shape)} and {tuple(weight.shape)}")
    if targets.shape != (x.shape[0],):
        raise ValueError(f"expected targets of shape ({x.shape[0]},), got {tuple(targets.shape)}")
    dtype = _compute_dtype(x)
    rows = _chunk_rows(x.shape[0], weight.shape[0], dtype, chunk_size)
    targets = targets.long()
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(x, weight, targets, ignore_index, rows, dtype)
    with torch.autocast(x.device.type, enabled=False):
        loss, _, _ = _fused(x, weight, targets, ignore_index, rows, dtype, need_gx=False, need_gw=False)
    return loss
