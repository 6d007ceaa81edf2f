"""What every endpoint shares: the app, the options, the metrics and the admission count."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from forge.server.config import ServerConfig
from forge.server.errors import ApiError
from forge.server.metrics import Metrics

if TYPE_CHECKING:  # the server uses the app; the app imports the server for listen()
    from forge.app import Forge

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

    app: Forge
    config: ServerConfig
    model_name: str
    context: int
    metrics: Metrics = field(default_factory=Metrics)
    created: int = field(default_factory=lambda: int(time.time()))
    admission: Admission = field(init=False)

    def __post_init__(self) -> None:
        self.admission = Admission(self.config.capacity)
