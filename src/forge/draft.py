"""Loading a draft model for speculative decoding (``speculate="draft"``, ``--draft MODEL``).

The draft proposes token ids that the target model checks, so both must read ids the same way: the
draft's tokenizer must have the target's vocabulary, id for id. :func:`load_draft` loads any model
Forge loads (a checkpoint, a GGUF file, an HF folder, a known name) on the target's device and checks
that; the token loop itself is ``forge.core.draft``.
"""

from __future__ import annotations

import os

import torch

from forge import models
from forge.core.transformer import Transformer
from forge.errors import ConfigError
from forge.tokenizer import Tokenizer

__all__ = ["check_vocabulary", "load_draft"]


def check_vocabulary(draft: Tokenizer, target: Tokenizer, name: str) -> None:
    """Raise ConfigError unless ``draft`` maps every id to the same token as ``target``."""
    if draft.vocab_size != target.vocab_size:
        raise ConfigError(
            f"draft model {name!r} has a vocabulary of {draft.vocab_size} tokens, the model {target.vocab_size}: "
            "a draft must share the model's tokenizer; pick a smaller model of the same family",
            field="draft",
        )
    differs = next((i for i in range(target.vocab_size) if draft.token(i) != target.token(i)), None)
    if differs is not None:
        raise ConfigError(
            f"draft model {name!r} reads token id {differs} as {draft.token(differs)!r}, the model as "
            f"{target.token(differs)!r}: a draft must share the model's tokenizer; pick a smaller model of the "
            "same family",
            field="draft",
        )


def load_draft(
    source: str | os.PathLike[str], target: Tokenizer, device: torch.device, dtype: torch.dtype | None = None
) -> Transformer:
    """The draft model at ``source`` on ``device`` (in ``dtype`` if given), checked against ``target``."""
    loaded = models.load(source, device=device)
    check_vocabulary(loaded.tokenizer, target, str(source))
    model = loaded.model if dtype is None else loaded.model.to(dtype)
    return model.eval()
