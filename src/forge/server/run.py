"""``serve(app, ...)``: run the server with uvicorn until cancelled or shut down by a signal."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Sequence
from typing import Literal

import uvicorn
from starlette.applications import Starlette

from forge.errors import ForgeError
from forge.server.app import create_server
from forge.server.config import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_COMPILE_TIMEOUT,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_MAX_BODY_SIZE,
    DEFAULT_MAX_CONNECTIONS,
    ServerConfig,
)
from forge.server.connections import ConnectionLimits, connection_cap, guarded_protocol
from forge.server.protocol import Servable
from forge.server.retrieval import Retriever

__all__ = ["serve"]

log = logging.getLogger("forge.server")


class _Server(uvicorn.Server):
    """uvicorn's server, telling ``ready`` once it listens."""

    def __init__(self, config: uvicorn.Config, ready: asyncio.Event | None) -> None:
        super().__init__(config)
        self.ready = ready
        self.port: int | None = None
        self.signalled: int | None = None

    def handle_exit(self, sig: int, frame: object) -> None:
        self.signalled = sig  # remembered: Ctrl-C must end in KeyboardInterrupt after the graceful shutdown
        super().handle_exit(sig, frame)  # type: ignore[arg-type]

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.port = self.servers[0].sockets[0].getsockname()[1] if self.servers else self.config.port
            log.info("Forge serves an OpenAI-compatible API on http://%s:%s/v1", self.config.host, self.port)
            if self.ready is not None:
                self.ready.set()


async def serve(
    app: Servable,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    context: int | None = None,
    cors_origins: Sequence[str] = (),
    max_body_size: int = DEFAULT_MAX_BODY_SIZE,
    model_name: str | None = None,
    shutdown_timeout: float | None = None,
    log_level: str = "info",
    ready: asyncio.Event | None = None,
    retriever: Retriever | None = None,
    rag_k: int | None = None,
    rag_mode: Literal["quote", "free"] = "quote",
    header_timeout: float = DEFAULT_HEADER_TIMEOUT,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    compile_timeout: float = DEFAULT_COMPILE_TIMEOUT,
    prefix_cache: bool = True,
    speculate: Literal["off", "ngram", "draft"] = "off",
) -> None:
    """Serve ``app`` over HTTP (see :func:`create_server` for the routes) until cancelled.

    Cancelling the task shuts down gracefully: the server stops accepting
    connections, in-flight requests finish (for at most ``shutdown_timeout``
    seconds, None waits), then the batching engine drains. In the main thread
    SIGINT/SIGTERM do the same. ``ready`` is set once the socket listens.
    ``header_timeout``, ``body_timeout`` and ``max_connections`` bound what a slow or
    idle client can hold (see :class:`ServerConfig`).

    >>> task = asyncio.create_task(serve(app, port=8000, ready=ready))  # doctest: +SKIP
    >>> await ready.wait(); ...; task.cancel()  # doctest: +SKIP
    """
    server_app = create_server(
        app,
        api_key=api_key,
        max_batch=max_batch,
        max_queue=max_queue,
        context=context,
        cors_origins=tuple(cors_origins),
        max_body_size=max_body_size,
        model_name=model_name,
        retriever=retriever,
        rag_k=rag_k,
        rag_mode=rag_mode,
        header_timeout=header_timeout,
        body_timeout=body_timeout,
        max_connections=max_connections,
        compile_timeout=compile_timeout,
        prefix_cache=prefix_cache,
        speculate=speculate,
    )
    server = _Server(_uvicorn_config(server_app, host, port, log_level, shutdown_timeout), ready)
    await _run(server, f"{host}:{port}")


def _uvicorn_config(
    server_app: Starlette, host: str, port: int, log_level: str, shutdown_timeout: float | None
) -> uvicorn.Config:
    options: ServerConfig = server_app.state.forge.config
    cap, backlog = connection_cap(options.max_connections)
    limits = ConnectionLimits(options.header_timeout, options.body_timeout, cap)
    return uvicorn.Config(
        server_app,
        host=host,
        port=port,
        lifespan="on",
        log_config=None,  # the caller's logging setup applies; forge.server logs one line per request
        log_level=log_level,
        access_log=False,
        http=guarded_protocol(limits),  # h11, with deadlines for reading requests and a cap on connections
        backlog=backlog,
        timeout_graceful_shutdown=int(shutdown_timeout) if shutdown_timeout is not None else None,
    )


async def _run(server: _Server, address: str) -> None:
    """Serve until cancelled; a cancel shuts down gracefully, a second one stops waiting for requests."""

    async def run() -> None:
        try:
            await server.serve()
        except SystemExit:  # uvicorn exits on startup failures, e.g. a port in use
            raise ForgeError(
                f"the server could not start on {address} (the log above says why; is the port in use?)"
            ) from None

    task = asyncio.ensure_future(run())
    try:
        await asyncio.shield(task)
        # uvicorn re-raises a captured Ctrl-C once it has shut down, but whether that still reaches this
        # task depends on timing; say it here, so `forge serve` always exits as interrupted (130).
        if server.signalled == signal.SIGINT:
            raise KeyboardInterrupt
    except asyncio.CancelledError:
        server.should_exit = True
        while not task.done():
            try:
                await asyncio.wait({task})
            except asyncio.CancelledError:  # cancelled again: stop waiting for requests
                server.force_exit = True
        raise
