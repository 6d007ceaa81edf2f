"""Errors as HTTP responses in OpenAI's shape.

Every refusal is ``{"error": {"message", "type", "param", "code"}}`` with the
status that says whose mistake it was: 4xx for the client's (the server keeps
serving), 5xx only for a fault of the server itself.

>>> ApiError("n must be >= 1", param="n").http_status
400
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

from starlette.responses import JSONResponse

from forge.errors import ApiError, ForgeError

# ApiError lives in forge.errors with the rest of the tree; the server's modules import it from here.
__all__ = ["ApiError", "error_body", "error_payload", "error_response", "forge_error_param"]

log = logging.getLogger("forge.server")


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict[str, object]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def forge_error_param(error: ForgeError, fields: Mapping[str, str] | None = None) -> str | None:
    """The request field ``error`` is about: its ``field``, in the route's names.

    ``fields`` maps the app's names to the request's (chat calls GenerationConfig's ``logprobs``
    ``top_logprobs``); an ``ApiError``'s field is already the request's.

    >>> from forge.errors import ConfigError
    >>> error = ConfigError.for_field("GenerationConfig", "logprobs", 30, "must be in [0, 20]")
    >>> forge_error_param(error, {"logprobs": "top_logprobs"})
    'top_logprobs'
    """
    if error.field is None or isinstance(error, ApiError):
        return error.field
    return (fields or {}).get(error.field, error.field)


def error_payload(
    error: BaseException, *, request_id: str = "-", fields: Mapping[str, str] | None = None
) -> tuple[int, dict[str, object], dict[str, str]]:
    """Status, OpenAI error body and headers for ``error``: a ForgeError's own, 500 for anything else."""
    if isinstance(error, ForgeError):
        status = error.http_status
        headers = dict(getattr(error, "headers", None) or {})
        if status == 429 and "Retry-After" not in headers:
            retry = getattr(error, "retry_after", None)
            headers["Retry-After"] = str(max(1, math.ceil(retry))) if isinstance(retry, int | float) else "1"
        if status >= 500:
            log.error("%s failed: %s: %s", request_id, type(error).__name__, error.message)
        param = forge_error_param(error, fields)
        return status, error_body(error.message, error.error_type, param, getattr(error, "code", None)), headers
    log.error("%s failed with an unexpected error", request_id, exc_info=error)
    message = f"the server failed on this request ({type(error).__name__}); it is logged as {request_id}"
    return 500, error_body(message, "server_error"), {}


def error_response(
    error: BaseException, *, request_id: str = "-", fields: Mapping[str, str] | None = None
) -> JSONResponse:
    """The HTTP response for ``error``."""
    status, body, headers = error_payload(error, request_id=request_id, fields=fields)
    return JSONResponse(body, status_code=status, headers=headers)
