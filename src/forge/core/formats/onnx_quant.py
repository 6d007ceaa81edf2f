"""Weight matmuls of an ONNX graph as onnxruntime's ``MatMulNBits``: Forge's quantized weights exactly.

Every Forge quantized weight is ``w[o, k] = q[o, k] * scale[o, g] + offset[o, g]`` with signed integers q:

- int4 (:class:`~forge.core.quantize.Int4Weight`, GGUF's Q4_0 and Q4_1): ``q = u - 8``, ``offset = min + 8 * scale``
- int8 in groups (:class:`~forge.core.quantize.Int8GroupWeight`, GGUF's Q8_0): q, ``offset = min`` or none
- int8 per channel (:class:`~forge.core.quantize.Int8Weight`): q, the row's scale in every block, no offset

``MatMulNBits`` with ``bits`` b and no zero points computes ``x @ ((u - 2^(b-1)) * scale)`` from unsigned
``u = q + 2^(b-1)`` in blocks along the input, so it holds q and scale as they are. An offset, constant per
block, adds ``(x summed over each block) @ offset``: a Reshape, a ReduceSum and a MatMul of 1/block the
weight's size beside it. So a GGUF's Q4_1 blocks (SmolLM2's) are exported exactly, not rounded a second time
(round-to-nearest int4 of the dequantized weights agreed with them on 68% of greedy tokens). Zero points are
not used: WebGPU's MatMulNBits takes only 4-bit integer ones, which can't hold Q4_1's minimums. A tied
embedding whose head is int8 without offsets (GGUF's Q8_0, or rounded here) is looked up in the same blocks
(a Gather of the int8 rows and their scales, dequantized after the lookup, in standard ops: onnxruntime-web's
WASM provider has no ``GatherBlockQuantized``): no float copy of the vocabulary's rows is kept (SmolLM2: 113 MB
less).

A weight with more bits than the export's (int8 into int4), or a float one, is rounded to nearest: int4 as
``quantize="int4"`` does (:meth:`Int4Weight.quantize`, groups of 32), int8 as GGUF's Q8_0 (groups of 32).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from forge.core.quantize import Int4Weight, Int8GroupWeight, Int8Weight, QuantizedWeight

__all__ = ["BLOCK_SIZE", "Blocks", "blocks_of", "quantize_matmuls"]

#: The block size of weights rounded here: 32 values share a scale (and, for int4, a minimum).
BLOCK_SIZE = 32
_MS = "com.microsoft"


@dataclass(frozen=True)
class Blocks:
    """A weight (out, in) as ``q * scale + offset`` per block of ``block`` input columns, q signed."""

    q: torch.Tensor  # (out, in) int32, within ``bits`` signed
    scale: torch.Tensor  # (out, in / block) float32
    offset: torch.Tensor | None  # like scale, or None
    block: int

    def dequantize(self) -> torch.Tensor:
        out, width = self.q.shape
        w = self.q.float().reshape(out, -1, self.block) * self.scale[..., None]
        if self.offset is not None:
            w = w + self.offset[..., None]
        return w.reshape(out, width)


def blocks_of(weight: torch.Tensor | QuantizedWeight, bits: int) -> Blocks:
    """``weight`` as :class:`Blocks` that fit in ``bits`` (4 or 8): exactly where its own values fit, else rounded."""
    if isinstance(weight, Int4Weight):
        scale, minimum = weight.scale.float(), weight.min.float()
        return Blocks(weight.unpacked() - 8, scale, minimum + 8 * scale, weight.group_size)
    if bits == 8 and isinstance(weight, Int8GroupWeight):
        offset = weight.min.float() if weight.min is not None else None
        return Blocks(weight.unpacked(), weight.scale.float(), offset, weight.group_size)
    if bits == 8 and isinstance(weight, Int8Weight) and weight.shape[1] % BLOCK_SIZE == 0:
        scale = weight.scale.float()[:, None].expand(-1, weight.shape[1] // BLOCK_SIZE).contiguous()
        return Blocks(weight.q.to(torch.int32), scale, None, BLOCK_SIZE)
    w = weight.dequantize(torch.float32) if isinstance(weight, QuantizedWeight) else weight.detach().float()
    if bits == 4:
        return blocks_of(Int4Weight.quantize(w, BLOCK_SIZE), 4)
    return _q8_0(w.cpu())


def _q8_0(w: torch.Tensor) -> Blocks:
    """Round-to-nearest int8 per block of 32, symmetric, with an fp16 scale: GGUF's Q8_0."""
    out, width = w.shape
    wb = w.reshape(out, -1, BLOCK_SIZE)
    scale = (wb.abs().amax(dim=-1) / 127).half().float()
    q = torch.round(wb / scale.clamp(min=1e-30)[..., None]).clamp(-127, 127).to(torch.int32)
    return Blocks(q.reshape(out, width), scale, None, BLOCK_SIZE)


