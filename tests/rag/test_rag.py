"""Rag end to end with the real embedder (all-MiniLM-L6-v2) and, for answers, SmolLM2: offline."""

from __future__ import annotations

from pathlib import Path

import pytest

from forge import models
from forge.rag.embed import LocalEmbedder
from forge.rag.retrieval import Rag, cited

DOCS = {
    "launch.md": "# Launch\n\nThe Apollo-X launch is scheduled for March 14 at Cape Canaveral.\n\n"
    "The countdown starts at 06:00 local time.",
    "team/roster.txt": "Maria leads the propulsion team. Kenji runs the telemetry desk.\n\n"
    "The team meets every Tuesday in room 4B.",
    "team/cafeteria.html": "<html><head><style>p{}</style></head><body><p>The cafeteria serves soup on "
    "Fridays.</p><script>var x;</script></body></html>",
}


@pytest.fixture(scope="module")
def embedder() -> LocalEmbedder:
    return LocalEmbedder.default()


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    root = tmp_path / "notes"
    for name, text in DOCS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


def test_add_query_and_reingest(tmp_path: Path, docs: Path, embedder: LocalEmbedder) -> None:
    rag = Rag(tmp_path / "s.db", embedder=embedder)
    report = rag.add([docs])
    assert len(report.added) == 3 and not report.failures and report.chunks >= 3
    hits = rag.query("When does the rocket launch?", k=2)
    assert Path(hits[0].chunk.source).name == "launch.md" and "March 14" in hits[0].chunk.text
    assert hits[0].score > hits[1].score
    text = Path(hits[0].chunk.source).read_text()
    assert text[hits[0].chunk.start : hits[0].chunk.end] == hits[0].chunk.text  # the span points into the source
    assert Path(rag.query("what is for lunch on friday", k=1)[0].chunk.source).name == "cafeteria.html"
    # Re-ingesting embeds only what changed.
    (docs / "launch.md").write_text("The Apollo-X launch moved to April 2.", encoding="utf-8")
    again = rag.add([docs])
    assert [Path(s).name for s in again.added] == ["launch.md"] and len(again.unchanged) == 2
    assert "April 2" in rag.query("When does the rocket launch?", k=1)[0].chunk.text
    rag.close()


def test_filters_texts_and_duplicates(tmp_path: Path, embedder: LocalEmbedder) -> None:
    rag = Rag(tmp_path / "s.db", embedder=embedder)
    rag.add(texts={"a": "Oranges are rich in vitamin C."}, metadata={"topic": "fruit"})
    rag.add(texts={"b": "Oranges are rich in vitamin C.", "c": "Granite is an igneous rock."})
    assert rag.store.count() == 3  # "b" repeats "a" word for word, and keeps its own copy: removing "a" keeps it
    assert [h.chunk.source for h in rag.query("citrus", k=5, filter={"topic": "fruit"})] == ["a"]
    assert rag.query("stone", k=1)[0].chunk.source == "c"
    rag.close()


def test_a_non_utf8_file_is_reported_and_skipped(tmp_path: Path, docs: Path, embedder: LocalEmbedder) -> None:
    (docs / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    report = Rag(tmp_path / "s.db", embedder=embedder).add([docs, tmp_path / "missing.txt"])
    assert len(report.added) == 3
    assert {Path(f.source).name for f in report.failures} == {"latin1.txt", "missing.txt"}
    assert "latin1.txt" in report.summary()


def test_answer_cites_its_sources(tmp_path: Path, docs: Path, embedder: LocalEmbedder) -> None:
    try:
        models.locate("smollm2")
    except Exception as e:
        pytest.skip(f"SmolLM2 is not installed: {e}")
    rag = Rag(tmp_path / "s.db", embedder=embedder)
    rag.add([docs])
    answer = rag.answer("When is the Apollo-X launch scheduled?", k=3, max_tokens=48)
    assert answer.sources[0].number == 1 and Path(answer.sources[0].source).name == "launch.md"
    assert answer.text.strip()
    assert "March 14" in answer.text or "14" in answer.text
    assert answer.citations == cited(answer.text, answer.sources)
    rag.close()
