"""``create_server(app)``: the OpenAI-compatible ASGI application around a Forge app (any :class:`Servable`).

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``,
``POST /v1/responses`` (and ``GET``/``DELETE /v1/responses/{id}``),
``POST /v1/embeddings``, ``GET /v1/models`` (and ``/v1/models/{id}``),
``GET /health`` (never needs the API key) and ``GET /metrics`` (Prometheus text).

Middleware, outermost first: request id (``X-Request-Id``, echoed or made; in
logs and metrics), CORS (when origins are given), API-key auth (when a key is
given). Each generation then runs through the app's own middleware stack.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from forge import compute
from forge.errors import ConfigError
from forge.server.config import ServerConfig
from forge.server.errors import ApiError, error_body, error_response
from forge.server.generation import CHAT_FIELDS, COMPLETION_FIELDS, chat_job, completion_job
from forge.server.middleware import ApiKeyAuth, RequestContext
from forge.server.protocol import Servable
from forge.server.responses_api import RESPONSES_FIELDS, ResponseStore, create_response, delete_response, get_response
from forge.server.running import run
from forge.server.schemas import ChatRequest, CompletionRequest, EmbeddingRequest, RagQueryRequest, parse
from forge.server.state import Served
from forge.server.streaming import ClientGone, until_disconnect

__all__ = ["create_server"]

Endpoint = Callable[[Request], Awaitable[Response]]
#: What the server answers with when the client has already gone (nginx's "client closed request").
CLIENT_CLOSED = 499
#: Texts embedded per worker-thread call: a request whose client left stops within one batch.
EMBED_BATCH = 16


def create_server(app: Servable, **options: Any) -> Starlette:
    """The OpenAI-compatible server for ``app`` as a Starlette app; ``options`` are :class:`ServerConfig` fields.

    Mount it in another ASGI stack, or run it with :func:`forge.server.serve`.
    Its lifespan starts the app's batching engine and stops it, draining, at shutdown.

    >>> server = create_server(Forge.load("runs/tiny"), api_key="sk-local")  # doctest: +SKIP
    """
    config = ServerConfig(**options)
    model, tokenizer = app.model, app.tokenizer
    if model is None or tokenizer is None:
        raise ConfigError(
            f"create_server() needs an app with a trained model, but {app.source!r} has none; "
            "train it first or use Forge.load(checkpoint)"
        )
    context = model.config.context_length
    if config.context is not None:
        if config.context > context:
            raise ConfigError.for_field(
                "ServerConfig", "context", config.context, f"must be at most the model's context length, {context}"
            )
        context = config.context
    aliases = frozenset({_model_name(app), app.source})  # the model's own name, and as given
    name = config.model_name or _model_name(app)
    served = Served(app=app, config=config, model_name=name, context=context, aliases=aliases)
    routes = [
        Route("/v1/chat/completions", _endpoint(served, _chat, CHAT_FIELDS), methods=["POST"]),
        Route("/v1/completions", _endpoint(served, _completions, COMPLETION_FIELDS), methods=["POST"]),
        *_responses_routes(served),
        Route("/v1/embeddings", _endpoint(served, _embeddings), methods=["POST"]),
        Route("/v1/models", _endpoint(served, _models), methods=["GET"]),
        Route("/v1/models/{model:path}", _endpoint(served, _model), methods=["GET"]),
        Route("/v1/rag/query", _endpoint(served, _rag_query), methods=["POST"]),
        Route("/health", _endpoint(served, _health), methods=["GET"]),
        Route("/metrics", _endpoint(served, _metrics), methods=["GET"]),
    ]
    middleware = [Middleware(RequestContext, metrics=served.metrics, routes=[r.path for r in routes])]
    if config.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=config.cors_origins,
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["*"],
                expose_headers=["X-Request-Id", "Retry-After"],
            )
        )
    if config.api_key is not None:
        middleware.append(Middleware(ApiKeyAuth, api_key=config.api_key))
    server = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={HTTPException: _http_error},
        lifespan=_lifespan(served),
    )
    server.state.forge = served
    return server


def _responses_routes(served: Served) -> list[Route]:
    """The Responses API's routes, over one in-memory store of responses."""
    store = ResponseStore()

    async def responses(served: Served, request: Request) -> Response:
        return await create_response(served, store, request, await read_json(request, served.config.max_body_size))

    async def stored_response(served: Served, request: Request) -> Response:
        ident = request.path_params["response_id"]
        return await (get_response if request.method == "GET" else delete_response)(store, ident)

    return [
        Route("/v1/responses", _endpoint(served, responses, RESPONSES_FIELDS), methods=["POST"]),
        Route("/v1/responses/{response_id}", _endpoint(served, stored_response), methods=["GET", "DELETE"]),
    ]


