"""Hugging Face model folders: read them into Forge, and write Forge models out as them.

A folder holds ``config.json``, the weights in ``model.safetensors`` (or shards
listed in ``model.safetensors.index.json``), ``tokenizer.json``, and optionally
``tokenizer_config.json``, ``special_tokens_map.json``, ``generation_config.json``
and ``chat_template.jinja``. Supported architectures: LlamaForCausalLM (Llama 2
and 3, SmolLM), MistralForCausalLM, Qwen2ForCausalLM and GPT2LMHeadModel.

>>> p = read_hf("path/to/SmolLM2-135M")  # doctest: +SKIP
>>> write_hf("out", p.config, p.state_dict, p.tokenizer, p.special, p.chat_template)  # doctest: +SKIP

Tensor names, Hugging Face to Forge (``{i}`` is the layer)::

    Llama, Mistral, Qwen2                                  Forge
    model.embed_tokens.weight                              tok_emb.weight
    model.layers.{i}.input_layernorm.weight                blocks.{i}.norm1.weight
    model.layers.{i}.self_attn.{q,k,v}_proj.weight/.bias   blocks.{i}.attn.qkv.weight/.bias   rows [q; k; v]
    model.layers.{i}.self_attn.o_proj.weight/.bias         blocks.{i}.attn.proj.weight/.bias
    model.layers.{i}.post_attention_layernorm.weight       blocks.{i}.norm2.weight
    model.layers.{i}.mlp.{gate,up}_proj.weight/.bias       blocks.{i}.mlp.up.weight/.bias     rows [gate; up]
    model.layers.{i}.mlp.down_proj.weight/.bias            blocks.{i}.mlp.down.weight/.bias
    model.norm.weight                                      norm.weight
    lm_head.weight (absent when tied)                      lm_head.weight

    GPT-2 (the ``transformer.`` prefix is optional)        Forge
    transformer.wte.weight, transformer.wpe.weight         tok_emb.weight, pos_emb.weight
    transformer.h.{i}.ln_1, ln_2 (.weight/.bias)           blocks.{i}.norm1, norm2
    transformer.h.{i}.attn.c_attn (Conv1D)                 blocks.{i}.attn.qkv
    transformer.h.{i}.attn.c_proj (Conv1D)                 blocks.{i}.attn.proj
    transformer.h.{i}.mlp.c_fc, mlp.c_proj (Conv1D)        blocks.{i}.mlp.up, mlp.down
    transformer.ln_f                                       norm
    lm_head.weight (absent when tied)                      lm_head.weight

HF Llama applies RoPE in the same "rotate half" layout as Forge, so q and k rows
are copied as they are. GPT-2's Conv1D stores weights as (in, out), the
transpose of ``nn.Linear``. Weights are read into fp32 whatever their stored dtype.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer

from forge.config import ModelConfig
from forge.core.checkpoint import atomic_directory, fsync_file, recover_swap, write_durably
from forge.core.formats import Pretrained, SpecialTokens
from forge.core.formats.hf_tokenizer import (
    json_bytes,
    read_chat_template,
    read_json,
    read_special_tokens,
    read_tokenizer,
    tokenizer_files,
)
from forge.errors import CheckpointError, ConfigError

__all__ = ["SUPPORTED_ARCHITECTURES", "config_from_hf", "config_to_hf", "read_hf", "write_hf"]

#: The HF ``architectures`` names Forge reads and writes.
SUPPORTED_ARCHITECTURES: tuple[str, ...] = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "GPT2LMHeadModel",
)
_MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "GPT2LMHeadModel": "gpt2",
}
#: Buffers some checkpoints store although they hold nothing to load: causal masks, RoPE frequencies.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
#: Both are GELU's tanh approximation, which Forge's GELU computes.
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")
_DTYPES = {"f32": (torch.float32, "float32"), "f16": (torch.float16, "float16"), "bf16": (torch.bfloat16, "bfloat16")}
_WEIGHTS = "model.safetensors"
_INDEX = "model.safetensors.index.json"
_CONFIG = "config.json"
#: safetensors metadata of exports: "format" is what transformers checks; "writer" marks a folder Forge may replace.
_WRITER = {"format": "pt", "writer": "forge"}


# -- configs ------------------------------------------------------------------------------------------------------


def config_from_hf(hf_config: dict[str, Any]) -> ModelConfig:
    """The :class:`ModelConfig` of an HF ``config.json``; :class:`CheckpointError` if Forge can't match it exactly.

    Fields whose HF value is what ModelConfig's ``None`` stands for (``n_kv_head``,
    ``d_ff``, ``qkv_bias``) come back as ``None``, so a config survives
    :func:`config_to_hf` and back unchanged.

    >>> config_from_hf({"architectures": ["GPT2LMHeadModel"], "vocab_size": 256, "n_positions": 64,
    ...                 "n_embd": 32, "n_layer": 2, "n_head": 2}).family
    'gpt2'
    """
    if not isinstance(hf_config, dict):
        raise ConfigError(f"config_from_hf() needs the dict of a config.json, got {type(hf_config).__name__}")
    arch = _architecture(hf_config)
    try:
        cfg = _gpt2_config(hf_config) if arch == "GPT2LMHeadModel" else _llama_config(hf_config, arch)
    except ConfigError as e:
        raise CheckpointError(f"{arch} config describes a model Forge cannot build: {e}") from None
    except (TypeError, ValueError, OverflowError) as e:  # int("x"), int(1e999), int([...]) on a field
        raise CheckpointError(f"{arch} config.json has a size that is not a number ({e}); fix config.json") from None
    # Canonical form: None wherever the value equals the default that None means.
    default_ff = cfg.replace(d_ff=None).ff_dim
    return cfg.replace(
        n_kv_head=None if cfg.kv_heads == cfg.n_head else cfg.n_kv_head,
        d_ff=None if cfg.ff_dim == default_ff else cfg.d_ff,
        qkv_bias=None if cfg.attn_bias == cfg.bias else cfg.qkv_bias,
    )


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The HF ``config.json`` dict of a Forge config: GPT-2, Llama, or Qwen2 when only q, k, v have biases.

    >>> config_to_hf(ModelConfig(vocab_size=256, context_length=64, n_layer=2, n_head=2, d_model=32))["model_type"]
    'gpt2'
    """
    arch = _export_architecture(config)
    common = {"architectures": [arch], "model_type": _MODEL_TYPES[arch], "vocab_size": config.vocab_size}
    if arch == "GPT2LMHeadModel":
        return {
            **common,
            "n_positions": config.context_length,
            "n_embd": config.d_model,
            "n_layer": config.n_layer,
            "n_head": config.n_head,
            "n_inner": config.ff_dim,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": config.norm_eps,
            "resid_pdrop": config.dropout,
            "embd_pdrop": config.dropout,
            "attn_pdrop": config.dropout,
            "scale_attn_weights": True,
            "tie_word_embeddings": config.tie_embeddings,
        }
    hf = {
        **common,
        "hidden_size": config.d_model,
        "intermediate_size": config.ff_dim,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": config.context_length,
        "rms_norm_eps": config.norm_eps,
        # The pre-v5 keys: transformers 4 reads only these, and 5 converts them to rope_parameters.
        "rope_theta": config.rope_theta,
        "rope_scaling": _rope_scaling(config.rope_scaling, arch),
        "attention_dropout": config.dropout,
        "tie_word_embeddings": config.tie_embeddings,
    }
    if arch == "Qwen2ForCausalLM":
        return {**hf, "use_sliding_window": False, "sliding_window": None, "max_window_layers": config.n_layer}
    return {**hf, "head_dim": config.head_dim, "attention_bias": config.bias, "mlp_bias": config.bias}


