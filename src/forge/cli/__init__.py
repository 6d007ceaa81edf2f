"""The ``forge`` command line: thin wrappers over the Python API.

User errors (a ``ForgeError`` or a bad option) print one line and exit
non-zero, with no traceback.
"""

from __future__ import annotations

import sys

import click
from rich.console import Console
from rich.markup import escape

from forge.cli import chat, evaluate, export, rag, serve, web  # noqa: F401  (registers `forge chat|eval|export|rag|serve|web`)
from forge.cli.commands import cli
from forge.errors import ForgeError

__all__ = ["cli", "main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``forge`` script; returns the exit code."""
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        cli.main(args=argv, prog_name="forge", standalone_mode=False)
    except ForgeError as e:
        err.print(f"[bold red]error:[/] {escape(e.message)}", emoji=False)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        err.print("aborted")
        sys.exit(130)
    except click.UsageError as e:
        # One line, like every other error: the problem, the value, and where to look.
        where = e.ctx.command_path if e.ctx else "forge"
        err.print(f"[bold red]error:[/] {escape(e.format_message())} (see '{where} --help')", emoji=False)
        sys.exit(e.exit_code)
    except click.ClickException as e:
        err.print(f"[bold red]error:[/] {escape(e.format_message())}", emoji=False)
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    return 0