def quantize_matmuls(model: Any, weights: Mapping[str, torch.Tensor | QuantizedWeight], bits: Mapping[str, int]) -> Any:
    """Replace each ``MatMul(x, W)`` whose W is an initializer named in ``weights`` by ``MatMulNBits``.

    ``weights`` maps the initializer (in, out) to the Forge weight (out, in) it transposes; ``bits`` gives each
    initializer's bits (4 or 8). ``x`` must be 3-D (batch, sequence, in). A tied embedding's lookup of an int8
    weight without offsets (``Gather(W, ids, axis=1)``) reads the same blocks (:func:`_gather_blocks`), so the
    float copy goes. Initializers no node reads any more are dropped. Edits ``model`` (an ``onnx.ModelProto``)
    in place and returns it.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    blocks = {name: blocks_of(w, bits[name]) for name, w in weights.items()}
    packed: dict[str, dict[str, np.ndarray]] = {name: _packed(name, b, bits[name]) for name, b in blocks.items()}
    nodes: list[Any] = []
    replaced: set[str] = set()
    for node in graph.node:
        name = node.input[0] if node.op_type == "Gather" else node.input[1] if node.op_type == "MatMul" else None
        if name not in blocks:
            nodes.append(node)
        elif node.op_type == "MatMul":
            nodes += _matmul_nbits(node, name, blocks[name], bits[name])
            replaced.add(name)
        elif _axis(node) == 1 and bits[name] == 8 and blocks[name].offset is None:
            nodes += _gather_blocks(node, name, blocks[name])
        else:
            nodes.append(node)
    assert replaced == set(blocks), f"no MatMul reads {sorted(set(blocks) - replaced)}: the graph's names changed"
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    kept += [numpy_helper.from_array(v, n) for p in packed.values() for n, v in p.items() if n in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(o.domain == _MS for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(_MS, 1))
    return model


def _axis(node: Any) -> int:
    return next((int(a.i) for a in node.attribute if a.name == "axis"), 0)


def _packed(name: str, blocks: Blocks, bits: int) -> dict[str, np.ndarray]:
    """The initializers of ``blocks``: MatMulNBits' unsigned values (out, groups, block * bits / 8) and scales,
    the offsets (groups, out), and the shapes the nodes beside them use."""
    out, width = blocks.q.shape
    n_blocks = width // blocks.block
    u = (blocks.q.cpu() + (1 << (bits - 1))).to(torch.uint8).reshape(out, n_blocks, blocks.block).numpy()
    if bits == 4:  # two values a byte, the even one in the low nibble
        u = u[..., 0::2] | (u[..., 1::2] << 4)
    tensors = {
        f"{name}.q{bits}": np.ascontiguousarray(u),
        f"{name}.scales": blocks.scale.cpu().numpy().astype(np.float32).reshape(-1),
        f"{name}.block_shape": np.array([0, 0, n_blocks, blocks.block], dtype=np.int64),  # (B, T, in) -> (B, T, g, b)
        f"{name}.block_axes": np.array([-1], dtype=np.int64),
        f"{name}.rows": np.array([out, width], dtype=np.int64),
        f"{name}.scale_rows": np.array([out, n_blocks], dtype=np.int64),
        f"{name}.zero": np.array(1 << (bits - 1), dtype=np.float32),  # u - zero = q
        f"{name}.row_blocks": np.array([-1, n_blocks, blocks.block], dtype=np.int64),
        f"{name}.row_scales": np.array([-1, n_blocks, 1], dtype=np.int64),
        f"{name}.row_width": np.array([-1, width], dtype=np.int64),
    }
    if blocks.offset is not None:
        tensors[f"{name}.offsets"] = blocks.offset.T.cpu().contiguous().numpy().astype(np.float32)  # (groups, out)
    return tensors


def _matmul_nbits(node: Any, name: str, blocks: Blocks, bits: int) -> list[Any]:
    """The nodes computing ``node``'s output, ``x @ W``, from ``blocks``: MatMulNBits, plus the offsets' MatMul."""
    from onnx import helper

    x, y = node.input[0], node.output[0]
    out, width = blocks.q.shape
    main = y if blocks.offset is None else f"{name}.matmul_nbits"
    attrs = {"K": width, "N": out, "bits": bits, "block_size": blocks.block}
    inputs = [x, f"{name}.q{bits}", f"{name}.scales"]
    nodes = [helper.make_node("MatMulNBits", inputs, [main], name=f"{name}.MatMulNBits", domain=_MS, **attrs)]
    if blocks.offset is not None:
        p = f"{name}.offset"
        nodes += [
            helper.make_node("Reshape", [x, f"{name}.block_shape"], [f"{p}.blocks"], name=f"{p}.Reshape"),
            helper.make_node(
                "ReduceSum", [f"{p}.blocks", f"{name}.block_axes"], [f"{p}.sums"], name=f"{p}.ReduceSum", keepdims=0
            ),
            helper.make_node("MatMul", [f"{p}.sums", f"{name}.offsets"], [f"{p}.out"], name=f"{p}.MatMul"),
            helper.make_node("Add", [main, f"{p}.out"], [y], name=f"{p}.Add"),
        ]
    return nodes


def _gather_blocks(node: Any, name: str, blocks: Blocks) -> list[Any]:
    """``Gather(W, ids, axis=1)`` of the (in, out) initializer, from its int8 rows: the rows' values and scales are
    gathered, then dequantized, ``(u - 128) * scale`` per block, as ``GatherBlockQuantized`` computes it."""
    from onnx import TensorProto, helper

    p = f"{name}.gather"
    ids = node.input[1]  # 1-D: the graph looks up flattened ids
    make = helper.make_node
    return [
        make("Reshape", [f"{name}.q8", f"{name}.rows"], [f"{p}.data"], name=f"{p}.data"),
        make("Reshape", [f"{name}.scales", f"{name}.scale_rows"], [f"{p}.scales"], name=f"{p}.scales"),
        # (ids, in): rows of Forge's (out, in) weight, which the graph reads as columns of W
        make("Gather", [f"{p}.data", ids], [f"{p}.u"], name=f"{p}.u", axis=0),
        make("Cast", [f"{p}.u"], [f"{p}.uf"], name=f"{p}.cast", to=TensorProto.FLOAT),
        make("Sub", [f"{p}.uf", f"{name}.zero"], [f"{p}.q"], name=f"{p}.q"),
        make("Reshape", [f"{p}.q", f"{name}.row_blocks"], [f"{p}.qb"], name=f"{p}.qb"),
        make("Gather", [f"{p}.scales", ids], [f"{p}.s"], name=f"{p}.s", axis=0),
        make("Reshape", [f"{p}.s", f"{name}.row_scales"], [f"{p}.sb"], name=f"{p}.sb"),
        make("Mul", [f"{p}.qb", f"{p}.sb"], [f"{p}.wb"], name=f"{p}.wb"),
        make("Reshape", [f"{p}.wb", f"{name}.row_width"], [f"{p}.rows"], name=f"{p}.rows"),
        make("Transpose", [f"{p}.rows"], [node.output[0]], name=f"{p}.T", perm=[1, 0]),
    ]
