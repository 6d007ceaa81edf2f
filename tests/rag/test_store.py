"""Both vector stores (SQLite, PostgreSQL + pgvector): search, filters, atomic replacement, readers during writes."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from forge.errors import ConfigError, StoreError
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
        same_text = [NewChunk("copy", 0, 4, "a-0")]  # the same content hash as a stored chunk
        assert store.replace_source("c.txt", "v1", same_text, _unit(rng, 1), embedder="e") == (0, 1)
        assert [s.source for s in store.sources()] == ["a.txt", "c.txt"]
        assert store.delete("a.txt") == 3 and store.count() == 0


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
