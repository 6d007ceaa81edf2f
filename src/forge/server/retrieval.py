"""What the server needs from a RAG pipeline, as a protocol: the server sits below ``forge.rag``.

``forge serve --db DB`` (or ``create_server(app, retriever=Rag(...))``) gives
the server a retriever. Then ``POST /v1/rag/query`` searches the store, and
chat requests are answered from it: the last user message is replaced by the
retrieved sources, numbered, and the question, and the answer is held to the
retriever's grammar (by default it quotes a source and cites it, or says the
sources do not hold the answer); the response carries those sources in a
``sources`` field beside OpenAI's (in the first chunk when streaming).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from forge.structured import Grammar

__all__ = ["Retriever"]


@runtime_checkable
class Retriever(Protocol):
    def search(self, query: str, k: int, filter: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """The ``k`` best chunks for ``query``: dicts with text, source, start, end, score and metadata."""
        ...

    def augment(
        self, messages: Sequence[Mapping[str, str]], k: int | None, mode: Literal["quote", "free"] = "quote"
    ) -> tuple[list[dict[str, str]], list[dict[str, Any]], Grammar | None]:
        """``messages`` with the last user turn grounded in retrieved sources, those sources (numbered), and
        the grammar the answer is held to in ``mode`` (None: any text)."""
        ...
