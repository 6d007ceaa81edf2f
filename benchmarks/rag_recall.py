"""Retrieval quality: recall@k over the Shakespeare corpus, for a few chunking settings.

Each question in benchmarks/data/shakespeare_questions.json names the play
and a passage that answers it. A question counts as found when one of the top
k chunks comes from that play and contains the passage (case and whitespace
ignored). The corpus is ingested once per setting into a temporary store with
the default embedder (all-MiniLM-L6-v2 through Forge's encoder).

    python benchmarks/rag_recall.py [--k 5] [--settings 200:40,128:32,256:48]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, SHAKESPEARE, environment, save_result
from forge.rag.embed import LocalEmbedder
from forge.rag.retrieval import Rag

QUESTIONS = ROOT / "benchmarks" / "data" / "shakespeare_questions.json"


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


def evaluate(rag: Rag, questions: list[dict], k: int) -> tuple[float, list[str]]:
    missed = []
    for q in questions:
        hits = rag.query(q["question"], k=k)
        found = any(Path(h.chunk.source).name == q["file"] and _norm(q["passage"]) in _norm(h.chunk.text) for h in hits)
        if not found:
            missed.append(q["question"])
    return 1 - len(missed) / len(questions), missed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--settings", default="64:16,96:24,128:32", help="chunk_tokens:overlap pairs")
    p.add_argument("--corpus", type=Path, default=SHAKESPEARE)
    args = p.parse_args()
    questions = json.loads(QUESTIONS.read_text())
    embedder = LocalEmbedder.default()
    rows = []
    for setting in args.settings.split(","):
        tokens, overlap = (int(x) for x in setting.split(":"))
        with tempfile.TemporaryDirectory() as tmp:
            rag = Rag(Path(tmp) / "s.db", embedder=embedder, chunk_tokens=tokens, chunk_overlap=overlap)
            t0 = time.perf_counter()
            report = rag.add([args.corpus])
            ingest_s = time.perf_counter() - t0
            recall, missed = evaluate(rag, questions, args.k)
            rows.append(
                {
                    "chunk_tokens": tokens,
                    "overlap": overlap,
                    "chunks": report.chunks,
                    "ingest_s": ingest_s,
                    "chunks_per_s": report.chunks / ingest_s,
                    f"recall@{args.k}": recall,
                    "missed": missed,
                }
            )
            rag.close()
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "missed"}), file=sys.stderr)
    out = {
        "benchmark": "rag_recall",
        "questions": len(questions),
        "k": args.k,
        "embedder": embedder.name,
        "results": rows,
        "env": environment(torch.device("cpu")),
    }
    save_result("rag_recall_cpu", out)


if __name__ == "__main__":
    main()
