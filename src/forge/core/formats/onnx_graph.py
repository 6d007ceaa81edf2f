"""The ONNX graph of a Forge model: a decoder with its KV cache as explicit inputs and outputs.

:class:`DecoderGraph` recomputes :class:`~forge.core.transformer.Transformer`'s forward in plain torch ops,
with the past keys and values passed in and the present ones returned, in Optimum's names (what
transformers.js and onnxruntime-genai's exports use)::

    inputs   input_ids (B, T) int64, attention_mask (B, P+T) int64, position_ids (B, T) int64,
             past_key_values.{i}.key / .value (B, Hkv, P, D) float32, num_logits_to_keep () int64
    outputs  logits (B, L, vocab) float32, present.{i}.key / .value (B, Hkv, P+T, D) float32

B, T and P are dynamic; P = 0 (empty past tensors) is a prefill. ``num_logits_to_keep`` (transformers.js's
name, which it sets to 0) asks for the logits of the last L positions only, or of all T with 0: a generator
that reads only the last position's logits passes 1, so the head's matmul runs on one row instead of the whole
prompt's (SmolLM2: a 2,000-token prompt's logits are 393 MB of float32). Keys are cached after RoPE, as Forge and
transformers cache them. :func:`trace` exports it with ``torch.onnx.export(dynamo=True)``; every weight matmul
reads an (in, out) initializer named by :func:`matmul_weights`, which ``onnx_quant`` replaces with
onnxruntime's ``MatMulNBits``.

The graph computes with the float weights it is given: a quantized Forge model is dequantized first.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from forge.config import ModelConfig
from forge.core.attention import rope_tables

__all__ = ["KEEP", "OPSET", "DecoderGraph", "input_names", "matmul_weights", "output_names", "trace"]

#: The ONNX opset written: onnxruntime 1.17+ and onnxruntime-web run it (Gelu became an op in 20).
OPSET = 20


#: The input that limits the logits to the last positions (0: all of them); see the module docstring.
KEEP = "num_logits_to_keep"


def input_names(n_layer: int) -> list[str]:
    """The graph's inputs, in order (``num_logits_to_keep`` last)."""
    return [*_traced_inputs(n_layer), KEEP]


def _traced_inputs(n_layer: int) -> list[str]:
    return ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")
    ]


def output_names(n_layer: int) -> list[str]:
    return ["logits"] + [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


def matmul_weights(config: ModelConfig) -> dict[str, str]:
    """The initializers that weight matmuls read, (in, out), and the Forge weight (out, in) each is the transpose of."""
    names = {"head_t": "lm_head.weight"}
    for i in range(config.n_layer):
        for name in ("attn.qkv", "attn.proj", "mlp.up", "mlp.down"):
            names[f"layers.{i}.{name.split('.')[1]}_t"] = f"blocks.{i}.{name}.weight"
    return names


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().to(device="cpu", dtype=torch.float32).contiguous(), requires_grad=False)


class _Layer(nn.Module):
    """One block's weights; matmul weights transposed to (in, out), so each is an initializer MatMul reads as is."""

    def __init__(self, cfg: ModelConfig, sd: dict[str, torch.Tensor], i: int) -> None:
        super().__init__()
        p = f"blocks.{i}."
        for name in ("attn.qkv", "attn.proj", "mlp.up", "mlp.down"):
            short = name.split(".")[1]
            setattr(self, f"{short}_t", _frozen(sd[f"{p}{name}.weight"].T))
            bias = sd.get(f"{p}{name}.bias")
            setattr(self, f"{short}_b", _frozen(bias) if bias is not None else None)
        for name in ("norm1", "norm2"):
            setattr(self, name, _frozen(sd[f"{p}{name}.weight"]))
            bias = sd.get(f"{p}{name}.bias")
            setattr(self, f"{name}_b", _frozen(bias) if bias is not None else None)


