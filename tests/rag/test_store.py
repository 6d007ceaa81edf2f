"""Both vector stores (SQLite, PostgreSQL + pgvector): search, filters, atomic replacement, readers during writes."""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from forge.errors import ConfigError, StoreError
from forge.rag import store as store_module
from forge.rag.store import NewChunk, SqliteStore, VectorStore

Opener = Callable[[], VectorStore]


def _unit(rng: np.random.Generator, n: int, dim: int = 8) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _chunks(source: str, n: int, **meta: object) -> list[NewChunk]:
    return [NewChunk(f"{source} chunk {i}", i * 10, i * 10 + 9, f"{source}-{i}", dict(meta)) for i in range(n)]


def test_search_is_cosine_best_first(open_store: Opener) -> None:
    rng = np.random.default_rng(0)
    vectors = _unit(rng, 50)
    with open_store() as store:
        assert store.replace_source("a.txt", "h1", _chunks("a", 50), vectors, embedder="e") == (50, 0)
        query = _unit(rng, 1)[0]
        hits = store.search(query, k=5)
        expected = np.argsort(-(vectors @ query))[:5]
        assert [h.chunk.text for h in hits] == [f"a chunk {i}" for i in expected]
        assert [h.score for h in hits] == pytest.approx(sorted((vectors @ query)[expected], reverse=True), rel=1e-5)
        assert hits[0].chunk.source == "a.txt" and hits[0].chunk.end - hits[0].chunk.start == 9


def test_filters_sources_and_metadata(open_store: Opener) -> None:
    rng = np.random.default_rng(1)
    with open_store() as store:
        store.replace_source("a.txt", "h", _chunks("a", 10, play="hamlet"), _unit(rng, 10), embedder="e")
        store.replace_source("b.txt", "h", _chunks("b", 10, play="lear"), _unit(rng, 10), embedder="e")
        q = _unit(rng, 1)[0]
        assert {h.chunk.source for h in store.search(q, 20, {"play": "lear"})} == {"b.txt"}
        assert {h.chunk.source for h in store.search(q, 20, {"source": "a.txt"})} == {"a.txt"}
        assert len(store.search(q, 20, {"play": ["lear", "hamlet"]})) == 20
        assert store.search(q, 5, {"play": "macbeth"}) == []
        with pytest.raises(ConfigError, match="filter key"):
            store.search(q, 5, {"play') OR 1=1 --": "x"})


def test_replacing_a_source_and_dropping_duplicates(open_store: Opener) -> None:
    rng = np.random.default_rng(2)
    with open_store() as store:
        store.replace_source("a.txt", "v1", _chunks("a", 5), _unit(rng, 5), embedder="e")
        assert store.source_hash("a.txt") == "v1"
        store.replace_source("a.txt", "v2", _chunks("a", 3), _unit(rng, 3), embedder="e")
        assert store.count() == 3 and store.source_hash("a.txt") == "v2"
        twice = [NewChunk("copy", 0, 4, "c-0"), NewChunk("copy", 5, 9, "c-0")]  # repeated within one source
        assert store.replace_source("c.txt", "v1", twice, _unit(rng, 2), embedder="e") == (1, 1)
        assert [s.source for s in store.sources()] == ["a.txt", "c.txt"]
        assert store.delete("a.txt") == 3 and store.count() == 1


def test_text_before_a_chunk_comes_from_the_chunk_before_it(open_store: Opener) -> None:
    text = "SPEAKER.\nline one\nline two\nline three\n"
    spans = [(0, 25), (16, 36), (25, len(text))]  # overlapping, as the chunker writes them
    chunks = [NewChunk(text[a:b], a, b, f"h{i}") for i, (a, b) in enumerate(spans)]
    with open_store() as store:
        store.replace_source("s.txt", "v1", chunks, _unit(np.random.default_rng(5), 3), embedder="e")
        assert store.text_before("s.txt", 0) == ""  # the source's first chunk
        assert store.text_before("s.txt", 16) == text[:16]
        assert store.text_before("s.txt", 25) == text[16:25]  # the nearest chunk before, cut at the offset
        assert store.text_before("other.txt", 25) == ""


