"""``PgVectorStore``: the same store on PostgreSQL + pgvector, for corpora that outgrow one file.

The interface is ``SqliteStore``'s, so ``Rag`` moves by changing the store
argument: ``Rag("postgresql://...")``. Embeddings live in a ``vector(dim)``
column with an HNSW index (cosine); a query is one ``ORDER BY embedding <=>
query LIMIT k``. Metadata is ``jsonb``, filtered in the same query, with
pgvector's iterative index scan so a selective filter still returns k rows.
Each source is replaced in one transaction, as in SQLite, and chunk hashes are
unique per source (tables made by an older Forge are upgraded when opened, their
sources marked changed so the next ``add`` re-embeds them). Needs ``psycopg``
(``pip install 'psycopg[binary]'``) and the ``vector`` extension.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from forge.errors import ConfigError, StoreError
from forge.rag.store import (
    HYBRID_POOL,
    RRF_K,
    SCHEMA_VERSION,
    Hit,
    NewChunk,
    SourceInfo,
    StoredChunk,
    check_filter,
    first_vectors,
    keyword_terms,
    prefix_before,
    unit_rows,
)

try:
    import psycopg
except ImportError:  # optional: only this store needs it
    psycopg = None  # type: ignore[assignment]

__all__ = ["PgVectorStore"]

_SCHEMA = """
CREATE EXTENSION IF NOT EXISTS vector;
CREATE TABLE IF NOT EXISTS {p}meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE IF NOT EXISTS {p}sources (
    source text PRIMARY KEY, sha256 text NOT NULL, chunks integer NOT NULL, added_at double precision NOT NULL
);
"""

_PREFIX = re.compile(r"[A-Za-z0-9_]+")


def _literal(vector: np.ndarray) -> str:
    return "[" + ",".join(f"{x:.8g}" for x in vector.tolist()) + "]"


class PgVectorStore:
    """Chunks in PostgreSQL with pgvector: HNSW cosine search, jsonb metadata, transactional writes.

    ``url`` is a libpq connection string; ``prefix`` names the tables (several stores per database).
    """

    def __init__(self, url: str, *, prefix: str = "forge_") -> None:
        if psycopg is None:
            raise StoreError(f"{url!r} is a PostgreSQL store; it needs psycopg: pip install 'psycopg[binary]'")
        if not _PREFIX.fullmatch(prefix):
            raise ConfigError(f"prefix {prefix!r} must be letters, digits and '_'")
        self.url, self.p = url, prefix
        try:
            self._db = psycopg.connect(url, autocommit=True)
            self._db.execute(_SCHEMA.format(p=prefix))
            # Filters are applied during the index scan, not after it: k rows even when few match.
            self._db.execute("SET hnsw.iterative_scan = relaxed_order")
            # A wider beam than pgvector's default 40: recall@10 against exact search goes from ~0.6 to
            # ~0.9 on hard (random 384-d) vectors, for well under a millisecond more (benchmarks/rag.py).
            self._db.execute("SET hnsw.ef_search = 200")
            self._upgrade()
        except psycopg.Error as exc:
            raise StoreError(f"can't open the PostgreSQL store {url!r}: {str(exc).strip()}") from None
        self._lock = threading.RLock()

    def _upgrade(self) -> None:
        """Record the schema; chunks made by an older Forge (hashes unique store-wide) get per-source hashes."""
        p = self.p
        with self._db.transaction():
            self._db.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (p + "schema",))  # one upgrader
            version = self._meta("schema")
            if version not in (None, SCHEMA_VERSION):
                raise StoreError(f"{self.url!r} ({p}*) has store schema {version}; this Forge reads {SCHEMA_VERSION}")
            if version is None:
                if self._db.execute("SELECT to_regclass(%s)", (p + "chunks",)).fetchone()[0] is not None:
                    self._db.execute(f"ALTER TABLE {p}chunks DROP CONSTRAINT IF EXISTS {p}chunks_hash_key")
                    self._db.execute(
                        f"ALTER TABLE {p}chunks ADD CONSTRAINT {p}chunks_source_hash UNIQUE (source, hash)"
                    )
                    # The old rule dropped a chunk whose text another source had: re-embed on the next add.
                    self._db.execute(f"UPDATE {p}sources SET sha256 = ''")
                self._db.execute(f"INSERT INTO {p}meta VALUES ('schema', %s)", (SCHEMA_VERSION,))

    @contextlib.contextmanager
    def _writing(self, source: str) -> Iterator[None]:
        """A transaction; a failed write (a full disk, a lost connection) rolls back and becomes a StoreError."""
        try:
            with self._db.transaction():
                yield
        except psycopg.Error as exc:
            raise StoreError(
                f"can't write {source!r} to {self.url!r}: {str(exc).strip()}; the store is as it was before it, "
                "fix the database and run it again"
            ) from None

    def _meta(self, key: str) -> str | None:
        row = self._db.execute(f"SELECT value FROM {self.p}meta WHERE key = %s", (key,)).fetchone()
        return None if row is None else str(row[0])

    def embedder_name(self) -> str | None:
        with self._lock:
            return self._meta("embedder")

    def dim(self) -> int | None:
        with self._lock:
            value = self._meta("dim")
            return None if value is None else int(value)

    def source_hash(self, source: str) -> str | None:
        with self._lock:
            row = self._db.execute(f"SELECT sha256 FROM {self.p}sources WHERE source = %s", (source,)).fetchone()
            return None if row is None else str(row[0])

    def _ensure_chunks(self, embedder: str, dim: int) -> None:
        if first_vectors(self.url, self._meta("embedder"), self._meta("dim"), embedder, dim, "another table prefix"):
            p = self.p
            self._db.execute(
                f"CREATE TABLE IF NOT EXISTS {p}chunks (id bigserial PRIMARY KEY, source text NOT NULL,"
                f' start integer NOT NULL, "end" integer NOT NULL, text text NOT NULL, hash text NOT NULL,'
                f" metadata jsonb NOT NULL, embedding vector({dim}) NOT NULL,"
                f" CONSTRAINT {p}chunks_source_hash UNIQUE (source, hash),"
                # Stored, so ranking reads it instead of re-parsing every matching chunk's text.
                " tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', text)) STORED)"
            )
            self._db.execute(f"CREATE INDEX IF NOT EXISTS {p}chunks_source ON {p}chunks (source)")
            self._db.execute(
                f"CREATE INDEX IF NOT EXISTS {p}chunks_hnsw ON {p}chunks USING hnsw (embedding vector_cosine_ops)"
            )
            self._db.execute(f"CREATE INDEX IF NOT EXISTS {p}chunks_fts ON {p}chunks USING gin (tsv)")
            self._db.execute(f"INSERT INTO {p}meta VALUES ('embedder', %s), ('dim', %s)", (embedder, str(dim)))

    def replace_source(
        self, source: str, sha256: str, chunks: Sequence[NewChunk], vectors: np.ndarray, *, embedder: str
    ) -> tuple[int, int]:
        """Atomically replace ``source``'s chunks; returns (stored, dropped as duplicates)."""
        vectors = unit_rows(vectors, len(chunks))
        p = self.p
        with self._lock, self._writing(source):
            self._ensure_chunks(embedder, vectors.shape[1])
            self._db.execute(f"DELETE FROM {p}chunks WHERE source = %s", (source,))
            stored = 0
            with self._db.cursor() as cur:
                for chunk, vector in zip(chunks, vectors, strict=True):
                    cur.execute(
                        f'INSERT INTO {p}chunks (source, start, "end", text, hash, metadata, embedding)'
                        " VALUES (%s, %s, %s, %s, %s, %s, %s::vector) ON CONFLICT (source, hash) DO NOTHING",
                        (source, chunk.start, chunk.end, chunk.text, chunk.hash, json.dumps(dict(chunk.metadata)),
                         _literal(vector)),
                    )  # fmt: skip
                    stored += cur.rowcount
            self._db.execute(
                f"INSERT INTO {p}sources VALUES (%s, %s, %s, %s) ON CONFLICT (source) DO UPDATE"
                " SET sha256 = EXCLUDED.sha256, chunks = EXCLUDED.chunks, added_at = EXCLUDED.added_at",
                (source, sha256, stored, time.time()),
            )
        return stored, len(chunks) - stored

    def delete(self, source: str) -> int:
        with self._lock, self._writing(source):
            n = 0
            if self._meta("dim") is not None:
                n = self._db.execute(f"DELETE FROM {self.p}chunks WHERE source = %s", (source,)).rowcount
            self._db.execute(f"DELETE FROM {self.p}sources WHERE source = %s", (source,))
        return n

    def sources(self) -> list[SourceInfo]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT source, sha256, chunks, added_at FROM {self.p}sources ORDER BY source"
            ).fetchall()
        return [SourceInfo(*row) for row in rows]

    def count(self) -> int:
        with self._lock:
            if self._meta("dim") is None:
                return 0
            return int(self._db.execute(f"SELECT COUNT(*) FROM {self.p}chunks").fetchone()[0])

    def text_before(self, source: str, start: int) -> str:
        """See :meth:`forge.rag.store.SqliteStore.text_before`."""
        with self._lock:
            if self._meta("dim") is None:
                return ""
            row = self._db.execute(
                f"SELECT start, text FROM {self.p}chunks WHERE source = %s AND start < %s ORDER BY start DESC LIMIT 1",
                (source, start),
            ).fetchone()
        return prefix_before(row, start)

    def search(
        self, vector: np.ndarray, k: int, filter: Mapping[str, Any] | None = None, *, text: str | None = None
    ) -> list[Hit]:
        """The ``k`` nearest chunks by cosine (approximate: HNSW), best first, among those ``filter`` allows.

        With ``text``, hybrid as in ``SqliteStore``: the vector ranking fused with a full-text ranking
        (``ts_rank`` over a stored English ``tsvector``, GIN-indexed) by reciprocal rank.
        """
        if k < 1:
            raise ConfigError(f"k must be at least 1, got {k}")
        query = np.asarray(vector, dtype=np.float32).reshape(-1)
        wanted = check_filter(filter) if filter is not None else {}
        with self._lock:
            dim = self.dim()
            if dim is None:
                return []
            if query.shape[0] != dim:
                raise StoreError(f"a {query.shape[0]}-d query against {dim}-d vectors: wrong embedder")
            where, params = self._where(wanted)
            literal = _literal(query)
            columns = f'id, source, start, "end", text, metadata, 1 - (embedding <=> %s::vector) FROM {self.p}chunks'
            pool = max(HYBRID_POOL, k) if text else k
            rows = self._db.execute(
                f"SELECT {columns} {where} ORDER BY embedding <=> %s::vector LIMIT %s",
                (literal, *params, literal, pool),
            ).fetchall()
            terms = keyword_terms(text) if text else []
            if terms:
                tsquery = " | ".join(terms)
                match = "tsv @@ to_tsquery('english', %s)"
                keyword_rows = self._db.execute(
                    f"SELECT {columns} {where + ' AND' if where else 'WHERE'} {match}"
                    f" ORDER BY ts_rank(tsv, to_tsquery('english', %s)) DESC LIMIT %s",
                    (literal, *params, tsquery, tsquery, HYBRID_POOL),
                ).fetchall()
                rows = _fused(rows, keyword_rows)
            elif text:
                rows = rows[:k]
        return [Hit(StoredChunk(r[0], r[1], r[2], r[3], r[4], r[5]), float(r[6])) for r in rows[:k]]

    @staticmethod
    def _where(wanted: dict[str, list[Any]]) -> tuple[str, list[Any]]:
        """SQL for a filter checked by ``check_filter``: each key's column is one of its allowed values."""
        clauses: list[str] = []
        params: list[Any] = []
        for key, values in wanted.items():
            path = "{" + key.replace(".", ",") + "}"
            column = "source" if key == "source" else "(metadata #>> %s)"
            present = [v if key == "source" else _as_text(v) for v in values if v is not None]
            clause = f"{column} = ANY(%s)"
            params.extend([present] if key == "source" else [path, present])
            if len(present) < len(values):  # null matches a missing key or a JSON null
                clause = f"({clause} OR {column} IS NULL)"
                params.extend([] if key == "source" else [path])
            clauses.append(clause)
        return ("WHERE " + " AND ".join(clauses) if clauses else ""), params

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> PgVectorStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fused(*rankings: list[Any]) -> list[Any]:
    """Rows of several rankings (first column: id) ordered by reciprocal rank fusion."""
    score: dict[int, float] = {}
    row_of: dict[int, Any] = {}
    for ranking in rankings:
        for rank, row in enumerate(ranking):
            score[row[0]] = score.get(row[0], 0.0) + 1.0 / (RRF_K + rank)
            row_of[row[0]] = row
    return [row_of[i] for i in sorted(score, key=lambda i: -score[i])]


def _as_text(value: Any) -> str:
    """How ``#>>`` renders a jsonb value, so filters compare like with like."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else json.dumps(value)
