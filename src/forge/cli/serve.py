"""``forge serve``: an OpenAI-compatible HTTP server for a model."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import click

from forge import server
from forge.app import Forge
from forge.cli.commands import cli
from forge.cli.options import (
    DEVICE_OPTION,
    DRAFT_OPTION,
    INFERENCE_DTYPE_OPTION,
    QUANTIZE_OPTION,
    AliasedOption,
    field_options,
    speculate_with,
)
from forge.cli.rag import existing_store
from forge.core.kv_cache import plan_cache
from forge.rag.retrieval import Rag
from forge.server.config import ServerConfig

__all__ = ["SERVE_FLAGS", "serve_cmd"]

#: ServerConfig's fields that are flags of `forge serve` (the retriever is --db; batching and schema_limits are
#: for the Python API).
SERVE_FLAGS = (
    "api_key",
    "max_batch",
    "max_queue",
    "context",
    "cors_origins",
    "max_body_size",
    "model_name",
    "rag_k",
    "rag_mode",
    "prefix_cache",
    "speculate",
    "header_timeout",
    "body_timeout",
    "max_connections",
    "compile_timeout",
)


@cli.command("serve")
@click.argument("model")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every one).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@DEVICE_OPTION
@INFERENCE_DTYPE_OPTION
@QUANTIZE_OPTION
@DRAFT_OPTION
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info", show_default=True
)
@click.option(
    "--db",
    cls=AliasedOption,
    aliases=("--rag",),  # its old name, kept for scripts
    default=None,
    help="Answer chats from this RAG store, as `forge rag` names it (forge rag add ... --db DB).",
)
@field_options(
    ServerConfig,
    SERVE_FLAGS,
    api_key={
        "envvar": "FORGE_API_KEY",
        "help": "Require 'Authorization: Bearer KEY' on every route but /health [env: FORGE_API_KEY].",
    },
    max_batch={"default": None, "help": "Requests decoded together [default: 8, fewer if memory is short]."},
    context={"help": "Cap on prompt + completion tokens [default: the model's, shortened to fit the KV cache]."},
    cors_origins={"flag": "--cors-origin", "multiple": True, "help": "An origin browsers may call from (repeatable)."},
    model_name={"help": "The model id clients see [default: MODEL's name]."},
    rag_k={"help": "Chunks searched per chat answer [default: 12 to quote, 5 free]."},
)
def serve_cmd(
    model: str,
    host: str,
    port: int,
    device: str,
    dtype: str,
    quantize: str | None,
    log_level: str,
    db: str | None,
    draft: str | None,
    **options: Any,
) -> None:
    """Serve MODEL over an OpenAI-compatible HTTP API (chat, completions, embeddings, models).

    MODEL is a Forge checkpoint, a GGUF file, a Hugging Face folder or a known name such as smollm2.
    Ctrl-C shuts down gracefully: requests in flight finish first.
    """
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if options["api_key"] is None and host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(
            f"warning: serving on {host} without --api-key: anyone who can reach this address can use the "
            "model; pass --api-key KEY (or set FORGE_API_KEY)",
            err=True,
        )
    options["speculate"] = speculate_with(draft, options["speculate"])
    app = Forge(model, device=device, dtype=dtype, quantize=quantize, draft=draft)  # type: ignore[arg-type]
    options["max_batch"], options["context"] = _size_cache(app, options["max_batch"], options["context"])
    retriever = Rag(existing_store(db), app=app) if db is not None else None
    asyncio.run(server.serve(app, host=host, port=port, log_level=log_level, retriever=retriever, **options))


def _size_cache(app: Forge, max_batch: int | None, context: int | None) -> tuple[int, int | None]:
    """The KV cache is allocated whole at start: size it to the memory there is, and say so."""
    if app.model is None:  # nothing to serve: the server says so
        return max_batch or 8, context
    weight = app.model.tok_emb.weight
    plan = plan_cache(app.model.config, dtype=weight.dtype, device=weight.device, max_batch=max_batch, context=context)
    click.echo(plan.describe(), err=True)
    return plan.max_batch, plan.context
