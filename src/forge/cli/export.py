"""``forge export``: a model for llama.cpp, Ollama (GGUF) or transformers (HF folder)."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from forge import models
from forge.cli.commands import cli
from forge.cli.options import dtype_option
from forge.config import DTYPES

__all__ = ["export_cmd"]

#: What export writes, in the one dtype vocabulary's order.
EXPORT_DTYPES = tuple(d for d in DTYPES if any(d in dtypes for dtypes in models.EXPORT_FORMATS.values()))


@cli.command("export")
@click.argument("model")
@click.option("--format", type=click.Choice(list(models.EXPORT_FORMATS)), required=True)
@dtype_option("--dtype", EXPORT_DTYPES, "float16", "Weights on disk; q8_0, q4_0 and q4_1 are GGUF only.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="A .gguf file or an HF folder.")
def export_cmd(model: str, format: str, dtype: str, out: Path) -> None:
    """Write MODEL (a Forge checkpoint, GGUF file, HF folder or known name) as GGUF or an HF folder."""
    loaded = models.load(model)
    path = models.export(loaded.model, loaded.tokenizer, out, format=format, dtype=dtype, name=Path(model).stem)
    size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    use = f"llama-cli -m {path}" if format == "gguf" else f"AutoModelForCausalLM.from_pretrained({str(path)!r})"
    Console(highlight=False).print(f"wrote [bold]{path}[/] ({size / 1e6:.1f} MB, {format} {dtype}); try: {use}")
