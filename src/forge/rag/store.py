"""Vector stores: chunks, their metadata and embeddings, searched by exact cosine similarity.

``SqliteStore`` is the embedded default: one SQLite file. It runs in WAL mode,
so readers keep searching while a writer ingests, and every source is
replaced in one transaction: a crash mid-ingest leaves the store as it was
before that source, and the source's recorded hash is written in the same
transaction, so a re-run re-embeds exactly what is missing.

Search is exact: the vectors (unit length, so cosine is a dot product) are
read once into one float32 matrix and kept until another write changes the
file (SQLite's ``data_version`` says when). A query is one matrix-vector
product and a partial sort; at a million 384-d chunks that is 1.5 GB and a
few tens of milliseconds. Metadata filters run in SQL (``json_extract``) and
mask the scores; the masks of the last few filters are cached.

Chunk hashes are unique per source, not per store: two files holding the same
text each keep their chunks, so removing one never empties the other. A store
written by an older Forge (schema 1, hashes unique store-wide) is upgraded when
opened, and its sources are marked changed so the next ``add`` re-embeds what
that rule dropped. A file that is not a Forge store is refused, never changed.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from forge.errors import ConfigError, StoreError

__all__ = [
    "Hit",
    "NewChunk",
    "SourceInfo",
    "SqliteStore",
    "StoreError",
    "StoredChunk",
    "VectorStore",
    "check_filter",
    "check_filter_key",
    "first_vectors",
    "unit_rows",
]

SCHEMA_VERSION = "2"
#: Bounds on a search filter: keys, and allowed values per key (a filter comes from HTTP clients too).
MAX_FILTER_KEYS, MAX_FILTER_VALUES = 16, 1024
#: Filter masks kept per store (each is one bool per chunk: 1 MB at a million chunks).
FILTER_CACHE = 32
_SQLITE_MAGIC = b"SQLite format 3\x00"
#: Candidates each ranking contributes to a hybrid search, and the reciprocal-rank constant (Cormack et al.).
HYBRID_POOL, RRF_K = 50, 60
#: Words too common to help a keyword search (BM25 would weigh them near zero anyway).
_STOPWORDS = (
    "a an and are as at be by did do does for from had has have he her his how i if in is it its me my no not "
    "of on or our she so than that the their them then there these they this to was we were what when where "
    "which who whom why will with you your says say said"
)
STOPWORDS = frozenset(_STOPWORDS.split())


@dataclass(frozen=True, slots=True)
class NewChunk:
    """A chunk to store: its text, where it sits in its source, its content hash and metadata."""

    text: str
    start: int
    end: int
    hash: str
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StoredChunk:
    id: int
    source: str
    start: int
    end: int
    text: str
    metadata: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Hit:
    """A retrieved chunk and its cosine similarity to the query."""

    chunk: StoredChunk
    score: float


@dataclass(frozen=True, slots=True)
class SourceInfo:
    source: str
    sha256: str
    chunks: int
    added_at: float


def prefix_before(row: tuple[int, str] | None, start: int) -> str:
    """The part of chunk ``row`` (its start and text) before offset ``start``."""
    if row is None:
        return ""
    begins, text = row
    return text[: max(0, start - begins)]


class VectorStore(Protocol):
    """What ``Rag`` needs from a store; ``SqliteStore`` and ``PgVectorStore`` implement it."""

    def embedder_name(self) -> str | None: ...

    def source_hash(self, source: str) -> str | None: ...

    def replace_source(
        self, source: str, sha256: str, chunks: Sequence[NewChunk], vectors: np.ndarray, *, embedder: str
    ) -> tuple[int, int]: ...

    def search(
        self, vector: np.ndarray, k: int, filter: Mapping[str, Any] | None = None, *, text: str | None = None
    ) -> list[Hit]: ...

    def sources(self) -> list[SourceInfo]: ...

    def text_before(self, source: str, start: int) -> str: ...

    def delete(self, source: str) -> int: ...

    def count(self) -> int: ...

    def close(self) -> None: ...

    def __enter__(self) -> VectorStore: ...

    def __exit__(self, *exc: object) -> None: ...


# Chunk hashes are unique per source (schema 2); schema 1 had them unique store-wide.
_CHUNKS_TABLE = """
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY,
    source TEXT NOT NULL,
    start INTEGER NOT NULL,
    end INTEGER NOT NULL,
    text TEXT NOT NULL,
    hash TEXT NOT NULL,
    metadata TEXT NOT NULL,
    vector BLOB NOT NULL,
    UNIQUE (source, hash)
);
"""
_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sources (
    source TEXT PRIMARY KEY, sha256 TEXT NOT NULL, chunks INTEGER NOT NULL, added_at REAL NOT NULL
);
"""
    + _CHUNKS_TABLE
    + """
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(
    text, content='chunks', content_rowid='id', tokenize='porter unicode61'
);
"""
)
# The full-text index follows the chunks table (FTS5 external content).
_TRIGGERS = (
    """CREATE TRIGGER IF NOT EXISTS chunks_fts_insert AFTER INSERT ON chunks BEGIN
    INSERT INTO chunks_fts(rowid, text) VALUES (new.id, new.text);
END""",
    """CREATE TRIGGER IF NOT EXISTS chunks_fts_delete AFTER DELETE ON chunks BEGIN
    INSERT INTO chunks_fts(chunks_fts, rowid, text) VALUES ('delete', old.id, old.text);
END""",
)

