"""Red-team harness: hostile bodies, slow clients, heavy schemas and kill -9 loops against real Forge processes.

Prints JSON (and saves benchmarks/results/redteam_cpu.json with --save). Each phase
runs against a real `forge serve` or `forge train` subprocess on a small
random-weight model, so it measures what a user runs:

* fuzz: --requests bodies sent to /v1/chat/completions, /v1/completions and
  /v1/embeddings (junk, wrong types, out-of-range values, and the shapes issue 14
  found: schemas nested 100+ deep, integers >= 2**64, recursive $ref, huge
  schemas, tool messages without ids, unknown models); counts statuses, 5xx and
  hangs (no answer within --hang-after seconds);
* slowloris: --slow-clients connections that send half a request line and wait,
  while a well-behaved client polls /health; counts /health failures, its worst
  latency, and how many slow connections the server closed by itself;
* heavy: three 990-property schema requests (the most the server accepts) at once while /health is polled
  and a completion streams; the worst /health latency and stream gap;
* kills: `forge train` killed with SIGKILL --kills times at random moments; after
  each, the checkpoint must load and verify, and a resume must finish;
* rss: the server's peak resident memory (VmHWM) after all of the above.

    python benchmarks/redteam.py [--requests 1200] [--slow-clients 1100] [--kills 20] [--save]
    python benchmarks/redteam.py --quick     # the slice tests/test_redteam.py runs in CI

No timings are asserted here; the test asserts counts (no 5xx, no hang, every kill survived).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import environment, save_result  # noqa: E402

FALLBACK = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 200


def corpus(tmp: Path) -> Path:
    """A small training text: a play shipped with the repository if present, else a fallback."""
    for folder in (ROOT / "tests" / "data" / "shakespeare", ROOT.parent / "shared" / "data" / "shakespeare"):
        plays = sorted(folder.glob("*.txt")) if folder.is_dir() else []
        if plays:
            text = plays[0].read_text(encoding="utf-8")[:60_000]
            break
    else:
        text = FALLBACK
    path = tmp / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_model(tmp: Path) -> Path:
    """A tiny random-weight checkpoint with a byte-level tokenizer and a chat template."""
    out = tmp / "model"
    cmd = [sys.executable, "-m", "forge", "train", str(corpus(tmp)), "--preset", "tiny", "--steps", "2"]
    cmd += ["--batch-size", "2", "--eval-every", "0", "--device", "cpu", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    return out


# ---------------------------------------------------------------- hostile bodies


def deep_schema(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def wide_schema(n: int) -> dict[str, Any]:
    return {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(n)}}


def hostile_schema(rng: random.Random) -> dict[str, Any]:
    big = rng.choice([2**64, 2**70, -(2**64) - 1, 10**30])
    return rng.choice(
        [
            deep_schema(rng.choice([101, 150, 400, 2000])),
            {"type": "integer", "minimum": big},
            {"type": "integer", "enum": [1, big]},
            {"const": big},
            {"$ref": "#"},
            {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
            {"type": "string", "pattern": "(a+)+" * 50},
            {"type": "object", "properties": {"x": {"type": ["string", {"type": "integer"}]}}},
            {"type": 7},
            [],
        ]
    )


def junk(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 3 else 6)
    scalars = [None, True, -1, 0, 2**64, 1e308, float("nan"), "", "x" * rng.randrange(40)]
    if kind < 6:
        return rng.choice(scalars)
    if kind < 8:
        return [junk(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["role", "content", "type", "a", ""]): junk(rng, depth + 1) for _ in range(rng.randrange(4))}


def chat_body(rng: random.Random) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": rng.randint(1, 3)}
    shape = rng.randrange(10)
    if shape == 0:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "x", "schema": hostile_schema(rng)}}
    elif shape == 1:
        tool = {"type": "function", "function": {"name": "f", "parameters": hostile_schema(rng)}}
        body["tools"] = [tool]
    elif shape == 2:
        body["messages"] = [{"role": "user", "content": "hi"}, {"role": "tool", "content": "18 C"}]
    elif shape == 3:
        body["model"] = rng.choice(["gpt-4", "", "x" * 300, None, 5])
    elif shape == 4:
        body["messages"] = junk(rng)
    elif shape == 5:
        body[rng.choice(["temperature", "top_p", "n", "seed", "stop", "logprobs", "top_logprobs"])] = junk(rng)
    elif shape == 6:
        body["messages"] = [{"role": "user", "content": "x " * rng.choice([10, 5000, 50_000])}]
    elif shape == 7:
        body["stream"] = True
    return body


def completion_body(rng: random.Random) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": rng.choice(["to be", "", ["a", "b"], [1, 2, 3]]), "max_tokens": 2}
    if rng.random() < 0.5:
        body[rng.choice(["prompt", "max_tokens", "echo", "logprobs", "best_of", "suffix"])] = junk(rng)
    return body


def embedding_body(rng: random.Random) -> dict[str, Any]:
    return {"input": rng.choice([junk(rng), "hello", ["a"] * rng.choice([1, 64, 2049]), [[1, 2]], [2**70]])}


async def fuzz(url: str, headers: dict[str, str], n: int, hang_after: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    routes = [
        ("/v1/chat/completions", chat_body),
        ("/v1/completions", completion_body),
        ("/v1/embeddings", embedding_body),
    ]
    statuses: dict[str, int] = {}
    fivexx: list[str] = []
    hangs = 0
    sem = asyncio.Semaphore(4)

    async def one(client: httpx.AsyncClient, i: int) -> None:
        nonlocal hangs
        path, make = routes[i % len(routes)]
        raw = json.dumps(make(rng)).encode() if rng.random() > 0.05 else rng.randbytes(rng.randrange(64))
        async with sem:
            try:
                response = await client.post(path, content=raw, headers={"Content-Type": "application/json"})
            except httpx.TimeoutException:
                hangs += 1
                return
        key = str(response.status_code)
        statuses[key] = statuses.get(key, 0) + 1
        if response.status_code >= 500:
            fivexx.append(f"{path} {response.status_code} {raw[:200]!r} -> {response.text[:300]}")

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=hang_after) as client:
        await asyncio.gather(*(one(client, i) for i in range(n)))
    return {"requests": n, "statuses": dict(sorted(statuses.items())), "5xx": len(fivexx), "hangs": hangs,
            "5xx_examples": fivexx[:5]}  # fmt: skip


# ---------------------------------------------------------------- slow clients and heavy work


async def poll_health(url: str, stop: asyncio.Event, timeout: float = 5.0) -> dict[str, Any]:
    worst, failures, polls = 0.0, 0, 0
    async with httpx.AsyncClient(timeout=timeout) as client:
        while not stop.is_set():
            start = time.perf_counter()
            try:
                ok = (await client.get(f"{url}/health")).status_code == 200
            except httpx.HTTPError:
                ok = False
            worst = max(worst, time.perf_counter() - start)
            failures += not ok
            polls += 1
            await asyncio.sleep(0.25)
    return {"health_polls": polls, "health_failures": failures, "health_worst_s": round(worst, 3)}


async def idle(url: str, seconds: float = 3.0) -> dict[str, Any]:
    stop = asyncio.Event()
    poller = asyncio.create_task(poll_health(url, stop))
    await asyncio.sleep(seconds)
    stop.set()
    return await poller


async def slowloris(url: str, port: int, clients: int, hold: float) -> dict[str, Any]:
    """Open many connections that never finish their request line; see who the server closes."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # this client needs a socket per slow client
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, clients + 256)), hard))
    stop = asyncio.Event()
    poller = asyncio.create_task(poll_health(url, stop))
    writers: list[asyncio.StreamWriter] = []
    readers: list[asyncio.StreamReader] = []
    refused = 0
    for _ in range(clients):
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
            await writer.drain()
            readers.append(reader)
            writers.append(writer)
        except OSError:
            refused += 1
    await asyncio.sleep(hold)
    closed = 0
    for reader in readers:  # closed: the server hung up (EOF) or answered with an error status
        with contextlib.suppress(asyncio.TimeoutError, OSError):
            data = await asyncio.wait_for(reader.read(1024), timeout=0.05)
            closed += data == b"" or data.startswith((b"HTTP/1.1 4", b"HTTP/1.1 5"))
    stop.set()
    health = await poller
    for writer in writers:
        writer.close()
    return {"slow_clients": clients, "connect_refused": refused, "closed_by_server": closed, **health}


