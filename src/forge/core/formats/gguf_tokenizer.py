"""GGUF tokenizers: ``tokenizer.ggml.*`` metadata to a ``tokenizers.Tokenizer`` and :class:`SpecialTokens`, and back.

``tokenizer.ggml.model`` "gpt2" is byte-level BPE (tokens + merges, text split by the
regex that ``tokenizer.ggml.pre`` names); "llama" is SentencePiece (tokens + scores), rebuilt as a
byte-fallback BPE whose merges rank by score. Both split text as llama.cpp does, which differs from
transformers' GGUF loader in two corners: "smollm" files cut digits apart first (as SmolLM's own
tokenizer does), and SentencePiece text gets its "▁" prefix after every special token. Control and
user-defined tokens become added tokens, so "<|im_start|>" in a prompt encodes to its id. Writing
supports byte-level BPE tokenizers only.

>>> hf, special = read_tokenizer(meta, Path("model.gguf"))  # doctest: +SKIP
>>> write_tokenizer(writer, hf, special, chat_template, n_vocab=49152)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from forge.core.formats import SpecialTokens
from forge.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from gguf import GGUFWriter

__all__ = ["read_tokenizer", "write_tokenizer"]

log = logging.getLogger("forge")

# gguf.TokenType values.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED = 1, 2, 3, 4, 5
#: The longest SentencePiece piece Forge derives merges for; real vocabularies stay under about 100.
_MAX_PIECE = 512
#: Tokens that end a turn or a text when the vocabulary has them; llama.cpp stops on the same names.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")

# The text splits llama.cpp's llama-vocab.cpp uses for the ``tokenizer.ggml.pre`` names below, as HF regexes.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


def _gpt2_split() -> pre_tokenizers.PreTokenizer:
    # ByteLevel's own regex is GPT-2's.
    return pre_tokenizers.ByteLevel(add_prefix_space=False)


def _split_then_bytes(regex: str) -> Callable[[], pre_tokenizers.PreTokenizer]:
    return lambda: pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _smollm_split() -> pre_tokenizers.PreTokenizer:
    # SmolLM's tokenizer.json cuts every digit apart before GPT-2's regex; llama.cpp's "smollm" does too.
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )


#: ``tokenizer.ggml.pre`` -> the pre-tokenizer; the first name of each kind is the one written.
_PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "gpt-2": _gpt2_split,
    "smollm": _smollm_split,
    "llama-bpe": _split_then_bytes(_LLAMA3_SPLIT),
    "qwen2": _split_then_bytes(_QWEN2_SPLIT),
    # llama.cpp's own "default" splits punctuation apart too; files that say it are rare and were
    # converted from GPT-2-style tokenizers, which transformers reads the same way.
    "default": _gpt2_split,
    "llama3": _split_then_bytes(_LLAMA3_SPLIT),
    "llama-v3": _split_then_bytes(_LLAMA3_SPLIT),
    "deepseek-r1-qwen": _split_then_bytes(_QWEN2_SPLIT),
}
#: Llama 3's tokenizer takes a whole word that is in the vocabulary before trying merges.
_IGNORE_MERGES = ("llama-bpe", "llama3", "llama-v3")


class _Metadata(Protocol):
    """The GGUF metadata reader in forge.core.formats.gguf, as far as tokenizers need it."""

    def get(self, key: str, default: Any = None) -> Any: ...


# -- reading ------------------------------------------------------------------------------------------------------


def read_tokenizer(meta: _Metadata, path: Path, n_vocab: int | None = None) -> tuple[HFTokenizer, SpecialTokens]:
    """The tokenizer and special tokens of a GGUF file's ``tokenizer.ggml.*`` metadata; ``path`` names it in errors.

    ``n_vocab``: the model's embedding rows; a token past them would index outside the embedding.
    """
    kind, tokens = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        raise CheckpointError(
            f"GGUF file {str(path)!r} has no tokenizer (tokenizer.ggml.model/tokens), and Forge needs one to encode "
            "prompts; use a GGUF converted together with its tokenizer"
        )
    if n_vocab is not None and len(tokens) > n_vocab:
        raise CheckpointError(
            f"GGUF file {str(path)!r} has {len(tokens)} tokens but token_embd.weight has only {n_vocab} rows; "
            "the file is inconsistent, re-convert it"
        )
    types = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    merges = meta.get("tokenizer.ggml.merges")
    if len(types) != len(tokens):
        raise CheckpointError(
            f"GGUF file {str(path)!r} has {len(tokens)} tokens but {len(types)} token types; re-convert it"
        )
    try:
        hf = _tokenizer_of_kind(kind, meta, tokens, types, merges, path)
    except CheckpointError:
        raise
    except Exception as e:  # tokenizers raises bare Exceptions for merges naming unknown tokens
        raise CheckpointError(
            f"GGUF file {str(path)!r} has an invalid tokenizer ({str(e)[:120]}); re-convert it"
        ) from None
    # llama.cpp matches control and user-defined tokens whole before splitting text; added tokens do the same,
    # and keep the id the token already has in the vocabulary.
    hf.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, k in zip(tokens, types, strict=True)
            if t and k in (_CONTROL, _UNKNOWN)
        ]
    )
    hf.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, k in zip(tokens, types, strict=True)
            if t and k == _USER_DEFINED
        ]
    )
    return hf, _read_special_tokens(meta, tokens, kind)


def _tokenizer_of_kind(
    kind: str, meta: _Metadata, tokens: Sequence[str], types: Sequence[int], merges: Sequence[str] | None, path: Path
) -> HFTokenizer:
    """The tokenizer ``tokenizer.ggml.model`` names: "gpt2" (byte-level BPE) or "llama" (SentencePiece)."""
    if kind == "gpt2":
        return _byte_level_tokenizer(tokens, merges or [], str(meta.get("tokenizer.ggml.pre", "default")), path)
    if kind == "llama":
        unk = meta.get("tokenizer.ggml.unknown_token_id")
        return _sentencepiece_tokenizer(
            tokens,
            types,
            meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens),
            merges,
            add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
            unk=tokens[unk] if isinstance(unk, int) and 0 <= unk < len(tokens) else None,
        )
    raise CheckpointError(
        f"GGUF file {str(path)!r} has a {kind!r} tokenizer; Forge reads 'gpt2' (byte-level BPE) and 'llama' "
        "(SentencePiece) tokenizers: use a model with one of those"
    )


def _vocab(tokens: Sequence[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)  # a repeated token keeps its first id, as in llama.cpp
    return vocab


def _byte_level_tokenizer(tokens: Sequence[str], merges: Sequence[str], pre: str, path: Path) -> HFTokenizer:
    split = _PRE_TOKENIZERS.get(pre)
    if split is None:
        log.warning(
            "GGUF file %r names the pre-tokenizer %r, which Forge does not know; splitting text like GPT-2, "
            "so some texts may encode differently than in llama.cpp",
            str(path),
            pre,
        )
        split = _gpt2_split
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    model = models.BPE(vocab=_vocab(tokens), merges=pairs, ignore_merges=pre in _IGNORE_MERGES)  # type: ignore[arg-type]
    hf = HFTokenizer(model)
    hf.pre_tokenizer = split()
    hf.decoder = decoders.ByteLevel()
    return hf


def _sentencepiece_tokenizer(
    tokens: Sequence[str],
    types: Sequence[int],
    scores: Sequence[float],
    merges: Sequence[str] | None,
    *,
    add_space_prefix: bool,
    unk: str | None,
) -> HFTokenizer:
    pairs = [tuple(m.split(" ", 1)) for m in merges] if merges else _merges_from_scores(tokens, types, scores)
    model = models.BPE(vocab=_vocab(tokens), merges=pairs, unk_token=unk, fuse_unk=True, byte_fallback=True)  # type: ignore[arg-type]
    hf = HFTokenizer(model)
    # SentencePiece writes spaces as "▁". llama.cpp puts one before every stretch of text that starts the
    # prompt or follows a special token, even one starting with a space; a normalizer runs on exactly those
    # stretches. (transformers' Metaspace "first" skips text that starts with a space and text after specials.)
    replace = normalizers.Replace(" ", "▁")
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), replace]) if add_space_prefix else replace
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    hf.decoder = decoders.Sequence([*steps, decoders.Strip(" ", 1, 0)] if add_space_prefix else steps)
    return hf


def _merges_from_scores(tokens: Sequence[str], types: Sequence[int], scores: Sequence[float]) -> list[tuple[str, str]]:
    """BPE merges for a SentencePiece vocabulary, which ranks pieces by score instead of listing merges.

    SentencePiece joins the adjacent pair whose joined piece scores highest; HF's BPE joins the pair
    ranked first, so each split of a piece is ranked by the piece's score. Ties are broken as
    transformers' GGUF converter breaks them.
    """
    pieces = {t: i for i, (t, k) in enumerate(zip(tokens, types, strict=True)) if k in (_NORMAL, _USER_DEFINED)}
    ranked = []
    for token, index in pieces.items():
        if types[index] != _NORMAL:
            continue
        if len(token) > _MAX_PIECE:  # every split of a piece is tried: the work grows with its length squared
            raise CheckpointError(
                f"the SentencePiece token {index} is {len(token)} characters long, and Forge builds merges only for "
                f"pieces of at most {_MAX_PIECE}; the tokenizer is damaged, re-convert the file"
            )
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in pieces and right in pieces:
                ranked.append((-scores[index], -len(left), -len(right), index, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _read_special_tokens(meta: _Metadata, tokens: Sequence[str], kind: str) -> SpecialTokens:
    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    eos, present = token("eos_token_id"), set(tokens)
    stop: list[str] = []
    for t in (eos, token("eot_token_id"), token("eom_token_id"), *(t for t in _END_OF_TURN if t in present)):
        if t is not None and t not in stop:
            stop.append(t)
    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    return SpecialTokens(
        bos=token("bos_token_id"),
        eos=eos,
        pad=token("padding_token_id"),
        unk=token("unknown_token_id"),
        stop=stop,
        # Without the key llama.cpp adds BOS for SentencePiece vocabularies and not for byte-level ones.
        add_bos=kind == "llama" if add_bos is None else bool(add_bos),
    )


# -- writing ------------------------------------------------------------------------------------------------------


def _pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str | None:
    """The ``tokenizer.ggml.pre`` name whose split equals this tokenizer's pre-tokenizer, if any."""
    for name, build in _PRE_TOKENIZERS.items():
        probe = HFTokenizer(models.BPE())
        probe.pre_tokenizer = build()
        if json.loads(probe.to_str())["pre_tokenizer"] == tokenizer_json.get("pre_tokenizer"):
            return name
    return None