def test_a_failed_write_leaves_the_store_as_it_was(open_store: Opener) -> None:
    rng = np.random.default_rng(3)
    with open_store() as store:
        store.replace_source("a.txt", "v1", _chunks("a", 4), _unit(rng, 4), embedder="e")
        bad = [*_chunks("a", 3), NewChunk("x", 0, 1, "x", {"when": object()})]  # fails on the 4th row
        with pytest.raises(TypeError):
            store.replace_source("a.txt", "v2", bad, _unit(rng, 4), embedder="e")
        assert store.count() == 4 and store.source_hash("a.txt") == "v1"


def test_readers_search_while_a_writer_ingests(open_store: Opener) -> None:
    rng = np.random.default_rng(4)
    writer = open_store()
    writer.replace_source("seed.txt", "h", _chunks("seed", 20), _unit(rng, 20), embedder="e")
    reader = open_store()
    errors: list[BaseException] = []
    counts: list[int] = []

    def read() -> None:
        try:
            for _ in range(30):
                counts.append(len(reader.search(_unit(rng, 1)[0], 5)))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=read)
    thread.start()
    for i in range(20):
        writer.replace_source(f"doc{i}.txt", "h", _chunks(f"d{i}", 50), _unit(rng, 50), embedder="e")
    thread.join()
    assert not errors and set(counts) == {5}
    assert reader.count() == 20 + 20 * 50  # the reader sees the writer's commits


def test_mismatched_embedder_and_bad_vectors_are_refused(open_store: Opener) -> None:
    rng = np.random.default_rng(5)
    with open_store() as store:
        store.replace_source("a.txt", "h", _chunks("a", 2), _unit(rng, 2), embedder="minilm")
        with pytest.raises(StoreError, match="'minilm'"):
            store.replace_source("b.txt", "h", _chunks("b", 2), _unit(rng, 2, dim=4), embedder="other")
        with pytest.raises(StoreError, match="unit length"):
            store.replace_source("b.txt", "h", _chunks("b", 2), 3 * _unit(rng, 2), embedder="minilm")
        with pytest.raises(StoreError, match="wrong embedder"):
            store.search(_unit(rng, 1, dim=4)[0], 3)


def test_a_file_that_is_not_a_store_is_named(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreError, match=r"junk\.db"):
        SqliteStore(junk)
    with pytest.raises(StoreError, match="does not exist"):
        SqliteStore(tmp_path / "missing" / "s.db")


def test_hybrid_search_finds_the_words_the_vectors_miss(open_store: Opener) -> None:
    rng = np.random.default_rng(6)
    vectors = _unit(rng, 40)
    chunks = [NewChunk(f"filler text number {i} about nothing", i, i + 1, f"f{i}") for i in range(40)]
    chunks[7] = NewChunk("Something is rotten in the state of Denmark.", 7, 8, "denmark")
    with open_store() as store:
        store.replace_source("play.txt", "h", chunks, vectors, embedder="e")
        away = -vectors[7]  # the vector ranking puts chunk 7 last
        assert 7 not in [h.chunk.start for h in store.search(away, 5)]
        hits = store.search(away, 5, text="Who says something is rotten in Denmark?")
        assert 7 in [h.chunk.start for h in hits]
        assert [h.chunk.start for h in store.search(away, 5, {"source": "other.txt"}, text="rotten")] == []


# Hostile input and bad luck (issue 14)


def test_the_same_text_in_two_sources_is_kept_for_each(open_store: Opener) -> None:
    rng = np.random.default_rng(7)
    shared = [NewChunk("the same paragraph", 0, 18, "same-hash")]
    with open_store() as store:
        assert store.replace_source("a.txt", "h", shared, _unit(rng, 1), embedder="e") == (1, 0)
        assert store.replace_source("b.txt", "h", shared, _unit(rng, 1), embedder="e") == (1, 0)
        assert {s.source: s.chunks for s in store.sources()} == {"a.txt": 1, "b.txt": 1}
        assert store.delete("a.txt") == 1
        hits = store.search(_unit(rng, 1)[0], 5)
        assert [h.chunk.source for h in hits] == ["b.txt"]  # b keeps its chunk when a goes
        assert store.replace_source("a.txt", "h", shared, _unit(rng, 1), embedder="e") == (1, 0)  # and a comes back
        assert store.count() == 2


