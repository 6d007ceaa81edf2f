"""The OpenAI-compatible HTTP server: ``forge serve MODEL`` or ``await serve(app, port=8000)``.

Any OpenAI client talks to it::

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="sk-local")
    client.chat.completions.create(model="forge", messages=[{"role": "user", "content": "Hi"}])

``create_server(app)`` gives the Starlette app, to mount in another ASGI stack.
"""

from forge.server.app import create_server
from forge.server.config import ServerConfig
from forge.server.run import serve

__all__ = ["ServerConfig", "create_server", "serve"]
