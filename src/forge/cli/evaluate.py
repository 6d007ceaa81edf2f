"""``forge eval``: bits per byte and perplexity of a model on a text file (how quantization quality is measured)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

from forge.app import Forge
from forge.cli.commands import cli
from forge.cli.options import DEVICE_OPTION, INFERENCE_DTYPE_OPTION, QUANTIZE_OPTION, field_options
from forge.errors import ConfigError
from forge.evaluate import EvalConfig

__all__ = ["EVAL_FLAGS", "eval_cmd"]

#: EvalConfig's fields that are flags of `forge eval`: every one.
EVAL_FLAGS = tuple(f.name for f in dataclasses.fields(EvalConfig))


@cli.command("eval")
@click.argument("model")
@click.argument("text", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@field_options(EvalConfig, EVAL_FLAGS)
@DEVICE_OPTION
@INFERENCE_DTYPE_OPTION
@QUANTIZE_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a summary.")
def eval_cmd(
    model: str, text: Path, device: str, dtype: str, quantize: str | None, as_json: bool, **options: Any
) -> None:
    """Bits per byte and perplexity of MODEL on TEXT, a UTF-8 text file, in sliding windows of its context.

    MODEL is a Forge checkpoint, a GGUF file, a Hugging Face folder or a known name. Bits per byte do not
    depend on the tokenizer, so models with different vocabularies compare; lower is better.
    """
    EvalConfig(**options)  # a bad --window or --stride fails before the model loads
    app = Forge(model, device=device, dtype=dtype, quantize=quantize)  # type: ignore[arg-type]
    if not app.info()["trained"]:
        raise ConfigError(
            f"{model!r} is a preset, a model shape with no trained weights, so there is nothing to evaluate; "
            f"train it first (`forge train notes.txt --preset {model}`, then `forge eval runs/{model} TEXT`)"
        )
    result = app.sync.run_coroutine(app.evaluate(text, **options))
    result["text"] = str(text)
    if result["truncated"]:
        Console(stderr=True, highlight=False, soft_wrap=True).print(
            f"note: {escape(str(text))} is longer than --max-tokens {options['max_tokens']}: only its first "
            f"{result['tokens']:,} tokens were scored; pass a larger --max-tokens to score all of it",
            emoji=False,
        )
    if as_json:
        click.echo(json.dumps(result))
        return
    _summary(result)


def _summary(result: dict[str, Any]) -> None:
    weights = f", {result['quantize']} weights" if result["quantize"] else ""
    windows = "1 window" if result["windows"] == 1 else f"{result['windows']} windows"
    console = Console(highlight=False, soft_wrap=True)
    console.print(
        f"[bold]bits per byte {result['bits_per_byte']:.4f}[/]   perplexity {result['perplexity']:.3f}   "
        f"(loss {result['loss']:.4f} nats a token)"
    )
    console.print(
        f"{result['tokens']:,} tokens ({result['bytes']:,} bytes) of {escape(result['text'])} in {windows} of "
        f"{result['window']} (stride {result['stride']}); {escape(result['model'])}, {result['dtype']}{weights}; "
        f"{result['seconds']:.1f} s",
        emoji=False,
    )
