"""Training data: from text to a memory-mapped token file, cached by content hash.

Sources are a text file, a folder of ``.txt``/``.md``/``.jsonl`` files, or a
list of strings. Each document is read, checked to be UTF-8 text, and tokenized in
chunks into a flat ``uint16``/``uint32`` file under the cache directory, named
by the hash of the corpus and the tokenizer. Later runs map that file instead
of tokenizing again, and the corpus never has to fit in memory.

For a chat model (a tokenizer with a chat template) each document is cut into
turn-sized pieces of whole paragraphs, each ended by the token the template ends
a turn with, so fine-tuning on plain text keeps the model ending its replies.
A ``.jsonl`` file holds conversations, one per line (``{"messages": [{"role":
"user", "content": ...}, ...]}``, as OpenAI's fine-tuning files): each is rendered
with the model's own chat template, so the model learns its turns as it will
see them in ``forge chat``, then ended by the end-of-turn token.
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import json
import os
import sys
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from forge.chat import check_messages, render_chat
from forge.errors import ConfigError, DataError
from forge.tokenizer import Tokenizer

__all__ = ["Corpus", "TokenDataset", "cache_dir", "end_of_turn", "stdlib_corpus"]

TEXT_SUFFIXES = (".txt", ".md", ".jsonl")
CHAT_SUFFIX = ".jsonl"
CHAT_LINE = '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'
_CHUNK = 1 << 20  # characters per tokenizer call
#: A chat model's plain-text data is cut into pieces of whole paragraphs of at least this many characters,
#: each ended by the end-of-turn token: about one every 150-200 tokens, a short chat reply. Without it a
#: fine-tune sees no end token at all (one file is one document) and unlearns ending its replies.
TURN_CHARS = 400
DataSource = str | os.PathLike[str] | Sequence[str]


def cache_dir() -> Path:
    """``$FORGE_CACHE_DIR``, else ``$XDG_CACHE_HOME/forge``, else ``~/.cache/forge``."""
    if env := os.environ.get("FORGE_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "forge"


@dataclass(frozen=True)
class Corpus:
    """A validated set of documents: file paths or in-memory strings.

    >>> Corpus.from_source(["to be or not to be"]).num_documents
    1
    """

    files: tuple[Path, ...] = ()
    texts: tuple[str, ...] = ()
    label: str = "<list of strings>"
    _fingerprint: list[str] = field(default_factory=list, compare=False, repr=False)  # memo

    @classmethod
    def from_source(cls, source: DataSource) -> Corpus:
        if isinstance(source, (str, os.PathLike)):
            return cls._from_path(Path(source))
        texts = tuple(source)
        if not all(isinstance(t, str) for t in texts):
            raise DataError("training data as a list must hold strings only; got a non-str item")
        if not any(t.strip() for t in texts):
            raise DataError("training data is empty: the list of strings holds no text; pass at least one document")
        return cls(texts=texts)

    @classmethod
    def _from_path(cls, path: Path) -> Corpus:
        if not path.exists():
            raise DataError(f"data path {str(path)!r} does not exist; pass a text file or a folder of .txt/.md files")
        if path.is_dir():
            files = tuple(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES))
            if not files:
                raise DataError(
                    f"data folder {str(path)!r} holds no .txt, .md or .jsonl files; add some or pass a file"
                )
        else:
            files = (path,)
        corpus = cls(files=files, label=str(path))
        corpus._check()
        return corpus

    @property
    def num_documents(self) -> int:
        return len(self.files) or len(self.texts)

    def _check(self) -> None:
        """Every file is readable UTF-8 text, and at least one is non-empty."""
        any_text = False
        for f in self.files:
            if f.suffix.lower() == CHAT_SUFFIX:
                for _ in conversations(f):  # every line parsed and checked before any training starts
                    any_text = True
                continue
            for chunk in _read_file(f):
                any_text = any_text or bool(chunk.strip())
        if not any_text:
            what = "file" if len(self.files) == 1 else "files in"
            raise DataError(f"training data is empty: the {what} {self.label!r} hold(s) no text; add text to train on")

    def documents(self) -> Iterator[Iterator[str]]:
        """Each document as an iterator of text chunks."""
        if self.files:
            for f in self.files:  # a conversation file as its plain rendering: what a new tokenizer learns from
                yield (_plain(c) for c in conversations(f)) if f.suffix.lower() == CHAT_SUFFIX else _read_file(f)
        else:
            for t in self.texts:
                yield iter([t[i : i + _CHUNK] for i in range(0, len(t), _CHUNK)])

    def chunks(self) -> Iterator[str]:
        for doc in self.documents():
            yield from doc

    def fingerprint(self) -> str:
        """sha256 over every document's bytes, with separators (computed once)."""
        if not self._fingerprint:
            h = hashlib.sha256()
            for doc in self.documents():
                for chunk in doc:
                    h.update(chunk.encode("utf-8"))
                h.update(b"\x00<doc>\x00")
            self._fingerprint.append(h.hexdigest())
        return self._fingerprint[0]


