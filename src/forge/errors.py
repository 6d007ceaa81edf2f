"""The ForgeError tree.

Every error a user can cause is a ``ForgeError``. Each carries the message
meant for the user, the CLI exit code and the HTTP status, so the CLI and the
server render errors without ``isinstance`` ladders::

    ForgeError                 exit 1, HTTP 500
    ├── ConfigError            exit 2, HTTP 400   a bad option or field value
    │   ├── PresetNotFoundError                   an unknown preset name
    │   └── ChatTemplateError                     a chat template that fails or exceeds its limits
    ├── DataError              exit 3, HTTP 400   missing, empty or binary training data
    ├── CheckpointError        exit 4, HTTP 404   a missing or corrupted checkpoint
    ├── DeviceError            exit 5, HTTP 400   an unknown or unavailable device
    ├── GenerationError        exit 6, HTTP 400   a request the model cannot serve
    ├── QueueFullError         exit 7, HTTP 429   the server's queue is full (Retry-After)
    ├── StoreError             exit 8, HTTP 400   a vector store that can't be opened or used as asked
    └── EmbeddingError         exit 9, HTTP 502   an embedding server failed or could not be reached

Messages say what was wrong, the value, and the fix.
"""

from __future__ import annotations

__all__ = [
    "ChatTemplateError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DeviceError",
    "EmbeddingError",
    "ForgeError",
    "GenerationError",
    "PresetNotFoundError",
    "QueueFullError",
    "StoreError",
]


class ForgeError(Exception):
    """Base of every error Forge raises for something the user can fix.

    >>> try:
    ...     raise ForgeError("something was wrong")
    ... except ForgeError as e:
    ...     (e.exit_code, e.http_status)
    (1, 500)
    """

    exit_code: int = 1
    http_status: int = 500
    #: OpenAI-style error type, used by the server.
    error_type: str = "server_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(ForgeError, ValueError):
    """A configuration field or option has a value Forge cannot use."""

    exit_code = 2
    http_status = 400
    error_type = "invalid_request_error"

    @classmethod
    def for_field(cls, owner: str, field: str, value: object, allowed: str) -> ConfigError:
        """Build the standard message: which field, the value, what is allowed."""
        return cls(f"{owner}.{field} = {value!r} is invalid: {allowed}")


class PresetNotFoundError(ConfigError, KeyError):
    """No preset has exactly this name."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.message


class ChatTemplateError(ConfigError):
    """A chat template (untrusted: it comes with the model file) failed to render or exceeded a rendering limit."""


class DataError(ForgeError):
    """Training data is missing, empty, unreadable or not text."""

    exit_code = 3
    http_status = 400
    error_type = "invalid_request_error"


class CheckpointError(ForgeError):
    """A checkpoint directory is missing, incomplete or corrupted."""

    exit_code = 4
    http_status = 404
    error_type = "invalid_request_error"


class DeviceError(ForgeError):
    """The requested device is unknown or not available on this machine."""

    exit_code = 5
    http_status = 400
    error_type = "invalid_request_error"


class GenerationError(ForgeError):
    """A generation request the model cannot serve (e.g. a prompt longer than its context)."""

    exit_code = 6
    http_status = 400
    error_type = "invalid_request_error"


class QueueFullError(ForgeError):
    """The server's request queue is full; retry after ``retry_after`` seconds (HTTP 429)."""

    exit_code = 7
    http_status = 429
    error_type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StoreError(ForgeError):
    """A RAG vector store can't be opened, or is used with vectors it wasn't built from."""

    exit_code = 8
    http_status = 400
    error_type = "invalid_request_error"


class EmbeddingError(ForgeError):
    """An embedding server failed, answered with something that is not embeddings, or could not be reached."""

    exit_code = 9
    http_status = 502  # the upstream embedding server failed, not the request
