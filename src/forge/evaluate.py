"""Perplexity and bits per byte of a model on a text: how well it predicts text it was not trained on.

The text is scored in sliding windows of the model's context, as in Hugging Face's perplexity guide, but
exact: every token but the first is scored exactly once, and the first window scores all of its tokens,
each later one only its last ``stride`` tokens, so each token has at least ``window - stride`` tokens of
context before it. A model whose tokenizer adds ``bos`` gets it first, and then its first token is scored
too. All windows have one length, so they batch without padding::

    ids    t0 t1 t2 t3 t4 t5 t6 t7 t8 t9          window 6, stride 3
    1      [t0 .. t5]      scores t1..t5
    2               [t3 .. t8]      scores t6..t8  (t3..t5 are context only)
    3                  [t4 .. t9]   scores t9      (the last window ends at the text's end)

``bits_per_byte`` is the total loss in bits over the UTF-8 bytes of the scored text: it does not depend on
the tokenizer, so models with different vocabularies (or a character model) compare. ``perplexity`` is
``exp`` of the mean loss per token, which does.

>>> plan(10, window=6, stride=3)
[(0, 1, 6), (3, 6, 9), (4, 9, 10)]
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from forge.config import bounded, check_specs
from forge.core.transformer import Transformer
from forge.errors import ConfigError, DataError
from forge.tokenizer import Tokenizer

__all__ = ["DEFAULT_MAX_TOKENS", "EvalConfig", "EvalResult", "evaluate", "plan", "read_text"]

#: Tokens scored at most, unless asked otherwise: about 400 kB of English, a few minutes for a 135M model on
#: two CPU cores. A longer text is cut there, and the result says so (``truncated``).
DEFAULT_MAX_TOKENS = 100_000
#: A file is read only this far (characters per token allowed), so a huge file costs no more than a big one.
_CHARS_PER_TOKEN = 32
#: Tokens in one forward pass: windows are batched up to this (a window longer than it goes alone).
_BATCH_TOKENS = 8192
#: Rows of logits (each vocab-wide, in float32) computed at a time.
_LOGIT_ROWS = 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class EvalConfig:
    """How to score a text; each field is defined once, and ``forge eval``'s flags are built from them."""

    window: int | None = bounded(None, integer=True, ge=2, doc="Tokens the model sees at once; unset: its context.")
    stride: int | None = bounded(
        None, integer=True, ge=1, doc="Tokens each window moves on, below the window; unset: half the window."
    )
    max_tokens: int = bounded(
        DEFAULT_MAX_TOKENS, integer=True, ge=1, doc="Score at most this many tokens; a longer text is cut there."
    )

    def __post_init__(self) -> None:
        check_specs(self)
        if self.window is not None and self.stride is not None:
            _check_stride(self.window, self.stride)


@dataclass(frozen=True, slots=True)
class EvalResult:
    """What :func:`evaluate` measured: the loss in nats per token, and the counts it came from."""

    bits_per_byte: float
    perplexity: float
    loss: float  # mean nats per scored token
    tokens: int  # scored
    bytes: int  # UTF-8 bytes of the scored text
    windows: int
    window: int
    stride: int
    truncated: bool  # the text was longer than max_tokens, and cut there
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(
    model: Transformer,
    tokenizer: Tokenizer,
    source: str | os.PathLike[str],
    config: EvalConfig | None = None,
    **options: Any,
) -> EvalResult:
    """Score ``source`` (a ``str`` is the text itself; a path, such as ``pathlib.Path``, a UTF-8 text file).

    ``options`` are :class:`EvalConfig` fields. The model runs as it is (its dtype, quantized weights and
    device), under ``torch.inference_mode``; its logits are log-softmaxed in float32.
    """
    if config is not None and options:
        raise ConfigError(f"evaluate() got both config and options {sorted(options)}; put them in the config")
    config = config or EvalConfig(**options)
    started = time.perf_counter()
    window, stride = _window(config, model.config.context_length)
    cut = False
    if isinstance(source, os.PathLike):
        text, cut = read_text(source, max_chars=config.max_tokens * _CHARS_PER_TOKEN)
        where = f"text file {os.fspath(source)!r}"
    elif isinstance(source, str):
        text, where = source, "the text"
    else:
        raise ConfigError(f"evaluate() takes a str (the text) or a path to a text file, got {type(source).__name__}")
    ids, nbytes, truncated = _tokens(tokenizer, text, config.max_tokens, where)
    spans = plan(len(ids), window=min(window, len(ids)), stride=stride)
    loss = _score(model, torch.tensor(ids), spans)
    tokens = len(ids) - 1
    mean = loss / tokens
    return EvalResult(
        bits_per_byte=loss / math.log(2) / nbytes,
        perplexity=math.exp(mean) if mean < 700 else math.inf,
        loss=mean,
        tokens=tokens,
        bytes=nbytes,
        windows=len(spans),
        window=window,
        stride=stride,
        truncated=truncated or cut,
        seconds=time.perf_counter() - started,
    )


