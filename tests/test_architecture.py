"""The layers of docs/ARCHITECTURE.md hold: imports point one way (import-linter)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_layers_point_one_way() -> None:
    exe = Path(sys.executable).with_name("lint-imports")
    cmd = str(exe) if exe.exists() else shutil.which("lint-imports")
    if cmd is None:
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    proc = subprocess.run([cmd, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 kept, 0 broken" in proc.stdout


def test_importing_forge_has_no_side_effects() -> None:
    """No torch flags flipped, no threads started, nothing written at import."""
    code = (
        "import threading, torch; before = (torch.get_num_threads(), torch.backends.cudnn.benchmark, "
        "threading.active_count()); import forge; "
        "after = (torch.get_num_threads(), torch.backends.cudnn.benchmark, threading.active_count()); "
        "assert before == after, (before, after)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
