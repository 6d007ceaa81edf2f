"""`forge rag add | ask | ls | rm` in-process: real store, real embedder, SmolLM2 answering offline."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from forge import models
from forge.cli.rag import IngestDisplay
from forge.errors import StoreError
from forge.rag.retrieval import IngestProgress, Rag
from forge.rag.store import SqliteStore
from helpers import run_cli


@pytest.fixture
def notes(tmp_path: Path) -> Path:
    root = tmp_path / "notes"
    root.mkdir()
    (root / "launch.md").write_text("The Apollo-X launch is scheduled for March 14 at Cape Canaveral.\n")
    (root / "menu.txt").write_text("The cafeteria serves tomato soup on Fridays.\n")
    (root / "broken.txt").write_bytes(b"\xff\xfe\xfa not utf-8")
    return root


def test_add_ls_rm(tmp_path: Path, notes: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "s.db"
    code, out, _ = run_cli(["rag", "add", notes, "--db", db], capsys)
    assert code == 0, out
    assert "2 added, 0 unchanged, 1 failed" in out and "broken.txt" in out
    code, out, _ = run_cli(["rag", "add", notes, "--db", db], capsys)
    assert "0 added, 2 unchanged" in out
    code, out, _ = run_cli(["rag", "ls", "--db", db], capsys)
    assert code == 0 and "launch.md" in out and "2 sources" in out
    code, out, _ = run_cli(["rag", "rm", notes / "menu.txt", "--db", db], capsys)
    assert code == 0 and "removed" in out
    code, out, _ = run_cli(["rag", "ls", "--db", db], capsys)
    assert "1 sources" in out and "menu.txt" not in out


def test_errors_are_one_line_and_non_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["rag", "ask", "anything", "--db", tmp_path / "none.db"], capsys)
    assert code == 8 and "no store at" in err and "forge rag add" in err and "Traceback" not in err
    code, _, err = run_cli(["rag", "ls", "--db", tmp_path / "none.db"], capsys)
    assert code == 8 and "no store at" in err
    db = tmp_path / "s.db"
    (tmp_path / "a.txt").write_text("hello there")
    run_cli(["rag", "add", tmp_path / "a.txt", "--db", db], capsys)
    code, _, err = run_cli(["rag", "rm", "nope.txt", "--db", db], capsys)
    assert code == 8 and "not in the store: nope.txt" in err
    code, _, err = run_cli(["rag", "add", tmp_path / "missing", "--db", db], capsys)
    assert code == 3 and "nothing to add: no such file or folder" in err and "missing" in err


def test_ask_answers_with_sources(tmp_path: Path, notes: Path, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        models.locate("smollm2")
    except Exception as e:
        pytest.skip(f"SmolLM2 is not installed: {e}")
    db = tmp_path / "s.db"
    run_cli(["rag", "add", notes, "--db", db], capsys)
    code, out, err = run_cli(["rag", "ask", "When is the Apollo-X launch?", "--db", db, "--k", "2",
                              "--max-tokens", "40"], capsys)  # fmt: skip
    assert code == 0, err
    answer, _, sources = out.partition("\nsources\n") if "\nsources\n" in out else out.partition("\nretrieved\n")
    assert answer.strip() and sources
    assert "[1]" in sources and "launch.md" in sources.splitlines()[0]


def test_the_same_commands_on_postgres(postgres_url: str, notes: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["rag", "add", notes, "--db", postgres_url], capsys)
    assert code == 0 and "2 added" in out
    code, out, _ = run_cli(["rag", "ls", "--db", postgres_url], capsys)
    assert code == 0 and "2 sources" in out and "menu.txt" in out
    code, out, _ = run_cli(["rag", "rm", notes / "menu.txt", "--db", postgres_url], capsys)
    assert code == 0 and "removed" in out


# Hostile input and bad luck (issue 14); the fake embedder, as these need vectors, not meaning.


def test_a_missing_path_leaves_no_database_behind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "new.db"
    code, _, err = run_cli(["rag", "add", tmp_path / "missingdir", "--db", db], capsys)
    assert code == 3 and "nothing to add" in err and "missingdir" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not db.exists()


def test_a_failed_first_ingest_leaves_no_database_behind(
    tmp_path: Path, fake_embedder: object, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "broken.txt").write_bytes(b"\xff\xfe not utf-8")
    db = tmp_path / "new.db"
    code, out, _ = run_cli(["rag", "add", tmp_path / "broken.txt", "--db", db], capsys)
    assert code == 1 and "0 added, 0 unchanged, 1 failed" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.txt"]  # no db, -wal or -shm


def test_names_with_control_characters_cannot_forge_output(
    tmp_path: Path, fake_embedder: object, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "evil\n     9 chunks  forged.txt").write_text("a note about launches")
    (docs / "\x1b[2Jclear.md").write_text("another note")
    db = tmp_path / "s.db"
    code, out, _ = run_cli(["rag", "add", docs, "--db", db], capsys)
    assert code == 0 and "\x1b" not in out
    code, out, _ = run_cli(["rag", "ls", "--db", db], capsys)
    assert code == 0 and "\x1b" not in out
    lines = out.splitlines()
    assert len(lines) == 3 and lines[-1] == "2 sources, 2 chunks"  # one line per source, however it is named
    assert any(line.endswith("\\x1b[2Jclear.md") for line in lines)
    assert any(line.endswith("evil\\n     9 chunks  forged.txt") for line in lines)


def test_progress_lines_when_stdout_is_not_a_terminal(
    tmp_path: Path, fake_embedder: object, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(3):
        (docs / f"{i}.txt").write_text(f"note number {i}")
    code, out, _ = run_cli(["rag", "add", docs, "--db", tmp_path / "s.db"], capsys)
    assert code == 0
    progress = [line for line in out.splitlines() if line.startswith("ingest: ")]
    assert progress[0].startswith("ingest: 0/3 files, 0.txt (0/1 chunks embedded), 0m")  # at once, not at the end
    assert progress[-1].startswith("ingest: 3/3 files, 2.txt, 0m")
    assert out.rstrip().endswith("3 added, 0 unchanged, 0 failed; 3 chunks stored, 0 duplicates dropped")


def test_plain_progress_is_periodic_and_the_terminal_shows_files_done() -> None:
    out = io.StringIO()
    now = [0.0]
    display = IngestDisplay(Console(file=out, width=200), interval=10.0, clock=lambda: now[0])
    with display:
        for second in range(25):
            now[0] = float(second)
            display(IngestProgress(second // 5, 5, f"{second // 5}.txt", second % 5, 5))
        display(IngestProgress(5, 5, "4.txt"))
    assert out.getvalue().splitlines() == [
        "ingest: 0/5 files, 0.txt (0/5 chunks embedded), 0m00s",
        "ingest: 2/5 files, 2.txt (0/5 chunks embedded), 0m10s",
        "ingest: 4/5 files, 4.txt (0/5 chunks embedded), 0m20s",
        "ingest: 5/5 files, 4.txt, 0m24s",
    ]
    terminal = io.StringIO()
    with IngestDisplay(Console(file=terminal, force_terminal=True, width=120)) as display:
        display(IngestProgress(1, 3, "a.txt", 64, 128))
        display(IngestProgress(3, 3, "c.txt"))
    assert "3/3" in terminal.getvalue() and "files" in terminal.getvalue()


def test_a_full_disk_fails_cleanly_and_keeps_what_was_stored(
    tmp_path: Path, fake_embedder: object, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "s.db"
    (tmp_path / "small.txt").write_text("a small note")
    assert run_cli(["rag", "add", tmp_path / "small.txt", "--db", db], capsys)[0] == 0
    opened = SqliteStore.__init__

    def tiny_disk(self: SqliteStore, path: object) -> None:
        opened(self, path)
        pages = self._db.execute("PRAGMA page_count").fetchone()[0]
        self._db.execute(f"PRAGMA max_page_count = {pages + 2}")  # the disk fills a few pages on

    monkeypatch.setattr(SqliteStore, "__init__", tiny_disk)
    big = tmp_path / "big.txt"
    big.write_text("\n\n".join(f"paragraph {i} " + "words " * 100 for i in range(200)))
    code, out, err = run_cli(["rag", "add", big, "--db", db], capsys)
    assert code == 8 and "database or disk is full" in err and "free some disk space" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    monkeypatch.undo()
    code, out, _ = run_cli(["rag", "ls", "--db", db], capsys)
    assert code == 0 and "small.txt" in out and "big.txt" not in out and "1 sources, 1 chunks" in out


def test_a_db_path_that_is_not_a_store_is_never_overwritten(
    tmp_path: Path, fake_embedder: object, capsys: pytest.CaptureFixture[str]
) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("my precious notes\n")
    code, _, err = run_cli(["rag", "add", notes, "--db", notes], capsys)
    assert code == 8 and "not a Forge store" in err and "won't overwrite it" in err
    assert notes.read_text() == "my precious notes\n"
    with pytest.raises(StoreError, match="not a SQLite file"):
        Rag(notes)
    assert notes.read_text() == "my precious notes\n"
