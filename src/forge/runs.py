"""What a training run starts from: the corpus tokenized, and a model fresh from a preset, given, or resumed."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import torch

from forge.budget import DEFAULT_BUDGET, AutoPick, auto_pick, format_duration
from forge.config import ModelConfig, get_preset
from forge.core.lora import has_lora, lora_rank
from forge.core.quantize import dequantize_model, has_quantized
from forge.core.transformer import Transformer
from forge.data import Corpus, DataSource, TokenDataset, cache_dir
from forge.errors import ConfigError, DataError
from forge.models import create_model, load, padded_vocab
from forge.tokenizer import Tokenizer, TokenizerKind


class RunConfig(Protocol):
    """What preparing a run reads of its ``TrainConfig`` (typed so, without importing ``forge.trainer`` back)."""

    @property
    def lora_rank(self) -> int: ...

    @property
    def seed(self) -> int: ...

    @property
    def context(self) -> int | None: ...

    @property
    def val_fraction(self) -> float: ...

    @property
    def budget(self) -> float | None: ...

    @property
    def steps(self) -> int | None: ...


#: The run's own config type (``TrainConfig``), handed back as it came.
Config = TypeVar("Config", bound=RunConfig)

__all__ = ["MEASURED", "BestWeights", "PreparedRun", "auto_preset", "prepare_run"]

#: The TrainConfig fields :func:`auto_preset` sets for a new model of the auto shape, as measured for it, unless
#: the call chose them.
MEASURED = ("lr", "optimizer", "label_smoothing")


def _tokenizer_for(corpus: Corpus, kind: TokenizerKind, vocab_size: int) -> Tokenizer:
    """Train a tokenizer on the corpus, cached by corpus content, kind and size."""
    path = cache_dir() / "tokenizers" / f"{corpus.fingerprint()[:32]}-{kind}-{vocab_size}.json"
    if path.exists():
        return Tokenizer.load(path)
    tokenizer = Tokenizer.train(corpus.chunks(), kind=kind, vocab_size=vocab_size)
    try:
        tokenizer.save(path)
    except OSError as e:  # a full disk: one line, not a traceback
        raise DataError(
            f"could not write the tokenizer cache {str(path)!r}: {e.strerror or e}; free some disk space, "
            "or point FORGE_CACHE_DIR at another disk"
        ) from None
    return tokenizer


def _resumed(
    path: str | os.PathLike[str], config: Config
) -> tuple[Transformer, Tokenizer, dict[str, Any] | None, Config]:
    """A checkpoint's model (with its LoRA adapters, if any), tokenizer and state, and the config to go on with."""
    loaded = load(path, with_state=True, keep_adapters=True)
    if has_lora(loaded.model) and not config.lora_rank:  # a LoRA run resumes as one
        config = dataclasses.replace(config, lora_rank=lora_rank(loaded.model))  # type: ignore[type-var]
    return loaded.model, loaded.tokenizer, loaded.training_state, config


def _fresh(
    corpus: Corpus,
    preset: str | ModelConfig,
    tokenizer: TokenizerKind | Tokenizer,
    vocab_size: int | None,
    config: RunConfig,
) -> tuple[Transformer, Tokenizer]:
    """A new model of ``preset``, seeded by ``config.seed``, and its tokenizer (trained on the corpus unless given)."""
    cfg = get_preset(preset) if isinstance(preset, str) else preset
    if config.context is not None and config.context > cfg.context_length:
        raise ConfigError(
            f"context={config.context} is longer than the model's context of {cfg.context_length}; "
            f"use context={cfg.context_length} or less",
            field="context",
        )
    if isinstance(tokenizer, Tokenizer):
        tok = tokenizer
    else:
        tok = _tokenizer_for(corpus, tokenizer, vocab_size or cfg.vocab_size)
    torch.manual_seed(config.seed)
    return create_model(cfg, vocab_size=padded_vocab(tok.vocab_size)), tok