class DecoderGraph(nn.Module):
    """Forge's forward with an explicit KV cache, for export: see the module docstring for inputs and outputs.

    >>> from forge.config import get_preset
    >>> from forge.core.transformer import Transformer
    >>> m = Transformer(get_preset("tiny").replace(vocab_size=256))
    >>> g = DecoderGraph(m.config, m.state_dict())
    >>> past = [torch.zeros(1, m.config.kv_heads, 0, m.config.head_dim)] * (2 * m.config.n_layer)
    >>> ids = torch.tensor([[1, 2, 3]])
    >>> logits, *present = g(ids, torch.ones_like(ids), torch.arange(3)[None], past)
    >>> torch.allclose(logits, m(ids), atol=1e-5), tuple(present[0].shape)
    (True, (1, 4, 3, 32))
    """

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, config: ModelConfig, state_dict: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.config = config
        sd = state_dict
        # A tied head reads the embedding too, from one (d, vocab) initializer: no second copy in the file.
        self.head_t = _frozen(sd["lm_head.weight"].T)
        self.tok_emb = None if config.tie_embeddings else _frozen(sd["tok_emb.weight"])
        self.pos_emb = _frozen(sd["pos_emb.weight"]) if config.position == "learned" else None
        self.layers = nn.ModuleList(_Layer(config, sd, i) for i in range(config.n_layer))
        self.norm = _frozen(sd["norm.weight"])
        self.norm_b = _frozen(sd["norm.bias"]) if "norm.bias" in sd else None
        if config.position == "rope":  # the full context's tables: every position a caller may pass
            cos, sin = rope_tables(config.head_dim, config.context_length, config.rope_theta, config.rope_scaling)
            self.register_buffer("cos", cos)  # (context, D)
            self.register_buffer("sin", sin)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past: list[torch.Tensor],
    ) -> tuple[torch.Tensor, ...]:
        B, T = input_ids.shape
        P = past[0].shape[2]
        if self.tok_emb is None:  # tied: gather columns of the (d, vocab) head
            x = self.head_t.index_select(1, input_ids.reshape(-1)).T.reshape(B, T, -1)  # (B, T, d)
        else:
            x = F.embedding(input_ids, self.tok_emb)  # (B, T, d)
        rope = None
        if self.pos_emb is not None:
            x = x + F.embedding(position_ids, self.pos_emb)
        else:
            rope = (self.cos[position_ids].unsqueeze(1), self.sin[position_ids].unsqueeze(1))  # (B, 1, T, D)
        # Query t (at absolute index P + t) sees key j if j <= P + t and the mask keeps j: padding is masked out.
        keys = torch.arange(attention_mask.shape[1], device=x.device)  # (P+T,)
        causal = keys[None, :] <= (torch.arange(T, device=x.device) + P)[:, None]  # (T, P+T)
        keep = causal[None, None] & attention_mask[:, None, None, :].bool()  # (B, 1, T, P+T)
        # A finite minimum, not -inf: a row with nothing to attend to (a pad query) gets uniform weights, not NaN.
        bias = torch.where(keep, 0.0, torch.finfo(torch.float32).min).unsqueeze(1)  # (B, 1, 1, T, P+T)
        present: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            h = self._norm(x, layer.norm1, layer.norm1_b)
            y, k, v = self._attention(h, layer, rope, bias, past[2 * i], past[2 * i + 1])
            present += [k, v]
            x = x + y
            x = x + self._mlp(self._norm(x, layer.norm2, layer.norm2_b), layer)
        x = self._norm(x, self.norm, self.norm_b)
        return (x @ self.head_t, *present)  # (B, T, vocab), then (B, Hkv, P+T, D) each

    def _norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        cfg = self.config
        if cfg.norm == "layernorm":
            return F.layer_norm(x, (x.shape[-1],), weight, bias, cfg.norm_eps)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * weight

    def _attention(
        self,
        x: torch.Tensor,
        layer: _Layer,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        bias: torch.Tensor,
        past_k: torch.Tensor,
        past_v: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.config
        H, Hkv, D = cfg.n_head, cfg.kv_heads, cfg.head_dim
        qkv = _linear(x, layer.qkv_t, layer.qkv_b).unflatten(-1, (-1, D)).transpose(1, 2)  # (B, H + 2Hkv, T, D)
        qk, v = qkv.split([H + Hkv, Hkv], dim=1)
        if rope is not None:  # queries and keys rotate together, as in Forge
            qk = _rope(qk, *rope)
        q, k = qk.split([H, Hkv], dim=1)  # (B, H, T, D), (B, Hkv, T, D)
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)  # (B, Hkv, P+T, D)
        # Grouped heads: query head h = kv * G + g reads kv head kv (as Forge groups them); the cache broadcasts
        # over g instead of being repeated per query head.
        q = q.unflatten(1, (Hkv, H // Hkv))  # (B, Hkv, G, T, D)
        scores = (q @ k.unsqueeze(2).transpose(-1, -2)) * (D**-0.5) + bias  # (B, Hkv, G, T, P+T)
        y = scores.softmax(dim=-1) @ v.unsqueeze(2)  # (B, Hkv, G, T, D)
        y = y.flatten(1, 2).transpose(1, 2).flatten(2)  # (B, T, H * D)
        return _linear(y, layer.proj_t, layer.proj_b), k, v

    def _mlp(self, x: torch.Tensor, layer: _Layer) -> torch.Tensor:
        h = _linear(x, layer.up_t, layer.up_b)
        if self.config.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)  # [gate | up], as Forge fuses them
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return _linear(h, layer.down_t, layer.down_b)


def _linear(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = x @ weight_t  # a MatMul on an (in, out) initializer: what MatMulNBits replaces
    return y + bias if bias is not None else y


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin  # "rotate half", as Forge


def _example_inputs(cfg: ModelConfig) -> tuple[Any, ...]:
    """Inputs to trace with: every dynamic size at least 2, so that none is specialised to a constant."""
    B, T, P = 2, 3, 4
    ids = torch.zeros(B, T, dtype=torch.long)
    past = [torch.zeros(B, cfg.kv_heads, P, cfg.head_dim) for _ in range(2 * cfg.n_layer)]
    return ids, torch.ones(B, P + T, dtype=torch.long), torch.arange(P, P + T).expand(B, T).contiguous(), past


def trace(config: ModelConfig, state_dict: dict[str, torch.Tensor]) -> Any:
    """The ``onnx.ModelProto`` of the model's decoder (see :class:`DecoderGraph`), weights inside."""
    graph = DecoderGraph(config, state_dict).eval()
    batch, seq = "batch_size", "sequence_length"
    dims: dict[str, Any] = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: "total_sequence_length"},
        "position_ids": {0: batch, 1: seq},
        "past": [{0: batch, 2: "past_sequence_length"}] * (2 * config.n_layer),
    }
    with _quiet(), torch.no_grad():
        program = torch.onnx.export(
            graph,
            _example_inputs(config),
            input_names=_traced_inputs(config.n_layer),
            output_names=output_names(config.n_layer),
            dynamic_shapes=dims,
            opset_version=OPSET,
            dynamo=True,
            verbose=False,
        )
    assert program is not None, "torch.onnx.export(dynamo=True) returns the program"
    return _keep_last_logits(program.model_proto)


