"""The server's own ASGI middleware: request ids with logging and metrics, and API-key auth.

Plain ASGI (not ``BaseHTTPMiddleware``), so streaming responses and client
disconnects pass through untouched. The app's generation middleware
(``app.use(...)``) runs inside each endpoint, around the model.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from collections.abc import Collection

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from forge.server.errors import error_body
from forge.server.metrics import Metrics

__all__ = ["ApiKeyAuth", "RequestContext", "route_path"]

log = logging.getLogger("forge.server")

REQUEST_ID_HEADER = "x-request-id"
# Echo a caller's id only if it is short and printable: it goes into headers and logs.
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")


def route_path(scope: Scope) -> str:
    """The path below the mount point (``root_path``), as the router sees it."""
    path, root = scope.get("path", "/"), scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root) :] or "/"
    return path


class RequestContext:
    """Outermost: gives every request an id (``X-Request-Id``, echoed or made), logs it, counts it."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics, routes: Collection[str]) -> None:
        self.app, self.metrics, self.routes = app, metrics, frozenset(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get(REQUEST_ID_HEADER, "")
        request_id = given if _SAFE_ID.match(given) else f"req-{uuid.uuid4().hex[:16]}"
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            path = route_path(scope)
            route = path if path in self.routes else "other"  # unknown paths share one label
            self.metrics.requests.inc(route=route, status=str(status))
            ms = (time.perf_counter() - start) * 1000
            log.info("%s %s %s %d %.0f ms", request_id, scope.get("method", "-"), path[:200], status, ms)


class ApiKeyAuth:
    """``Authorization: Bearer KEY`` on every route but the open ones; 401 in OpenAI's shape otherwise."""

    def __init__(self, app: ASGIApp, *, api_key: str, open_paths: Collection[str] = ("/health",)) -> None:
        self.app, self.key, self.open = app, api_key.encode("utf-8"), frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or route_path(scope) in self.open:
            await self.app(scope, receive, send)
            return
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("utf-8"), self.key):
            await self.app(scope, receive, send)
            return
        message = (
            "incorrect API key provided" if token else "missing API key: send the header 'Authorization: Bearer KEY'"
        )
        body = error_body(message, "authentication_error", code="invalid_api_key")
        await JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
