"""``forge web``'s static server: a web folder over HTTP, with the headers its WASM threads want.

Any static server can host a web folder; this one adds what makes it fast and correct: ``application/wasm`` and
``text/javascript`` for .wasm and .mjs (which some systems' MIME tables lack), and cross-origin isolation
(``Cross-Origin-Opener-Policy`` / ``Cross-Origin-Embedder-Policy``), without which browsers refuse the
SharedArrayBuffer that onnxruntime-web's multi-threaded WASM needs.
"""

from __future__ import annotations

import mimetypes
import os
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from forge.errors import ConfigError
from forge.web.export import is_web_folder

__all__ = ["ISOLATION_HEADERS", "MIME_TYPES", "Isolated", "web_app"]

#: Types the folder's files must be served with (browsers refuse to compile WASM or import modules otherwise).
MIME_TYPES = {".wasm": "application/wasm", ".mjs": "text/javascript", ".js": "text/javascript"}
#: Cross-origin isolation: it lets the page use SharedArrayBuffer, so WASM runs on several threads.
ISOLATION_HEADERS = {
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-embedder-policy": "require-corp",
    "cross-origin-resource-policy": "same-origin",
}
for _suffix, _type in MIME_TYPES.items():
    mimetypes.add_type(_type, _suffix)


class Isolated:
    """ASGI middleware adding :data:`ISOLATION_HEADERS` and :data:`MIME_TYPES` to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        suffix = Path(scope.get("path", "")).suffix

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.decode().lower() not in ISOLATION_HEADERS]
                headers += [(k.encode(), v.encode()) for k, v in ISOLATION_HEADERS.items()]
                if suffix in MIME_TYPES:
                    headers = [(k, v) for k, v in headers if k.decode().lower() != "content-type"]
                    headers.append((b"content-type", MIME_TYPES[suffix].encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def web_app(folder: str | os.PathLike[str]) -> Any:
    """An ASGI app serving the web folder ``folder`` at ``/`` (index.html for ``/``)."""
    path = Path(folder)
    if not is_web_folder(path):
        raise ConfigError(
            f"{str(path)!r} is not a web folder (no web.json written by Forge); make one with "
            f"`forge export MODEL --format web --out {path}`, or pass the model to `forge web` instead"
        )
    return Isolated(Starlette(routes=[Mount("/", StaticFiles(directory=path, html=True))]))
