"""``forge export``: a model for llama.cpp, Ollama (GGUF), transformers (HF folder), onnxruntime and
transformers.js (ONNX folder), or a browser page (web folder: :mod:`forge.web.export`)."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console

from forge import models
from forge.cli.commands import cli
from forge.cli.options import DtypeChoice
from forge.config import DTYPE_ALIASES, DTYPES
from forge.core.formats.onnx import ONNX_FILES
from forge.web import export_web

__all__ = ["export_cmd"]

#: What export writes, in the one dtype vocabulary's order.
EXPORT_DTYPES = tuple(d for d in DTYPES if any(d in dtypes for dtypes in models.EXPORT_FORMATS.values()))
_DEFAULTS = ", ".join(f"{d} for {f}" for f, d in models.DEFAULT_EXPORT_DTYPES.items())
_ALIASES = ", ".join(sorted(a for a, canonical in DTYPE_ALIASES.items() if canonical in EXPORT_DTYPES))


@cli.command("export")
@click.argument("model")
@click.option("--format", type=click.Choice([*models.EXPORT_FORMATS, "web"]), required=True)
@click.option(
    "--dtype",
    type=DtypeChoice(EXPORT_DTYPES),
    default=None,
    help=f"Weights on disk (default: {_DEFAULTS}; web: float32 for a model under 100 MB, else int8); "
    "q8_0, q4_0 and q4_1 are GGUF only, int8 and int4 ONNX and web only "
    f"(MatMulNBits in blocks of 32). ({_ALIASES} are accepted too.)",
)
@click.option(
    "--out", type=click.Path(path_type=Path), required=True, help="A .gguf file, or an HF, ONNX or web folder."
)
@click.option(
    "--onnxruntime-web",
    "ort",
    type=click.Path(path_type=Path),
    default=None,
    help="web: an onnxruntime-web npm install to copy into the folder (default: $FORGE_ONNXRUNTIME_WEB, else "
    "./node_modules/onnxruntime-web, else the page loads it from the jsDelivr CDN).",
)
def export_cmd(model: str, format: str, dtype: str | None, out: Path, ort: Path | None) -> None:
    """Write MODEL (a Forge checkpoint, GGUF file, HF folder or known name) as GGUF, or an HF, ONNX or web folder."""
    if format == "web":
        _export_web(model, dtype, out, ort)
        return
    dtype = dtype or models.DEFAULT_EXPORT_DTYPES[format]
    loaded = models.load(model)
    path = models.export(loaded.model, loaded.tokenizer, out, format=format, dtype=dtype, name=Path(model).stem)
    size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    if format == "gguf":
        use = f"llama-cli -m {path}"
    elif format == "onnx":
        use = f"onnxruntime.InferenceSession({str(path / ONNX_FILES[dtype][0])!r}), or transformers.js"
    else:
        use = f"AutoModelForCausalLM.from_pretrained({str(path)!r})"
    Console(highlight=False).print(f"wrote [bold]{path}[/] ({size / 1e6:.1f} MB, {format} {dtype}); try: {use}")


def _export_web(model: str, dtype: str | None, out: Path, ort: Path | None) -> None:
    loaded = models.load(model)
    path = export_web(loaded.model, loaded.tokenizer, out, dtype=dtype, name=Path(model).stem, onnxruntime_web=ort)
    manifest = json.loads((path / "web.json").read_text(encoding="utf-8"))
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    source = manifest["onnxruntime_web"]
    where = (
        f"onnxruntime-web {source['version']} copied from {source['source']}"
        if source["source"] != "cdn"
        else f"onnxruntime-web {source['version']} from the CDN (the page needs the internet; pass "
        "--onnxruntime-web node_modules/onnxruntime-web to put it in the folder)"
    )
    Console(highlight=False).print(
        f"wrote [bold]{path}[/] ({size / 1e6:.1f} MB, web {manifest['dtype']}, {where}); try: forge web {path}"
    )
