"""Shared helpers for benchmarks: hardware/commit record and device sync."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# FORGE_SHAKESPEARE: where the corpus is not beside the checkout (a device machine).
SHAKESPEARE = Path(os.environ.get("FORGE_SHAKESPEARE") or ROOT.parent / "shared" / "data" / "shakespeare")


def environment(device: torch.device) -> dict[str, object]:
    # FORGE_COMMIT: where the checkout's git metadata is stale (a copied working tree).
    commit = os.environ.get("FORGE_COMMIT") or _git_commit()
    env: dict[str, object] = {
        "commit": commit,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def save_result(name: str, out: dict[str, object]) -> None:
    """Print ``out`` as JSON and save it as benchmarks/results/<name>.json."""
    text = json.dumps(out, indent=2)
    print(text)
    dest = ROOT / "benchmarks" / "results"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"{name}.json").write_text(text + "\n")


def save_gpu_result(name: str, out: dict[str, object]) -> None:
    """``save_result`` under <name>_<GPU name>.json."""
    save_result(f"{name}_{torch.cuda.get_device_name().replace(' ', '_')}", out)


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
