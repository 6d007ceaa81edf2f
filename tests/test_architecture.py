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


def test_loading_models_does_not_import_the_compiler() -> None:
    """torch._dynamo (and Triton with it) costs about a second at import, and Triton reads TRITON_INTERPRET
    when imported: the model code applies torch.compiler.disable where it is called, never at import."""
    code = (
        "import sys, forge, forge.core.transformer, forge.models, forge.app, forge.server; "
        "loaded = [m for m in ('torch._dynamo', 'triton') if m in sys.modules]; assert not loaded, loaded"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
