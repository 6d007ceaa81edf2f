"""``ServerConfig``: the server's options, validated once."""

from __future__ import annotations

from dataclasses import dataclass

from forge.errors import ConfigError
from forge.server.retrieval import Retriever

__all__ = ["DEFAULT_MAX_BODY_SIZE", "ServerConfig"]

DEFAULT_MAX_BODY_SIZE = 1 << 20  # 1 MiB


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
    rag_k: how many chunks a chat answer retrieves.

    >>> ServerConfig(max_batch=4).max_batch
    4
    """

    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    max_batch: int = 8
    max_queue: int = 64
    context: int | None = None
    max_body_size: int = DEFAULT_MAX_BODY_SIZE
    model_name: str | None = None
    default_max_tokens: int | None = None
    batching: bool = True
    retriever: Retriever | None = None
    rag_k: int = 5

    def __post_init__(self) -> None:
        def positive(name: str, value: object, minimum: int = 1) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ConfigError.for_field("ServerConfig", name, value, f"must be an integer >= {minimum}")

        positive("max_batch", self.max_batch)
        positive("max_queue", self.max_queue)
        positive("max_body_size", self.max_body_size)
        positive("rag_k", self.rag_k)
        if self.retriever is not None and not isinstance(self.retriever, Retriever):
            raise ConfigError.for_field(
                "ServerConfig", "retriever", self.retriever, "must have search() and augment(), e.g. forge.rag.Rag"
            )
        if self.context is not None:
            positive("context", self.context, 2)
        if self.default_max_tokens is not None:
            positive("default_max_tokens", self.default_max_tokens)
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
