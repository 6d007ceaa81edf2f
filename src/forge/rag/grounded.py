"""Grounded answers: the model quotes its sources, and every quote cites one.

Asked to answer from retrieved passages in its own words, a small chat model
(SmolLM2-135M) answers from memory and forgets the ``[n]``: on the Shakespeare
question set, 0 of 5 tried answers were right before this module. So by
default an answer *quotes*. The retrieved chunks are cut into candidate
passages (a line with the line before it, or a sentence), the ones closest to
the question are kept, and constrained decoding (an llguidance grammar) lets
the model choose among them and copy one or two word for word, each followed
by the number of the source it came from. What the model may say is exactly a
real quote and a true citation; which quote to give is its choice.

When even the best passage is far from the question, the answer says plainly
that the sources do not contain it (``NOT_FOUND``) instead of guessing. The
``free`` mode, for strong models, lets the model write its own words but still
holds it to the grammar: it cannot end before it has cited a source, or it says
``NOT_FOUND``.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import numpy as np

from forge.generator import likelihoods
from forge.rag.store import keyword_terms
from forge.structured import Grammar

if TYPE_CHECKING:
    from forge.core.transformer import Transformer
    from forge.rag.embed import Embedder
    from forge.tokenizer import Tokenizer

__all__ = ["NOT_FOUND", "Citation", "Mode", "Passage", "free_grammar", "passages", "quote_grammar", "quotes"]

Mode = Literal["quote", "free"]

NOT_FOUND = "The sources do not contain the answer."


@dataclass(frozen=True, slots=True)
class Citation:
    """Source ``number`` as the answer cites it: where the passage is, and its text."""

    number: int
    source: str
    start: int
    end: int
    text: str
    score: float


#: A first line this short heads its paragraph (a speaker, a title).
HEADING_WORDS = 4
MIN_WORDS = 3

#: Lines in a passage: the line that matches the question and the ones after it, where the answer often is.
WINDOW = 3

#: A passage longer than this many words is cut into sentences: a quote should be an answer, not a page.
MAX_WORDS = 40

#: What the reranker reads before the question (see :func:`rerank`).
RERANK_PROMPT = "Passage: {passage}\nA question about this passage:"

QUOTE_SYSTEM = (
    "Answer the question with a quote from the numbered sources: copy the words that answer it exactly, "
    'in double quotes, followed by the source number, like "..." [2].'
)


@dataclass(frozen=True, slots=True)
class Passage:
    """A piece of source ``number`` that an answer may quote, and how close it is to the question."""

    number: int
    heading: str  # the paragraph's heading, e.g. the speaker, or ""
    text: str  # the words that may be quoted
    score: float  # the ranking: similarity and keywords
    similarity: float  # the cosine similarity of its embedding and the question's

    def answer(self) -> str:
        """This passage as a whole answer: the heading, then the quote and its citation."""
        return f'{self.heading + ": " if self.heading else ""}"{self.text}" [{self.number}]'


def _pieces(text: str, before: str = "") -> list[tuple[str, str]]:
    """A chunk's candidate quotes: runs of up to ``WINDOW`` lines (long lines cut into sentences), each led by
    the heading of its paragraph when it has one (a short first line: a speaker's name in a play, a title),
    since "who said it" is often the heading. ``before`` is the source's text before the chunk: a chunk that
    begins mid-paragraph takes that paragraph's heading from it. Whitespace is collapsed, as the quote is
    written."""
    out: list[tuple[str, str]] = []
    carried = _continued_heading(before, text)
    for index, block in enumerate(re.split(r"\n\s*\n", text)):
        lines = [" ".join(line.split()) for line in block.splitlines()]
        lines = [line for line in lines if line]
        if not lines:
            continue
        if index == 0 and carried is not None:  # the rest of a paragraph that began in the chunk before
            heading, body_lines = carried, lines
        else:
            heading = lines[0] if len(lines) > 1 and len(lines[0].split()) <= HEADING_WORDS else ""
            body_lines = lines[1:] if heading else lines
        body: list[str] = []
        for line in body_lines:
            body += re.split(r"(?<=[.!?;])\s+", line) if len(line.split()) > MAX_WORDS else [line]
        for i in range(len(body)):
            run = " ".join(body[i : i + WINDOW]) if len(body[i].split()) < MAX_WORDS // 2 else body[i]
            if len(run.split()) >= MIN_WORDS:
                out.append((heading.rstrip(".:"), run))
    return list(dict.fromkeys(out))


def _continued_heading(before: str, text: str) -> str | None:
    """The heading of the paragraph ``text`` continues ("" if it has none), or None when ``text`` begins a
    paragraph of its own (nothing before it, or a blank line between)."""
    if not before.strip() or re.search(r"\n[^\S\n]*\n\s*$", before) or re.match(r"\s*\n[^\S\n]*\n", text):
        return None
    if not re.search(r"\n[^\S\n]*\n", before):
        return ""  # the text before is all one paragraph, whose start is further back: its heading is unknown
    last = [" ".join(line.split()) for line in re.split(r"\n\s*\n", before)[-1].splitlines()]
    last = [line for line in last if line]
    return last[0] if last and len(last[0].split()) <= HEADING_WORDS else ""


def passages(
    question: str,
    sources: Sequence[Citation],
    embedder: Embedder,
    limit: int | None,
    keyword_weight: float = 0.0,
    before: Callable[[Citation], str] | None = None,
    phrase_weight: float = 0.0,
) -> list[Passage]:
    """The ``limit`` candidate quotes from ``sources`` closest to ``question`` (None: all of them), best first:
    the cosine of their embeddings, plus ``keyword_weight`` times the question's keywords the passage has, each
    weighted by how rare it is among the candidates (IDF: "frailty" says more than "Hamlet" in a question about
    Hamlet), plus ``phrase_weight`` times the share of the question's word pairs it has (a quoted line in the
    question is found by its words better than by its meaning). ``before(source)`` gives the text before a
    source's chunk (see :func:`_pieces`). A quote found in several overlapping chunks is kept once: with its
    heading if any copy has one, else from the best-ranked source."""
    kept: dict[str, tuple[int, str, str]] = {}
    for s in sources:
        for heading, text in _pieces(s.text, before(s) if before is not None else ""):
            if text not in kept or (heading and not kept[text][1]):
                kept[text] = (s.number, heading, text)
    found = list(kept.values())
    if not found:
        return []
    shown = [f"{heading} {text}" for _, heading, text in found]
    vectors = embedder.embed([question, *shown])
    similarity = vectors[1:] @ vectors[0]
    tokens = [_tokens(text) for text in shown]  # each passage's words, read once for both scores
    scores = similarity + keyword_weight * _keywords(question, tokens) + phrase_weight * _phrases(question, tokens)
    order = np.argsort(-scores, kind="stable")[:limit]
    return [Passage(*found[i], float(scores[i]), float(similarity[i])) for i in order]


def _keywords(question: str, tokens: Sequence[list[str]]) -> np.ndarray:
    """Each passage's share of the question's keywords, weighted by their inverse frequency among the passages
    (``tokens``: each passage's words)."""
    terms = set(keyword_terms(question))
    held = [set(words) for words in tokens]
    weight = {t: math.log((len(held) + 1) / (sum(t in words for words in held) + 0.5)) for t in terms}
    total = sum(weight.values()) or 1.0
    return np.array([sum(weight[t] for t in terms & words) / total for words in held])


def _phrases(question: str, tokens: Sequence[list[str]]) -> np.ndarray:
    """Each passage's share of the question's consecutive word pairs (``tokens``: each passage's words)."""
    asked = set(itertools.pairwise(_tokens(question)))
    return np.array([len(asked & set(itertools.pairwise(words))) / max(1, len(asked)) for words in tokens])


def rerank(
    model: Transformer, tokenizer: Tokenizer, question: str, choices: Sequence[Passage], weight: float = 1.0
) -> list[Passage]:
    """``choices`` ordered by how likely the chat model finds ``question`` after each of them (UPR): the model's
    judgement of which passage the question is about, read in one batched pass, not left to its first token.
    With ``weight`` < 1 the order is a blend: ``weight`` times the likelihoods plus ``1 - weight`` times the
    passages' own scores, each standardised over ``choices`` (so neither scale dominates)."""
    heard = likelihoods(model, tokenizer, [RERANK_PROMPT.format(passage=_shown(p)) for p in choices], " " + question)
    blend = weight * _standard(heard) + (1.0 - weight) * _standard([p.score for p in choices])
    return [choices[i] for i in np.argsort(-blend, kind="stable")]


def _standard(values: Sequence[float]) -> np.ndarray:
    """``values`` less their mean, over their standard deviation (all 0 when they are all equal)."""
    a = np.asarray(values, dtype=np.float64)
    return (a - a.mean()) / (a.std() or 1.0)


def _shown(p: Passage) -> str:
    return f"{p.heading}: {p.text}" if p.heading else p.text


def _tokens(text: str) -> list[str]:
    return re.findall(r"[^\W_]+", text.lower())


def renumbered(choices: Sequence[Passage], sources: Sequence[Citation]) -> tuple[list[Passage], list[Citation]]:
    """``choices`` and the sources they come from, numbered 1, 2, ... in order of first use: the answer shows
    the sources its quotes may cite, not every chunk that was searched."""
    numbers: dict[int, int] = {}
    for p in choices:
        numbers.setdefault(p.number, len(numbers) + 1)
    by_number = {s.number: s for s in sources}
    used = [replace(by_number[old], number=new) for old, new in numbers.items()]
    return [replace(p, number=numbers[p.number]) for p in choices], used


def quote_grammar(choices: Sequence[Passage]) -> Grammar:
    """Answers that are one of the passages, quoted exactly after its heading and followed by its ``[n]``.
    With several passages the model picks one while decoding (measured no better than the reranker's best
    alone: see ``Rag``'s QUOTE_CHOICES)."""
    if not choices:
        return Grammar.lark(f"start: {json.dumps(NOT_FOUND)}", "a not-found answer")
    lines = []
    for i, p in enumerate(choices):
        heading = json.dumps(p.heading + ": ") + " " if p.heading else ""
        lines.append(f'q{i}: {heading}"\\"" {json.dumps(p.text)} "\\" [{p.number}]"')
    lines.append("start: " + " | ".join(f"q{i}" for i in range(len(choices))))
    return Grammar.lark("\n".join(lines), "quoted answer")


def free_grammar(numbers: Sequence[int]) -> Grammar:
    """Free text that cites at least one of ``numbers`` as [n] (and no other bracket), or ``NOT_FOUND``."""
    cite = "|".join(str(n) for n in numbers)
    pattern = rf"[^\[\]]*(\[({cite})\][^\[\]]*)+"
    return Grammar.lark(f"start: free | {json.dumps(NOT_FOUND)}\nfree: /{pattern}/", "cited answer")


def quotes(text: str) -> list[tuple[str, int]]:
    """The quotes in an answer and the source number each cites, in order."""
    return [(q, int(n)) for q, n in re.findall(r'"([^"]*)" \[(\d+)\]', text)]
