"""Retrieval-augmented generation: loaders, chunking, embedders, stores, retrieval.

>>> from forge.rag import Rag
>>> rag = Rag("notes.db")  # doctest: +SKIP
>>> rag.add(["notes/"]); rag.answer("when is the launch?").citations  # doctest: +SKIP
"""

from forge.rag.embed import Embedder, HttpEmbedder, LocalEmbedder
from forge.rag.retrieval import NOT_FOUND, Answer, Citation, IngestProgress, IngestReport, Plan, Rag, open_store
from forge.rag.store import Hit, SqliteStore, VectorStore

__all__ = [
    "NOT_FOUND",
    "Answer",
    "Citation",
    "Embedder",
    "Hit",
    "HttpEmbedder",
    "IngestProgress",
    "IngestReport",
    "LocalEmbedder",
    "Plan",
    "Rag",
    "SqliteStore",
    "VectorStore",
    "open_store",
]
