"""Every example runs, as a user runs it (a subprocess), on a real corpus."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, data: Path, steps: int) -> str:
    env = os.environ | {"FORGE_EXAMPLE_STEPS": str(steps), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), str(data)], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, hamlet: Path) -> Path:
    return hamlet


def test_quickstart(corpus: Path) -> None:
    out = run_example("quickstart.py", corpus, steps=20)
    assert out.count("generate: ") == 2  # the async program and its sync twin
    assert out.count(" generate 'Return the' -> ") == 2  # logger middleware, once per generate
    assert "saved to" in out


def test_training(corpus: Path) -> None:
    out = run_example("training.py", corpus, steps=40)
    assert "eval @ 0" in out and "eval @ 40" in out
    assert "checkpoint @ 40" in out
    assert "the failing listener raised 1 time(s); training went on to step 40" in out
    assert "resumed run ended at step 50" in out
    assert "50 steps in total" in out


def test_middleware(corpus: Path) -> None:
    """The bucket holds 4 requests and refills one an hour: the 5th and 6th are refused however slow the run
    (it is stopped after 10 minutes), where a bucket of 5 a second refilled on a loaded machine."""
    out = run_example("middleware.py", corpus, steps=20)
    assert "same text from the cache: True" in out
    assert "(cached)" in out  # the logger saw the cache hit
    assert "\n0 [busy" not in out and "\n1 [busy: rate limit exceeded" in out and "\n2 [busy: rate limit" in out
    assert "stream: " in out


def test_server(corpus: Path) -> None:
    out = run_example("server.py", corpus, steps=20)
    assert "models: ['tiny']" in out
    assert out.count("audit: req-") == 2  # the app's middleware saw each request, with the server's id
    assert "from 'alice'" in out
    assert "chat: '" in out and "stream: " in out
    assert out.count(" -> ") == 2  # the logger middleware, once per request, with the same id
    first_id = out.split("audit: ", 1)[1].split()[0]
    assert f"{first_id} generate " in out
    assert out.rstrip().endswith("server stopped")


def test_rag(hamlet: Path) -> None:
    out = run_example("rag.py", hamlet.parent / "macbeth.txt", steps=0)
    assert "ingest: 1 added, 0 unchanged, 0 failed" in out
    assert "again: 0 added, 1 unchanged" in out
    assert out.count("hit ") == 3 and "macbeth.txt" in out
    assert "answer: " in out and out.split("answer: ", 1)[1].strip()
    assert "[1] macbeth.txt chars " in out


def test_agent() -> None:
    try:
        from forge import models

        models.locate("smollm2")
    except Exception as e:
        pytest.skip(f"SmolLM2 is not installed: {e}")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "agent.py")], capture_output=True, text=True, timeout=600, env=os.environ
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "call   lookup({'topic': 'Eiffel Tower'})" in out
    assert "result The Eiffel Tower is 330 metres tall." in out
    assert out.count("answer ") == 1 and out.split("answer ", 1)[1].split("\n", 1)[0].strip()
    assert "done   after " in out


def test_the_corpus_ships_with_the_repository() -> None:
    """A fresh clone skipped 121 tests: the plays lived outside the repository, in ../shared/data."""
    plays = EXAMPLES / "data" / "shakespeare"
    used = ["hamlet", "macbeth", "julius_caesar", "tempest", "othello", "as_you_like_it"]  # tests, examples, README
    assert sorted(p.stem for p in plays.glob("*.txt")) == sorted(used)
    assert sum(p.stat().st_size for p in plays.glob("*.txt")) < 1_000_000  # small enough to ship
    readme = (EXAMPLES.parent / "README.md").read_text(encoding="utf-8")
    assert "../shared" not in readme and "forge rag add examples/data/shakespeare" in readme


def test_rag_fails_when_nothing_was_ingested(tmp_path: Path) -> None:
    """It printed an answer from an empty store and exited 0."""
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "rag.py"), str(tmp_path / "missing.txt")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "nothing was ingested" in proc.stderr and "Traceback" not in proc.stderr
    assert "answer:" not in proc.stdout
