"""Slow-loris against a real `forge serve`: half-sent requests can't exhaust its file descriptors or lock anyone out."""

from __future__ import annotations

import resource
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serving import ServerProcess

from forge.server.connections import ConnectionLimits, guarded_protocol

FD_LIMIT = 256  # the server's open-file limit, soft and hard: the attack below needs more than this
ATTACKERS = 320


def _limit_files() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


@pytest.fixture(scope="module")
def guarded_server(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("slowloris") / "serve.log"
    args = ["--header-timeout", "2", "--body-timeout", "2", "--max-connections", "64", "--log-level", "warning"]
    server = ServerProcess(tiny_ckpt, *args, log=log, api_key=None, preexec_fn=_limit_files)
    yield server.ready()
    server.stop()


def _until_closed(s: socket.socket) -> bytes:
    """What the server sent before it closed ``s`` (b"reset" if it reset it); a hang fails at the socket timeout."""
    data = b""
    try:
        while chunk := s.recv(4096):
            data += chunk
    except ConnectionResetError:
        return data or b"reset"
    return data


def test_half_sent_requests_are_dropped_and_others_still_served(guarded_server: ServerProcess) -> None:
    attackers = []
    try:
        for _ in range(ATTACKERS):  # more half-sent request lines than the server has descriptors
            s = socket.create_connection(("127.0.0.1", guarded_server.port), timeout=30)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # and never the blank line that ends the headers
            attackers.append(s)
        response = httpx.get(f"{guarded_server.url}/health", timeout=20)  # a well-behaved client gets in
        assert response.status_code == 200
        for s in attackers:  # every half-sent request is closed: evicted, or timed out with 408
            got = _until_closed(s)
            assert got in (b"", b"reset") or got.startswith(b"HTTP/1.1 408"), got[:100]
    finally:
        for s in attackers:
            s.close()
    assert httpx.get(f"{guarded_server.url}/health", timeout=20).status_code == 200
    assert "Traceback" not in guarded_server.log()


def test_an_idle_connection_gets_408_after_the_header_timeout(guarded_server: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", guarded_server.port), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        data = b""
        while chunk := s.recv(4096):  # returns once the server closes it, after about 2 s
            data += chunk
    assert data.startswith(b"HTTP/1.1 408")
    assert b"request_timeout" in data


def test_a_slow_body_gets_408(guarded_server: ServerProcess) -> None:
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    with socket.create_connection(("127.0.0.1", guarded_server.port), timeout=30) as s:
        s.sendall(head + b'{"prompt": ')  # the headers on time, then a body that never ends
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    assert data.startswith(b"HTTP/1.1 408")
    assert b"body" in data


def test_the_protocol_class_carries_its_limits() -> None:
    limits = ConnectionLimits(header_timeout=1.0, body_timeout=0.5, max_connections=8)
    assert guarded_protocol(limits).limits == limits  # type: ignore[attr-defined]
