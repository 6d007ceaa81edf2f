"""Helpers of the web tests: a static server in a thread, headless Chromium through browser.mjs, and PyTorch's
answers on the weights an export holds."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import uvicorn

from forge import models
from forge.core.formats.onnx_quant import blocks_of
from forge.core.quantize import dequantize_model
from forge.core.transformer import Transformer
from forge.tokenizer import Tokenizer

HERE = Path(__file__).resolve().parent
CHROMIUM = Path(os.environ.get("FORGE_CHROMIUM", "/usr/bin/chromium"))
ORT = HERE / "node_modules" / "onnxruntime-web"
#: Seconds one browser run may take: SwiftShader runs WebGPU on the CPU, slowly.
BROWSER_TIMEOUT = 900


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """Serve the ASGI ``app`` on a free port of 127.0.0.1 in a thread; yields its URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the static server did not start")
        threading.Event().wait(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def browse(
    url: str, steps: list[dict[str, Any]], *, webgpu: bool = True, timeout: float = BROWSER_TIMEOUT
) -> list[Any]:
    """Open ``url`` in headless Chromium and run ``steps`` (see browser.mjs); returns each step's result.
    ``webgpu=False`` leaves out --enable-unsafe-webgpu: the browser then has no WebGPU adapter."""
    job = {"url": url, "steps": steps, "chromium": str(CHROMIUM), "timeout_ms": int(timeout * 1000), "webgpu": webgpu}
    try:
        done = subprocess.run(
            ["node", str(HERE / "browser.mjs")],
            input=json.dumps(job),
            capture_output=True,
            text=True,
            timeout=timeout + 60,
            cwd=HERE,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"headless Chromium ran past {timeout} s on {url}")
    try:
        out = json.loads(done.stdout)
    except ValueError:
        pytest.fail(f"browser.mjs failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    if "error" in out:
        pytest.fail(f"the page failed: {out['error']}\nconsole:\n" + "\n".join(out["console"][-30:]))
    return out["results"]


def reference_model(model: Transformer, dtype: str) -> Transformer:
    """Forge's model on the weights a ``dtype`` web export holds (as tests/core/test_onnx_export.py rebuilds them):
    every block's matmul weight as its blocks, the head (and the embedding tied to it) int8."""
    ref = copy.deepcopy(model).float().eval()
    if dtype == "float32":
        return ref
    dequantize_model(ref)
    state = models._export_weights(model)
    bits = 8 if dtype == "int8" else 4
    with torch.no_grad():
        for name, param in ref.named_parameters():
            if name.startswith("blocks.") and name.endswith(".weight") and param.dim() == 2:
                param.copy_(blocks_of(state[name], bits).dequantize())
        ref.lm_head.weight.copy_(blocks_of(state["lm_head.weight"], 8).dequantize())
    return ref


def greedy(model: Transformer, ids: list[int], steps: int, stop: frozenset[int]) -> list[int]:
    """PyTorch's greedy continuation of ``ids``: the whole sequence each step, stopping at an end token."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(torch.tensor([seq]))[0, -1].argmax())
            if token in stop:
                break
            seq.append(token)
    return seq[len(ids) :]


class Exported:
    """A model, its tokenizer, its web folder and the PyTorch model on the folder's weights."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, folder: Path, dtype: str) -> None:
        self.model, self.tokenizer, self.folder, self.dtype = model, tokenizer, folder, dtype
        self.reference = reference_model(model, dtype)

    def top_tokens(self, ids: list[int]) -> list[int]:
        with torch.no_grad():
            return self.reference(torch.tensor([ids]))[0].argmax(-1).tolist()

    def greedy(self, ids: list[int], steps: int) -> list[int]:
        return greedy(self.reference, ids, steps, self.tokenizer.stop_ids)


def agreement(got: list[int], expected: list[int]) -> float:
    """The share of positions where two top-1 lists agree."""
    assert len(got) == len(expected)
    return sum(a == b for a, b in zip(got, expected, strict=True)) / len(expected)
