"""`forge rag add | ask | ls | rm` in-process: real store, real embedder, SmolLM2 answering offline."""

from __future__ import annotations

from pathlib import Path

import pytest

from forge import models
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
    code, out, err = run_cli(["rag", "add", tmp_path / "missing", "--db", db], capsys)
    assert code == 1 and "missing" in out


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
