"""``forge export``: a model for llama.cpp, Ollama (GGUF), transformers (HF folder), or onnxruntime and
transformers.js (ONNX folder)."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from forge import models
from forge.cli.commands import cli
from forge.cli.options import DtypeChoice
from forge.config import DTYPE_ALIASES, DTYPES
from forge.core.formats.onnx import ONNX_FILES

__all__ = ["export_cmd"]

#: What export writes, in the one dtype vocabulary's order.
EXPORT_DTYPES = tuple(d for d in DTYPES if any(d in dtypes for dtypes in models.EXPORT_FORMATS.values()))
_DEFAULTS = ", ".join(f"{d} for {f}" for f, d in models.DEFAULT_EXPORT_DTYPES.items())
_ALIASES = ", ".join(sorted(a for a, canonical in DTYPE_ALIASES.items() if canonical in EXPORT_DTYPES))


@cli.command("export")
@click.argument("model")
@click.option("--format", type=click.Choice(list(models.EXPORT_FORMATS)), required=True)
@click.option(
    "--dtype",
    type=DtypeChoice(EXPORT_DTYPES),
    default=None,
    help=f"Weights on disk (default: {_DEFAULTS}); q8_0, q4_0 and q4_1 are GGUF only, int8 and int4 ONNX only "
    f"(MatMulNBits in blocks of 32). ({_ALIASES} are accepted too.)",
)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="A .gguf file, or an HF or ONNX folder.")
def export_cmd(model: str, format: str, dtype: str | None, out: Path) -> None:
    """Write MODEL (a Forge checkpoint, GGUF file, HF folder or known name) as GGUF, an HF folder or an ONNX folder."""
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