def _architecture(hf: dict[str, Any]) -> str:
    names = hf.get("architectures") or []
    if not names and hf.get("model_type"):
        names = [a for a, t in _MODEL_TYPES.items() if t == hf["model_type"]] or [f"model_type {hf['model_type']!r}"]
    for name in names:
        if name in SUPPORTED_ARCHITECTURES:
            return name
    shown = names[0] if names else "unknown (config.json names no architectures or model_type)"
    raise CheckpointError(
        f"architecture {shown} is not supported; Forge reads {', '.join(SUPPORTED_ARCHITECTURES)}, "
        "so convert the model to one of them or pick another model"
    )


def _required(hf: dict[str, Any], key: str, arch: str) -> Any:
    if hf.get(key) is None:
        raise CheckpointError(f"{arch} config.json lacks {key!r}; the file is incomplete, download it again")
    return hf[key]


def _unrepresentable(arch: str, key: str, value: object, why: str) -> CheckpointError:
    return CheckpointError(f"{arch} config.json has {key} = {value!r}, which Forge cannot run exactly: {why}")


def _llama_config(hf: dict[str, Any], arch: str) -> ModelConfig:
    d, heads = int(_required(hf, "hidden_size", arch)), int(_required(hf, "num_attention_heads", arch))
    head_dim = hf.get("head_dim")
    if head_dim is not None and int(head_dim) * heads != d:
        why = f"Forge's head size is hidden_size / num_attention_heads = {d / heads:g}"
        raise _unrepresentable(arch, "head_dim", head_dim, why)
    if hf.get("hidden_act", "silu") != "silu":
        raise _unrepresentable(arch, "hidden_act", hf["hidden_act"], "Forge's SwiGLU uses silu")
    if arch == "Qwen2ForCausalLM":
        bias, qkv_bias = False, True  # Qwen2 has biases on q, k and v only
    else:
        attention_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
        if attention_bias != mlp_bias:
            raise _unrepresentable(
                arch, "attention_bias, mlp_bias", (attention_bias, mlp_bias), "Forge has biases in both or in neither"
            )
        bias, qkv_bias = attention_bias, None
    theta, scaling = _rope(hf, arch)
    return ModelConfig(
        vocab_size=int(_required(hf, "vocab_size", arch)),
        context_length=int(_required(hf, "max_position_embeddings", arch)),
        n_layer=int(_required(hf, "num_hidden_layers", arch)),
        n_head=heads,
        n_kv_head=int(hf.get("num_key_value_heads") or heads),
        d_model=d,
        d_ff=int(_required(hf, "intermediate_size", arch)),
        norm="rmsnorm",
        activation="swiglu",
        position="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        bias=bias,
        qkv_bias=qkv_bias,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        dropout=float(hf.get("attention_dropout", 0.0)),
    )


