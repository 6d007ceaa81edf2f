"""What the server needs from what it serves, as a protocol: the server sits below the app.

A Forge app is one (``create_server(app)``, ``app.listen()``); so is
anything else that builds requests, runs them through its middleware and holds a
model. The server maps OpenAI JSON to :meth:`Servable.request` calls and the
answers back to JSON; it never reaches past this protocol into the app.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from forge.core.transformer import Transformer
from forge.middleware import Context
from forge.tokenizer import Tokenizer

__all__ = ["Servable"]


@runtime_checkable
class Servable(Protocol):
    """An app the server can serve: requests, the middleware stack, the model and its batching engine."""

    @property
    def model(self) -> Transformer | None:
        """The model (None until trained): its config gives the context length, vocabulary and width."""
        ...

    @property
    def tokenizer(self) -> Tokenizer | None:
        """The model's tokenizer (None until trained)."""
        ...

    @property
    def source(self) -> str:
        """What the app was made from (a path or a model name): the server names its model after it."""
        ...

    def request(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Mapping[str, Any]] | str | None = None,
        stream: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        allowed_tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | None = None,
        parallel_tool_calls: bool = False,
        id: str | None = None,
        strict: bool = False,
        ids: Sequence[int] | None = None,
        meta: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Context:
        """A complete request for :meth:`handle` / :meth:`handle_stream`; ``options`` are GenerationConfig fields.

        ``strict``: an explicit ``max_tokens`` that does not fit after the prompt raises
        ``ContextLengthError`` (as does a prompt that does not fit at all) when it is handled.
        """
        ...

    async def handle(self, ctx: Context) -> str:
        """The response text of a non-streaming request, through the middleware stack; ``ctx.completion`` after."""
        ...

    def handle_stream(self, ctx: Context) -> AsyncIterator[str]:
        """The text pieces of a streaming request, through the middleware stack."""
        ...

    async def embed(self, texts: str | Sequence[str]) -> list[list[float]]:
        """One normalised vector per text."""
        ...

    async def start_batching(
        self, *, max_batch: int = 8, max_queue: int = 64, context: int | None = None, **options: Any
    ) -> Any:
        """Serve every request through a continuous-batching engine (``options``: prefix_cache, speculate)."""
        ...

    async def stop_batching(self, *, drain: bool = True) -> None:
        """Stop the engine; with ``drain``, running and queued requests finish first."""
        ...

    def batching_stats(self) -> dict[str, Any] | None:
        """The engine's counters for ``/metrics``, or None when batching is off."""
        ...