async def heavy(url: str, headers: dict[str, str]) -> dict[str, Any]:
    """Three huge-schema requests at once while /health is polled and a completion streams."""
    stop = asyncio.Event()
    poller = asyncio.create_task(poll_health(url, stop))
    schema = wide_schema(990)  # just under the server's property limit, so it is compiled
    schema["required"] = list(schema["properties"])  # all optional: a valid 400 (the grammar's parser row overflows)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}  # fmt: skip
    gaps: list[float] = []

    async def stream(client: httpx.AsyncClient) -> None:
        last = time.perf_counter()
        payload = {"prompt": "to be", "max_tokens": 64, "stream": True}
        async with client.stream("POST", "/v1/completions", json=payload) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    now = time.perf_counter()
                    gaps.append(now - last)
                    last = now

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as client:
        results = await asyncio.gather(
            *(client.post("/v1/chat/completions", json=body) for _ in range(3)), stream(client), return_exceptions=True
        )
    stop.set()
    health = await poller
    codes = [r.status_code if isinstance(r, httpx.Response) else type(r).__name__ for r in results[:3]]
    return {"schema_statuses": codes, "stream_worst_gap_s": round(max(gaps, default=0.0), 3), **health}


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


# ---------------------------------------------------------------- kill -9 during training


def kills(tmp: Path, n: int, seed: int) -> dict[str, Any]:
    """SIGKILL `forge train` at random moments; after each the checkpoint loads and a resume finishes."""
    from forge.core.checkpoint import load_checkpoint
    from forge.errors import CheckpointError

    rng = random.Random(seed)
    data, out = corpus(tmp), tmp / "killed-run"
    base = [sys.executable, "-m", "forge", "train", str(data), "--preset", "tiny", "--batch-size", "2"]
    base += ["--eval-every", "0", "--checkpoint-every", "2", "--device", "cpu", "--out", str(out)]
    survived, corrupt, never_saved = 0, 0, 0
    for _ in range(n):
        resuming = (out / "forge.json").exists()
        cmd = base + ["--steps", "400"] + (["--resume", str(out)] if resuming else [])
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not resuming:  # the first run: wait for its first checkpoint, so kills land during saves and steps
            deadline = time.monotonic() + 300
            while not (out / "forge.json").exists() and child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 3.0) if not resuming else rng.uniform(1.0, 6.0))
        child.send_signal(signal.SIGKILL)
        child.wait()
        if not out.exists():
            never_saved += 1
            continue
        try:
            load_checkpoint(out)
            survived += 1
        except CheckpointError:
            corrupt += 1
    done = 0
    if survived:
        state = load_checkpoint(out).training_state or {}
        done = int(state.get("step", 0))
    more = ["--steps", str(done + 2)] + (["--resume", str(out)] if survived else [])
    resumed = subprocess.run([*base, *more], capture_output=True, text=True, timeout=600)
    return {
        "kills": n,
        "checkpoint_loads_after_kill": survived,
        "corrupt": corrupt,
        "killed_before_first_save": never_saved,
        "steps_done_at_last_kill": done,
        "resume_exit_code": resumed.returncode,
        "resume_error": resumed.stderr[-500:] if resumed.returncode else "",
    }