def _rope(hf: dict[str, Any], arch: str) -> tuple[float, dict[str, Any] | None]:
    """RoPE theta and scaling from the pre-v5 keys (rope_theta, rope_scaling) or v5's rope_parameters."""
    params = hf.get("rope_parameters") if isinstance(hf.get("rope_parameters"), dict) else {}
    theta = float(hf.get("rope_theta") or params.get("rope_theta") or 10000.0)
    scaling = hf.get("rope_scaling") or {k: v for k, v in params.items() if k != "rope_theta"} or None
    try:
        return theta, _rope_scaling(scaling, arch)
    except (KeyError, TypeError, ValueError):
        raise _unrepresentable(arch, "rope_scaling", scaling, "it lacks a field its rope_type needs") from None


def _rope_scaling(scaling: dict[str, Any] | None, arch: str) -> dict[str, Any] | None:
    """Normalise: "type" becomes "rope_type", the default type becomes None, unknown types are refused."""
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(scaling["factor"])}
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        out: dict[str, Any] = {"rope_type": "llama3", **{k: float(scaling[k]) for k in keys}}
        out["original_max_position_embeddings"] = int(out["original_max_position_embeddings"])
        return out
    raise _unrepresentable(arch, "rope_scaling", scaling, "Forge supports the default, linear and llama3 rope types")


