"""`forge export --format web` and `forge web`, without a browser: the folder, its errors, and the server.

(The browser runs the folders in test_web_browser.py.) onnxruntime-web is a stand-in package here, made of
small files named as onnxruntime-web 1.31 names them, so these tests need no npm.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from forge import models
from forge.config import ModelConfig
from forge.core.quantize import quantize_model
from forge.core.transformer import Transformer
from forge.errors import CheckpointError, ConfigError
from forge.tokenizer import Tokenizer
from forge.web import ORT_VERSION, default_web_dtype, export_web, find_onnxruntime_web, is_web_folder
from forge.web.serve import web_app
from helpers import run_cli

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def fake_ort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An onnxruntime-web package folder: the module names its WASM loader, which names the .wasm."""
    package = tmp_path_factory.mktemp("npm") / "node_modules" / "onnxruntime-web"
    dist = package / "dist"
    dist.mkdir(parents=True)
    (package / "package.json").write_text(json.dumps({"name": "onnxruntime-web", "version": "9.9.9"}))
    (dist / "ort.webgpu.min.mjs").write_text('import("./ort-wasm-simd-threaded.asyncify.mjs")')
    (dist / "ort-wasm-simd-threaded.asyncify.mjs").write_text('fetch("ort-wasm-simd-threaded.asyncify.wasm")')
    (dist / "ort-wasm-simd-threaded.asyncify.wasm").write_bytes(b"\0asm" + bytes(64))
    (dist / "ort.wasm.min.mjs").write_text('import("./ort-wasm-simd-threaded.mjs")')  # the plain WASM build
    (dist / "ort-wasm-simd-threaded.mjs").write_text('fetch("ort-wasm-simd-threaded.wasm")')
    (dist / "ort-wasm-simd-threaded.wasm").write_bytes(b"\0asm" + bytes(32))
    (dist / "ort-wasm-simd-threaded.jsep.wasm").write_bytes(b"\0asm")  # another build: not copied
    return package


@pytest.fixture(scope="module")
def tiny(small_config: Callable[..., ModelConfig], bpe_tokenizer: Tokenizer) -> Transformer:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    return Transformer(small_config("llama", vocab_size=models.padded_vocab(bpe_tokenizer.vocab_size))).eval()


@pytest.fixture(scope="module")
def folder(
    tmp_path_factory: pytest.TempPathFactory, tiny: Transformer, bpe_tokenizer: Tokenizer, fake_ort: Path
) -> Path:
    out = tmp_path_factory.mktemp("web") / "tiny-web"
    assert export_web(tiny, bpe_tokenizer, out, name="tiny", onnxruntime_web=fake_ort.parent) == out
    return out


def test_the_folder_holds_the_model_the_runtime_and_onnxruntime_web(
    folder: Path, tiny: Transformer, bpe_tokenizer: Tokenizer
) -> None:
    manifest = json.loads((folder / "web.json").read_text())
    assert manifest["format"] == "forge-web" and manifest["name"] == "tiny"
    assert manifest["dtype"] == "float32" and (folder / manifest["model"]).is_file()
    assert manifest["outputs"][0] == "logits" and len(manifest["outputs"]) == 1 + 2 * tiny.config.n_layer
    assert manifest["eos_token_ids"] == sorted(bpe_tokenizer.stop_ids)
    assert manifest["onnxruntime_web"]["version"] == "9.9.9"
    assert manifest["onnxruntime_web"]["module"] == "ort/ort.webgpu.min.mjs"
    assert manifest["onnxruntime_web"]["wasm_module"] == "ort/ort.wasm.min.mjs"
    assert sorted(p.name for p in (folder / "ort").iterdir()) == [
        "ort-wasm-simd-threaded.asyncify.mjs",
        "ort-wasm-simd-threaded.asyncify.wasm",
        "ort-wasm-simd-threaded.mjs",
        "ort-wasm-simd-threaded.wasm",
        "ort.wasm.min.mjs",
        "ort.webgpu.min.mjs",
    ]
    names = {p.name for p in folder.iterdir()}
    assert names >= {"index.html", "forge-web.js", "tokenizer.json", "tokenizer_config.json", "config.json"}
    vendor = json.loads((folder / "vendor" / "VERSIONS.json").read_text())
    for file, about in vendor.items():
        assert (folder / "vendor" / file).is_file() and about["version"] and about["license"]
    assert is_web_folder(folder) and not is_web_folder(folder / "onnx")
    assert [p.name for p in folder.parent.iterdir()] == ["tiny-web"]  # no temporary folder left


