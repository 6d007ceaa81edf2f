"""``ServerConfig``: the server's options, validated once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from forge.config import bounded, check_specs, choice, documented
from forge.errors import ConfigError
from forge.server.retrieval import Retriever
from forge.structured import SchemaLimits

__all__ = [
    "DEFAULT_BODY_TIMEOUT",
    "DEFAULT_COMPILE_TIMEOUT",
    "DEFAULT_HEADER_TIMEOUT",
    "DEFAULT_MAX_BODY_SIZE",
    "DEFAULT_MAX_CONNECTIONS",
    "TIMEOUT_RANGE",
    "ServerConfig",
]

DEFAULT_MAX_BODY_SIZE = 1 << 20  # 1 MiB
#: Defaults of the limits on clients (see ServerConfig), shared with serve() and the CLI.
DEFAULT_HEADER_TIMEOUT, DEFAULT_BODY_TIMEOUT, DEFAULT_COMPILE_TIMEOUT = 10.0, 60.0, 10.0
DEFAULT_MAX_CONNECTIONS = 1024
#: Seconds allowed for the timeouts below: above an hour a timeout no longer protects anything.
TIMEOUT_RANGE = (0.01, 3600.0)


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    """How the OpenAI-compatible server behaves.

    api_key: required as ``Authorization: Bearer KEY`` on every route but ``/health`` (None: open).
    cors_origins: origins browsers may call from (``("*",)`` for any); none by default.
    max_batch, max_queue: the batching engine's slots and waiting room; beyond both, 429.
    context: cap on prompt + completion tokens (None: the model's context length).
    max_body_size: request bodies above this many bytes get 413.
    model_name: the id in ``/v1/models`` and responses (None: the model's name).
    default_max_tokens: completion length when a request gives none (None: the rest of the context).
    batching: start the app's batching engine with the server (and stop it, draining, at shutdown).
    retriever: a RAG pipeline (``forge.rag.Rag``): adds ``/v1/rag/query`` and grounds chat answers in it.
    rag_k: how many chunks a chat answer searches (None: the retriever's default for ``rag_mode``).
    rag_mode: how a chat answer uses them: "quote" (a cited quote of a source, or "not in the sources": the
        default, right for small models) or "free" (own words that must cite a source). A request with tools
        or a response_format keeps its own format and gets the sources in "free" mode's prompt.
    header_timeout: seconds a connection may take to send a request's headers (from connecting, or from
        the end of the previous response); then it is closed with 408. Slow clients can't hold sockets.
    body_timeout: seconds a request may take to send its body once its headers are in; then 408.
    max_connections: open connections at most; beyond it the connection waiting longest for its headers
        is closed, or, if every one is busy, the newcomer gets 503. Kept below the file-descriptor limit.
    compile_timeout: seconds a request's JSON schema or tools may take to compile into a grammar; then 400.
    schema_limits: bounds on a request's JSON schema and tool parameters (bytes, properties, depth).

    >>> ServerConfig(max_batch=4).max_batch
    4
    """

    api_key: str | None = documented(None, doc="Require 'Authorization: Bearer KEY' on every route but /health.")
    cors_origins: tuple[str, ...] = documented((), doc="An origin browsers may call from ('*': any).")
    max_batch: int = bounded(8, integer=True, ge=1, doc="Requests decoded together.")
    max_queue: int = bounded(64, integer=True, ge=1, doc="Requests waiting; beyond: 429.")
    context: int | None = bounded(None, integer=True, ge=2, doc="Cap on prompt + completion tokens.")
    max_body_size: int = bounded(DEFAULT_MAX_BODY_SIZE, integer=True, ge=1, doc="Bytes; larger bodies get 413.")
    model_name: str | None = documented(None, doc="The model id clients see.")
    default_max_tokens: int | None = bounded(None, integer=True, ge=1, doc="Completion length when none is asked.")
    batching: bool = documented(True, doc="Start the app's batching engine with the server.")
    prefix_cache: bool = documented(True, doc="Reuse the KV cache of prompts' shared beginnings (a system prompt).")
    speculate: Literal["off", "ngram", "draft"] = choice(
        "off",
        ("off", "ngram", "draft"),
        doc="Speculative decoding for every request, by n-gram lookup or the app's draft model (same output).",
    )
    retriever: Retriever | None = documented(None, doc="A RAG pipeline that grounds chat answers.")
    rag_k: int | None = bounded(None, integer=True, ge=1, doc="Chunks searched per chat answer.")
    rag_mode: Literal["quote", "free"] = choice(
        "quote",
        ("quote", "free"),
        doc="quote: answers quote a source and cite it, or say the sources lack it; free: own words, cited.",
    )
    header_timeout: float = bounded(
        DEFAULT_HEADER_TIMEOUT, ge=TIMEOUT_RANGE[0], le=TIMEOUT_RANGE[1], doc="Seconds to send the headers; then 408."
    )
    body_timeout: float = bounded(
        DEFAULT_BODY_TIMEOUT, ge=TIMEOUT_RANGE[0], le=TIMEOUT_RANGE[1], doc="Seconds to send the body; then 408."
    )
    max_connections: int = bounded(
        DEFAULT_MAX_CONNECTIONS,
        integer=True,
        ge=1,
        doc="Open connections at most; beyond: the slowest to send its headers is dropped, or 503.",
    )
    compile_timeout: float = bounded(
        DEFAULT_COMPILE_TIMEOUT,
        ge=TIMEOUT_RANGE[0],
        le=TIMEOUT_RANGE[1],
        doc="Seconds a request's JSON schema or tools may take to compile; then 400.",
    )
    schema_limits: SchemaLimits = documented(default_factory=SchemaLimits, doc="Bounds on a request's JSON schema.")

    def __post_init__(self) -> None:
        check_specs(self)
        if not isinstance(self.schema_limits, SchemaLimits):
            raise ConfigError.for_field("ServerConfig", "schema_limits", self.schema_limits, "must be a SchemaLimits")
        if self.retriever is not None and not isinstance(self.retriever, Retriever):
            raise ConfigError.for_field(
                "ServerConfig", "retriever", self.retriever, "must have search() and augment(), e.g. forge.rag.Rag"
            )
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()):
            raise ConfigError.for_field("ServerConfig", "api_key", "***", "must be a non-empty string or None")
        if isinstance(self.cors_origins, str):  # one origin, not its characters
            object.__setattr__(self, "cors_origins", (self.cors_origins,))
        object.__setattr__(self, "cors_origins", tuple(self.cors_origins))
        if not all(isinstance(o, str) and o for o in self.cors_origins):
            raise ConfigError.for_field(
                "ServerConfig", "cors_origins", self.cors_origins, "must be origins such as 'http://localhost:3000'"
            )
        if self.model_name is not None and (not isinstance(self.model_name, str) or not self.model_name):
            raise ConfigError.for_field("ServerConfig", "model_name", self.model_name, "must be a non-empty string")

    @property
    def capacity(self) -> int:
        """Generations the server admits at once: running plus waiting."""
        return self.max_batch + self.max_queue