_NAME = re.compile(r"[A-Za-z0-9_]+")
_METADATA_KEY = re.compile(r"[A-Za-z0-9_.]+")


class SqliteStore:
    """Chunks, metadata and vectors in one SQLite file; exact cosine search.

    >>> store = SqliteStore(":memory:")
    >>> store.count()
    0
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            _check_target(Path(self.path).expanduser())
        try:
            # One connection shared by threads (the server's workers), guarded by a lock.
            self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30.0)
            _check_is_forge_store(self._db, self.path)  # before WAL mode, which rewrites the header
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA + "".join(f"{trigger};\n" for trigger in _TRIGGERS))
            version = self._meta("schema")
            if version not in (None, "1", SCHEMA_VERSION):
                raise StoreError(
                    f"{self.path!r} has store schema {version}; this Forge reads {SCHEMA_VERSION}: upgrade Forge"
                )
            if version != SCHEMA_VERSION:
                self._upgrade()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"can't open {self.path!r} as a Forge store: {exc}") from exc
        self._lock = threading.RLock()
        self._ids: np.ndarray | None = None  # (N,) int64, ascending
        self._matrix: np.ndarray | None = None  # (N, dim) float32
        self._version: tuple[int, int] | None = None
        # filter -> allowed rows, until the next write; least recently used first
        self._filters: OrderedDict[str, np.ndarray] = OrderedDict()

    def _upgrade(self) -> None:
        """Bring a new or schema-1 store to this schema in one transaction (a no-op if another process did)."""
        self._db.execute("BEGIN IMMEDIATE")  # one upgrader at a time; the others wait, then find it done
        try:
            version = self._meta("schema")
            if version == "1":
                _rebuild_chunks_table(self._db)
                # Schema 1 dropped a chunk whose text another source already had: re-embed on the next add.
                self._db.execute("UPDATE sources SET sha256 = ''")
            if version != SCHEMA_VERSION:
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            self._db.commit()
        except BaseException:
            self._db.rollback()
            raise

    # -- metadata ---------------------------------------------------------------
    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def embedder_name(self) -> str | None:
        """The embedder the stored vectors came from (queries must use the same one)."""
        with self._lock:
            return self._meta("embedder")

    def dim(self) -> int | None:
        with self._lock:
            value = self._meta("dim")
            return None if value is None else int(value)

    # -- writes -----------------------------------------------------------------
    def source_hash(self, source: str) -> str | None:
        """The sha256 recorded when ``source`` was last ingested completely, or None."""
        with self._lock:
            row = self._db.execute("SELECT sha256 FROM sources WHERE source = ?", (source,)).fetchone()
            return None if row is None else str(row[0])

    def replace_source(
        self, source: str, sha256: str, chunks: Sequence[NewChunk], vectors: np.ndarray, *, embedder: str
    ) -> tuple[int, int]:
        """Atomically replace ``source``'s chunks; returns (stored, dropped as duplicates of stored chunks)."""
        vectors = unit_rows(vectors, len(chunks))
        dim = vectors.shape[1]
        with self._lock, self._writing(source):  # one transaction: all of it or none of it
            self._check_embedder(embedder, dim)
            self._db.execute("DELETE FROM chunks WHERE source = ?", (source,))
            stored = 0
            for chunk, vector in zip(chunks, vectors, strict=True):
                cur = self._db.execute(
                    "INSERT OR IGNORE INTO chunks (source, start, end, text, hash, metadata, vector)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        source,
                        chunk.start,
                        chunk.end,
                        chunk.text,
                        chunk.hash,
                        json.dumps(dict(chunk.metadata)),
                        vector.tobytes(),
                    ),
                )
                stored += cur.rowcount
            self._db.execute(
                "INSERT OR REPLACE INTO sources VALUES (?, ?, ?, ?)", (source, sha256, stored, time.time())
            )
        return stored, len(chunks) - stored

    @contextlib.contextmanager
    def _writing(self, source: str) -> Iterator[None]:
        """A transaction; a failed write (a full disk, a read-only file) rolls back and becomes a StoreError."""
        try:
            with self._db:
                yield
        except sqlite3.Error as exc:
            if self._db.in_transaction:  # a failed COMMIT leaves it open
                self._db.rollback()
            hint = "free some disk space" if "full" in str(exc) else "check the file and its folder are writable"
            raise StoreError(
                f"can't write {source!r} to {self.path!r}: {exc}; the store is as it was before it, "
                f"{hint} and run it again"
            ) from None

    def _check_embedder(self, embedder: str, dim: int) -> None:
        if first_vectors(self.path, self._meta("embedder"), self._meta("dim"), embedder, dim, "a new store"):
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('embedder', ?)", (embedder,))
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('dim', ?)", (str(dim),))

    def delete(self, source: str) -> int:
        """Remove a source and its chunks; returns how many chunks went."""
        with self._lock, self._writing(source):
            n = self._db.execute("DELETE FROM chunks WHERE source = ?", (source,)).rowcount
            self._db.execute("DELETE FROM sources WHERE source = ?", (source,))
        return n

    # -- reads ------------------------------------------------------------------
    def sources(self) -> list[SourceInfo]:
        with self._lock:
            rows = self._db.execute("SELECT source, sha256, chunks, added_at FROM sources ORDER BY source").fetchall()
        return [SourceInfo(*row) for row in rows]

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0])

    def text_before(self, source: str, start: int) -> str:
        """The text of ``source`` just before offset ``start``, as far back as the chunk before it begins
        ("" at the start of the source): what a chunk that begins mid-paragraph continues."""
        with self._lock:
            row = self._db.execute(
                "SELECT start, text FROM chunks WHERE source = ? AND start < ? ORDER BY start DESC LIMIT 1",
                (source, start),
            ).fetchone()
        return prefix_before(row, start)

    def _vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, matrix), reread only when the file changed since the last read."""
        version = (self._db.execute("PRAGMA data_version").fetchone()[0], self._db.total_changes)
        if self._matrix is None or self._ids is None or version != self._version:
            rows = self._db.execute("SELECT id, vector FROM chunks ORDER BY id").fetchall()
            dim = self.dim() or 0
            self._ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            self._matrix = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim)
            self._version = version
            self._filters.clear()
        return self._ids, self._matrix

    def search(
        self, vector: np.ndarray, k: int, filter: Mapping[str, Any] | None = None, *, text: str | None = None
    ) -> list[Hit]:
        """The ``k`` chunks most similar to ``vector`` (unit length), best first, among those ``filter`` allows.

        ``filter`` maps metadata keys (or ``source``) to a value, or a list of allowed values. With
        ``text`` (the query's words) the ranking is hybrid: the vector ranking and a BM25 keyword
        ranking (FTS5) fused by reciprocal rank. ``Hit.score`` is the cosine similarity either way.
        """
        if k < 1:
            raise ConfigError(f"k must be at least 1, got {k}")
        query = np.asarray(vector, dtype=np.float32).reshape(-1)
        wanted = check_filter(filter) if filter is not None else {}
        with self._lock:
            ids, matrix = self._vectors()
            if len(ids) == 0:
                return []
            if query.shape[0] != matrix.shape[1]:
                raise StoreError(f"a {query.shape[0]}-d query against {matrix.shape[1]}-d vectors: wrong embedder")
            scores = matrix @ query  # (N,)
            if wanted:
                scores = np.where(self._filter_mask(ids, wanted), scores, -np.inf)
            top = _best(scores, min(k if not text else max(HYBRID_POOL, k), len(ids)))
            if text:
                top = self._fuse(top, scores, ids, text, k)
            chunks = self._chunks([int(ids[i]) for i in top])
        return [Hit(chunk=chunks[int(ids[i])], score=float(scores[i])) for i in top]

    def _fuse(self, by_vector: np.ndarray, scores: np.ndarray, ids: np.ndarray, text: str, k: int) -> np.ndarray:
        """Reciprocal rank fusion of the vector ranking and FTS5's BM25 ranking of ``text``."""
        terms = keyword_terms(text)
        fused: dict[int, float] = {}
        for rank, row in enumerate(by_vector):
            fused[int(row)] = 1.0 / (RRF_K + rank)
        if terms:
            query = " OR ".join(f'"{t}"' for t in terms)
            found = self._db.execute(
                "SELECT rowid FROM chunks_fts WHERE chunks_fts MATCH ? ORDER BY bm25(chunks_fts) LIMIT ?",
                (query, HYBRID_POOL),
            ).fetchall()
            rows = np.searchsorted(ids, np.fromiter((r[0] for r in found), dtype=np.int64, count=len(found)))
            rank = 0
            for row in rows:
                if np.isfinite(scores[row]):  # filtered out rows stay out
                    fused[int(row)] = fused.get(int(row), 0.0) + 1.0 / (RRF_K + rank)
                    rank += 1
        order = sorted(fused, key=lambda row: -fused[row])[:k]
        return np.asarray(order, dtype=np.int64)

    def _filter_mask(self, ids: np.ndarray, wanted: dict[str, list[Any]]) -> np.ndarray:
        """Which rows ``wanted`` allows: from the cache (least recently used dropped first) or from SQL."""
        key = json.dumps(wanted, sort_keys=True)
        if key in self._filters:
            self._filters.move_to_end(key)
        else:
            self._filters[key] = np.isin(ids, self._filtered_ids(wanted), assume_unique=True)
            while len(self._filters) > FILTER_CACHE:
                self._filters.popitem(last=False)
        return self._filters[key]

    def _filtered_ids(self, wanted: dict[str, list[Any]]) -> np.ndarray:
        clauses, params = [], []
        for key, values in wanted.items():
            column = "source" if key == "source" else f"json_extract(metadata, '$.{key}')"
            present = [v for v in values if v is not None]
            clause = f"{column} IN ({', '.join('?' * len(present))})"
            if len(present) < len(values):  # null matches a missing key or a JSON null
                clause = f"({clause} OR {column} IS NULL)"
            clauses.append(clause)
            params.extend(present)
        rows = self._db.execute(f"SELECT id FROM chunks WHERE {' AND '.join(clauses)}", params).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def _chunks(self, ids: list[int]) -> dict[int, StoredChunk]:
        if not ids:
            return {}
        rows = self._db.execute(
            f"SELECT id, source, start, end, text, metadata FROM chunks WHERE id IN ({', '.join('?' * len(ids))})", ids
        ).fetchall()
        return {r[0]: StoredChunk(r[0], r[1], r[2], r[3], r[4], json.loads(r[5])) for r in rows}

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_filter(filter: Mapping[str, Any]) -> dict[str, list[Any]]:
    """``filter`` as {key: allowed values}, or a ConfigError naming the key, the value's type and what is allowed.

    A value is a string, a number, a boolean or null (matching a missing key), or a flat list of those
    meaning "any of". At most ``MAX_FILTER_KEYS`` keys and ``MAX_FILTER_VALUES`` values per key.

    >>> check_filter({"play": ["hamlet", "lear"], "act": 1})
    {'play': ['hamlet', 'lear'], 'act': [1]}
    """
    allowed = f"allowed: a string, number, boolean or null, or a flat list of at most {MAX_FILTER_VALUES} of those"
    if not isinstance(filter, Mapping):
        raise ConfigError(f"a filter maps metadata keys to values, got a {type(filter).__name__}: {_short(filter)}")
    if len(filter) > MAX_FILTER_KEYS:
        raise ConfigError(f"a filter has at most {MAX_FILTER_KEYS} keys, got {len(filter)}; filter on fewer keys")
    out: dict[str, list[Any]] = {}
    for key, wanted in filter.items():
        check_filter_key(key)
        values = list(wanted) if isinstance(wanted, (list, tuple, set, frozenset)) else [wanted]
        if len(values) > MAX_FILTER_VALUES:
            raise ConfigError(f"filter[{key!r}] lists {len(values)} values; {allowed}")
        for value in values:
            if not _filter_scalar(value):
                what = "is" if value is wanted else "holds"
                raise ConfigError(f"filter[{key!r}] {what} a {type(value).__name__} ({_short(value)}); {allowed}")
        out[key] = values
    return out


def _filter_scalar(value: object) -> bool:
    if value is None or isinstance(value, (str, bool)):
        return True
    if isinstance(value, int):
        return -(2**63) <= value < 2**63  # SQLite's integers; larger ones can't be stored as metadata either
    return isinstance(value, float) and math.isfinite(value)


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_filter_key(key: str) -> None:
    """A filter key goes into SQL: letters, digits, '_' and '.' (nested keys) only."""
    if not isinstance(key, str) or not _METADATA_KEY.fullmatch(key):
        raise ConfigError(f"filter key {key!r} must be a metadata name (letters, digits, '_' and '.')")


def _check_target(path: Path) -> None:
    """Refuse a path Forge must not write: a missing folder, a folder, or a file that is not SQLite."""
    parent = path.resolve().parent
    if not parent.is_dir():
        raise StoreError(f"can't create the store {str(path)!r}: folder {str(parent)!r} does not exist")
    if not path.exists():
        return
    if not path.is_file():
        raise StoreError(f"{str(path)!r} is not a regular file, so not a Forge store; pick another store path")
    with open(path, "rb") as f:
        head = f.read(len(_SQLITE_MAGIC))
    if head and head != _SQLITE_MAGIC:  # an empty file holds nothing to lose
        raise StoreError(
            f"{str(path)!r} exists and is not a Forge store (not a SQLite file); Forge won't overwrite it: "
            "pick another store path (e.g. forge-rag.db)"
        )


def _check_is_forge_store(db: sqlite3.Connection, path: str) -> None:
    """Refuse to add Forge's tables to another program's SQLite database."""
    tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")]
    if tables and "meta" not in tables:
        raise StoreError(
            f"{path!r} is a SQLite database but not a Forge store (it holds {', '.join(sorted(tables)[:5])}); "
            "Forge won't change it: pick another store path"
        )


def _rebuild_chunks_table(db: sqlite3.Connection) -> None:
    """Schema 1 -> 2: the chunks table again, with hashes unique per source instead of store-wide.

    Ids are kept, so the full-text index (keyed by chunk id) stays valid; the triggers dropped
    with the old table are made again.
    """
    db.execute(_CHUNKS_TABLE.replace("IF NOT EXISTS chunks", "chunks_v2"))
    db.execute(
        "INSERT INTO chunks_v2 (id, source, start, end, text, hash, metadata, vector)"
        " SELECT id, source, start, end, text, hash, metadata, vector FROM chunks"
    )
    db.execute("DROP TABLE chunks")
    db.execute("ALTER TABLE chunks_v2 RENAME TO chunks")
    for trigger in _TRIGGERS:
        db.execute(trigger)


def first_vectors(where: str, known: str | None, known_dim: str | None, embedder: str, dim: int, fix: str) -> bool:
    """True when a store holds no vectors yet; a StoreError when ``embedder``/``dim`` differ from its own."""
    if known is None:
        return True
    if known != embedder or int(known_dim or 0) != dim:
        raise StoreError(
            f"{where!r} holds vectors from {known!r} ({known_dim}-d); these come from {embedder!r} "
            f"({dim}-d): use the same embedder, or {fix}"
        )
    return False


def _best(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest finite scores, best first."""
    top = np.argpartition(-scores, k - 1)[:k]
    top = top[np.argsort(-scores[top], kind="stable")]
    return top[np.isfinite(scores[top])]


def keyword_terms(text: str) -> list[str]:
    """The words of a query for keyword search: letters and digits only (nothing reaches the query syntax)."""
    words = re.findall(r"[^\W_]+", text.lower())
    return list(dict.fromkeys(w for w in words if len(w) > 1 and w not in STOPWORDS))[:32]


def unit_rows(vectors: np.ndarray, n: int) -> np.ndarray:
    """``vectors`` as contiguous float32 (n, dim) rows of unit length, or a StoreError saying what is wrong."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != n:
        raise StoreError(f"{n} chunks need {n} vectors, got an array of {vectors.shape}")
    norms = np.linalg.norm(vectors, axis=-1)
    if n and not (np.all(np.abs(norms - 1) < 1e-3) and not math.isnan(float(norms.sum()))):
        raise StoreError("vectors must be unit length (normalise each row): stores search by dot product")
    return vectors
