"""``forge serve``: an OpenAI-compatible HTTP server for a model."""

from __future__ import annotations

import asyncio
import logging

import click

from forge import server
from forge.app import Forge
from forge.cli.commands import DTYPE_OPTION, POSITIVE_INT, cli
from forge.cli.rag import existing_store
from forge.core.device import DEVICES
from forge.core.kv_cache import plan_cache
from forge.rag.retrieval import Rag
from forge.server.config import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_MAX_BODY_SIZE,
    DEFAULT_MAX_CONNECTIONS,
    TIMEOUT_RANGE,
)

__all__ = ["serve_cmd"]


@cli.command("serve")
@click.argument("model")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every one).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option(
    "--api-key",
    envvar="FORGE_API_KEY",
    default=None,
    help="Require 'Authorization: Bearer KEY' on every route but /health [env: FORGE_API_KEY].",
)
@click.option(
    "--max-batch",
    type=POSITIVE_INT,
    default=None,
    help="Requests decoded together [default: 8, fewer if memory is short].",
)
@click.option("--max-queue", type=POSITIVE_INT, default=64, show_default=True, help="Requests waiting; beyond: 429.")
@click.option(
    "--context",
    type=click.IntRange(min=2),
    default=None,
    help="Cap on prompt + completion tokens [default: the model's, shortened to fit the KV cache in memory].",
)
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@DTYPE_OPTION
@click.option("--cors-origin", "cors_origins", multiple=True, help="An origin browsers may call from (repeatable).")
@click.option("--max-body-size", type=POSITIVE_INT, default=DEFAULT_MAX_BODY_SIZE, show_default=True, help="Bytes.")
@click.option("--model-name", default=None, help="The model id clients see [default: MODEL's name].")
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info", show_default=True
)
@click.option("--rag", "rag_db", default=None, help="Answer chats from this RAG store (forge rag add ... --db DB).")
@click.option(
    "--rag-k", type=POSITIVE_INT, default=None, help="Chunks searched per chat answer [default: 12 to quote, 5 free]."
)
@click.option(
    "--rag-mode",
    type=click.Choice(["quote", "free"]),
    default="quote",
    show_default=True,
    help="quote: answers quote a source and cite it, or say the sources lack it; free: own words, cited.",
)
@click.option(
    "--header-timeout",
    type=click.FloatRange(*TIMEOUT_RANGE),
    default=DEFAULT_HEADER_TIMEOUT,
    show_default=True,
    help="Seconds a client has to send a request's headers; then 408.",
)
@click.option(
    "--body-timeout",
    type=click.FloatRange(*TIMEOUT_RANGE),
    default=DEFAULT_BODY_TIMEOUT,
    show_default=True,
    help="Seconds a client has to send a request's body; then 408.",
)
@click.option(
    "--max-connections",
    type=POSITIVE_INT,
    default=DEFAULT_MAX_CONNECTIONS,
    show_default=True,
    help="Open connections at most; beyond: the slowest to send its headers is dropped, or 503.",
)
def serve_cmd(
    model: str,
    host: str,
    port: int,
    api_key: str | None,
    max_batch: int | None,
    max_queue: int,
    context: int | None,
    device: str,
    dtype: str,
    cors_origins: tuple[str, ...],
    max_body_size: int,
    model_name: str | None,
    log_level: str,
    rag_db: str | None,
    rag_k: int | None,
    rag_mode: str,
    header_timeout: float,
    body_timeout: float,
    max_connections: int,
) -> None:
    """Serve MODEL over an OpenAI-compatible HTTP API (chat, completions, embeddings, models).

    MODEL is a Forge checkpoint, a GGUF file, a Hugging Face folder or a known name such as smollm2.
    Ctrl-C shuts down gracefully: requests in flight finish first.
    """
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(
            f"warning: serving on {host} without --api-key: anyone who can reach this address can use the "
            "model; pass --api-key KEY (or set FORGE_API_KEY)",
            err=True,
        )
    app = Forge(model, device=device, dtype=dtype)  # type: ignore[arg-type]
    max_batch, context = _size_cache(app, max_batch, context)
    retriever = Rag(existing_store(rag_db), app=app) if rag_db is not None else None
    asyncio.run(
        server.serve(
            app,
            host=host,
            port=port,
            api_key=api_key,
            max_batch=max_batch,
            max_queue=max_queue,
            context=context,
            cors_origins=cors_origins,
            max_body_size=max_body_size,
            model_name=model_name,
            log_level=log_level,
            retriever=retriever,
            rag_k=rag_k,
            rag_mode=rag_mode,  # type: ignore[arg-type]
            header_timeout=header_timeout,
            body_timeout=body_timeout,
            max_connections=max_connections,
        )
    )


def _size_cache(app: Forge, max_batch: int | None, context: int | None) -> tuple[int, int | None]:
    """The KV cache is allocated whole at start: size it to the memory there is, and say so."""
    if app.model is None:  # nothing to serve: the server says so
        return max_batch or 8, context
    weight = app.model.tok_emb.weight
    plan = plan_cache(app.model.config, dtype=weight.dtype, device=weight.device, max_batch=max_batch, context=context)
    click.echo(plan.describe(), err=True)
    return plan.max_batch, plan.context
