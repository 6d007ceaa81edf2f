"""Tokenizers: byte-level BPE or char-level, trained on your corpus with HF tokenizers.

Both kinds encode any UTF-8 text and decode it back unchanged: byte-level BPE
works on bytes, and the char-level vocabulary falls back to byte tokens for
characters it never saw.

>>> tok = Tokenizer.train(["hello world"], kind="char")
>>> tok.decode(tok.encode("hello, wörld!"))
'hello, wörld!'
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from forge.errors import ConfigError, DataError
from forge.prompt_memory import MIN_CHARS, PromptMemory, reusable

__all__ = ["EOS", "Tokenizer", "TokenizerKind"]

EOS = "<|endoftext|>"
TokenizerKind = Literal["bpe", "char"]


class Tokenizer:
    """A thin, typed wrapper over a ``tokenizers.Tokenizer``, with the model's special tokens.

    ``eos`` separates documents in training and ends a generation; ``stop``
    lists more tokens that end one (a chat model's end-of-turn, such as
    ``<|im_end|>``). ``add_bos``: prompts start with ``bos`` (Llama 2 does).
    ``chat_template`` is the model's Jinja chat template, if it has one.
    """

    def __init__(
        self,
        hf: HFTokenizer,
        *,
        eos: str | None = EOS,
        bos: str | None = None,
        stop: Sequence[str] = (),
        add_bos: bool = False,
        chat_template: str | None = None,
    ) -> None:
        self.hf = hf
        self.eos, self.bos = eos, bos
        self.eos_id: int | None = hf.token_to_id(eos) if eos else None
        self.bos_id: int | None = hf.token_to_id(bos) if bos else None
        self.stop = tuple(t for t in stop if hf.token_to_id(t) is not None)
        #: Every token id that ends a generation: eos and the stop tokens.
        self.stop_ids = frozenset(i for i in (self.eos_id, *(hf.token_to_id(t) for t in self.stop)) if i is not None)
        self.add_bos = add_bos and self.bos_id is not None
        self.chat_template = chat_template
        self._id_bytes = _byte_table(hf)

    # -- construction ---------------------------------------------------------
    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        *,
        kind: TokenizerKind = "bpe",
        vocab_size: int = 2048,
        special_tokens: Sequence[str] = (EOS,),
    ) -> Tokenizer:
        """Train on an iterable of texts (documents or chunks; streamed, not held in memory)."""
        if kind == "char":
            return cls(_train_char(texts, special_tokens), eos=special_tokens[0] if special_tokens else EOS)
        if kind != "bpe":
            raise ConfigError(f"tokenizer kind {kind!r} is unknown: use 'bpe' or 'char'")
        minimum = 256 + len(special_tokens)
        if vocab_size < minimum:
            raise ConfigError(
                f"vocab_size = {vocab_size} is too small for byte-level BPE: it needs at least {minimum} "
                "(256 bytes + special tokens); raise it or use the char tokenizer"
            )
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            special_tokens=list(special_tokens),
            # Every byte is in the alphabet, so any UTF-8 text encodes.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf, eos=special_tokens[0] if special_tokens else EOS)

    @classmethod
    def from_str(cls, data: str, config: dict[str, Any] | None = None) -> Tokenizer:
        """From ``tokenizer.json`` text, and the special tokens of :meth:`config` (Forge's defaults if None)."""
        try:
            hf = HFTokenizer.from_str(data)
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise DataError(f"tokenizer JSON could not be parsed ({e}); re-save the tokenizer") from None
        if config is None:
            return cls(hf)
        known = {"eos", "bos", "stop", "add_bos", "chat_template"}
        return cls(hf, **{k: v for k, v in config.items() if k in known})

    def config(self) -> dict[str, Any]:
        """The special tokens and chat template, as saved beside ``tokenizer.json``."""
        return {
            "eos": self.eos,
            "bos": self.bos,
            "stop": list(self.stop),
            "add_bos": self.add_bos,
            "chat_template": self.chat_template,
        }

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a ``tokenizer.json`` file."""
        p = Path(path)
        if not p.is_file():
            raise DataError(f"tokenizer file {str(p)!r} does not exist; pass a tokenizer.json saved by Forge or HF")
        return cls.from_str(p.read_text(encoding="utf-8"))

    # -- persistence ----------------------------------------------------------
    def to_str(self) -> str:
        return self.hf.to_str()

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``tokenizer.json`` atomically (temp file, then rename)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
        tmp.write_text(self.to_str(), encoding="utf-8")
        os.replace(tmp, p)

    # -- use --------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def encode_prompt(self, text: str, *, remember: bool = True) -> list[int]:
        """Like :meth:`encode`, with ``bos`` first when the model wants it (and the text has none)."""
        return self.encode_prompts([text], remember=remember)[0]

    def encode_prompts(self, texts: Sequence[str], *, remember: bool = True) -> list[list[int]]:
        """Like :meth:`encode_batch`, with ``bos`` first when the model wants it.

        A long prompt that shares a prefix with a recent one is tokenized only past the shared part
        (``forge.prompt_memory``: exact, for byte-level BPE tokenizers): agents, RAG and chat repeat a long
        system prompt with every request. ``remember=False`` tokenizes every text whole (a server without prefix
        caching).
        """
        memory = self.prompt_memory() if remember and any(len(t) >= MIN_CHARS for t in texts) else None
        batch = self.encode_batch(texts) if memory is None else [memory.encode(t) for t in texts]
        if self.add_bos and self.bos_id is not None:
            batch = [ids if ids[:1] == [self.bos_id] else [self.bos_id, *ids] for ids in batch]
        return batch

    def prompt_memory(self) -> PromptMemory | None:
        """The memory of recent long prompts' ids; None where this tokenizer's pipeline doesn't allow reuse."""
        return self._prompt_memory

    @functools.cached_property
    def _prompt_memory(self) -> PromptMemory | None:  # made on the first long prompt: reading the JSON costs ms
        return PromptMemory(self.hf) if reusable(json.loads(self.hf.to_str())) else None

    def token(self, i: int) -> str | None:
        """The token string of id ``i``."""
        return self.hf.id_to_token(i)

    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids, special tokens included, so decode(encode(s)) == s.

        Decoding a prefix of ids gives a prefix of the text (up to a trailing
        incomplete character), which streaming relies on.
        """
        if self._id_bytes is not None:
            # HF's ByteFallback decoder turns a whole run of byte tokens into U+FFFD
            # when one byte is invalid, changing text already streamed; Python's
            # UTF-8 decoder replaces only the invalid bytes.
            table, n = self._id_bytes, len(self._id_bytes)
            return b"".join(table[i] for i in ids if 0 <= i < n).decode("utf-8", errors="replace")
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, model={type(self.hf.model).__name__}, eos={self.eos!r})"


def _train_char(texts: Iterable[str], special_tokens: Sequence[str]) -> HFTokenizer:
    """Characters seen in the corpus, plus 256 byte tokens for everything else.

    A BPE model with no merges is exactly a char-level tokenizer; HF's
    ``byte_fallback`` maps unseen characters to their UTF-8 bytes.
    """
    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    vocab: dict[str, int] = {}
    for token in [*special_tokens, *(f"<0x{b:02X}>" for b in range(256)), *sorted(chars)]:
        vocab.setdefault(token, len(vocab))
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    hf.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    hf.add_special_tokens(list(special_tokens))
    return hf


def _byte_table(hf: HFTokenizer) -> list[bytes] | None:
    """For Forge's char tokenizer: each id's bytes (``<0xAB>`` is one byte); else None.

    Only a byte-fallback BPE whose decoder is just ByteFallback + Fuse decodes
    token by token this way; SentencePiece-style vocabularies (Llama 2,
    Mistral) also replace "▁" with spaces, so they keep HF's own decoder.
    """
    model = hf.model
    if not (isinstance(model, models.BPE) and model.byte_fallback):
        return None
    decoder = json.loads(hf.to_str()).get("decoder") or {}
    steps = [d.get("type") for d in decoder.get("decoders", [])] if decoder.get("type") == "Sequence" else []
    if steps != ["ByteFallback", "Fuse"]:
        return None
    vocab = hf.get_vocab(with_added_tokens=True)
    table = [b""] * (max(vocab.values()) + 1)
    for token, i in vocab.items():
        is_byte = len(token) == 6 and token.startswith("<0x") and token.endswith(">")
        table[i] = bytes([int(token[3:5], 16)]) if is_byte else token.encode("utf-8")
    return table
