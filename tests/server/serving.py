"""Helpers for the server tests: a real `forge serve` process, and reading /metrics."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

API_KEY = "sk-forge-test"
ORIGIN = "http://localhost:3000"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """`python -m forge serve MODEL --port P ...` in a subprocess; started at once, waited for on first use."""

    def __init__(self, model: Path, *args: str, log: Path, api_key: str | None = API_KEY, **popen: Any) -> None:
        self.port = free_port()
        self.api_key = api_key
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        cmd = [sys.executable, "-m", "forge", "serve", str(model), "--port", str(self.port), "--device", "cpu"]
        if api_key:
            cmd += ["--api-key", api_key]
        env = os.environ | {"PYTHONUNBUFFERED": "1"}
        self._log = log.open("w")
        self.proc = subprocess.Popen([*cmd, *args], stdout=self._log, stderr=subprocess.STDOUT, env=env, **popen)
        self._ready = False

    def ready(self, timeout: float = 90.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while not self._ready:
            if self.proc.poll() is not None:
                pytest.fail(f"forge serve exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                self._ready = httpx.get(f"{self.url}/health", timeout=1).status_code == 200
            if time.monotonic() > deadline:
                pytest.fail(f"forge serve did not answer /health within {timeout} s:\n{self.log()}")
            if not self._ready:
                time.sleep(0.1)
        return self

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @property
    def model_id(self) -> str:
        """The model's id, as GET /v1/models lists it: what requests name in ``model``."""
        response = httpx.get(f"{self.url}/v1/models", headers=self.headers, timeout=10)
        return str(response.json()["data"][0]["id"])

    def client(self, **options: object) -> OpenAI:
        """The official OpenAI client, pointed at this server (no retries: tests see every status)."""
        return OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "none", max_retries=0, **options)  # type: ignore[arg-type]

    def http(self, **options: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, **{"timeout": 30, **options})  # type: ignore[arg-type]

    def metrics(self) -> str:
        response = httpx.get(f"{self.url}/metrics", headers=self.headers, timeout=10)
        assert response.status_code == 200, response.text
        return response.text

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self, sig: int = signal.SIGINT, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return int(self.proc.returncode)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text, 0 if absent."""
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if found == labels:
            return float(m.group(3))
    return 0.0


def wait_for(condition: callable, timeout: float = 10.0, every: float = 0.05) -> bool:  # type: ignore[valid-type]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return bool(condition())
