"""The red-team harness's fast slice: hostile bodies, slow clients, heavy schemas and kill -9s, end to end.

`benchmarks/redteam.py --quick` runs real `forge serve` and `forge train`
processes; this test holds it to counts (no 5xx, no hang, every slow client
closed, the server alive, every kill survived). The long runs are the same script
without --quick; their figures are in benchmarks/results/redteam_cpu.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "redteam.py"


@pytest.mark.slow
def test_redteam_quick_slice(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, timeout=900, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout[run.stdout.index("{") :])
    fuzz, slow, heavy, kills = report["fuzz"], report["slowloris"], report["heavy"], report["kills"]
    assert fuzz["5xx"] == 0, fuzz["5xx_examples"]
    assert fuzz["hangs"] == 0
    assert sum(fuzz["statuses"].values()) == fuzz["requests"]
    assert "400" in fuzz["statuses"]  # the hostile shapes were refused, not all waved through
    assert slow["closed_by_server"] == slow["slow_clients"] - slow["connect_refused"]
    assert slow["health_failures"] == 0 and slow["health_polls"] > 0
    assert heavy["health_failures"] == 0
    assert all(code == 200 for code in heavy["schema_statuses"]), heavy
    assert report["server_alive"] is True
    assert kills["corrupt"] == 0
    assert kills["checkpoint_loads_after_kill"] == kills["kills"] - kills["killed_before_first_save"]
    assert kills["killed_before_first_save"] == 0
    assert kills["resume_exit_code"] == 0