def test_without_a_local_onnxruntime_web_the_page_loads_the_pinned_cdn_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FORGE_ONNXRUNTIME_WEB", raising=False)
    ort = find_onnxruntime_web()
    assert ort.files == () and ort.source == "cdn"
    assert ort.module == f"https://cdn.jsdelivr.net/npm/onnxruntime-web@{ORT_VERSION}/dist/ort.webgpu.min.mjs"
    assert ort.wasm_module == f"https://cdn.jsdelivr.net/npm/onnxruntime-web@{ORT_VERSION}/dist/ort.wasm.min.mjs"


def test_a_bad_onnxruntime_web_path_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"--onnxruntime-web=.* is not an onnxruntime-web install"):
        find_onnxruntime_web(tmp_path)
    monkeypatch.setenv("FORGE_ONNXRUNTIME_WEB", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"\$FORGE_ONNXRUNTIME_WEB=.* is not an onnxruntime-web install"):
        find_onnxruntime_web()


def test_a_small_model_defaults_to_float32_and_a_large_one_to_int8(tiny: Transformer) -> None:
    assert default_web_dtype(tiny) == "float32"
    big = Transformer(tiny.config.replace(d_model=1024, n_head=8, n_kv_head=4, vocab_size=32768))
    assert default_web_dtype(big) == "int8"
    # A quantized model (a GGUF's blocks) keeps quantized weights, however small: SmolLM2's int4 weights hold
    # 135M values, a 540 MB float32 file, though its float parameters alone are a few MB.
    small = copy.deepcopy(tiny)
    quantize_model(small, "int4")
    assert default_web_dtype(small) == "int8"


def test_bad_exports_are_refused_and_leave_nothing(
    tiny: Transformer, bpe_tokenizer: Tokenizer, small_config: Callable[..., ModelConfig], tmp_path: Path
) -> None:
    with pytest.raises(CheckpointError, match=r"parent folder .*missing.* does not exist; create it first"):
        export_web(tiny, bpe_tokenizer, tmp_path / "missing" / "web")
    with pytest.raises(ConfigError, match="web export dtype='q4_0' is not supported; use one of float32, int8"):
        export_web(tiny, bpe_tokenizer, tmp_path / "web", dtype="q4_0")
    vocab = models.padded_vocab(bpe_tokenizer.vocab_size)
    odd = Transformer(small_config("llama", vocab_size=vocab, norm="layernorm"))  # RoPE with LayerNorm
    with pytest.raises(ConfigError, match="ONNX export can't handle this architecture"):
        export_web(odd, bpe_tokenizer, tmp_path / "web")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="Forge did not write"):
        export_web(tiny, bpe_tokenizer, tmp_path / "mine")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary folder left


def test_the_server_sends_wasm_and_modules_with_their_types_and_isolation(folder: Path, tmp_path: Path) -> None:
    client = TestClient(web_app(folder))
    page = client.get("/")
    assert page.status_code == 200 and "window.forge" in page.text
    wasm = client.get("/ort/ort-wasm-simd-threaded.asyncify.wasm")
    assert wasm.headers["content-type"] == "application/wasm"
    module = client.get("/ort/ort.webgpu.min.mjs")
    assert module.headers["content-type"] == "text/javascript"
    assert module.headers["cross-origin-opener-policy"] == "same-origin"
    assert module.headers["cross-origin-embedder-policy"] == "require-corp"
    with pytest.raises(ConfigError, match="is not a web folder"):
        web_app(tmp_path)


def test_forge_web_serves_a_folder_and_prints_its_url(folder: Path) -> None:
    env = os.environ | {"NO_COLOR": "1", "COLUMNS": "400"}
    cmd = [sys.executable, "-m", "forge", "web", str(folder), "--port", "0"]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as server:
        try:
            line = server.stdout.readline() if server.stdout else ""
            assert line.startswith(f"serving {folder} at http://127.0.0.1:"), line
            url = line.split(" at ")[1].split()[0]
            with urllib.request.urlopen(f"{url}web.json", timeout=30) as response:
                assert json.loads(response.read())["format"] == "forge-web"
        finally:
            server.terminate()
            server.wait(timeout=30)


def test_forge_web_and_export_errors_are_one_line(
    folder: Path, tiny: Transformer, bpe_tokenizer: Tokenizer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(["web", str(folder), "--dtype", "int8"], capsys)
    assert code != 0 and "already a web folder" in err and "Traceback" not in err
    models.save(tmp_path / "ckpt", tiny, bpe_tokenizer)
    code, _, err = run_cli(["export", tmp_path / "ckpt", "--format", "web", "--out", tmp_path / "no" / "web"], capsys)
    assert code != 0 and "does not exist; create it first" in err and "Traceback" not in err
    code, _, err = run_cli(["web", tmp_path / "ckpt", "--onnxruntime-web", tmp_path], capsys)
    assert code != 0 and "is not an onnxruntime-web install" in err