def _token_list(tokenizer: HFTokenizer, data: dict[str, Any], n_vocab: int) -> tuple[list[str], list[int]]:
    """Every token in id order with its gguf.TokenType, padded with unused tokens to ``n_vocab``."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    n = len(vocab)
    if sorted(vocab.values()) != list(range(n)):
        raise CheckpointError(
            "GGUF export needs token ids 0..n-1 without gaps, and this tokenizer skips some; rebuild it with "
            "contiguous ids (Tokenizer.train makes them so)"
        )
    if n > n_vocab:
        raise ConfigError(
            f"write_gguf: the tokenizer has {n} tokens but config.vocab_size is {n_vocab}; the model must have an "
            "embedding row for every token"
        )
    tokens = [""] * n
    for token, i in vocab.items():
        tokens[i] = token
    added = {a["id"]: a["special"] for a in data.get("added_tokens", [])}
    types = [(_CONTROL if added[i] else _USER_DEFINED) if i in added else _NORMAL for i in range(n)]
    types = [
        _UNUSED if t.startswith("[PAD") and t.endswith("]") and k == _NORMAL else k
        for t, k in zip(tokens, types, strict=True)
    ]
    # Forge pads the embedding past the tokenizer (to a multiple of 64); llama.cpp wants a token per row.
    tokens += [f"[PAD{i}]" for i in range(n, n_vocab)]
    types += [_UNUSED] * (n_vocab - n)
    return tokens, types


def write_tokenizer(
    writer: GGUFWriter, tokenizer: HFTokenizer, special: SpecialTokens, chat_template: str | None, n_vocab: int
) -> None:
    """Add a byte-level BPE tokenizer, its special tokens and chat template to a GGUF file, padded to ``n_vocab``."""
    data = json.loads(tokenizer.to_str())
    model = data.get("model") or {}
    pre = _pre_tokenizer_name(data)
    if model.get("type") != "BPE" or model.get("byte_fallback") or data.get("normalizer") or pre is None:
        raise CheckpointError(
            "GGUF export needs a byte-level BPE tokenizer that splits text like GPT-2, SmolLM, Llama 3 or Qwen2 "
            f"(Forge's Tokenizer.train(kind='bpe')), and this one is a {model.get('type')} model with pre-tokenizer "
            f"{(data.get('pre_tokenizer') or {}).get('type')}; retrain the tokenizer with kind='bpe'"
        )
    tokens, types = _token_list(tokenizer, data, n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    setters = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "pad": writer.add_pad_token_id}
    setters["unk"] = writer.add_unk_token_id
    for role, setter in setters.items():
        token = getattr(special, role)
        if token is None:
            continue
        if (i := tokenizer.token_to_id(token)) is None:
            raise ConfigError(f"write_gguf: special.{role} = {token!r} is not in the tokenizer's vocabulary")
        setter(i)
    # llama.cpp stops on eos and on one end-of-turn token; it finds the usual ones by name too.
    eot = [i for t in special.stop if t != special.eos and (i := tokenizer.token_to_id(t)) is not None]
    if eot:
        writer.add_eot_token_id(eot[0])
    writer.add_add_bos_token(special.add_bos)
    if chat_template:
        writer.add_chat_template(chat_template)
