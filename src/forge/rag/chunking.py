"""Token-budgeted chunks of a document that break at paragraphs, sentences and lines, never mid-word.

The text is cut into units from coarse to fine, going finer only where a unit
is over the budget:

1. paragraphs (separated by blank lines), kept whole when they fit;
2. sentences and lines: a sentence ends at ``.``, ``!`` or ``?`` before a capital,
   and a single newline inside a paragraph is a break too (verse is written in lines);
3. words, only for a sentence longer than the whole budget.

Units are packed greedily up to ``max_tokens``. Each chunk after the first starts
with the trailing sentences or lines of the one before, about ``overlap`` tokens,
so a passage cut at a boundary is still found whole in one of the two.

The token counter may be slow (a real tokenizer), so each distinct unit and each
distinct gap between units is counted once and sums stand in for counts. Each
chunk is then counted once to make sure: a tokenizer whose count of joined text
exceeds the sum of its parts still gets chunks within the budget.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass

from forge.errors import ConfigError

__all__ = ["Chunk", "chunk_text", "content_hash"]

_MIN_TOKENS = 8
_PARAGRAPH_BREAK = re.compile(r"\n[^\S\n]*\n\s*")  # a blank line, maybe with spaces, and what follows
# Candidate breaks inside a paragraph: any whitespace holding a newline, or whitespace after
# sentence punctuation (and closing quotes or brackets); _is_sentence_end checks the latter.
_BREAK = re.compile(r"\s*\n\s*|(?:(?<=[.!?])|(?<=[.!?][\"'”’)\]]))\s+")
_OPENERS = "\"'“‘([¿¡"
_ABBREVIATIONS = frozenset(
    {"mr.", "mrs.", "ms.", "dr.", "st.", "jr.", "sr.", "prof.", "mt.", "vs.", "etc.", "e.g.", "i.e."}
)
_WORD = re.compile(r"\S+")


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of a document and where it sits: ``document[start:end] == text``.

    >>> doc = "To be, or not to be."
    >>> chunk = chunk_text(doc, lambda s: len(s.split()))[0]
    >>> doc[chunk.start : chunk.end] == chunk.text
    True
    """

    text: str
    start: int
    end: int


def content_hash(text: str) -> str:
    """SHA-256 hex digest of ``text`` with runs of whitespace made single spaces and the ends stripped.

    Texts that differ only in layout (line wrapping, indentation) hash the same, to find duplicates.

    >>> content_hash("To be,\\n  or not") == content_hash("To be, or not ")
    True
    """
    return hashlib.sha256(" ".join(text.split()).encode("utf-8")).hexdigest()


def chunk_text(
    text: str, count_tokens: Callable[[str], int], *, max_tokens: int = 200, overlap: int = 40
) -> list[Chunk]:
    """Split ``text`` into chunks of at most ``max_tokens`` tokens that break at paragraphs, sentences or lines.

    Chunks are stripped of surrounding whitespace, in order, and together cover
    every non-whitespace character of ``text``. A chunk is over the budget only
    when it is a single word longer than the budget. Consecutive chunks share
    about ``overlap`` tokens of whole sentences or lines (at most half the
    budget; less where a whole paragraph needs the room, none where the last
    sentence is longer than both twice ``overlap`` and half the budget).

    ``count_tokens`` should count without special tokens; a constant overhead,
    such as BOS and EOS, is measured as ``count_tokens("")`` and allowed for once.

    >>> words = lambda s: len(s.split())
    >>> verse = "To be, or not to be, that is the question:\\nWhether 'tis nobler in the mind to suffer"
    >>> [c.text for c in chunk_text(verse, words, max_tokens=10, overlap=0)]
    ['To be, or not to be, that is the question:', "Whether 'tis nobler in the mind to suffer"]
    """
    if max_tokens < _MIN_TOKENS:
        raise ConfigError(
            f"chunk_text(max_tokens={max_tokens!r}) is too small to hold a sentence; "
            f"use at least {_MIN_TOKENS} (typical: 100 to 500)"
        )
    if not 0 <= overlap < max_tokens:
        raise ConfigError(
            f"chunk_text(overlap={overlap!r}) must be at least 0 and less than max_tokens={max_tokens}; "
            f"use e.g. overlap={max_tokens // 5} (0 for none)"
        )
    counter = _Counter(count_tokens)
    if counter.base >= max_tokens // 2:
        raise ConfigError(
            f"count_tokens('') is {counter.base}: the counter's own overhead leaves little room in "
            f"max_tokens={max_tokens}; count without special tokens or raise max_tokens"
        )
    units = _units(text, counter, max_tokens)
    if units is None:
        return []
    return _Packer(text, units, counter, max_tokens, overlap).chunks()


class _Counter:
    """Counts each distinct string once (units, gaps, chunks), net of the counter's constant overhead."""

    def __init__(self, count_tokens: Callable[[str], int]) -> None:
        self._count = count_tokens
        self._cache: dict[str, int] = {}
        self.base = max(0, count_tokens(""))

    def __call__(self, s: str) -> int:
        """Tokens ``s`` adds to a chunk: its count less the overhead every count carries."""
        if (n := self._cache.get(s)) is None:
            n = self._cache[s] = max(0, self._count(s) - self.base)
        return n


@dataclass(slots=True)
class _Units:
    """Stripped spans of the text, in order, with their token counts and where a chunk may end."""

    starts: list[int]
    ends: list[int]
    tokens: list[int]
    may_end: list[bool]  # False inside a paragraph kept whole

    def __len__(self) -> int:
        return len(self.starts)


