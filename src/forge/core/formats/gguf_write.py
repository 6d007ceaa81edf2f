"""Write Forge models as GGUF files that llama.cpp and Ollama run (the layout is in :mod:`forge.core.formats.gguf`).

>>> p = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
>>> write_gguf("out.gguf", p.config, p.state_dict, p.tokenizer, p.special, p.chat_template)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tokenizers import Tokenizer as HFTokenizer

from forge.config import ModelConfig
from forge.core.checkpoint import fsync_file, write_error
from forge.core.formats import SpecialTokens, check_exportable
from forge.core.formats.gguf import _expected_shapes, _gguf, _permute
from forge.core.formats.gguf_tokenizer import write_tokenizer
from forge.core.quantize import Int4Weight, QuantizedWeight
from forge.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from gguf import GGMLQuantizationType, GGUFWriter

__all__ = ["WRITE_DTYPES", "write_gguf"]

#: ``write_gguf(dtype=...)`` choices: the types ``gguf.quants`` can produce that llama.cpp runs everywhere.
WRITE_DTYPES: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")

#: Kept at Q8_0 in a q4_0/q4_1 file, as llama.cpp's quantizer keeps them above 4 bits: they are read by index or
#: decide the next token, and an int4 head makes greedy output diverge (the shipped SmolLM2 Q4_1 has a Q8_0 token_embd).
_HIGH_PRECISION = ("token_embd.weight", "output.weight")
#: Values per block of the Q4_0, Q4_1 and Q8_0 types: blocks are 32 values of one row.
_BLOCK = 32

#: Kept in float32 whatever the dtype, as llama.cpp's converter does: small, and read by index, not matmul.
_KEEP_F32 = ("position_embd.weight", "rope_freqs.weight")


def write_gguf(
    path: str | os.PathLike[str],
    config: ModelConfig,
    state_dict: Mapping[str, torch.Tensor | QuantizedWeight],
    tokenizer: HFTokenizer,
    special: SpecialTokens,
    chat_template: str | None = None,
    *,
    dtype: str = "f16",
    name: str = "forge-model",
) -> None:
    """Write a Forge model as a GGUF file that llama.cpp and Ollama run; atomic (temp file, then rename).

    Llama-family configs become "llama" files ("qwen2" when only q, k, v have biases), GPT-2-family
    configs "gpt2" files. ``dtype`` is one of :data:`WRITE_DTYPES`; norms and biases stay float32; with
    "q4_0" and "q4_1" the token embeddings and output head are Q8_0, as llama.cpp's quantizer keeps them; with
    the block types a matrix whose rows are not a multiple of 32 long stays float16.

    ``state_dict`` may hold :class:`QuantizedWeight` modules in place of weights (a quantized model's linear
    layers): an int4 weight in groups of 32 that is exactly Q4_0/Q4_1 is written as those blocks, unchanged, when
    ``dtype`` is that type; any other is dequantized and written like a float weight.

    >>> write_gguf("tiny.gguf", model.config, model.state_dict(), tok.hf, SpecialTokens(eos=EOS))  # doctest: +SKIP
    """
    gguf = _gguf()
    if dtype not in WRITE_DTYPES:
        raise ConfigError(f"write_gguf(dtype={dtype!r}) is invalid: use one of {', '.join(WRITE_DTYPES)}")
    if not isinstance(tokenizer, HFTokenizer):
        raise ConfigError(
            f"write_gguf needs a tokenizers.Tokenizer, got {type(tokenizer).__name__}; for a Forge Tokenizer pass "
            "its .hf attribute"
        )
    arch = _export_architecture(config)
    tensors = _from_forge(config, state_dict, arch, dtype)
    out = Path(path)
    _check_gguf_target(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        writer = gguf.GGUFWriter(tmp, arch)
    except OSError as e:
        raise write_error(out, "GGUF file", e) from None
    try:
        _write_config(writer, config, arch, name, dtype)
        write_tokenizer(writer, tokenizer, special, chat_template, config.vocab_size)
        for tensor_name, tensor in tensors.items():
            data, qtype = _encode(tensor_name, tensor, dtype)
            writer.add_tensor(tensor_name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        fsync_file(tmp)
        os.replace(tmp, out)
    except BaseException as e:
        with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
            writer.close()
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_error(out, "GGUF file", e) from None
        raise


def _check_gguf_target(out: Path) -> None:
    """Replace a GGUF file, never a folder or a file of another kind: it may be the user's data."""
    if out.is_dir():
        raise CheckpointError(f"cannot write a GGUF file to {str(out)!r}: it is a folder; pass a path ending .gguf")
    if out.is_file():
        with out.open("rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise CheckpointError(
                f"refusing to replace {str(out)!r}: it is not a GGUF file, and exporting there would overwrite it; "
                "choose a new path ending .gguf"
            )