@pytest.mark.parametrize(
    ("filter", "message"),
    [
        ({"play": {"$ne": "x"}}, "filter['play'] is a dict ({'$ne': 'x'}); allowed: a string, number, boolean or null"),
        ({"play": ["a", ["b"]]}, "filter['play'] holds a list (['b'])"),
        ({"play": [{"a": 1}]}, "filter['play'] holds a dict"),
        ({"n": 2**64}, "filter['n'] is a int"),
        ({"n": float("nan")}, "filter['n'] is a float (nan)"),
        ({"play": list(range(1025))}, "lists 1025 values"),
        ({f"k{i}": 1 for i in range(17)}, "at most 16 keys"),
        (["play", "x"], "a filter maps metadata keys to values, got a list"),
    ],
)
def test_filters_with_objects_or_nested_lists_are_refused(open_store: Opener, filter: object, message: str) -> None:
    rng = np.random.default_rng(8)
    with open_store() as store:
        store.replace_source("a.txt", "h", _chunks("a", 3, play="x"), _unit(rng, 3), embedder="e")
        with pytest.raises(ConfigError) as caught:
            store.search(_unit(rng, 1)[0], 5, filter)  # type: ignore[arg-type]
        assert message in str(caught.value) and caught.value.http_status == 400


def test_filter_values_of_every_allowed_type(open_store: Opener) -> None:
    rng = np.random.default_rng(9)
    with open_store() as store:
        store.replace_source("a.txt", "h", _chunks("a", 2, act=1, final=True, score=0.5), _unit(rng, 2), embedder="e")
        store.replace_source("b.txt", "h", _chunks("b", 2, act=2), _unit(rng, 2), embedder="e")
        q = _unit(rng, 1)[0]
        assert {h.chunk.source for h in store.search(q, 9, {"act": 1, "final": True, "score": 0.5})} == {"a.txt"}
        assert {h.chunk.source for h in store.search(q, 9, {"final": None})} == {"b.txt"}  # null: the key is missing
        assert {h.chunk.source for h in store.search(q, 9, {"final": [True, None]})} == {"a.txt", "b.txt"}
        assert store.search(q, 9, {"act": []}) == []  # any of nothing


def test_the_filter_cache_is_bounded(tmp_path: Path) -> None:
    rng = np.random.default_rng(10)
    with SqliteStore(tmp_path / "s.db") as store:
        store.replace_source("a.txt", "h", _chunks("a", 4, part=1), _unit(rng, 4), embedder="e")
        q = _unit(rng, 1)[0]
        for i in range(200):  # each a distinct filter, as clients can send
            store.search(q, 2, {"part": i})
        assert len(store._filters) == store_module.FILTER_CACHE
        assert len(store.search(q, 2, {"part": 1})) == 2  # still right after evictions