def _read_file(path: Path) -> Iterator[str]:
    """Chunks of a UTF-8 file, at line ends; raises DataError on binary content."""
    try:
        f = path.open("r", encoding="utf-8", newline="")
    except OSError as e:
        raise DataError(f"data file {str(path)!r} cannot be read ({e.strerror}); check its permissions") from None
    with f:
        while True:
            try:
                chunk = f.read(_CHUNK)
                if chunk and not chunk.endswith("\n"):
                    chunk += f.readline()
            except UnicodeDecodeError:
                raise DataError(
                    f"data file {str(path)!r} is not UTF-8 text (it looks binary); pass a plain text file"
                ) from None
            if not chunk:
                return
            if "\x00" in chunk:
                raise DataError(f"data file {str(path)!r} holds NUL bytes (it looks binary); pass a plain text file")
            yield chunk


def conversations(path: Path) -> Iterator[list[dict[str, str]]]:
    """The conversations of a ``.jsonl`` file, one per non-blank line, each checked as chat messages."""
    for number, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        where = f"data file {str(path)!r} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where} is not JSON ({e.msg}); each line must be {CHAT_LINE}") from None
        messages = row.get("messages") if isinstance(row, dict) else row
        if not isinstance(messages, list) or not messages:
            raise DataError(f'{where} has no "messages" list; each line must be {CHAT_LINE}')
        try:
            checked = check_messages(messages)
        except ConfigError as e:
            raise DataError(f"{where}: {e.message}") from None
        yield [{"role": m["role"], "content": str(m.get("content") or "")} for m in checked]


def _lines(path: Path) -> Iterator[str]:
    for chunk in _read_file(path):
        yield from chunk.splitlines()


def _plain(conversation: list[dict[str, str]]) -> str:
    return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in conversation)


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