# ---------------------------------------------------------------- main


def start_server(model: Path, port: int, api_key: str, extra: list[str], nofile: int) -> subprocess.Popen[bytes]:
    """`forge serve` with at most ``nofile`` open files (soft and hard), as on the machine the issue was found on."""
    import resource

    cmd = [sys.executable, "-m", "forge", "serve", str(model), "--port", str(port), "--device", "cpu"]
    cmd += ["--api-key", api_key, "--log-level", "warning", *extra]
    limit = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, preexec_fn=limit)


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"forge serve exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        time.sleep(0.2)
    raise SystemExit("forge serve did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1200)
    parser.add_argument("--slow-clients", type=int, default=1100)
    parser.add_argument("--header-timeout", type=float, default=10.0, help="The server's --header-timeout.")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--server-nofile", type=int, default=1024, help="The server's open-file limit.")
    parser.add_argument("--hang-after", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="A small slice (about a minute or two).")
    parser.add_argument("--save", action="store_true", help="Also write benchmarks/results/redteam_cpu.json.")
    args = parser.parse_args()
    sys.setrecursionlimit(50_000)  # json.dumps of the 2,000-deep schemas this client sends
    if args.quick:
        args.requests, args.slow_clients, args.kills, args.header_timeout = 90, 200, 2, 2.0

    import torch

    out: dict[str, Any] = {"benchmark": "redteam", "env": environment(torch.device("cpu")), "args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = build_model(tmp)
        port, key = free_port(), "sk-redteam"
        url, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}
        server = start_server(model, port, key, ["--header-timeout", str(args.header_timeout)], args.server_nofile)
        try:
            wait_ready(url, server)
            out["idle_baseline"] = asyncio.run(idle(url))  # /health with nobody else: what the phases compare to
            out["fuzz"] = asyncio.run(fuzz(url, headers, args.requests, args.hang_after, args.seed))
            out["slowloris"] = asyncio.run(slowloris(url, port, args.slow_clients, args.header_timeout + 3.0))
            out["heavy"] = asyncio.run(heavy(url, headers))
            out["server_alive"] = server.poll() is None and httpx.get(f"{url}/health", timeout=5).status_code == 200
            out["server_peak_rss_mib"] = peak_rss_mib(server.pid)
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
        out["kills"] = kills(tmp, args.kills, args.seed)
    if args.save:
        save_result("redteam_cpu", out)
    else:
        print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
