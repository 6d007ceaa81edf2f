"""The OpenAI-compatible HTTP server: ``forge serve MODEL`` or ``await serve(app, port=8000)``.

Any OpenAI client talks to it::

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="sk-local")
    client.chat.completions.create(model="forge", messages=[{"role": "user", "content": "Hi"}])

``create_server(app)`` gives the Starlette app, to mount in another ASGI stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from forge.server.app import create_server
    from forge.server.config import ServerConfig
    from forge.server.run import serve

__all__ = ["ServerConfig", "create_server", "serve"]

#: Where each name lives. Starlette, uvicorn and the pydantic schemas load on first use, not with
#: ``import forge`` (the app imports this package for ``listen``): about 0.1 s off every import.
_HOME = {"ServerConfig": "forge.server.config", "create_server": "forge.server.app", "serve": "forge.server.run"}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'forge.server' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)