def _units(text: str, count: _Counter, max_tokens: int) -> _Units | None:
    units = _Units([], [], [], [])
    budget = max_tokens - count.base
    for p_start, p_end in _paragraphs(text):
        first = len(units)
        for s_start, s_end in _sentences(text, p_start, p_end):
            if count(text[s_start:s_end]) <= budget:
                _add(units, text, s_start, s_end, count)
                continue
            for word in _WORD.finditer(text, s_start, s_end):  # a sentence over the budget on its own
                _add(units, text, word.start(), word.end(), count)
        last = len(units) - 1
        if _cost(units, text, count, first, last) <= budget:
            for i in range(first, last):
                units.may_end[i] = False  # the paragraph fits: only break after it
    return units if len(units) else None


def _add(units: _Units, text: str, start: int, end: int, count: _Counter) -> None:
    units.starts.append(start)
    units.ends.append(end)
    units.tokens.append(count(text[start:end]))
    units.may_end.append(True)


def _cost(units: _Units, text: str, count: _Counter, first: int, last: int) -> int:
    gaps = sum(count(text[units.ends[i] : units.starts[i + 1]]) for i in range(first, last))
    return sum(units.tokens[first : last + 1]) + gaps


def _paragraphs(text: str) -> list[tuple[int, int]]:
    spans, start = [], 0
    for m in [*_PARAGRAPH_BREAK.finditer(text), None]:
        end = m.start() if m else len(text)
        spans.append((start, end))
        start = m.end() if m else len(text)
    return [s for s in (_strip(text, a, b) for a, b in spans) if s]


def _sentences(text: str, start: int, end: int) -> list[tuple[int, int]]:
    spans, at = [], start
    for m in _BREAK.finditer(text, start, end):
        if "\n" in m.group() or _is_sentence_end(text, at, m.start(), m.end(), end):
            spans.append((at, m.start()))
            at = m.end()
    spans.append((at, end))
    return [s for s in (_strip(text, a, b) for a, b in spans) if s]


def _is_sentence_end(text: str, start: int, stop: int, after: int, end: int) -> bool:
    """Whether the whitespace ``text[stop:after]`` ends a sentence: a capital follows and no abbreviation precedes."""
    i = after
    while i < end and text[i] in _OPENERS:
        i += 1
    if i >= end or not text[i].isupper():
        return False
    word = text[max(start, text.rfind(" ", start, stop) + 1) : stop].lower()
    initial = len(word) == 2 and word[0].isalpha()  # "J. Smith"
    return word not in _ABBREVIATIONS and not initial


def _strip(text: str, start: int, end: int) -> tuple[int, int] | None:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end) if start < end else None


class _Packer:
    """Greedy packing of units into chunks, with overlap; see chunk_text."""

    def __init__(self, text: str, units: _Units, count: _Counter, max_tokens: int, overlap: int) -> None:
        self.text, self.units, self.count, self.max_tokens = text, units, count, max_tokens
        self.overlap = min(overlap, max_tokens // 2)
        n = len(units)
        # cum[i]: tokens of units[:i] and the gaps after each; gaps are mostly " ", "\n", "\n\n".
        self.gap = [count(text[units.ends[i] : units.starts[i + 1]]) for i in range(n - 1)] + [0]
        self.cum = [0] * (n + 1)
        for i in range(n):
            self.cum[i + 1] = self.cum[i] + units.tokens[i] + self.gap[i]
        # end_at[i]: the first unit at or after i that a chunk may end with.
        self.end_at = [n - 1] * n
        for i in range(n - 2, -1, -1):
            self.end_at[i] = i if units.may_end[i] else self.end_at[i + 1]

    def estimate(self, first: int, last: int) -> int:
        """Tokens of text[units first..last], from the per-unit counts."""
        return self.count.base + self.cum[last + 1] - self.cum[first] - self.gap[last]

    def chunks(self) -> list[Chunk]:
        units, n, out = self.units, len(self.units), []
        first = new = 0  # the chunk's first unit, and its first unit not in the previous chunk
        while new < n:
            last = self.end_at[new]
            while first < new and self.estimate(first, last) > self.max_tokens:
                first += 1  # the overlap gives way to the next paragraph
            while last + 1 < n and self.estimate(first, self.end_at[last + 1]) <= self.max_tokens:
                last = self.end_at[last + 1]
            first, last = self._verify(first, new, last)
            out.append(Chunk(self.text[units.starts[first] : units.ends[last]], units.starts[first], units.ends[last]))
            new = last + 1
            first = self._overlap_start(first, last)
        return out

    def _verify(self, first: int, new: int, last: int) -> tuple[int, int]:
        # Sums are exact for most counters; for one where joining adds tokens, give up
        # trailing units, then overlap, until the real count fits. A lone unit fits by
        # construction, unless it is a single word over the budget.
        units = self.units
        while self.count.base + self.count(self.text[units.starts[first] : units.ends[last]]) > self.max_tokens:
            if last > new:
                last -= 1
            elif first < new:
                first += 1
            else:
                break
        return first, last

    def _overlap_start(self, first: int, last: int) -> int:
        """The first unit of the next chunk: trailing units of this one worth about ``overlap`` tokens."""
        start = last + 1
        if not self.overlap:
            return start
        # Never the whole previous chunk, so each chunk starts later than the one before.
        while start - 1 > first and self.estimate(start - 1, last) - self.count.base <= self.overlap:
            start -= 1
        lone = self.units.tokens[last]
        if start == last + 1 and last > first and lone <= min(2 * self.overlap, self.max_tokens // 2):
            start = last  # a sentence a little longer than the overlap beats no overlap at all
        return start
