"""A crash mid-ingest (SIGKILL) leaves the store consistent, and a re-run completes it."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

PLAYS = ["macbeth.txt", "tempest.txt", "julius_caesar.txt", "othello.txt"]


def _consistent(db: Path) -> dict[str, int]:
    """Every recorded source has exactly its chunks; no chunk belongs to an unrecorded source."""
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        recorded = dict(conn.execute("SELECT source, chunks FROM sources").fetchall())
        actual = dict(conn.execute("SELECT source, COUNT(*) FROM chunks GROUP BY source").fetchall())
    assert actual == {s: n for s, n in recorded.items() if n}, (recorded, actual)
    return recorded


def test_sigkill_mid_ingest_then_rerun(tmp_path: Path, shakespeare_dir: Path) -> None:
    docs = tmp_path / "plays"
    docs.mkdir()
    for name in PLAYS:
        shutil.copy(shakespeare_dir / name, docs / name)
    db = tmp_path / "s.db"
    cmd = [sys.executable, "-m", "forge", "rag", "add", str(docs), "--db", str(db)]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=os.environ | {"NO_COLOR": "1"})
    deadline = time.monotonic() + 240
    recorded: dict[str, int] = {}
    while time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.2)
        if db.exists():
            try:
                recorded = _consistent(db)  # readers work while the writer ingests
            except sqlite3.OperationalError:  # the schema is still being created
                continue
            if len(recorded) >= 2:
                break
    if child.poll() is not None:
        pytest.fail(f"the ingest ended before it could be killed:\n{child.stdout.read().decode()}")  # type: ignore[union-attr]
    child.send_signal(signal.SIGKILL)  # no cleanup, no atexit: as a power cut would
    child.wait()
    survived = _consistent(db)  # whole sources only: the one being written when killed is gone entirely
    assert 2 <= len(survived) < len(PLAYS)

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    done = _consistent(db)
    assert sorted(Path(s).name for s in done) == sorted(PLAYS)
    assert f"{len(PLAYS) - len(survived)} added, {len(survived)} unchanged, 0 failed" in rerun.stdout