def _model_name(app: Servable) -> str:
    return Path(app.source).name or app.source


def _lifespan(served: Served) -> Callable[[Starlette], contextlib.AbstractAsyncContextManager[None]]:
    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        app, config = served.app, served.config
        started = config.batching and app.batching_stats() is None  # an engine the caller started stays theirs
        if started:
            # Only what differs from the defaults: an app's start_batching may predate these options.
            extra: dict[str, Any] = {"prefix_cache": False} if not config.prefix_cache else {}
            if config.speculate != "off":
                extra["speculate"] = config.speculate
            await app.start_batching(
                max_batch=config.max_batch, max_queue=config.max_queue, context=config.context, **extra
            )
        try:
            yield
        finally:
            served.compiler.shutdown(wait=False, cancel_futures=True)
            if started:
                await app.stop_batching(drain=True)

    return lifespan


def _endpoint(
    served: Served, handler: Callable[[Served, Request], Awaitable[Response]], fields: dict[str, str] | None = None
) -> Endpoint:
    """Every failure becomes an OpenAI error response here, so nothing reaches Starlette's 500 page."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(served, request)
        except (ClientGone, ClientDisconnect):
            return Response(status_code=CLIENT_CLOSED)
        except Exception as e:
            return error_response(e, request_id=_request_id(request), fields=fields)

    endpoint.__name__ = handler.__name__.lstrip("_")
    return endpoint


def _request_id(request: Request) -> str:
    return str(request.scope.get("state", {}).get("request_id", "-"))


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's 404 and 405 in OpenAI's shape."""
    assert isinstance(exc, HTTPException)
    message = {404: f"no route {request.url.path!r}; see GET /v1/models", 405: "method not allowed"}.get(
        exc.status_code, str(exc.detail)
    )
    return JSONResponse(error_body(message, "invalid_request_error"), status_code=exc.status_code, headers=exc.headers)


async def read_json(request: Request, limit: int) -> Any:
    """The JSON body, read up to ``limit`` bytes: 413 above it, 400 if it is not JSON."""

    def too_large() -> ApiError:
        return ApiError(
            f"the request body is larger than this server's limit of {limit} bytes",
            status=413,
            code="request_too_large",
        )

    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large()
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large()
    try:
        data = json.loads(body)
        # JSON may escape lone UTF-16 surrogates, which no tokenizer can encode.
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError("the request body contains an unpaired UTF-16 surrogate (\\ud800-\\udfff)") from None
    except (ValueError, RecursionError) as e:
        raise ApiError(f"the request body is not valid JSON: {str(e)[:200]}") from None
    return data


def _meta(request: Request, user: str | None) -> dict[str, Any]:
    """What the app's middleware sees of the HTTP request, in ``ctx.meta``."""
    return {"request_id": _request_id(request), "user": user}


async def _chat(served: Served, request: Request) -> Response:
    req = parse(ChatRequest, await read_json(request, served.config.max_body_size))
    served.check_model(req.model)
    return await run(served, await chat_job(served, req, _meta(request, req.user)), request)


async def _rag_query(served: Served, request: Request) -> Response:
    """Search the server's RAG store: {"query": ..., "k": 5, "filter": {...}} -> the best chunks, scored."""
    retriever = served.config.retriever
    if retriever is None:
        raise ApiError("this server has no RAG store; start it with forge serve MODEL --db DB", status=404)
    try:
        req = parse(RagQueryRequest, await read_json(request, served.config.max_body_size))
    except ApiError as e:
        if e.param is None or not e.param.startswith("filter"):
            raise
        raise ApiError(  # the keys are the client's own text: name the field, and say what a filter holds
            f"{e.message}; a filter maps metadata keys to a string, number, boolean or null, or a list of them",
            param="filter",
        ) from None
    try:
        hits = await compute.run(retriever.search, req.query, req.k, req.filter)
    except ConfigError as e:
        raise ApiError(e.message, param="filter") from None
    return JSONResponse({"object": "list", "data": hits, "model": served.model_name})


