"""``forge export --format web``: a static folder that runs the model in a browser page.

The folder is the ONNX folder of :mod:`forge.core.formats.onnx` (transformers.js loads it as is) plus::

    web.json        what forge-web.js needs: the model file, bos / eos, context length, onnxruntime-web's place
    forge-web.js    the runtime: an ES module on onnxruntime-web (WebGPU when the browser has an adapter, else
                    WASM), a KV cache, greedy and seeded sampling, token-by-token streaming
    index.html      a chat page that streams replies and says which provider runs it; it sets ``window.forge``
    vendor/         @huggingface/tokenizers and @huggingface/jinja (chat templates), with their licences
    ort/            onnxruntime-web's WebGPU build (about 29 MB) and its plain WASM build (about 15 MB, faster on
                    the WASM provider), when a local copy was found

onnxruntime-web is ~44 MB of WASM, too big for Forge's wheel, so the export copies it from a local npm install
(``--onnxruntime-web DIR``, ``$FORGE_ONNXRUNTIME_WEB``, or ``./node_modules/onnxruntime-web``); without one the
page loads the pinned version from the jsDelivr CDN, and the export says so. The tokenizer and template packages
are small and ship inside Forge (``forge/web/assets/vendor``, versions in ``VERSIONS.json``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from forge import models
from forge.core.checkpoint import atomic_directory, write_durably
from forge.core.formats.onnx import ONNX_FILES
from forge.core.formats.onnx_graph import output_names
from forge.core.quantize import QuantizedWeight
from forge.core.transformer import Transformer
from forge.errors import CheckpointError, ConfigError
from forge.tokenizer import Tokenizer

__all__ = [
    "ORT_ENV",
    "ORT_VERSION",
    "OnnxruntimeWeb",
    "default_web_dtype",
    "export_web",
    "find_onnxruntime_web",
    "is_web_folder",
]

#: The onnxruntime-web the runtime is written and tested against; the CDN URL pins it.
ORT_VERSION = "1.31.1"
#: An onnxruntime-web package folder (or a node_modules holding one) to copy into the export.
ORT_ENV = "FORGE_ONNXRUNTIME_WEB"
_ORT_MODULE = "ort.webgpu.min.mjs"
#: onnxruntime-web's plain WASM build, for the WASM provider: without the asyncify instrumentation that the WebGPU
#: build's binary needs, it runs SmolLM2's decode step in 230 ms where that one takes 280 (one thread, Chromium).
_ORT_WASM_MODULE = "ort.wasm.min.mjs"
_CDN = "https://cdn.jsdelivr.net/npm/onnxruntime-web@{version}/dist/"
_MANIFEST = "web.json"
_FORMAT = "forge-web"
_ASSETS = ("forge-web.js", "index.html")
#: A float32 model file above this gets int8 weights by default (SmolLM2-135M: 540 MB -> about 190 MB).
_FLOAT32_LIMIT = 100_000_000


@dataclass(frozen=True)
class OnnxruntimeWeb:
    """Where the page gets onnxruntime-web: ``files`` to copy into ort/ (empty: the CDN URLs).

    ``module`` is the WebGPU build (it runs WASM too); ``wasm_module``, when there is one, the plain WASM build
    that the runtime loads for the WASM provider because it is faster there.
    """

    version: str
    module: str
    files: tuple[Path, ...] = ()
    source: str = "cdn"
    wasm_module: str | None = None


def default_web_dtype(model: Transformer) -> str:
    """int8 for a quantized model (a GGUF's blocks, kept) or one whose float32 file would pass 100 MB, when its
    widths allow blocks of 32; else float32."""
    cfg = model.config
    quantized = any(isinstance(m, QuantizedWeight) for m in model.modules())
    large = quantized or 4 * sum(p.numel() for p in model.parameters()) > _FLOAT32_LIMIT
    return "int8" if large and cfg.d_model % 32 == 0 and cfg.ff_dim % 32 == 0 else "float32"


def _package_dir(path: Path) -> Path | None:
    """The onnxruntime-web package folder at ``path``: the package itself, its dist/, or a node_modules above it."""
    for candidate in (path, path.parent, path / "onnxruntime-web", path / "node_modules" / "onnxruntime-web"):
        if (candidate / "dist" / _ORT_MODULE).is_file() and (candidate / "package.json").is_file():
            return candidate
    return None


def find_onnxruntime_web(given: str | os.PathLike[str] | None = None) -> OnnxruntimeWeb:
    """onnxruntime-web from ``given``, else ``$FORGE_ONNXRUNTIME_WEB``, else ./node_modules; else the pinned CDN."""
    named = given if given is not None else os.environ.get(ORT_ENV)
    if named:
        package = _package_dir(Path(named).expanduser().resolve())
        if package is None:
            where = "--onnxruntime-web" if given is not None else f"${ORT_ENV}"
            raise ConfigError(
                f"{where}={str(named)!r} is not an onnxruntime-web install (no dist/{_ORT_MODULE} there); point it "
                "at node_modules/onnxruntime-web after `npm install onnxruntime-web`, or leave it out to load "
                "onnxruntime-web from the CDN"
            )
    else:
        package = _package_dir(Path.cwd() / "node_modules")
        if package is None:
            cdn = _CDN.format(version=ORT_VERSION)
            return OnnxruntimeWeb(ORT_VERSION, cdn + _ORT_MODULE, wasm_module=cdn + _ORT_WASM_MODULE)
    dist = package / "dist"
    # _package_dir saw the WebGPU build; the plain WASM one is optional (the WebGPU build runs WASM too).
    modules = [_ORT_MODULE] + ([_ORT_WASM_MODULE] if (dist / _ORT_WASM_MODULE).is_file() else [])
    wasm = _wasm_files(dist, modules)
    missing = [f for f in wasm if not (dist / f).is_file()]
    if not wasm or missing:
        raise ConfigError(
            f"the onnxruntime-web install at {str(package)!r} lacks its WASM files "
            f"({', '.join(missing) or 'none named'}); reinstall it with `npm install onnxruntime-web`"
        )
    version = json.loads((package / "package.json").read_text(encoding="utf-8")).get("version", "unknown")
    files = (*(dist / m for m in modules), *(dist / f for f in wasm), package / "LICENSE")
    plain = f"ort/{_ORT_WASM_MODULE}" if _ORT_WASM_MODULE in modules else None
    return OnnxruntimeWeb(version, f"ort/{_ORT_MODULE}", tuple(f for f in files if f.is_file()), str(package), plain)


def _wasm_files(dist: Path, modules: list[str]) -> list[str]:
    """The WASM builds' files the modules load: each one's .mjs (named in the module) and the .wasm it names."""
    pattern = re.compile(r"ort-wasm-simd-threaded[a-z.]*\.(?:mjs|wasm)")
    found: set[str] = set()
    todo = list(modules)
    while todo:
        path = dist / todo.pop()
        if path.suffix != ".mjs" or not path.is_file():
            continue
        for name in set(pattern.findall(path.read_text(encoding="utf-8", errors="replace"))) - found:
            found.add(name)
            todo.append(name)
    return sorted(found)


def is_web_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder ``forge export --format web`` wrote."""
    try:
        manifest = json.loads((Path(path) / _MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == _FORMAT


def export_web(
    model: Transformer,
    tokenizer: Tokenizer,
    out: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    name: str = "forge-model",
    onnxruntime_web: str | os.PathLike[str] | None = None,
) -> Path:
    """Write ``model`` as a web folder at ``out`` (see the module docstring), atomically; returns ``out``.

    ``dtype`` is float32, int8 or int4 (default: :func:`default_web_dtype`). ``out``'s parent must exist; a web
    folder Forge wrote there before is replaced, any other non-empty folder is refused.

    >>> export_web(loaded.model, loaded.tokenizer, "smol-web", dtype="int8")  # doctest: +SKIP
    PosixPath('smol-web')
    """
    target = Path(out)
    if not target.parent.is_dir():
        raise CheckpointError(
            f"cannot write the web folder {str(target)!r}: its parent folder {str(target.parent)!r} does not "
            "exist; create it first or choose another path"
        )
    dtype = dtype or default_web_dtype(model)
    if dtype not in models.EXPORT_FORMATS["onnx"]:
        raise ConfigError(
            f"web export dtype={dtype!r} is not supported; use one of {', '.join(models.EXPORT_FORMATS['onnx'])}",
            field="dtype",
        )
    ort = find_onnxruntime_web(onnxruntime_web)
    with atomic_directory(target, marker=_MANIFEST, owned=is_web_folder, what="web folder") as tmp:
        onnx_dir = models.export(model, tokenizer, tmp / "onnx-export", format="onnx", dtype=dtype, name=name)
        for entry in onnx_dir.iterdir():
            entry.rename(tmp / entry.name)
        onnx_dir.rmdir()
        _copy_assets(tmp, ort)
        manifest = _manifest(model, tokenizer, dtype, name, ort)
        write_durably(tmp / _MANIFEST, json.dumps(manifest, indent=2).encode())  # last: the folder is complete
    return target


def _copy_assets(folder: Path, ort: OnnxruntimeWeb) -> None:
    assets = resources.files("forge.web") / "assets"
    for name in _ASSETS:
        write_durably(folder / name, (assets / name).read_bytes())
    (folder / "vendor").mkdir()
    for entry in (assets / "vendor").iterdir():
        write_durably(folder / "vendor" / entry.name, entry.read_bytes())
    if ort.files:
        (folder / "ort").mkdir()
        for file in ort.files:
            shutil.copyfile(file, folder / "ort" / file.name)


def _manifest(model: Transformer, tokenizer: Tokenizer, dtype: str, name: str, ort: OnnxruntimeWeb) -> dict[str, Any]:
    return {
        "format": _FORMAT,
        "name": name,
        "dtype": dtype,
        "model": ONNX_FILES[dtype][0],
        "outputs": output_names(model.config.n_layer),
        "context_length": model.config.context_length,
        "bos_token_id": tokenizer.bos_id,
        "add_bos": bool(tokenizer.add_bos),
        "eos_token_ids": sorted(tokenizer.stop_ids),  # what ends a generation in Python too
        "special_tokens": {"bos_token": tokenizer.bos or "", "eos_token": tokenizer.eos or ""},
        "onnxruntime_web": {
            "version": ort.version,
            "module": ort.module,
            "wasm_module": ort.wasm_module,  # None: the WebGPU build runs WASM too
            "source": ort.source,
        },
    }