def test_a_full_disk_fails_cleanly_and_keeps_the_store(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    with SqliteStore(tmp_path / "s.db") as store:
        store.replace_source("a.txt", "v1", _chunks("a", 4), _unit(rng, 4), embedder="e")
        pages = store._db.execute("PRAGMA page_count").fetchone()[0]
        store._db.execute(f"PRAGMA max_page_count = {pages + 2}")  # the disk fills up a few pages later
        big = [NewChunk("x" * 4000 + str(i), i, i + 1, f"big-{i}") for i in range(40)]
        with pytest.raises(StoreError, match="database or disk is full") as caught:
            store.replace_source("big.txt", "v1", big, _unit(rng, 40), embedder="e")
        assert "free some disk space" in str(caught.value) and "'big.txt'" in str(caught.value)
        with pytest.raises(StoreError, match="full"):
            store.replace_source("a.txt", "v2", big, _unit(rng, 40), embedder="e")
        assert store.count() == 4 and [s.source for s in store.sources()] == ["a.txt"]
        assert store.source_hash("a.txt") == "v1" and store.source_hash("big.txt") is None
    with SqliteStore(tmp_path / "s.db") as store:  # and it opens again, as it was
        assert store.count() == 4 and len(store.search(_unit(rng, 1)[0], 9)) == 4


def test_files_that_are_not_forge_stores_are_refused_and_left_alone(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes, not a database\n")
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE contacts (name TEXT)")
    conn.close()
    for path, message in [(notes, "not a SQLite file"), (other, "not a Forge store (it holds contacts)")]:
        before = path.read_bytes()
        with pytest.raises(StoreError, match=re.escape(message)):
            SqliteStore(path)
        assert path.read_bytes() == before and not Path(f"{path}-wal").exists()
    with pytest.raises(StoreError, match="not a regular file"):
        SqliteStore(tmp_path)
    empty = tmp_path / "empty.db"
    empty.touch()  # nothing to lose: it becomes a store
    with SqliteStore(empty) as store:
        assert store.count() == 0


# A store written by Forge before chunk hashes were unique per source.
SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE sources (source TEXT PRIMARY KEY, sha256 TEXT NOT NULL, chunks INTEGER NOT NULL, added_at REAL NOT NULL);
CREATE TABLE chunks (id INTEGER PRIMARY KEY, source TEXT NOT NULL, start INTEGER NOT NULL, end INTEGER NOT NULL,
    text TEXT NOT NULL, hash TEXT NOT NULL UNIQUE, metadata TEXT NOT NULL, vector BLOB NOT NULL);
CREATE INDEX chunks_source ON chunks (source);
CREATE VIRTUAL TABLE chunks_fts USING fts5(text, content='chunks', content_rowid='id', tokenize='porter unicode61');
CREATE TRIGGER chunks_fts_insert AFTER INSERT ON chunks BEGIN
    INSERT INTO chunks_fts(rowid, text) VALUES (new.id, new.text);
END;
CREATE TRIGGER chunks_fts_delete AFTER DELETE ON chunks BEGIN
    INSERT INTO chunks_fts(chunks_fts, rowid, text) VALUES ('delete', old.id, old.text);
END;
INSERT INTO meta VALUES ('schema', '1'), ('embedder', 'e'), ('dim', '8');
"""


def test_a_schema_1_store_is_upgraded_and_its_sources_re_embedded(tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    db = tmp_path / "old.db"
    with sqlite3.connect(db) as conn:
        conn.executescript(SCHEMA_1)
        for i, (source, text) in enumerate([("a.txt", "shared words"), ("a.txt", "rotten Denmark")], start=7):
            conn.execute(
                "INSERT INTO chunks VALUES (?, ?, 0, 1, ?, ?, '{}', ?)",
                (i, source, text, f"h-{text}", _unit(rng, 1)[0].tobytes()),
            )
        conn.execute("INSERT INTO sources VALUES ('a.txt', 'sha-a', 2, 0), ('b.txt', 'sha-b', 0, 0)")
    conn.close()
    with SqliteStore(db) as store:
        assert store.count() == 2 and store.source_hash("b.txt") == ""  # b lost its chunk: no longer "unchanged"
        best = store.search(_unit(rng, 1)[0], 5, text="rotten")[0]
        assert best.chunk.id == 8 and best.chunk.text == "rotten Denmark"  # ids and the keyword index kept
        shared = [NewChunk("shared words", 0, 1, "h-shared words")]
        assert store.replace_source("b.txt", "sha-b", shared, _unit(rng, 1), embedder="e") == (1, 0)
        assert store.delete("a.txt") == 2 and store.count() == 1
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0] == "2"
    conn.close()


def test_old_postgres_tables_are_upgraded(postgres_url: str) -> None:
    from forge.rag.pgvector import PgVectorStore

    rng = np.random.default_rng(13)
    shared = [NewChunk("shared words", 0, 1, "same")]
    with PgVectorStore(postgres_url, prefix="old_") as store:
        store.replace_source("a.txt", "sha-a", shared, _unit(rng, 1), embedder="e")
        # Back to the tables an older Forge made: hashes unique store-wide, no schema recorded.
        store._db.execute("ALTER TABLE old_chunks DROP CONSTRAINT old_chunks_source_hash")
        store._db.execute("ALTER TABLE old_chunks ADD CONSTRAINT old_chunks_hash_key UNIQUE (hash)")
        store._db.execute("DELETE FROM old_meta WHERE key = 'schema'")
    with PgVectorStore(postgres_url, prefix="old_") as store:
        assert store.source_hash("a.txt") == ""
        assert store.replace_source("b.txt", "sha-b", shared, _unit(rng, 1), embedder="e") == (1, 0)
        assert store.delete("a.txt") == 1 and store.count() == 1
