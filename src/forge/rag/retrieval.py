"""``Rag``: documents in, cited answers out.

Ingest: load each file (``loaders``), skip it if its sha256 matches what the
store recorded, chunk it by tokens (``chunking``), drop chunks whose content
hash is already stored, embed the rest in batches, and replace the source's
chunks in one transaction. A bad file is reported and skipped; the rest go on.
A ``progress`` callback hears after each file and each batch of embeddings.

Answer: embed the question, take the top k chunks, pack as many as fit the
chat model's context (best first, each numbered), and ask the model to answer
from them citing ``[n]``. The answer comes back with the sources it cites.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from forge import compute
from forge.app import Forge
from forge.errors import ConfigError
from forge.rag.chunking import chunk_text, content_hash
from forge.rag.embed import Embedder, LocalEmbedder
from forge.rag.grounded import (
    NOT_FOUND,
    QUOTE_SYSTEM,
    Citation,
    Mode,
    Passage,
    free_grammar,
    passages,
    quote_grammar,
    renumbered,
    rerank,
)
from forge.rag.loaders import Document, LoadFailure, load_document, walk_files
from forge.rag.pgvector import PgVectorStore
from forge.rag.store import Hit, NewChunk, SqliteStore, VectorStore
from forge.structured import Grammar

if TYPE_CHECKING:
    from forge.tokenizer import Tokenizer

__all__ = [
    "NOT_FOUND",
    "Answer",
    "Citation",
    "IngestProgress",
    "IngestReport",
    "Plan",
    "Rag",
    "cited",
    "open_store",
]

#: Chunks embedded between two progress reports: a large file is not silent for minutes.
EMBED_BATCH = 128

#: Greedy, with a light repetition penalty: small chat models otherwise loop on a retrieved phrase.
ANSWER_DEFAULTS: dict[str, Any] = {"temperature": 0.0, "max_tokens": 256, "repetition_penalty": 1.1}

#: Passages the chat model judges (see ``grounded.rerank``), and how many of its best an answer may quote.
#: Measured with benchmarks/answers.py's 65 tuning questions (T) and, never used to choose, 45 held-out ones (H):
#: the passage ranked first by ``passages`` held the answer for T 0.68 / H 0.82; the reranker's best of the first
#: 2, 4, 8: T 0.69, 0.71, 0.74 / H 0.82, 0.78, 0.82. Before IDF and phrase weighting (below), 40 passages of 12
#: chunks were needed to reach T 0.60. Letting the model pick among its best 2 or 3 while decoding was worse
#: than the reranker's best alone.
#: The reranker's order blends its likelihoods (this weight) with the passages' own scores (the rest), each
#: standardised over the pool. Measured on T with pools of 4, 8 and 16 and weights 0-1 in one offline pass
#: (the cited chunk holds the answer): the best was pool 8 at weight 0.7 and at 1.0 (0.815 both; the
#: first-stage order alone 0.769). The blend is kept, as it leans on two signals; on H (looked at only after)
#: it gave 0.911 against the reranker alone's 0.844.
RERANK_POOL = 8
RERANK_WEIGHT = 0.7
QUOTE_CHOICES = 1
#: Chunks searched for an answer when the caller gives no ``k``: a quote is chosen among many passages, while
#: a free answer reads every chunk it is given, so fewer fit. 20 chunks held the answer for T 0.98 / H 0.93
#: of the questions, 12 for T 0.91.
DEFAULT_K = {"quote": 20, "free": 5}

#: How a passage's keywords and phrases add to its similarity (see ``grounded.passages``). Measured on T: the
#: closest passage held the answer for 0.35 by embedding alone, 0.45 with the plain keyword share (x0.3),
#: 0.62 with IDF-weighted keywords (x1.6), 0.68 adding the share of the question's word pairs (x1.0).
KEYWORD_WEIGHT = 1.6
PHRASE_WEIGHT = 1.0

#: Below this cosine similarity between the question and the closest passage of the chunks searched, the
#: sources are taken not to hold the answer. Measured with 20 chunks: the closest passages of the 110 answerable
#: questions scored 0.53 or more; 5 of 8 questions about other things scored below 0.50 (0.31-0.47).
MIN_SCORE = 0.5

SYSTEM_PROMPT = (
    "Answer the question using only the numbered sources. After each claim, cite the source it came from "
    "as [1], [2], and so on. If the sources do not contain the answer, say that you don't know."
)


@dataclass
class IngestReport:
    """What ``Rag.add`` did: files (re)embedded, unchanged files skipped, failures, chunk counts."""

    added: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    failures: list[LoadFailure] = field(default_factory=list)
    chunks: int = 0
    duplicates: int = 0

    def summary(self) -> str:
        text = (
            f"{len(self.added)} added, {len(self.unchanged)} unchanged, {len(self.failures)} failed; "
            f"{self.chunks} chunks stored, {self.duplicates} duplicates dropped"
        )
        return text + "".join(f"\n  skipped {f}" for f in self.failures)  # names escaped: see LoadFailure


@dataclass(frozen=True, slots=True)
class IngestProgress:
    """Where ``Rag.add`` is: files finished of all, and the chunks embedded so far of the file in hand."""

    files_done: int
    files_total: int
    source: str
    chunks_done: int = 0
    chunks_total: int = 0


@dataclass(frozen=True, slots=True)
class Plan:
    """How a question will be answered: see :meth:`Rag.plan`."""

    messages: list[dict[str, str]] | None  # None: the sources don't hold the answer; say NOT_FOUND
    sources: list[Citation]
    grammar: Grammar | None


@dataclass(frozen=True, slots=True)
class Answer:
    text: str
    citations: list[Citation]  # the sources the answer cites, in order of number
    sources: list[Citation]  # every source the model was given


class Rag:
    """Retrieval over a vector store, answering with a Forge app's chat model.

    >>> rag = Rag(":memory:", embedder=my_embedder)  # doctest: +SKIP
    >>> rag.add(["notes/"]).summary()  # doctest: +SKIP
    '3 added, 0 unchanged, 0 failed; 41 chunks stored, 0 duplicates dropped'
    >>> rag.query("when is the launch?", k=3)  # doctest: +SKIP
    """

    def __init__(
        self,
        store: str | Path | VectorStore = "forge-rag.db",
        *,
        embedder: Embedder | None = None,
        app: Forge | None = None,
        chunk_tokens: int = 128,
        chunk_overlap: int = 32,
        context_tokens: int = 1536,
        min_score: float = MIN_SCORE,
    ) -> None:
        self.embedder = embedder if embedder is not None else LocalEmbedder.default()
        if chunk_tokens > self.embedder.max_tokens:
            raise ConfigError(
                f"chunk_tokens={chunk_tokens} is longer than the embedder's {self.embedder.max_tokens}-token "
                f"window; use {self.embedder.max_tokens} or less"
            )
        # Opened last: a bad option or a missing embedder must not leave a new, empty store file behind.
        self.store: VectorStore = open_store(store) if isinstance(store, (str, Path)) else store
        self.chunk_tokens, self.chunk_overlap, self.context_tokens = chunk_tokens, chunk_overlap, context_tokens
        self._app = app
        self.min_score = min_score

    # -- ingest ---------------------------------------------------------------
    def add(
        self,
        paths: str | Path | Iterable[str | Path] = (),
        *,
        texts: Sequence[str] | Mapping[str, str] = (),
        metadata: Mapping[str, Any] | None = None,
        progress: Callable[[IngestProgress], None] | None = None,
    ) -> IngestReport:
        """Ingest files and folders (recursively), and/or raw ``texts`` (a list, or {source name: text}).

        Unchanged files (same sha256 as last time) are skipped; a bad file is reported in the result.
        ``progress`` is called after each file and each batch of embeddings of a file.
        """
        report = IngestReport()
        items = [paths] if isinstance(paths, (str, Path)) else list(paths)
        named = texts.items() if isinstance(texts, Mapping) else ((f"text:{i}", t) for i, t in enumerate(texts))
        work: list[Path | LoadFailure | Document] = [*walk_files(items)]  # listed first, for the total
        work += [Document(source=s, text=t, sha256=content_hash(t), kind="text") for s, t in named]
        notify = progress if progress is not None else lambda _: None
        for done, item in enumerate(work):
            doc = load_document(item) if isinstance(item, Path) else item
            if isinstance(doc, LoadFailure):
                report.failures.append(doc)
            else:
                self._ingest(doc, metadata, report, notify, IngestProgress(done, len(work), doc.source))
            notify(IngestProgress(done + 1, len(work), doc.source))
        return report

    def _ingest(
        self,
        doc: Document,
        metadata: Mapping[str, Any] | None,
        report: IngestReport,
        notify: Callable[[IngestProgress], None],
        where: IngestProgress,
    ) -> None:
        if self.store.source_hash(doc.source) == doc.sha256:
            report.unchanged.append(doc.source)
            return
        pieces = chunk_text(
            doc.text, self.embedder.count_tokens, max_tokens=self.chunk_tokens, overlap=self.chunk_overlap
        )
        seen: set[str] = set()
        chunks = []
        for piece in pieces:
            digest = content_hash(piece.text)
            if digest in seen:  # repeated within the document
                report.duplicates += 1
                continue
            seen.add(digest)
            meta = {"kind": doc.kind, **(metadata or {})}
            chunks.append(NewChunk(piece.text, piece.start, piece.end, digest, meta))
        texts = [c.text for c in chunks]
        batches = []
        for start in range(0, len(texts), EMBED_BATCH):
            notify(replace(where, chunks_done=start, chunks_total=len(texts)))
            batches.append(self.embedder.embed(texts[start : start + EMBED_BATCH]))
        vectors = np.concatenate(batches) if batches else self.embedder.embed([])
        name = self.embedder.name
        stored, dropped = self.store.replace_source(doc.source, doc.sha256, chunks, vectors, embedder=name)
        report.added.append(doc.source)
        report.chunks += stored
        report.duplicates += dropped

    # -- retrieval ------------------------------------------------------------
    def query(self, question: str, k: int = 5, filter: Mapping[str, Any] | None = None) -> list[Hit]:
        """The ``k`` chunks closest to ``question``, best first, each with its source, span and score."""
        if not isinstance(question, str) or not question.strip():
            raise ConfigError(f"the question must be a non-empty string, got {question!r}")
        if not isinstance(k, int) or k < 1:
            raise ConfigError(f"k must be a positive integer, got {k!r}")
        return self.store.search(self.embedder.embed([question])[0], k, filter, text=question)

    # -- answering --------------------------------------------------------------
    @property
    def app(self) -> Forge:
        """The chat app answering questions: SmolLM2 unless one was given."""
        if self._app is None:  # loaded on first use: ingest and retrieval don't need a chat model
            self._app = Forge("smollm2")
        return self._app

    def messages(
        self, question: str, hits: Sequence[Hit], *, budget: int | Literal["context"] | None = "context"
    ) -> tuple[list[dict[str, str]], list[Citation]]:
        """The chat messages for ``question``: as many sources as fit ``budget`` tokens, numbered ("context":
        3/4 of the model's window, less the prompt; None: all of them)."""
        tokenizer, model = self.app.tokenizer, self.app.model
        assert tokenizer is not None and model is not None, "the app has a model"
        left = budget if budget != "context" else None
        if budget == "context":  # sources get at most 3/4 of the model's window: the answer needs the rest
            window = min(self.context_tokens, model.config.context_length * 3 // 4)
            left = window - len(tokenizer.encode(SYSTEM_PROMPT + question)) - 32
        sources: list[Citation] = []
        blocks: list[str] = []
        given: set[str] = set()
        for hit in hits:
            if hit.chunk.text in given:  # the same passage from another file says nothing new
                continue
            given.add(hit.chunk.text)
            n = len(sources) + 1
            block = f"[{n}] ({Path(hit.chunk.source).name})\n{hit.chunk.text.strip()}"
            if left is not None:
                cost = len(tokenizer.encode(block))
                if cost > left:
                    break
                left -= cost
            blocks.append(block)
            c = hit.chunk
            sources.append(Citation(n, c.source, c.start, c.end, c.text, hit.score))
        content = "Sources:\n\n" + "\n\n".join(blocks) + f"\n\nQuestion: {question}"
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}], sources

    def plan(
        self,
        question: str,
        k: int | None = None,
        filter: Mapping[str, Any] | None = None,
        mode: Mode = "quote",
        max_tokens: int | None = None,
    ) -> Plan:
        """What answering ``question`` takes: the chat messages, the numbered sources, and the grammar the
        answer is held to (``mode`` "quote": quotes of the closest passages; "free": own words with at least
        one citation). ``k`` chunks are searched (None: ``DEFAULT_K`` for the mode). ``plan.messages`` is
        None when nothing retrieved is close enough to answer from. With ``max_tokens``, a quote is chosen
        among the passages whose whole answer fits in it (when none does, the answer's grammar says so)."""
        if mode not in ("quote", "free"):
            raise ConfigError(f"mode must be 'quote' or 'free', got {mode!r}")
        hits = self.query(question, DEFAULT_K[mode] if k is None else k, filter)
        if mode == "free":
            messages, sources = self.messages(question, hits)
            return Plan(messages, sources, free_grammar([s.number for s in sources]))
        # The model reads only the chosen passage, so every chunk searched is a candidate: no context budget.
        sources = self.messages(question, hits, budget=None)[1]
        ranked = passages(question, sources, self.embedder, None, KEYWORD_WEIGHT, self._before, PHRASE_WEIGHT)
        if not ranked or max(p.similarity for p in ranked) < self.min_score:
            return Plan(None, sources, None)
        model, tokenizer = self.app.model, self.app.tokenizer
        assert model is not None and tokenizer is not None, "the app has a model"
        pool = _fitting(ranked, tokenizer, max_tokens, RERANK_POOL) or ranked[:RERANK_POOL]
        best = rerank(model, tokenizer, question, pool, RERANK_WEIGHT)[:QUOTE_CHOICES]
        choices, sources = renumbered(best, sources)
        listed = "\n".join(p.answer() for p in choices)
        messages = [
            {"role": "system", "content": QUOTE_SYSTEM},
            {"role": "user", "content": f"Sources:\n{listed}\n\nQuestion: {question}"},
        ]
        return Plan(messages, sources, quote_grammar(choices))

    def _before(self, source: Citation) -> str:
        return self.store.text_before(source.source, source.start)

    def answer(
        self,
        question: str,
        k: int | None = None,
        filter: Mapping[str, Any] | None = None,
        *,
        mode: Mode = "quote",
        **options: Any,
    ) -> Answer:
        """The answer to ``question`` from the top ``k`` chunks, with the sources it cites; see :meth:`plan`."""
        plan = self.plan(question, k, filter, mode, _max_tokens(options))
        if plan.messages is None:
            return Answer(NOT_FOUND, [], plan.sources)
        text = self.app.sync.chat(plan.messages, grammar=plan.grammar, **{**ANSWER_DEFAULTS, **options})
        citations = cited(text, plan.sources)
        if not citations:  # the token limit cut a free answer before its citation: no citation-less guess
            text = NOT_FOUND
        return Answer(text=text, citations=citations, sources=plan.sources)

    def answer_stream(
        self,
        question: str,
        k: int | None = None,
        filter: Mapping[str, Any] | None = None,
        *,
        mode: Mode = "quote",
        **options: Any,
    ) -> tuple[Iterator[str], list[Citation]]:
        """The answer piece by piece, and the numbered sources it may cite."""
        plan = self.plan(question, k, filter, mode, _max_tokens(options))
        if plan.messages is None:
            return iter([NOT_FOUND]), plan.sources
        pieces = self.app.sync.chat_stream(plan.messages, grammar=plan.grammar, **{**ANSWER_DEFAULTS, **options})
        return pieces, plan.sources

    async def astream(
        self,
        question: str,
        k: int | None = None,
        filter: Mapping[str, Any] | None = None,
        *,
        mode: Mode = "quote",
        **options: Any,
    ) -> AsyncIterator[str]:
        """The answer piece by piece, in an event loop."""
        # embedding is slow work
        plan = await compute.run(self.plan, question, k, filter, mode, _max_tokens(options))
        if plan.messages is None:
            yield NOT_FOUND
            return
        async for piece in self.app.chat_stream(plan.messages, grammar=plan.grammar, **{**ANSWER_DEFAULTS, **options}):
            yield piece

    # -- the server's Retriever protocol ---------------------------------------------
    def search(self, query: str, k: int = 5, filter: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """``query`` as JSON-ready dicts: text, source, start, end, score, metadata."""
        hits = self.query(query, k, filter)
        return [{**{k: v for k, v in asdict(h.chunk).items() if k != "id"}, "score": h.score} for h in hits]

    def augment(
        self, messages: Sequence[Mapping[str, str]], k: int | None = None, mode: Mode = "quote"
    ) -> tuple[list[dict[str, str]], list[dict[str, Any]], Grammar]:
        """A chat grounded in the store (``forge serve --db``): the last user turn becomes its sources plus the
        question, earlier turns are kept, and the answer is held to :meth:`plan`'s grammar: in "quote" mode a
        cited quote, or :data:`NOT_FOUND` when nothing retrieved is close enough."""
        last = max(i for i, m in enumerate(messages) if m["role"] == "user")
        question = messages[last]["content"]
        plan = self.plan(question, k, mode=mode)
        grounded = plan.messages or [
            {"role": "system", "content": QUOTE_SYSTEM},
            {"role": "user", "content": f"Question: {question}"},
        ]
        grammar = plan.grammar or quote_grammar([])  # no passage to quote: the grammar's only answer is NOT_FOUND
        history = [dict(m) for m in messages[:last] if m["role"] != "system"]
        out = [grounded[0], *history, grounded[1], *(dict(m) for m in messages[last + 1 :])]
        return out, [asdict(s) for s in plan.sources], grammar

    def close(self) -> None:
        self.store.close()


def _max_tokens(options: Mapping[str, Any]) -> int | None:
    limit = options.get("max_tokens", ANSWER_DEFAULTS["max_tokens"])
    return limit if isinstance(limit, int) and not isinstance(limit, bool) else None


def _fitting(ranked: Sequence[Passage], tokenizer: Tokenizer, max_tokens: int | None, n: int) -> list[Passage]:
    """The first ``n`` of ``ranked`` whose answer, with the end-of-text token and a token to spare (the
    grammar may split it otherwise), fits in ``max_tokens`` (None: any)."""
    if max_tokens is None:
        return list(ranked[:n])
    fits = (p for p in ranked if len(tokenizer.encode(p.answer())) + 2 <= max_tokens)
    return list(itertools.islice(fits, n))


def open_store(spec: str | Path) -> VectorStore:
    """A ``postgresql://`` URL opens a PgVectorStore; anything else is a SQLite file."""
    if isinstance(spec, str) and spec.startswith(("postgresql://", "postgres://")):
        return PgVectorStore(spec)
    return SqliteStore(spec)


def cited(text: str, sources: Sequence[Citation]) -> list[Citation]:
    """The sources an answer refers to as [n], in order of number."""
    numbers = {int(m) for m in re.findall(r"\[(\d+)\]", text)}
    return [s for s in sources if s.number in numbers]
