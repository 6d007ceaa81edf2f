"""``forge web``: serve a web folder (exporting MODEL into one first when needed) and print its URL."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import click
import uvicorn
from rich.console import Console

from forge import models
from forge.cli.commands import cli
from forge.cli.options import DtypeChoice
from forge.data import cache_dir
from forge.errors import ConfigError
from forge.web import export_web, is_web_folder
from forge.web.serve import web_app

__all__ = ["web_cmd"]


def _cached_folder(model: str, dtype: str | None) -> Path:
    """Where ``forge web MODEL`` keeps MODEL's export: one folder per model path (or name) and dtype."""
    source = Path(model)
    key = str(source.resolve()) if source.exists() else model
    digest = hashlib.sha256(f"{key}\0{dtype or 'default'}".encode()).hexdigest()[:12]
    return cache_dir() / "web" / f"{source.stem or 'model'}-{digest}"


def _folder(model: str, out: Path | None, dtype: str | None, ort: Path | None, rebuild: bool) -> Path:
    """The web folder to serve: MODEL itself, or MODEL's export (made now unless there is one to reuse)."""
    if is_web_folder(model):
        if out is not None or dtype is not None:
            raise ConfigError(
                f"{model!r} is already a web folder, so --out and --dtype don't apply; pass the model instead "
                "of its folder to export it again"
            )
        return Path(model)
    folder = out if out is not None else _cached_folder(model, dtype)
    if rebuild or not is_web_folder(folder):
        folder.parent.mkdir(parents=True, exist_ok=out is None)  # the cache's folders; a given --out's must exist
        loaded = models.load(model)
        export_web(loaded.model, loaded.tokenizer, folder, dtype=dtype, name=Path(model).stem, onnxruntime_web=ort)
    return folder


@cli.command("web")
@click.argument("model")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every one).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Export MODEL into this folder [default: a folder under Forge's cache, reused next time].",
)
@click.option("--dtype", type=DtypeChoice(("float32", "int8", "int4")), default=None, help="As forge export's.")
@click.option(
    "--onnxruntime-web",
    "ort",
    type=click.Path(path_type=Path),
    default=None,
    help="An onnxruntime-web npm install to copy into the folder (as forge export's).",
)
@click.option("--rebuild", is_flag=True, help="Export again even if the folder holds an export already.")
def web_cmd(
    model: str, host: str, port: int, out: Path | None, dtype: str | None, ort: Path | None, rebuild: bool
) -> None:
    """Serve MODEL (a web folder, or a model to export into one) to a browser, and print the URL."""
    folder = _folder(model, out, dtype, ort, rebuild)
    app = web_app(folder)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # connections wait from now on, so the URL works as soon as it is printed
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port") from None
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{sock.getsockname()[1]}/"
    Console(highlight=False).print(f"serving [bold]{folder}[/] at {url} (Ctrl-C stops)", soft_wrap=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
