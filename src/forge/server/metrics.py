"""Prometheus metrics in the text exposition format, with no client library.

The server counts requests, tokens and latencies as they happen; the batching
engine's gauges (queue depth, running requests, batch sizes) are read from
``app.batching_stats()`` when ``/metrics`` is scraped.

>>> m = Metrics()
>>> m.requests.inc(route="/health", status="200")
>>> 'forge_requests_total{route="/health",status="200"} 1' in m.render(None)
True
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["Counter", "Gauge", "Histogram", "Metrics"]

Labels = tuple[tuple[str, str], ...]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: Labels, extra: str = "") -> str:
    parts = [f'{k}="{_escape(v)}"' for k, v in labels]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help: str) -> None:
        self.name, self.help = name, help

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help: str) -> None:
        super().__init__(name, help)
        self.values: dict[Labels, float] = {}

    def inc(self, amount: float = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        self.values[key] = self.values.get(key, 0) + amount

    def get(self, **labels: str) -> float:
        return self.values.get(tuple(sorted(labels.items())), 0)

    def lines(self) -> list[str]:
        values = self.values or {(): 0}
        return [*self.header(), *(f"{self.name}{_labels(k)} {_number(v)}" for k, v in sorted(values.items()))]


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, name: str, help: str) -> None:
        super().__init__(name, help)
        self.value = 0.0

    def set(self, value: float) -> None:
        self.value = value

    def lines(self) -> list[str]:
        return [*self.header(), f"{self.name} {_number(self.value)}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        super().__init__(name, help)
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)  # the last is +Inf
        self.sum = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += count
        self.sum += value * count

    @property
    def count(self) -> int:
        return sum(self.counts)

    def lines(self) -> list[str]:
        out, running = self.header(), 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts, strict=True):
            running += n
            le = "+Inf" if bound == float("inf") else _number(bound)
            out.append(f'{self.name}_bucket{{le="{le}"}} {running}')
        out += [f"{self.name}_sum {_number(self.sum)}", f"{self.name}_count {running}"]
        return out


class Metrics:
    """Everything ``GET /metrics`` reports."""

    def __init__(self) -> None:
        self.requests = Counter("forge_requests_total", "HTTP requests by route and status code.")
        self.cancelled = Counter(
            "forge_requests_cancelled_total", "Generations stopped because the client disconnected, by route."
        )
        self.prompt_tokens = Counter("forge_prompt_tokens_total", "Prompt tokens of completed generations.")
        self.generation_tokens = Counter("forge_generation_tokens_total", "Tokens generated.")
        self.ttft = Histogram("forge_time_to_first_token_seconds", "Streaming requests: time to the first token.")
        self.itl = Histogram(
            "forge_inter_token_latency_seconds", "Streaming requests: time between consecutive tokens."
        )
        self.duration = Histogram("forge_request_duration_seconds", "Generation requests: time to the last byte.")
        self.in_flight = Gauge("forge_generations_in_flight", "Generations admitted by the server (running or queued).")

    def render(self, stats: Mapping[str, Any] | None) -> str:
        """The exposition text; ``stats`` is ``app.batching_stats()`` (None when batching is off)."""
        lines: list[str] = []
        for metric in (
            self.requests,
            self.cancelled,
            self.prompt_tokens,
            self.generation_tokens,
            self.ttft,
            self.itl,
            self.duration,
            self.in_flight,
        ):
            lines += metric.lines()
        lines += _engine_lines(stats or {})
        return "\n".join(lines) + "\n"


def _engine_lines(stats: Mapping[str, Any]) -> list[str]:
    def number(key: str) -> float:
        value = stats.get(key, 0)
        return float(value) if isinstance(value, int | float) else 0.0

    lines: list[str] = []
    for key, name, kind, help in (
        ("queue_depth", "forge_queue_depth", "gauge", "Requests waiting for a batch slot."),
        ("running", "forge_running_requests", "gauge", "Requests decoding in the running batch."),
        ("max_batch", "forge_max_batch", "gauge", "Batch slots of the engine."),
        ("batch_size_max", "forge_batch_size_max", "gauge", "Largest batch decoded in one step so far."),
        ("steps", "forge_engine_steps_total", "counter", "Batched decode steps."),
        ("tokens", "forge_engine_tokens_total", "counter", "Tokens decoded by the engine."),
        ("completed", "forge_engine_completed_total", "counter", "Requests the engine finished."),
        ("cancelled", "forge_engine_cancelled_total", "counter", "Requests the engine cancelled."),
        ("speculative_proposed", "forge_speculative_proposed_tokens_total", "counter", "Tokens proposed (n-gram)."),
        ("speculative_accepted", "forge_speculative_accepted_tokens_total", "counter", "Proposed tokens accepted."),
        ("speculative_steps", "forge_speculative_steps_total", "counter", "Speculative verify steps of requests."),
    ):
        lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name} {_number(number(key))}"]
    lines += _prefix_lines(stats.get("prefix_cache"))
    sizes = Histogram("forge_batch_size", "Requests decoded together, per engine step.", BATCH_BUCKETS)
    hist = stats.get("batch_size_hist") or {}
    if isinstance(hist, Mapping):
        for size, steps in hist.items():
            if isinstance(size, int | float) and isinstance(steps, int):
                sizes.observe(float(size), steps)
    return lines + sizes.lines()


def _prefix_lines(stats: Any) -> list[str]:
    """The prefix cache's counters (none when it is off)."""
    if not isinstance(stats, Mapping):
        return []
    lines: list[str] = []
    for key, name, kind, help in (
        ("lookups", "forge_prefix_cache_lookups_total", "counter", "Prompts looked up in the prefix cache."),
        ("hits", "forge_prefix_cache_hits_total", "counter", "Prompts that reused at least one cached block."),
        ("tokens_reused", "forge_prefix_cache_tokens_reused_total", "counter", "Prompt tokens not computed again."),
        ("tokens_looked_up", "forge_prefix_cache_prompt_tokens_total", "counter", "Prompt tokens looked up."),
        ("evictions", "forge_prefix_cache_evictions_total", "counter", "Blocks evicted (least recently used)."),
        ("blocks", "forge_prefix_cache_blocks", "gauge", "Blocks of 16 tokens held."),
        ("bytes", "forge_prefix_cache_bytes", "gauge", "Bytes of keys and values held."),
        ("max_bytes", "forge_prefix_cache_max_bytes", "gauge", "The prefix cache's bound in bytes."),
    ):
        value = stats.get(key, 0)
        value = float(value) if isinstance(value, int | float) else 0.0
        lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name} {_number(value)}"]
    return lines
