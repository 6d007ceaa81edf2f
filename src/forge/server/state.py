"""What every endpoint shares: the app it serves, the options, the metrics and the admission count."""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from forge.server.config import ServerConfig
from forge.server.errors import ApiError
from forge.server.metrics import Metrics
from forge.server.protocol import Servable

__all__ = ["Admission", "Served"]


class Admission:
    """Generations in flight, at most ``capacity`` (the engine's batch slots plus its queue).

    The engine refuses a full queue itself (``QueueFullError``); counting here as
    well means a request asking for several choices is admitted whole or not at all.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_flight = 0

    def acquire(self, n: int, *, retry_after: float = 1.0) -> None:
        """Take ``n`` slots, or raise a 429 ``ApiError`` with Retry-After."""
        if self.in_flight + n > self.capacity:
            raise ApiError(
                f"the server is busy: {self.in_flight} generations are running or queued and it takes at most "
                f"{self.capacity}; retry after {math.ceil(retry_after)} s",
                status=429,
                error_type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(max(1, math.ceil(retry_after)))},
            )
        self.in_flight += n

    def release(self, n: int) -> None:
        self.in_flight = max(0, self.in_flight - n)


@dataclass
class Served:
    """The server's shared state, one per ``create_server``."""

    app: Servable
    config: ServerConfig
    model_name: str
    context: int
    #: Names a request's ``model`` may give: ``model_name`` (what /v1/models lists) and the aliases in
    #: docs/API.md (the model's own name when ``model_name`` renamed it); any other is a 404.
    aliases: frozenset[str] = frozenset()
    metrics: Metrics = field(default_factory=Metrics)
    created: int = field(default_factory=lambda: int(time.time()))
    admission: Admission = field(init=False)
    #: Where requests' grammars compile: two threads, so heavy schemas wait for each other, not for the loop.
    compiler: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=2, thread_name_prefix="forge-compile")
    )

    def __post_init__(self) -> None:
        self.admission = Admission(self.config.capacity)

    def check_model(self, name: str | None) -> None:
        """A 404 ``model_not_found`` for a ``model`` this server does not serve, as OpenAI answers."""
        if name is None or name == self.model_name or name in self.aliases:
            return
        raise ApiError(
            f"the model {name[:100]!r} does not exist on this server; it serves {self.model_name!r} "
            "(see GET /v1/models)",
            status=404,
            param="model",
            code="model_not_found",
        )