class TokenDataset:
    """A corpus tokenized into a memory-mapped file, split into train and validation.

    The last ``val_fraction`` of the tokens is the validation split.
    """

    def __init__(self, path: Path, dtype: np.dtype, *, val_fraction: float = 0.1) -> None:
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError.for_field("TokenDataset", "val_fraction", val_fraction, "must be in (0, 1)")
        self.path = path
        self.tokens = np.memmap(path, dtype=dtype, mode="r")
        n = len(self.tokens)
        self.split_at = n - max(1, int(n * val_fraction))

    @classmethod
    def build(
        cls,
        corpus: Corpus,
        tokenizer: Tokenizer,
        *,
        val_fraction: float = 0.1,
        directory: Path | None = None,
    ) -> TokenDataset:
        """Tokenize ``corpus`` once into ``directory`` (the cache by default), or reuse the cached file."""
        directory = directory or cache_dir() / "tokens"
        directory.mkdir(parents=True, exist_ok=True)
        tok_hash = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()
        end = end_of_turn(tokenizer)
        # The layout is part of the key: a file cut into turns is not the same tokens as one without.
        layout = f":turns-{end}-{TURN_CHARS}" if end is not None else ""
        key = hashlib.sha256(f"{corpus.fingerprint()}:{tok_hash}{layout}".encode()).hexdigest()[:32]
        dtype = _token_dtype(tokenizer.vocab_size)
        path = directory / f"{key}.{dtype.name}"
        if not path.exists():
            _write_tokens(corpus, tokenizer, path, dtype)
        return cls(path, dtype, val_fraction=val_fraction)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def split_size(self, split: Literal["train", "val"]) -> int:
        return self.split_at if split == "train" else self.num_tokens - self.split_at

    def check_context(self, context: int) -> None:
        """Both splits must hold at least one window of ``context + 1`` tokens."""
        need = context + 1
        for split in ("train", "val"):
            have = self.split_size(split)
            if have < need:
                raise DataError(
                    f"the corpus is too small: its {split} split has {have} tokens but one window of "
                    f"context={context} needs {need}; add more text or use a shorter context",
                    field="context",
                )

    def batch(
        self, split: Literal["train", "val"], batch_size: int, context: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: inputs x (B, T) and next-token targets y (B, T), int64."""
        lo, hi = (0, self.split_at) if split == "train" else (self.split_at, self.num_tokens)
        starts = torch.randint(lo, hi - context, (batch_size,), generator=generator).tolist()
        rows = np.stack([self.tokens[s : s + context + 1] for s in starts]).astype(np.int64)
        data = torch.from_numpy(rows)  # (B, T+1)
        return data[:, :-1], data[:, 1:]

    def shard_batch(
        self,
        split: Literal["train", "val"],
        batch_size: int,
        context: int,
        *,
        seed: int,
        index: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank ``rank``'s ``batch_size`` windows of the global batch number ``index``, x and y (B, T).

        The global batch (``batch_size * world_size`` windows) is drawn from ``seed`` and ``index`` alone,
        with no generator state carried between batches: a resumed run draws the very same windows, and
        2 ranks of B/2 cover exactly what 1 rank of B does.

        >>> ds = TokenDataset.build(Corpus.from_source(["abcdefgh" * 40]), Tokenizer.train(["abcdefgh"], kind="char"))
        >>> a, _ = ds.shard_batch("train", 2, 8, seed=0, index=5, rank=1, world_size=2)
        >>> b, _ = ds.shard_batch("train", 4, 8, seed=0, index=5)
        >>> bool((a == b[2:]).all())
        True
        """
        lo, hi = (0, self.split_at) if split == "train" else (self.split_at, self.num_tokens)
        # Seed and index mixed into one 63-bit seed: nearby seeds and indices give unrelated streams.
        key = hashlib.sha256(f"{seed}:{index}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)
        starts = torch.randint(lo, hi - context, (batch_size * world_size,), generator=generator)
        mine = starts[rank * batch_size : (rank + 1) * batch_size].tolist()
        rows = np.stack([self.tokens[s : s + context + 1] for s in mine]).astype(np.int64)
        data = torch.from_numpy(rows)  # (B, T+1)
        return data[:, :-1], data[:, 1:]


def end_of_turn(tokenizer: Tokenizer) -> str | None:
    """The token a chat model ends its turn with: the first stop token its chat template writes, else eos.

    None for a tokenizer without a chat template (a plain language model).

    >>> end_of_turn(Tokenizer.train(["ab"], kind="char")) is None
    True
    """
    template = tokenizer.chat_template
    if not template:
        return None
    candidates = [t for t in dict.fromkeys((tokenizer.eos, *tokenizer.stop)) if t is not None]
    return next((t for t in candidates if t in template), tokenizer.eos)


def _turns(doc: Iterable[str], size: int = TURN_CHARS) -> Iterator[str]:
    """A document as pieces of whole paragraphs (blank-line separated) of at least ``size`` characters.

    A paragraph with no blank line in ``4 * size`` characters is cut at a line end before that.
    """
    lines: list[str] = []
    n = 0
    for chunk in doc:
        for line in chunk.splitlines(keepends=True):
            if lines and ((n >= size and not line.strip()) or n + len(line) > 4 * size):
                if piece := "".join(lines).strip():
                    yield piece
                lines, n = [], 0
            lines.append(line)
            n += len(line)
    if piece := "".join(lines).strip():
        yield piece


def _write_tokens(corpus: Corpus, tokenizer: Tokenizer, path: Path, dtype: np.dtype) -> None:
    """Tokenize document by document, chunk by chunk; EOS between documents. Atomic.

    With a chat template, documents are cut into turns instead, each followed by the end-of-turn token.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    eos = tokenizer.eos_id
    end = end_of_turn(tokenizer)
    end_id = tokenizer.hf.token_to_id(end) if end is not None else None
    try:
        with tmp.open("wb") as out:
            for i, doc in enumerate(corpus.documents()):
                source = corpus.files[i] if corpus.files else None
                if source is not None and source.suffix.lower() == CHAT_SUFFIX:
                    for ids in _conversation_tokens(source, tokenizer, end_id if end_id is not None else eos):
                        out.write(np.asarray(ids, dtype=dtype).tobytes())
                    continue
                if end_id is not None:
                    turns = _turns(doc)
                    while batch := list(itertools.islice(turns, 256)):  # a few hundred per tokenizer call
                        ids = [t for row in tokenizer.encode_batch(batch) for t in (*row, end_id)]
                        out.write(np.asarray(ids, dtype=dtype).tobytes())
                    continue
                if i and eos is not None:
                    out.write(np.asarray([eos], dtype=dtype).tobytes())
                for chunk in doc:
                    out.write(np.asarray(tokenizer.encode(chunk), dtype=dtype).tobytes())
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full disk: one line, not a traceback (the finally removes the partial file)
        raise DataError(
            f"could not write the token cache {str(path)!r}: {e.strerror or e}; free some disk space, "
            "or point FORGE_CACHE_DIR at another disk"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def _conversation_tokens(path: Path, tokenizer: Tokenizer, end_id: int | None) -> Iterator[list[int]]:
    """Each conversation of ``path`` as the model's chat template writes it, then ``end_id`` unless the
    template already ended the last turn with it (a template-less model gets Forge's plain template)."""
    special = {"bos_token": tokenizer.bos, "eos_token": tokenizer.eos}
    rows = conversations(path)
    while batch := list(itertools.islice(rows, 256)):
        texts = [
            render_chat(tokenizer.chat_template, c, add_generation_prompt=False, special_tokens=special).rstrip()
            for c in batch
        ]
        for row in tokenizer.encode_batch(texts):
            yield [*row, end_id] if end_id is not None and (not row or row[-1] != end_id) else row


_SKIP = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo", "__pycache__"}
_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def stdlib_corpus(directory: Path | None = None, *, min_chars: int = 40) -> Path:
    """A corpus every machine has: the Python standard library's docstrings, as one text file.

    Written once per Python into ``directory`` (default: the cache); returns its path.
    It is English prose about code, about 1.6 MB, with no download and no copy
    of anyone's text inside Forge. ``forge demo`` and the examples train on it.
    """
    directory = directory or cache_dir() / "corpora"
    root = Path(sysconfig.get_paths()["stdlib"])
    tag = hashlib.sha256(f"{root}:{sys.version}".encode()).hexdigest()[:12]
    path = directory / f"stdlib-docstrings-{tag}.txt"
    if path.exists():
        return path
    docs: list[str] = []
    for file in sorted(root.rglob("*.py")):
        if _SKIP.intersection(file.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(file.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, _NODES) and (doc := ast.get_docstring(node)) and len(doc) >= min_chars:
                docs.append(doc)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