def _gpt2_config(hf: dict[str, Any]) -> ModelConfig:
    arch = "GPT2LMHeadModel"
    act = hf.get("activation_function", "gelu_new")
    if act not in _GELU_TANH:
        raise _unrepresentable(arch, "activation_function", act, f"Forge's GELU is the tanh approximation {_GELU_TANH}")
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
        raise _unrepresentable(
            arch, "scale_attn_weights", hf.get("scale_attn_weights"), "Forge scales attention by 1/sqrt(head_dim) only"
        )
    if hf.get("add_cross_attention"):
        raise _unrepresentable(arch, "add_cross_attention", True, "Forge is decoder-only")
    return ModelConfig(
        vocab_size=int(_required(hf, "vocab_size", arch)),
        context_length=int(hf.get("n_positions") or _required(hf, "n_ctx", arch)),
        n_layer=int(_required(hf, "n_layer", arch)),
        n_head=int(_required(hf, "n_head", arch)),
        d_model=int(_required(hf, "n_embd", arch)),
        d_ff=int(hf["n_inner"]) if hf.get("n_inner") else None,
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        dropout=float(hf.get("resid_pdrop", 0.0)),
    )


def _export_architecture(config: ModelConfig) -> str:
    shape = (
        f"ModelConfig(position={config.position!r}, norm={config.norm!r}, activation={config.activation!r}, "
        f"bias={config.bias}, qkv_bias={config.qkv_bias}, n_kv_head={config.n_kv_head})"
    )
    if config.position == "learned":
        layout_ok = config.norm == "layernorm" and config.activation == "gelu" and config.kv_heads == config.n_head
        if layout_ok and config.bias and config.attn_bias:
            return "GPT2LMHeadModel"
        raise ConfigError(
            f"{shape} has no Hugging Face equivalent: learned positions export as GPT2LMHeadModel, which needs "
            "layernorm, gelu, biases everywhere and n_kv_head = n_head"
        )
    if config.norm == "rmsnorm" and config.activation == "swiglu":
        if not config.bias:
            return "Qwen2ForCausalLM" if config.attn_bias else "LlamaForCausalLM"
        if config.attn_bias:
            return "LlamaForCausalLM"  # attention_bias and mlp_bias both true
    raise ConfigError(
        f"{shape} has no Hugging Face equivalent: RoPE models export as Llama or Qwen2, which need rmsnorm, "
        "swiglu, and biases everywhere, nowhere or on q, k, v only (qkv_bias=True, bias=False)"
    )


# -- tensor layout ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Entry:
    """One Forge tensor and the HF tensors it is made of, concatenated along dim 0 in this order."""

    forge: str
    hf: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]  # as stored in the HF file
    conv1d: bool = False  # GPT-2's Conv1D stores weights (in, out): the transpose of nn.Linear's


def _layout(cfg: ModelConfig, arch: str, prefix: str = "transformer.") -> list[_Entry]:
    """Every tensor of the model, in both namings, with the shapes the config implies."""
    entries = _gpt2_layout(cfg, prefix) if arch == "GPT2LMHeadModel" else _llama_layout(cfg)
    if not cfg.tie_embeddings:
        entries.append(_Entry("lm_head.weight", ("lm_head.weight",), ((cfg.vocab_size, cfg.d_model),)))
    return entries


def _llama_layout(cfg: ModelConfig) -> list[_Entry]:
    E, d, ff = _Entry, cfg.d_model, cfg.ff_dim
    q, kv = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    out = [E("tok_emb.weight", ("model.embed_tokens.weight",), ((cfg.vocab_size, d),))]
    for i in range(cfg.n_layer):
        f, p = f"blocks.{i}.", f"model.layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        out += [
            E(f + "norm1.weight", (p + "input_layernorm.weight",), ((d,),)),
            E(f + "attn.qkv.weight", tuple(a + f"{x}_proj.weight" for x in "qkv"), ((q, d), (kv, d), (kv, d))),
            E(f + "attn.proj.weight", (a + "o_proj.weight",), ((d, q),)),
            E(f + "norm2.weight", (p + "post_attention_layernorm.weight",), ((d,),)),
            E(f + "mlp.up.weight", (m + "gate_proj.weight", m + "up_proj.weight"), ((ff, d), (ff, d))),
            E(f + "mlp.down.weight", (m + "down_proj.weight",), ((d, ff),)),
        ]
        if cfg.attn_bias:
            out.append(E(f + "attn.qkv.bias", tuple(a + f"{x}_proj.bias" for x in "qkv"), ((q,), (kv,), (kv,))))
        if cfg.bias:
            out += [
                E(f + "attn.proj.bias", (a + "o_proj.bias",), ((d,),)),
                E(f + "mlp.up.bias", (m + "gate_proj.bias", m + "up_proj.bias"), ((ff,), (ff,))),
                E(f + "mlp.down.bias", (m + "down_proj.bias",), ((d,),)),
            ]
    out.append(E("norm.weight", ("model.norm.weight",), ((d,),)))
    return out


