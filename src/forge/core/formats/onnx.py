"""ONNX folders: a Forge model as a decoder with a KV cache that onnxruntime and transformers.js run.

The folder is laid out as transformers.js loads a model (``AutoModelForCausalLM.from_pretrained(folder,
{dtype})``, or ``pipeline("text-generation", folder)``), with the tokenizer files of an HF folder::

    config.json               the HF config (model_type llama, qwen2 or gpt2), "transformers.js_config"
                              naming the dtype, and "forge_export" (which marks a folder Forge may replace)
    generation_config.json    bos / eos ids
    tokenizer.json, tokenizer_config.json (with the chat template), special_tokens_map.json
    onnx/model.onnx           float32, or onnx/model_quantized.onnx (int8), onnx/model_q4.onnx (int4)

The graph and its input and output names are :mod:`forge.core.formats.onnx_graph`'s. Quantized dtypes use
onnxruntime's ``MatMulNBits`` (:mod:`forge.core.formats.onnx_quant`): int8 everywhere, or int4 with the output
head at int8, keeping a quantized model's own blocks exactly (a Q4_1 GGUF's); a tied embedding reads the
head's int8 blocks, an untied one stays float32.
A model over 2 GB keeps its weights in ``<file>.onnx_data`` beside the graph (protobuf's limit), and
config.json says so (``use_external_data_format``).

Needs the ``onnx`` extra: ``pip install 'forge-llm[onnx]'`` (onnx, onnxscript, onnxruntime).

>>> write_onnx("out", model.config, model.state_dict(), tok.hf, special, dtype="int4")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer as HFTokenizer

from forge.config import ModelConfig
from forge.core.checkpoint import atomic_directory, fsync_file, write_durably
from forge.core.formats import SpecialTokens, check_exportable
from forge.core.formats.hf import config_to_hf
from forge.core.formats.hf_tokenizer import json_bytes, read_json, tokenizer_files
from forge.core.formats.onnx_graph import matmul_weights, trace
from forge.core.formats.onnx_quant import BLOCK_SIZE, quantize_matmuls
from forge.core.quantize import QuantizedWeight
from forge.errors import CheckpointError, ConfigError

__all__ = ["ONNX_DTYPES", "ONNX_FILES", "onnx_available", "write_onnx"]

#: What ``write_onnx(dtype=...)`` writes, in Forge's dtype vocabulary.
ONNX_DTYPES = ("float32", "int8", "int4")
#: The model file of each dtype, and the name transformers.js gives that dtype (its ``dtype`` option).
ONNX_FILES = {
    "float32": ("onnx/model.onnx", "fp32"),
    "int8": ("onnx/model_quantized.onnx", "q8"),
    "int4": ("onnx/model_q4.onnx", "q4"),
}
_CONFIG = "config.json"
_MARK = "forge_export"
#: Above this, weights go to an external data file: a protobuf message can't exceed 2 GiB.
_INLINE_LIMIT = 1_800_000_000
_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


def onnx_available() -> bool:
    """Whether the ``onnx`` extra is installed (onnx, onnxscript and onnxruntime)."""
    return all(importlib.util.find_spec(name) is not None for name in _PACKAGES)


def write_onnx(
    path: str | os.PathLike[str],
    config: ModelConfig,
    state_dict: dict[str, torch.Tensor | QuantizedWeight],
    tokenizer: HFTokenizer,
    special: SpecialTokens,
    chat_template: str | None = None,
    *,
    dtype: str = "float32",
) -> Path:
    """Write the model as an ONNX folder (see the module docstring), atomically; returns the model file's path.

    ``state_dict`` holds the weights under Forge's float names: tensors, or quantized weights (their modules), which
    an int8 or int4 export keeps exactly where they fit (see :mod:`forge.core.formats.onnx_quant`) and a float32
    one dequantizes. ``path``'s parent folder must exist. A folder Forge exported earlier at ``path`` is
    replaced; any other non-empty folder is refused, and nothing is written until the model has been converted.

    >>> write_onnx("smol-onnx", model.config, model.state_dict(), tok.hf, special, dtype="int4")  # doctest: +SKIP
    PosixPath('smol-onnx/onnx/model_q4.onnx')
    """
    target = Path(path)
    hf_config = _check(target, config, dtype)
    token_ids, files = tokenizer_files(tokenizer, special, chat_template, config.context_length)
    floats = {k: v.dequantize(torch.float32) if isinstance(v, QuantizedWeight) else v for k, v in state_dict.items()}
    model = trace(config, floats)
    if dtype != "float32":
        names = matmul_weights(config)
        # int4 keeps the output head at int8: an int4 head makes greedy output diverge (as GGUF's Q4 files do).
        bits = {n: 8 if dtype == "int8" or n == "head_t" else 4 for n in names}
        model = quantize_matmuls(model, {n: state_dict[w] for n, w in names.items()}, bits)
    name, js_dtype = ONNX_FILES[dtype]
    external = model.ByteSize() > _INLINE_LIMIT
    hf_config.update(token_ids)
    hf_config["torch_dtype"] = "float32"
    hf_config["transformers.js_config"] = {
        "dtype": js_dtype,
        **({"use_external_data_format": True} if external else {}),
    }
    hf_config[_MARK] = {"format": "onnx", "dtype": dtype, "file": name}
    with atomic_directory(target, marker=_CONFIG, owned=_forge_onnx, what="ONNX folder") as tmp:
        _save_model(model, tmp / name, external)
        for file, data in files.items():
            write_durably(tmp / file, data)
        write_durably(tmp / _CONFIG, json_bytes(hf_config))  # last: the folder is complete once it is there
    return target / name


def _check(target: Path, config: ModelConfig, dtype: str) -> dict[str, Any]:
    """Refuse what can't be exported before the (slow) conversion starts; returns the HF config."""
    if dtype not in ONNX_DTYPES:
        raise ConfigError(
            f"ONNX export dtype={dtype!r} is not supported; use one of {', '.join(ONNX_DTYPES)}", field="dtype"
        )
    if not onnx_available():
        missing = [n for n in _PACKAGES if importlib.util.find_spec(n) is None]
        raise ConfigError(
            f"ONNX export needs {', '.join(missing)}, which are not installed; "
            "install them with `pip install 'forge-llm[onnx]'`"
        )
    widths = {"d_model": config.d_model, "d_ff": config.ff_dim}
    uneven = {k: v for k, v in widths.items() if v % BLOCK_SIZE}
    if dtype != "float32" and uneven:
        raise ConfigError(
            f"ONNX export dtype={dtype!r} quantizes in blocks of {BLOCK_SIZE} input columns, which don't divide "
            f"{', '.join(f'{k}={v}' for k, v in uneven.items())}; export as float32",
            field="dtype",
        )
    if not target.parent.is_dir():
        raise CheckpointError(
            f"cannot write the ONNX folder {str(target)!r}: its parent folder {str(target.parent)!r} does not "
            "exist; create it first or choose another path"
        )
    check_exportable(config, "ONNX")
    try:
        hf_config = config_to_hf(config)  # transformers.js picks the model class by model_type
    except ConfigError as e:
        raise ConfigError(f"ONNX export can't handle this architecture: {e}") from None
    if config.context_length > 1 << 20:
        raise ConfigError(
            f"ONNX export writes RoPE tables for the whole context, and context_length={config.context_length} "
            "is too long for that; lower it with model.config.replace(context_length=...) before exporting",
            field="context_length",
        )
    return hf_config


def _save_model(model: Any, path: Path, external: bool) -> None:
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.name + "_data"
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True, location=data)
    fsync_file(path)
    if external:
        fsync_file(path.parent / data)


def _forge_onnx(folder: Path) -> bool:
    """Whether ``folder`` is an ONNX folder Forge wrote: its config.json carries the mark."""
    try:
        config = read_json(folder / _CONFIG)
    except (CheckpointError, OSError):
        return False
    return isinstance(config, dict) and isinstance(config.get(_MARK), dict) and config[_MARK].get("format") == "onnx"