@dataclass
class PreparedRun(Generic[Config]):
    """What a run starts from: its model, tokenizer, token dataset, config, and the state to resume (if any)."""

    model: Transformer
    tokenizer: Tokenizer
    corpus: Corpus
    dataset: TokenDataset
    config: Config
    state: dict[str, Any] | None = None


def prepare_run(
    data: DataSource,
    *,
    preset: str | ModelConfig,
    resume: str | os.PathLike[str] | None,
    model: Transformer | None,
    tokenizer: TokenizerKind | Tokenizer,
    vocab_size: int | None,
    config: Config,
) -> PreparedRun[Config]:
    """The model (fresh from ``preset``, given, or resumed), its tokenizer and the corpus tokenized with it."""
    corpus = Corpus.from_source(data)
    state = None
    if resume is not None:
        model, tok, state, config = _resumed(resume, config)
    elif model is not None:
        if not isinstance(tokenizer, Tokenizer):
            raise ConfigError("train(model=...) needs the model's Tokenizer as tokenizer=...; got a tokenizer kind")
        tok = tokenizer
        if has_quantized(model):  # e.g. a GGUF kept quantized: train its float32 twin, in place
            dequantize_model(model, torch.float32).float()
    else:
        model, tok = _fresh(corpus, preset, tokenizer, vocab_size, config)
    dataset = TokenDataset.build(corpus, tok, val_fraction=config.val_fraction)
    return PreparedRun(model=model, tokenizer=tok, corpus=corpus, dataset=dataset, config=config, state=state)


def auto_preset(
    data: DataSource,
    config: Config,
    device: str = "cpu",
    *,
    tokenizer: TokenizerKind | Tokenizer = "bpe",
    chosen: dict[str, Any] | None = None,
) -> tuple[Config, AutoPick]:
    """What ``preset="auto"`` trains on ``data``: the shape for the budget, the device and the corpus size, and
    the one-line reason; and the config to train with (given neither a budget nor ``steps``, the
    ``DEFAULT_BUDGET``)."""
    if config.budget is None and config.steps is None:
        config = dataclasses.replace(config, time=format_duration(DEFAULT_BUDGET))
    corpus = Corpus.from_source(data)
    size = sum(p.stat().st_size for p in corpus.files) + sum(len(t.encode()) for t in corpus.texts)
    budget = config.budget
    kind = tokenizer if isinstance(tokenizer, str) else "given"
    pick = auto_pick(
        budget=budget or DEFAULT_BUDGET, corpus_bytes=size, device=device, assumed=budget is None, tokenizer=kind
    )
    if chosen is not None:  # the options a call chose; the rest of MEASURED as measured for the shape
        measured = {"lr": pick.lr, "optimizer": "muon", "label_smoothing": pick.label_smoothing}
        assert measured.keys() == set(MEASURED)
        config = dataclasses.replace(config, **measured | chosen)
    return config, pick


class BestWeights:
    """The weights of the lowest validation loss seen so far, copied to host memory, to end a run with them.

    A small corpus and a long budget (a GPU's minutes on a megabyte of text) train many epochs, and the
    last steps can be much worse on new text than the best ones: on the H200, 255 s on 0.8 MB of
    Shakespeare ended at 5.46 bits per byte on held-out English where HF's Trainer got 3.36.
    """

    def __init__(self) -> None:
        self.step: int | None = None
        self.loss = float("inf")
        self._state: dict[str, torch.Tensor] | None = None

    def offer(self, model: torch.nn.Module, step: int, loss: float) -> None:
        """Keep ``model``'s trained weights if ``loss`` is the lowest yet (a LoRA run's: its adapters only)."""
        if loss < self.loss:
            self.step, self.loss = step, loss
            trained = model.named_parameters()
            self._state = {k: v.detach().to("cpu", copy=True) for k, v in trained if v.requires_grad}

    def restore(self, model: torch.nn.Module, final_loss: float) -> tuple[int, float] | None:
        """Put the kept weights back if they evaluated better than ``final_loss``: their (step, loss), else None."""
        if self._state is None or self.step is None or not final_loss > self.loss:
            return None
        model.load_state_dict(self._state, strict=False)  # frozen weights and buffers never changed
        return self.step, self.loss