def plan(n: int, *, window: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows over ``n`` token ids: ``(begin, first scored, end)`` each, the window being ``ids[begin:end]``.

    Every id but the first is scored once; all windows are ``min(window, n)`` long.
    """
    if n > window:
        _check_stride(window, stride)
    spans = [(0, 1, min(window, n))]
    while spans[-1][2] < n:
        scored = spans[-1][2]
        end = min(scored + stride, n)
        spans.append((end - window, scored, end))
    return spans


def read_text(path: str | os.PathLike[str], *, max_chars: int | None = None) -> tuple[str, bool]:
    """The text of UTF-8 file ``path``, its first ``max_chars`` characters at most, and whether it was cut."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise DataError(f"text file {str(path)!r} {what}; pass a UTF-8 text file to evaluate on")
    try:
        with path.open("r", encoding="utf-8", newline="") as f:
            text = f.read(-1 if max_chars is None else max_chars)
            cut = max_chars is not None and f.read(1) != ""
    except UnicodeDecodeError:
        raise DataError(
            f"text file {str(path)!r} is not UTF-8 text (it looks binary); pass a plain text file"
        ) from None
    except OSError as e:
        raise DataError(f"text file {str(path)!r} cannot be read ({e.strerror}); check its permissions") from None
    if "\x00" in text:
        raise DataError(f"text file {str(path)!r} holds NUL bytes (it looks binary); pass a plain text file")
    return text, cut


def _check_stride(window: int, stride: int) -> None:
    if stride >= window:
        raise ConfigError(
            f"stride={stride} is not below the window of {window} tokens: each window needs a token of context "
            f"before the tokens it scores; use stride={window - 1} (windows that do not overlap) or less",
            field="stride",
        )


def _window(config: EvalConfig, context: int) -> tuple[int, int]:
    """The window (the model's context unless set) and the stride (half the window unless set)."""
    window = config.window if config.window is not None else context
    if window > context:
        raise ConfigError(
            f"window={window} is longer than the model's context of {context}; use window={context} or less",
            field="window",
        )
    stride = config.stride if config.stride is not None else max(1, window // 2)
    _check_stride(window, stride)
    return window, stride


def _tokens(tokenizer: Tokenizer, text: str, max_tokens: int, where: str) -> tuple[list[int], int, bool]:
    """The ids to score (``bos`` first where the model wants it), the UTF-8 bytes of the text they score
    (from the token offsets: after the first token when it is only context), and whether the text was cut."""
    if not text.strip():
        raise DataError(f"{where} is empty; pass some text to evaluate on")
    encoding = tokenizer.hf.encode(text, add_special_tokens=False)
    ids, offsets = list(encoding.ids), encoding.offsets
    if not ids:
        raise DataError(f"{where} holds no token this model's tokenizer knows; pass text in the model's language")
    bos = tokenizer.bos_id if tokenizer.add_bos and ids[:1] != [tokenizer.bos_id] else None
    keep = max_tokens if bos is not None else max_tokens + 1  # the first token is context only, without a bos
    truncated = len(ids) > keep
    ids, offsets = ids[:keep], offsets[:keep]
    if bos is not None:
        ids, start = [bos, *ids], 0
    elif len(ids) < 2:
        raise DataError(
            f"{where} is {len(ids)} token long; scoring needs at least 2 (the first is only context), "
            "so pass a longer text"
        )
    else:
        start = offsets[0][1]
    return ids, max(1, len(text[start : offsets[-1][1]].encode("utf-8"))), truncated


def _score(model: Transformer, ids: torch.Tensor, spans: list[tuple[int, int, int]]) -> float:
    """The summed loss (nats) of the scored ids of each span, windows batched ``_BATCH_TOKENS`` at a time."""
    device = next(model.parameters()).device
    length = spans[0][2] - spans[0][0]
    per_batch = max(1, _BATCH_TOKENS // length)
    total = torch.zeros((), dtype=torch.float64)
    training = model.training
    model.eval()  # no dropout
    try:
        with torch.inference_mode():
            for i in range(0, len(spans), per_batch):
                group = spans[i : i + per_batch]
                x = torch.stack([ids[begin:end] for begin, _, end in group]).to(device)  # (B, T)
                h = model.hidden(x)  # (B, T, d)
                # The hidden state at position p predicts the id at p + 1.
                rows = torch.cat([h[j, s - 1 - b : e - 1 - b] for j, (b, s, e) in enumerate(group)])  # (N, d)
                targets = torch.cat([ids[s:e] for _, s, e in group]).to(device)  # (N,)
                for r in range(0, len(targets), _LOGIT_ROWS):  # never all N x vocab logits at once
                    logits = model.head(rows[r : r + _LOGIT_ROWS]).float()  # (n, vocab), soft-capped if the model is
                    nll = F.cross_entropy(logits, targets[r : r + _LOGIT_ROWS], reduction="sum")
                    total += nll.double().cpu()
    finally:
        model.train(training)
    return float(total)