def _export_architecture(config: ModelConfig) -> str:
    check_exportable(config, "GGUF")
    if config.position == "rope" and config.norm == "rmsnorm" and config.activation == "swiglu":
        if (
            config.rope_scaling
            and config.rope_scaling.get("rope_type") == "llama3"
            and not config.bias
            and config.attn_bias
        ):
            raise ConfigError("write_gguf: llama.cpp's qwen2 graph has no Llama 3 RoPE scaling; drop rope_scaling")
        # llama.cpp's qwen2 graph is Llama with q, k, v biases and rotate-half RoPE.
        return "qwen2" if config.attn_bias and not config.bias else "llama"
    if config.position == "learned" and config.norm == "layernorm" and config.activation == "gelu":
        return "gpt2"
    raise ConfigError(
        f"write_gguf: a model with position={config.position!r}, norm={config.norm!r}, "
        f"activation={config.activation!r} has no GGUF architecture; GGUF export supports the Llama family "
        "(rope, rmsnorm, swiglu) and the GPT-2 family (learned, layernorm, gelu)"
    )


def _from_forge(
    cfg: ModelConfig, state_dict: Mapping[str, torch.Tensor | QuantizedWeight], arch: str, dtype: str
) -> dict[str, torch.Tensor]:
    """Forge's state dict as GGUF tensors on the CPU: float32, or uint8 rows of blocks already in ``dtype``."""
    expected = _expected_shapes(cfg)
    for key, shape in expected.items():
        got = state_dict.get(key)
        if got is None and any(k.startswith(key + ".") for k in state_dict):
            raise ConfigError(
                f"write_gguf: state_dict[{key!r}] is missing but its quantized buffers are there; put the "
                "QuantizedWeight module itself under that name (forge.models.export does)"
            )
        if got is None or got.shape != shape:
            found = "is missing" if got is None else f"has shape {tuple(got.shape)}"
            raise ConfigError(
                f"write_gguf: state_dict[{key!r}] {found}, but the config needs {tuple(shape)}; pass the "
                "state_dict() of a Transformer built from this config"
            )

    def get(key: str) -> torch.Tensor:
        if key in expected:
            # The embeddings and head are Q8_0 in a Q4 file (_HIGH_PRECISION): never Q4 blocks.
            return _rows(state_dict[key], dtype if key not in ("tok_emb.weight", "lm_head.weight") else None)
        # llama.cpp's gpt2 graph needs every bias; a zero bias is the same as none.
        return torch.zeros(expected[key.rsplit(".", 1)[0] + ".weight"][0])

    out = {"token_embd.weight": get("tok_emb.weight")}
    if arch == "gpt2":
        out["position_embd.weight"] = get("pos_emb.weight")
    for i in range(cfg.n_layer):
        out |= _block_to_gguf(get, cfg, arch, i)
    out["output_norm.weight"] = get("norm.weight")
    if arch == "gpt2":
        out["output_norm.bias"] = get("norm.bias")
    if arch == "gpt2" or not cfg.tie_embeddings:
        # GPT-2 files carry the output matrix even when tied; older llama.cpp builds require it.
        out["output.weight"] = get("lm_head.weight")
    if cfg.rope_scaling and cfg.rope_scaling.get("rope_type") == "llama3":
        out["rope_freqs.weight"] = _rope_freqs(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    return out


def _block_to_gguf(get: Callable[[str], torch.Tensor], cfg: ModelConfig, arch: str, i: int) -> dict[str, torch.Tensor]:
    """Layer ``i`` as GGUF tensors; ``get`` fetches a Forge tensor by name."""
    H, Hkv, D = cfg.n_head, cfg.kv_heads, cfg.head_dim
    out: dict[str, torch.Tensor] = {}
    b, f = f"blk.{i}.", f"blocks.{i}."
    out[b + "attn_norm.weight"] = get(f + "norm1.weight")
    if arch == "gpt2":
        out[b + "attn_norm.bias"] = get(f + "norm1.bias")
        out[b + "attn_qkv.weight"], out[b + "attn_qkv.bias"] = get(f + "attn.qkv.weight"), get(f + "attn.qkv.bias")
    else:
        for part in ("weight", "bias") if cfg.attn_bias else ("weight",):
            q, k, v = get(f"{f}attn.qkv.{part}").split([H * D, Hkv * D, Hkv * D])
            if arch == "llama":
                q, k = _permute(q, H), _permute(k, Hkv)
            out[f"{b}attn_q.{part}"], out[f"{b}attn_k.{part}"], out[f"{b}attn_v.{part}"] = q, k, v
    out[b + "attn_output.weight"] = get(f + "attn.proj.weight")
    out[b + "ffn_norm.weight"] = get(f + "norm2.weight")
    if arch == "gpt2":
        out[b + "ffn_norm.bias"] = get(f + "norm2.bias")
        out[b + "ffn_up.weight"] = get(f + "mlp.up.weight")
    else:
        out[b + "ffn_gate.weight"], out[b + "ffn_up.weight"] = get(f + "mlp.up.weight").chunk(2)
    out[b + "ffn_down.weight"] = get(f + "mlp.down.weight")
    if cfg.bias or arch == "gpt2":
        out[b + "attn_output.bias"] = get(f + "attn.proj.bias")
        if arch == "gpt2":
            out[b + "ffn_up.bias"] = get(f + "mlp.up.bias")
        else:
            out[b + "ffn_gate.bias"], out[b + "ffn_up.bias"] = get(f + "mlp.up.bias").chunk(2)
        out[b + "ffn_down.bias"] = get(f + "mlp.down.bias")
    return out


def _rope_freqs(head_dim: int, theta: float, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3's RoPE scaling as llama.cpp stores it: a divisor per frequency, as its converter computes them."""
    factor, old = float(scaling["factor"]), float(scaling["original_max_position_embeddings"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    wavelen = 2 * math.pi * theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    smooth = (old / wavelen - low) / (high - low)
    divisors = torch.where(wavelen > old / low, factor, 1 / ((1 - smooth) / factor + smooth))
    return torch.where(wavelen < old / high, 1.0, divisors).float()


def _write_config(writer: GGUFWriter, cfg: ModelConfig, arch: str, name: str, dtype: str) -> None:
    gguf = _gguf()
    kinds = gguf.LlamaFileType
    file_types = {
        "f32": kinds.ALL_F32,
        "f16": kinds.MOSTLY_F16,
        "bf16": kinds.MOSTLY_BF16,
        "q8_0": kinds.MOSTLY_Q8_0,
        "q4_0": kinds.MOSTLY_Q4_0,
        "q4_1": kinds.MOSTLY_Q4_1,
    }
    writer.add_name(name)
    writer.add_file_type(file_types[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.ff_dim)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.kv_heads)
    if arch == "gpt2":
        writer.add_layer_norm_eps(cfg.norm_eps)
        return
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_dimension_count(cfg.head_dim)
    if cfg.rope_scaling and cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
    elif cfg.rope_scaling and cfg.rope_scaling.get("rope_type") == "llama3":
        # llama.cpp reads only rope_freqs.weight; the reader needs this to recover the parameters.
        writer.add_rope_scaling_orig_ctx_len(int(cfg.rope_scaling["original_max_position_embeddings"]))


def _rows(value: torch.Tensor | QuantizedWeight, dtype: str | None) -> torch.Tensor:
    """A weight as float32 on the CPU, or as its Q4_0/Q4_1 blocks (uint8, one row per output row) when ``value``
    holds exactly those blocks and ``dtype`` is their type: the row operations of :func:`_block_to_gguf` (split,
    permute, chunk) then move whole rows of blocks, and nothing is requantized."""
    if not isinstance(value, QuantizedWeight):
        return value.detach().to("cpu", torch.float32)
    blocks = _q4_blocks(value, dtype) if isinstance(value, Int4Weight) and dtype in ("q4_0", "q4_1") else None
    return blocks if blocks is not None else value.dequantize(torch.float32).detach().cpu()


def _q4_blocks(w: Int4Weight, dtype: str) -> torch.Tensor | None:
    """``w`` as GGUF ``dtype`` blocks, (out, in / 32 * block bytes) uint8, if it is exactly such blocks; else None.

    Q4_1 is ``w = d * q + m`` per 32 values with d and m in float16; Q4_0 the same with ``m = -8 * d``.
    """
    if w.group_size != _BLOCK:
        return None
    scale, minimum = w.scale.detach().cpu().float(), w.min.detach().cpu().float()
    d, m = scale.half(), minimum.half()
    if not torch.equal(d.float(), scale):
        return None
    if dtype == "q4_1" and not torch.equal(m.float(), minimum):
        return None
    if dtype == "q4_0" and not torch.equal(minimum, -8 * scale):
        return None
    out, width = w.shape
    q = w.unpacked().cpu().to(torch.uint8).reshape(out, width // _BLOCK, _BLOCK)  # (out, blocks, 32)
    nibbles = q[..., :16] | (q[..., 16:] << 4)  # a block's values 0..15 in the low nibbles, 16..31 in the high
    head = torch.stack([d, m] if dtype == "q4_1" else [d], dim=-1).view(torch.uint8)  # little-endian float16s
    return torch.cat([head, nibbles], dim=-1).reshape(out, -1)


def _encode(name: str, tensor: torch.Tensor, dtype: str) -> tuple[np.ndarray, GGMLQuantizationType]:
    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    x = tensor.contiguous().numpy()
    if x.dtype == np.uint8:  # blocks already in the file's type (see _rows)
        return x, Q[dtype.upper()]
    # Norms, biases, RoPE factors and learned positions stay float32, as llama.cpp's converter keeps them.
    if dtype == "f32" or x.ndim == 1 or name in _KEEP_F32:
        return x, Q.F32
    if dtype == "bf16":
        return gguf.quants.quantize(x, Q.BF16), Q.BF16
    if dtype == "f16" or x.shape[-1] % _BLOCK:  # the block types need rows of whole blocks
        return x.astype(np.float16), Q.F16
    qtype = Q.Q8_0 if name in _HIGH_PRECISION else Q[dtype.upper()]
    return gguf.quants.quantize(x, qtype), qtype
