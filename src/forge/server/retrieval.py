"""What the server needs from a RAG pipeline, as a protocol: the server sits below ``forge.rag``.

``forge serve --rag DB`` (or ``create_server(app, retriever=Rag(...))``) gives
the server a retriever. Then ``POST /v1/rag/query`` searches the store, and
chat requests are answered from it: the last user message is replaced by the
retrieved sources, numbered, and the question; the response carries those
sources in a ``sources`` field beside OpenAI's (in the first chunk when streaming).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

__all__ = ["Retriever"]


@runtime_checkable
class Retriever(Protocol):
    def search(self, query: str, k: int, filter: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """The ``k`` best chunks for ``query``: dicts with text, source, start, end, score and metadata."""
        ...

    def augment(
        self, messages: Sequence[Mapping[str, str]], k: int
    ) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
        """``messages`` with the last user turn grounded in retrieved sources, and those sources (numbered)."""
        ...