def _keep_last_logits(model: Any) -> Any:
    """Add the ``num_logits_to_keep`` input: the head's MatMul reads ``x[:, -L:]``, L the input's value.

    ``Slice`` clamps: L = 0 starts at -0 = 0, all positions; an L beyond the sequence also keeps all of them.
    """
    from onnx import TensorProto, helper

    graph = model.graph
    (head,) = [n for n in graph.node if n.output[0] == "logits"]
    assert head.op_type == "MatMul", f"the logits come from a {head.op_type}, not the head's MatMul"
    x, p = head.input[0], "logits_to_keep"
    helpers = [
        helper.make_tensor(f"{p}.shape", TensorProto.INT64, [1], [1]),
        helper.make_tensor(f"{p}.end", TensorProto.INT64, [1], [2**63 - 1]),
        helper.make_tensor(f"{p}.axis", TensorProto.INT64, [1], [1]),
    ]
    graph.initializer.extend(helpers)
    nodes = [
        helper.make_node("Neg", [KEEP], [f"{p}.neg"], name=f"{p}.Neg"),
        helper.make_node("Reshape", [f"{p}.neg", f"{p}.shape"], [f"{p}.start"], name=f"{p}.Reshape"),
        helper.make_node("Slice", [x, f"{p}.start", f"{p}.end", f"{p}.axis"], [f"{p}.x"], name=f"{p}.Slice"),
    ]
    head.input[0] = f"{p}.x"
    at = list(graph.node).index(head)
    for offset, node in enumerate(nodes):
        graph.node.insert(at + offset, node)
    graph.input.append(helper.make_tensor_value_info(KEEP, TensorProto.INT64, []))
    (logits,) = [o for o in graph.output if o.name == "logits"]
    logits.type.tensor_type.shape.dim[1].dim_param = "num_logits"
    return model


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence torch.onnx's progress lines and warnings while it runs: ``forge export`` prints its own."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
