"""Presets, and creating, saving and loading models with their tokenizers.

>>> model = create_model("tiny", vocab_size=512)
>>> model.config.n_layer
4
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from forge.config import PRESETS, ModelConfig, get_preset, preset_names
from forge.core.checkpoint import load_checkpoint, read_manifest, save_checkpoint
from forge.core.transformer import Transformer
from forge.errors import CheckpointError, ConfigError
from forge.tokenizer import Tokenizer

__all__ = [
    "PRESETS",
    "LoadedModel",
    "create_model",
    "describe",
    "get_preset",
    "load",
    "padded_vocab",
    "preset_names",
    "save",
]

TOKENIZER_FILE = "tokenizer.json"


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
    """Save model, tokenizer and optional training state as one checkpoint directory (atomically)."""
    return save_checkpoint(
        path,
        model=model,
        config=model.config.to_dict(),
        files={TOKENIZER_FILE: tokenizer.to_str().encode("utf-8")},
        training_state=training_state,
        meta=meta,
    )


def load(path: str | os.PathLike[str], *, device: str | torch.device = "cpu", with_state: bool = False) -> LoadedModel:
    """Load a checkpoint directory; the training state only if ``with_state``."""
    ckpt = load_checkpoint(path, map_location="cpu", with_state=with_state)
    try:
        cfg = ModelConfig.from_dict(ckpt.config)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} has an invalid config.json ({e}); re-save it") from None
    if TOKENIZER_FILE not in ckpt.files:
        raise CheckpointError(f"checkpoint {str(path)!r} has no {TOKENIZER_FILE}; re-save it with its tokenizer")
    tokenizer = Tokenizer.from_str(ckpt.files[TOKENIZER_FILE].decode("utf-8"))
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.tie_weights()
    _load_weights(model, ckpt.state_dict, path)
    return LoadedModel(model=model.to(device), tokenizer=tokenizer, path=Path(path), training_state=ckpt.training_state)


def _load_weights(model: Transformer, state_dict: dict[str, torch.Tensor], path: object) -> None:
    # Tied weights are stored once; loading either name fills both.
    tied = {"lm_head.weight", "tok_emb.weight"} if model.config.tie_embeddings else set()
    result = model.load_state_dict(state_dict, strict=False)
    missing = set(result.missing_keys) - tied
    if tied and tied <= set(result.missing_keys):
        missing |= tied
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not match its config: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(result.unexpected_keys)[:5]}; re-save it"
        )
    model.reset_buffers()  # non-persistent buffers were left empty by to_empty()


def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What ``forge info`` shows: architecture, parameter count, training state."""
    manifest = read_manifest(path)
    loaded = load(path, with_state=True)
    model, state = loaded.model, loaded.training_state or {}
    cfg = model.config
    return {
        "path": str(path),
        "family": cfg.family,
        "config": cfg.to_dict(),
        "parameters": model.num_params(),
        "non_embedding_parameters": model.num_params(non_embedding=True),
        "tokenizer_vocab": loaded.tokenizer.vocab_size,
        "step": state.get("step", 0),
        "train_config": state.get("train_config"),
        "metrics": state.get("metrics"),
        "meta": manifest.get("meta", {}),
    }