def _gpt2_layout(cfg: ModelConfig, prefix: str) -> list[_Entry]:
    E, d, ff = _Entry, cfg.d_model, cfg.ff_dim
    out = [
        E("tok_emb.weight", (prefix + "wte.weight",), ((cfg.vocab_size, d),)),
        E("pos_emb.weight", (prefix + "wpe.weight",), ((cfg.context_length, d),)),
    ]
    for i in range(cfg.n_layer):
        f, h = f"blocks.{i}.", f"{prefix}h.{i}."
        out += [
            E(f + "norm1.weight", (h + "ln_1.weight",), ((d,),)),
            E(f + "norm1.bias", (h + "ln_1.bias",), ((d,),)),
            E(f + "attn.qkv.weight", (h + "attn.c_attn.weight",), ((d, 3 * d),), conv1d=True),
            E(f + "attn.qkv.bias", (h + "attn.c_attn.bias",), ((3 * d,),)),
            E(f + "attn.proj.weight", (h + "attn.c_proj.weight",), ((d, d),), conv1d=True),
            E(f + "attn.proj.bias", (h + "attn.c_proj.bias",), ((d,),)),
            E(f + "norm2.weight", (h + "ln_2.weight",), ((d,),)),
            E(f + "norm2.bias", (h + "ln_2.bias",), ((d,),)),
            E(f + "mlp.up.weight", (h + "mlp.c_fc.weight",), ((d, ff),), conv1d=True),
            E(f + "mlp.up.bias", (h + "mlp.c_fc.bias",), ((ff,),)),
            E(f + "mlp.down.weight", (h + "mlp.c_proj.weight",), ((ff, d),), conv1d=True),
            E(f + "mlp.down.bias", (h + "mlp.c_proj.bias",), ((d,),)),
        ]
    out += [E("norm.weight", (prefix + "ln_f.weight",), ((d,),)), E("norm.bias", (prefix + "ln_f.bias",), ((d,),))]
    return out


def _from_hf_tensors(
    cfg: ModelConfig, arch: str, weights: dict[str, torch.Tensor], root: Path
) -> dict[str, torch.Tensor]:
    """Forge's state dict from the HF tensors, which it consumes."""
    # GPT-2 checkpoints saved from GPT2Model (not the LM head model) lack the "transformer." prefix.
    prefix = "transformer." if any(n.startswith("transformer.") for n in weights) else ""
    layout = _layout(cfg, arch, prefix)
    needed = {name for e in layout for name in e.hf}
    missing = [name for e in layout for name in e.hf if name not in weights]
    if missing:
        raise CheckpointError(
            f"the weights in {str(root)!r} lack {len(missing)} tensor(s) that config.json calls for, e.g. "
            f"{', '.join(missing[:3])}; the download is incomplete or the weights don't match config.json"
        )
    # A tied lm_head.weight some exporters store anyway is a copy of the embedding, as HF treats it.
    unexpected = sorted(
        name
        for name in weights
        if name not in needed
        and not name.endswith(_IGNORED_SUFFIXES)
        and not (cfg.tie_embeddings and name == "lm_head.weight")
    )
    if unexpected:
        raise CheckpointError(
            f"the weights in {str(root)!r} hold {len(unexpected)} tensor(s) that config.json does not account for, "
            f"e.g. {', '.join(unexpected[:3])}; ignoring them would compute a different model, so fix config.json"
        )
    state: dict[str, torch.Tensor] = {}
    for e in layout:
        parts = []
        for name, shape in zip(e.hf, e.shapes, strict=True):
            t = weights.pop(name)  # dropped as it is used, so peak memory stays near one model's worth
            if tuple(t.shape) != shape:
                raise CheckpointError(
                    f"tensor {name} in {str(root)!r} has shape {tuple(t.shape)} but config.json implies {shape}; "
                    "the weights don't belong to this config.json"
                )
            parts.append(t.T if e.conv1d else t)
        state[e.forge] = (torch.cat(parts) if len(parts) > 1 else parts[0]).contiguous()
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]  # the same tensor, as Transformer ties them
    return state


