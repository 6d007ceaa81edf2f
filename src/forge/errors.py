"""The ForgeError tree.

Every error a user can cause is a ``ForgeError``. Each carries the message
meant for the user, the CLI exit code, the HTTP status and, when it is about
one option, the ``field`` (its Python name), so the CLI and the server render
errors without ``isinstance`` ladders or parsing messages::

    ForgeError                   exit 1,  HTTP 500
    ├── ConfigError              exit 2,  HTTP 400   a bad option or field value
    │   ├── PresetNotFoundError                      an unknown preset name
    │   └── ChatTemplateError                        a chat template that fails or exceeds its limits
    ├── DataError                exit 3,  HTTP 400   missing, empty or binary training data
    ├── CheckpointError          exit 4,  HTTP 404   a missing or corrupted checkpoint
    ├── DeviceError              exit 5,  HTTP 400   an unknown or unavailable device
    ├── GenerationError          exit 6,  HTTP 400   a request the model cannot serve
    │   └── ContextLengthError   exit 14, HTTP 400   a prompt (or prompt + max_tokens) longer than the context
    ├── QueueFullError           exit 7,  HTTP 429   the server's queue is full (Retry-After)
    ├── StoreError               exit 8,  HTTP 400   a vector store that can't be opened or used as asked
    ├── EmbeddingError           exit 9,  HTTP 502   an embedding server failed or could not be reached
    ├── RateLimitError           exit 10, HTTP 429   refused by the rate_limit middleware
    ├── AgentError               exit 11, HTTP 500   an agent whose model failed
    ├── ToolError                exit 12, HTTP 400   a tool call with bad arguments, that failed or timed out
    └── ApiError                 exit 13, HTTP 4xx   a request the HTTP server refuses (its own status)

A class without an exit code of its own is a kind of its parent and shares its
code; every other code is distinct (tests/test_options.py checks it).

Messages say what was wrong, the value, and the fix. A message names an option
by its Python name (``context=4096``, or ``TrainConfig.context = 4096`` from
:meth:`ConfigError.for_field`); :meth:`ForgeError.render` spells it as another
surface does (the CLI's ``--context 4096``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = [
    "AgentError",
    "ApiError",
    "ChatTemplateError",
    "CheckpointError",
    "ConfigError",
    "ContextLengthError",
    "DataError",
    "DeviceError",
    "EmbeddingError",
    "ForgeError",
    "GenerationError",
    "PresetNotFoundError",
    "QueueFullError",
    "RateLimitError",
    "StoreError",
    "ToolError",
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

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: The Python name of the option or request field the error is about, if one: ``"context"``, ``"messages[2]"``.
        self.field = field

    def __str__(self) -> str:
        return self.message

    def render(self, names: Mapping[str, str]) -> str:
        """The message with its ``field`` spelled as ``names`` spells it: the CLI passes its flags.

        Both ways a message names a field become ``NAME VALUE`` (a plain word loses its Python quotes):

        >>> ConfigError("steps=3 is not above step 6", field="steps").render({"steps": "--steps"})
        '--steps 3 is not above step 6'
        >>> ConfigError.for_field("TrainConfig", "lr", 0, "must be > 0").render({"lr": "--lr"})
        '--lr 0 is invalid: must be > 0'
        >>> DeviceError("use device='cpu'", field="device").render({"device": "--device"})
        'use --device cpu'
        """
        name = names.get(self.field) if self.field else None
        if name is None:
            return self.message
        mention = re.compile(rf"(?:\b[A-Z]\w*\.)?\b{re.escape(self.field or '')}(?: = |=)(?:'([\w.:/+-]*)')?")
        return mention.sub(lambda m: f"{name} {m.group(1) or ''}", self.message)


class ConfigError(ForgeError, ValueError):
    """A configuration field or option has a value Forge cannot use."""

    exit_code = 2
    http_status = 400
    error_type = "invalid_request_error"

    @classmethod
    def for_field(cls, owner: str, field: str, value: object, allowed: str) -> ConfigError:
        """Build the standard message: which field, the value, what is allowed; ``field`` is set.

        >>> ConfigError.for_field("TrainConfig", "steps", 0, "must be a positive integer").field
        'steps'
        """
        return cls(f"{owner}.{field} = {value!r} is invalid: {allowed}", field=field)


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


class ContextLengthError(GenerationError):
    """A prompt that leaves no room in the context, or (asked for strictly) prompt + ``max_tokens`` past it.

    ``field`` is ``"prompt"`` or ``"max_tokens"``; ``prompt_tokens``, ``context`` and ``requested`` (the
    ``max_tokens`` asked for, or None) are the counts the message gives.

    >>> ContextLengthError(field="prompt", prompt_tokens=20, context=16).message
    'the prompt is 20 tokens but the context is 16 (prompt and completion together); shorten it to at most 15 tokens'
    """

    exit_code = 14
    code = "context_length_exceeded"

    def __init__(self, *, field: str, prompt_tokens: int, context: int, requested: int | None = None) -> None:
        if field == "prompt":
            message = (
                f"the prompt is {prompt_tokens} tokens but the context is {context} (prompt and completion "
                f"together); shorten it to at most {context - 1} tokens"
            )
        else:
            message = (
                f"the context is {context} tokens, but {prompt_tokens + (requested or 0)} were requested "
                f"({prompt_tokens} in the prompt + {requested} in max_tokens); reduce the prompt or max_tokens "
                f"(at most {context - prompt_tokens} here)"
            )
        super().__init__(message, field=field)
        self.prompt_tokens, self.context, self.requested = prompt_tokens, context, requested


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


class RateLimitError(ForgeError):
    """A request was refused by :func:`forge.rate_limit` (HTTP 429)."""

    exit_code = 10
    http_status = 429
    error_type = "rate_limit_error"


class AgentError(ForgeError):
    """The agent could not finish: its model failed."""

    exit_code = 11


class ToolError(ForgeError):
    """A tool call failed: bad arguments, an exception inside the tool, or its timeout."""

    exit_code = 12
    http_status = 400
    error_type = "invalid_request_error"


class ApiError(ForgeError):
    """A request the HTTP server refuses: the status, OpenAI's error type and code, and the field at fault.

    ``param`` is the request's own name for the field (``"messages[0].content"``); it is also the ``field``.

    >>> ApiError("n must be >= 1", param="n").http_status
    400
    """

    exit_code = 13
    http_status = 400
    error_type = "invalid_request_error"

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, field=param)
        self.http_status = status
        self.param = param
        self.code = code
        if error_type is not None:
            self.error_type = error_type
        self.headers = dict(headers or {})