async def _completions(served: Served, request: Request) -> Response:
    req = parse(CompletionRequest, await read_json(request, served.config.max_body_size))
    served.check_model(req.model)
    return await run(served, await completion_job(served, req, _meta(request, req.user)), request)


async def _embeddings(served: Served, request: Request) -> Response:
    req = parse(EmbeddingRequest, await read_json(request, served.config.max_body_size))
    served.check_model(req.model)
    tokenizer, model = served.app.tokenizer, served.app.model
    assert tokenizer is not None and model is not None
    texts = _embedding_texts(served, req.input)
    counts = await asyncio.to_thread(lambda: [len(tokenizer.encode(text)) for text in texts])
    limit = served.context
    for i, n in enumerate(counts):
        if n > limit:
            raise ApiError(
                f"input {i} is {n} tokens but this model's maximum context length is {limit} tokens; shorten it",
                param=f"input[{i}]" if len(texts) > 1 else "input",
                code="context_length_exceeded",
            )
    if req.dimensions is not None and req.dimensions != model.config.d_model:
        raise ApiError(
            f"this model's embeddings have {model.config.d_model} dimensions; "
            f"dimensions={req.dimensions} is not supported (omit it)",
            param="dimensions",
        )
    served.admission.acquire(1)  # one request at a time of the model's time, as a generation is
    try:
        vectors = await until_disconnect(_embed(served, texts), request.receive)
    except ClientGone:
        served.metrics.cancelled.inc(route="/v1/embeddings")
        raise
    finally:
        served.admission.release(1)
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": _b64(v) if req.encoding_format == "base64" else v,
        }
        for i, v in enumerate(vectors)
    ]
    usage = {"prompt_tokens": sum(counts), "total_tokens": sum(counts)}
    return JSONResponse({"object": "list", "data": data, "model": served.model_name, "usage": usage})


async def _embed(served: Served, texts: list[str]) -> list[list[float]]:
    """The vectors of ``texts``, a batch at a time: a client that leaves (cancelling this) stops it between two."""
    vectors: list[list[float]] = []
    for start in range(0, len(texts), EMBED_BATCH):
        vectors += await served.app.embed(texts[start : start + EMBED_BATCH])
    return vectors


def _embedding_texts(served: Served, given: str | list[str] | list[int] | list[list[int]]) -> list[str]:
    """Texts, or token ids (OpenAI accepts both) decoded to texts."""
    tokenizer = served.app.tokenizer
    assert tokenizer is not None
    if isinstance(given, str):
        return [given]
    if all(isinstance(x, str) for x in given):
        return list(given)  # type: ignore[arg-type]
    rows = [given] if all(isinstance(x, int) for x in given) else given
    vocab = tokenizer.vocab_size
    for i, row in enumerate(rows):
        if bad := [t for t in row if not 0 <= t < vocab]:  # type: ignore[union-attr]
            raise ApiError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})", param=f"input[{i}]")
    return [tokenizer.decode(row) for row in rows]  # type: ignore[arg-type]


def _b64(vector: list[float]) -> str:
    """OpenAI's base64 encoding: the float32 little-endian bytes."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def _model_card(served: Served) -> dict[str, Any]:
    return {
        "id": served.model_name,
        "object": "model",
        "created": served.created,
        "owned_by": "forge",
        "context_length": served.context,
    }


async def _models(served: Served, request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [_model_card(served)]})


async def _model(served: Served, request: Request) -> Response:
    name = request.path_params["model"]
    if name != served.model_name:
        raise ApiError(
            f"the model {name!r} does not exist; this server serves {served.model_name!r}",
            status=404,
            param="model",
            code="model_not_found",
        )
    return JSONResponse(_model_card(served))


async def _health(served: Served, request: Request) -> Response:
    return JSONResponse({"status": "ok", "model": served.model_name})


async def _metrics(served: Served, request: Request) -> Response:
    served.metrics.in_flight.set(served.admission.in_flight)
    stats = served.app.batching_stats()
    return PlainTextResponse(served.metrics.render(stats), media_type="text/plain; version=0.0.4; charset=utf-8")
