"""Connections that can't pin the server: a deadline for a request's headers and body, and a cap on sockets.

uvicorn's h11 protocol times out only idle keep-alive connections: a client that
sends half a request line and waits holds its socket (and file descriptor) for
good, so a thousand of them lock everyone out. :func:`guarded_protocol` returns
its subclass with two timers and a cap:

- from connecting (or from the previous response) a client has ``header_timeout``
  seconds to finish its headers, then ``body_timeout`` for its body; past either,
  it gets 408 and is closed;
- at ``max_connections`` open sockets, a newcomer evicts the connection that has
  waited longest for its headers (a well-behaved client sends them at once, so a
  slow-loris attacker is the one evicted); if every connection is busy with a
  request, the newcomer gets 503 and is closed, and the server never runs out
  of descriptors.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Literal

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    import resource
except ImportError:  # Windows has no rlimits
    resource = None  # type: ignore[assignment]

__all__ = ["ConnectionLimits", "guarded_protocol", "raise_fd_limit"]

log = logging.getLogger("forge.server")

#: Descriptors kept for everything but client sockets: the model's files, a RAG store, logs, threads.
FD_RESERVE = 128


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    header_timeout: float
    body_timeout: float
    max_connections: int


def raise_fd_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit; the soft limit now."""
    if resource is None:
        return 1 << 16
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # some systems refuse; the cap below adapts to what is left
            pass
    return soft


def connection_cap(wanted: int) -> tuple[int, int]:
    """The connections to allow (``wanted``, or fewer if the open-file limit is low) and the listen backlog.

    asyncio accepts up to ``backlog`` sockets at a time before the protocol can close any, so the
    cap leaves room for two such batches under the limit; a low limit gets a smaller backlog.
    """
    room = raise_fd_limit() - FD_RESERVE
    backlog = min(2048, max(16, room // 4))
    cap = max(1, min(wanted, room - 2 * backlog))
    if cap < wanted:
        log.warning(
            "the open-file limit (%d) allows %d connections, not max_connections=%d; raise it with `ulimit -n`",
            room + FD_RESERVE,
            cap,
            wanted,
        )
    return cap, backlog


def _refusal(status: int, reason: str, message: str, code: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}})
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\n"
        f"content-length: {len(body)}\r\n"
    )
    if status == 503:
        head += "retry-after: 1\r\n"
    return (head + "\r\n" + body).encode("ascii")


Phase = Literal["head", "body"] | None


class _GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with deadlines for reading a request, and the cap on connections."""

    limits: ConnectionLimits  # set by guarded_protocol()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        self._phase: Phase = None
        self._since = 0.0
        self._timer: asyncio.TimerHandle | None = None
        full = len(self.connections) >= self.limits.max_connections and self._open() >= self.limits.max_connections
        super().connection_made(transport)  # type: ignore[arg-type]
        if full and not self._evict():
            log.debug("refused a connection: %d are open, all busy", len(self.connections) - 1)
            self._refuse(_refusal(503, "Service Unavailable", "the server has too many connections", "overloaded"))
            return
        self._track()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._track()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._track()

    def connection_lost(self, exc: Exception | None) -> None:
        self._set_phase(None)
        super().connection_lost(exc)

    def _open(self) -> int:
        return sum(1 for c in self.connections if not (c.transport is None or c.transport.is_closing()))

    def _evict(self) -> bool:
        """Close the connection that has waited longest for its request's headers; whether there was one."""
        waiting = [c for c in self.connections if isinstance(c, _GuardedH11) and c is not self and c._phase == "head"]
        waiting = [c for c in waiting if not c.transport.is_closing()]
        if not waiting:
            return False
        min(waiting, key=lambda c: c._since)._expire()
        return True

    def _track(self) -> None:
        """Arm the timer for the part of a request the client is sending now; keep a running one's deadline."""
        if self.transport.is_closing():
            self._set_phase(None)
            return
        state = self.conn.their_state
        self._set_phase("head" if state is h11.IDLE else "body" if state is h11.SEND_BODY else None)

    def _set_phase(self, phase: Phase) -> None:
        if phase == self._phase:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._phase, self._since = phase, self.loop.time()
        if phase is not None:
            seconds = self.limits.header_timeout if phase == "head" else self.limits.body_timeout
            self._timer = self.loop.call_later(seconds, self._expire)

    def _expire(self) -> None:
        """408 to a client too slow with its request (or evicted while waiting), and close."""
        phase = self._phase
        self._set_phase(None)
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:  # the app is waiting for the body: it sees a disconnect
            cycle.disconnected = True
            cycle.message_event.set()
            if cycle.response_started:
                self.transport.close()
                return
        what = "headers" if phase == "head" else "body"
        seconds = self.limits.header_timeout if phase == "head" else self.limits.body_timeout
        message = f"the request's {what} did not arrive within {seconds:g} s"
        self._refuse(_refusal(408, "Request Timeout", message, "request_timeout"))

    def _refuse(self, response: bytes) -> None:
        self._set_phase(None)
        self.transport.write(response)
        self.transport.close()


def guarded_protocol(limits: ConnectionLimits) -> type[H11Protocol]:
    """The h11 protocol class for uvicorn's ``http=`` option, with ``limits``."""
    return type("ForgeH11Protocol", (_GuardedH11,), {"limits": limits})