def _to_hf_tensors(
    cfg: ModelConfig, arch: str, state_dict: dict[str, torch.Tensor], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    layout = _layout(cfg, arch)
    expected = {e.forge for e in layout}
    missing = sorted(expected - state_dict.keys())
    extra = sorted(state_dict.keys() - expected - ({"lm_head.weight"} if cfg.tie_embeddings else set()))
    if missing or extra:
        raise ConfigError(
            f"write_hf(): the state dict does not match the config (missing {missing[:3]}, unexpected {extra[:3]}); "
            "pass model.state_dict() of a Transformer built from this config"
        )
    out: dict[str, torch.Tensor] = {}
    for e in layout:
        t = state_dict[e.forge].detach()
        rows = [s[-1] if e.conv1d else s[0] for s in e.shapes]
        rest = e.shapes[0][:-1] if e.conv1d else e.shapes[0][1:]
        if tuple(t.shape) != (sum(rows), *rest):
            raise ConfigError(
                f"write_hf(): {e.forge} has shape {tuple(t.shape)} but the config implies {(sum(rows), *rest)}; "
                "pass the config the model was built from"
            )
        for name, part in zip(e.hf, t.split(rows) if len(rows) > 1 else (t,), strict=True):
            # A copy: safetensors refuses tensors that share memory, as split views and tied weights do.
            part = part.to(device="cpu", dtype=dtype, copy=True)
            out[name] = (part.T if e.conv1d else part).contiguous()
    return out


# -- reading ------------------------------------------------------------------------------------------------------


def read_hf(path: str | os.PathLike[str]) -> Pretrained:
    """Read a Hugging Face model folder (config.json, safetensors weights, tokenizer.json) into Forge's terms.

    >>> pretrained = read_hf("path/to/SmolLM2-135M")  # doctest: +SKIP
    >>> Transformer(pretrained.config).load_state_dict(pretrained.state_dict)  # doctest: +SKIP
    """
    root = Path(path)
    recover_swap(root, _CONFIG)
    if not root.exists():
        raise CheckpointError(
            f"Hugging Face model folder {str(root)!r} does not exist; "
            "pass a folder with config.json, *.safetensors and tokenizer.json (e.g. a hub snapshot)"
        )
    if not root.is_dir():
        raise CheckpointError(f"{str(root)!r} is a file; pass the Hugging Face model folder that holds it")
    hf_config = read_json(root / _CONFIG)
    if hf_config is None:
        raise CheckpointError(
            f"{str(root)!r} has no {_CONFIG}, so it is not a Hugging Face model folder; pass the folder that has one"
        )
    arch = _architecture(hf_config)
    config = config_from_hf(hf_config)
    state_dict = _from_hf_tensors(config, arch, _load_weights(root), root)
    tokenizer, tokenizer_json = read_tokenizer(root)
    meta: dict[str, Any] = {
        "format": "hf",
        "architecture": arch,
        "name": hf_config.get("_name_or_path") or root.name,
        "torch_dtype": hf_config.get("torch_dtype") or hf_config.get("dtype"),
    }
    window = _sliding_window(hf_config, arch)
    if window is not None and window < config.context_length:
        # Forge attends to the whole context; the two agree on sequences up to the window.
        meta["sliding_window"] = window
    return Pretrained(
        config=config,
        state_dict=state_dict,
        tokenizer=tokenizer,
        special=read_special_tokens(root, hf_config, tokenizer, tokenizer_json),
        chat_template=read_chat_template(root),
        meta=meta,
    )


def _load_weights(root: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors file(s), in fp32."""
    index = read_json(root / _INDEX)
    if index is not None:
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{str(root / _INDEX)!r} has no weight_map; download it again")
        files = sorted(set(weight_map.values()))
        for name in files:
            if not (root / name).is_file():
                raise CheckpointError(f"shard {name} listed in {str(root / _INDEX)!r} is missing; download it again")
    elif (root / _WEIGHTS).is_file():
        files = [_WEIGHTS]
    else:
        files = sorted(p.name for p in root.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in root.glob("*.bin"))
        found = "none"
        if pickles:
            found = f"only {', '.join(pickles)}, and Forge does not load .bin pickles, which can run code when loaded"
        raise CheckpointError(
            f"{str(root)!r} has no *.safetensors weights ({found}); convert them in a trusted environment with "
            "`AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)`"
        )
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            with safe_open(str(root / name), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                    t = f.get_tensor(key)
                    weights[key] = t.float() if t.is_floating_point() else t
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(
                f"{str(root / name)!r} is not a readable safetensors file ({e}); it is corrupt or truncated, "
                "download it again"
            ) from None
    return weights


def _sliding_window(hf: dict[str, Any], arch: str) -> int | None:
    if arch == "MistralForCausalLM" or (arch == "Qwen2ForCausalLM" and hf.get("use_sliding_window")):
        window = hf.get("sliding_window")
        return int(window) if window else None
    return None


# -- writing ------------------------------------------------------------------------------------------------------


def write_hf(
    path: str | os.PathLike[str],
    config: ModelConfig,
    state_dict: dict[str, torch.Tensor],
    tokenizer: HFTokenizer,
    special: SpecialTokens,
    chat_template: str | None = None,
    *,
    dtype: str = "f32",
) -> None:
    """Write a folder transformers loads with ``AutoModelForCausalLM`` and ``AutoTokenizer``, atomically.

    ``dtype`` is the weights' dtype on disk: "f32", "f16" or "bf16". A folder
    Forge exported earlier at ``path`` is replaced; any other non-empty folder is refused.

    >>> write_hf("out", model.config, model.state_dict(), tok.hf, SpecialTokens(eos="<|endoftext|>"))  # doctest: +SKIP
    """
    if dtype not in _DTYPES:
        raise ConfigError(f"write_hf(dtype={dtype!r}) is invalid: use one of {', '.join(_DTYPES)}")
    torch_dtype, dtype_name = _DTYPES[dtype]
    hf_config = config_to_hf(config)
    tensors = _to_hf_tensors(config, hf_config["architectures"][0], state_dict, torch_dtype)

    token_ids, files = tokenizer_files(tokenizer, special, chat_template, config.context_length)
    hf_config.update(torch_dtype=dtype_name, **token_ids)
    data = {_CONFIG: json_bytes(hf_config), **files}
    _write_folder(Path(path), tensors, data)


def _write_folder(target: Path, tensors: dict[str, torch.Tensor], files: dict[str, bytes]) -> None:
    """Write into a hidden sibling, then rename it into place; a crash never leaves a half-written folder.

    Only an empty folder or one Forge exported is replaced: a downloaded model
    or anything else of the user's is refused (see :func:`_forge_export`).
    """
    with atomic_directory(target, marker=_CONFIG, owned=_forge_export, what="Hugging Face folder") as tmp:
        save_file(tensors, str(tmp / _WEIGHTS), metadata=_WRITER)
        fsync_file(tmp / _WEIGHTS)
        for name, data in files.items():
            write_durably(tmp / name, data)


def _forge_export(folder: Path) -> bool:
    """Whether ``folder`` is an HF folder Forge wrote: its weights carry Forge's metadata."""
    if not (folder / _CONFIG).is_file() or not (folder / _WEIGHTS).is_file():
        return False
    try:
        with safe_open(str(folder / _WEIGHTS), framework="pt") as f:
            return (f.metadata() or {}).get("writer") == _WRITER["writer"]
    except (OSError, SafetensorError):
        return False
