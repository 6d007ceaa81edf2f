"""Checkpoint formats from and to the wider ecosystem: GGUF and Hugging Face folders.

Readers return a :class:`Pretrained`: a :class:`~forge.config.ModelConfig`, a
state dict in Forge's own parameter names (ready for
``Transformer.load_state_dict``), a ``tokenizers.Tokenizer`` and the special
tokens and chat template that came with the model. Writers take the same
pieces back. Forge's own checkpoint directories are ``forge.core.checkpoint``.

Forge's parameter names (see ``forge.core.transformer``)::

    tok_emb.weight, pos_emb.weight (GPT-2 only), norm.weight/.bias, lm_head.weight
    blocks.{i}.norm1.weight/.bias, blocks.{i}.norm2.weight/.bias
    blocks.{i}.attn.qkv.weight/.bias   rows: [q (H*D); k (Hkv*D); v (Hkv*D)], RoPE in "rotate half" layout
    blocks.{i}.attn.proj.weight/.bias
    blocks.{i}.attn.q_norm, blocks.{i}.attn.k_norm   (head_dim,) gains, with ModelConfig.qk_norm (not exportable)
    blocks.{i}.mlp.up.weight/.bias     SwiGLU: rows [gate (ff); up (ff)]; GELU: (ff, d)
    blocks.{i}.mlp.down.weight/.bias

All weights are ``nn.Linear`` layout: (out_features, in_features).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from tokenizers import Tokenizer as HFTokenizer

from forge.config import ModelConfig
from forge.errors import ConfigError

__all__ = ["Pretrained", "SpecialTokens", "check_exportable"]


def check_exportable(config: ModelConfig, target: str) -> None:
    """Refuse, naming them, the architecture options ``target``'s graphs (llama.cpp's GGUF architectures,
    transformers' GPT-2/Llama/Qwen2 classes, the ONNX graph) have no place for: exported without them, the
    model would compute something else.
    """
    found = []
    if config.qk_norm:
        found.append("qk_norm=True")
    if config.logit_softcap is not None:
        found.append(f"logit_softcap={config.logit_softcap}")
    if config.activation == "relu2":
        found.append("activation='relu2'")
    if found:
        raise ConfigError(
            f"{target} export can't represent this model's {', '.join(found)}: the format's architectures have "
            "no such layer. Run it with Forge itself (its checkpoint works with generate, serve and the Python "
            f"API), or train an exportable model without {' / '.join(found)} (the defaults)"
        )


@dataclass
class SpecialTokens:
    """The special tokens a pretrained model was trained with (token strings, not ids).

    ``eos`` ends a text; ``stop`` lists every token that ends a generation
    (eos plus end-of-turn tokens such as ``<|im_end|>`` or ``<|eot_id|>``).
    ``add_bos``: prepend ``bos`` to every encoded prompt (Llama 2 does, GPT-2 and SmolLM2 don't).
    """

    bos: str | None = None
    eos: str | None = None
    pad: str | None = None
    unk: str | None = None
    stop: list[str] = field(default_factory=list)
    add_bos: bool = False


@dataclass
class Pretrained:
    """A model read from GGUF or a Hugging Face folder, in Forge's terms."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: HFTokenizer
    special: SpecialTokens
    chat_template: str | None = None
    #: Where it came from: {"format": "gguf"|"hf", "architecture": ..., "name": ..., "file_type": ...}.
    meta: dict[str, Any] = field(default_factory=dict)
