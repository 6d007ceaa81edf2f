"""Load on `forge serve`: concurrent streaming clients, and 16 requests at once against one after another.

Prints JSON. Starts a real server process on a random-weight model (the `small`
preset by default, char tokenizer with no end-of-text token, so every request
generates exactly --max-tokens), then:

* load: --clients concurrent clients send streaming completions for --duration
  seconds; requests/s, generated tokens/s, time to first token p50/p99;
* batch vs sequential: the same --batch requests (16) all at once, then one after
  another; aggregate tokens/s of each and their ratio (continuous batching's gain).

    python benchmarks/serve_load.py [--preset small] [--clients 8] [--duration 10] [--device cpu]

The client runs on the same machine as the server; on a small CPU it takes a share of the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHAKESPEARE, environment
from forge.core.device import resolve_device
from forge.models import create_model, padded_vocab, save
from forge.tokenizer import Tokenizer

FALLBACK_TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"


def build_checkpoint(preset: str, path: Path) -> None:
    hamlet = SHAKESPEARE / "hamlet.txt"
    text = hamlet.read_text(encoding="utf-8")[:20_000] if hamlet.is_file() else FALLBACK_TEXT
    tokenizer = Tokenizer.train([text], kind="char", special_tokens=())  # no EOS: fixed-length completions
    torch.manual_seed(0)
    save(path, create_model(preset, vocab_size=padded_vocab(tokenizer.vocab_size)), tokenizer)


def start_server(checkpoint: Path, port: int, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "forge", "serve", str(checkpoint), "--port", str(port), "--device", args.device]
    cmd += ["--max-batch", str(args.max_batch), "--max-queue", "1024", "--log-level", "warning"]
    return subprocess.Popen(cmd, env=os.environ | {"PYTHONUNBUFFERED": "1"})


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"forge serve exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("forge serve did not start")


async def one_request(client: httpx.AsyncClient, prompt: str, max_tokens: int, seed: int) -> tuple[float, int]:
    """Stream one completion; (time to first token, completion tokens)."""
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start, first, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return (first if first is not None else time.perf_counter() - start), tokens


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def load(url: str, args: argparse.Namespace) -> dict[str, object]:
    ttfts: list[float] = []
    tokens, requests = 0, 0
    stop_at = time.perf_counter() + args.duration

    async def client_loop(i: int, client: httpx.AsyncClient) -> None:
        nonlocal tokens, requests
        k = 0
        while time.perf_counter() < stop_at:
            ttft, n = await one_request(client, args.prompt, args.max_tokens, seed=1000 * i + k)
            ttfts.append(ttft)
            tokens += n
            requests += 1
            k += 1

    limits = httpx.Limits(max_connections=args.clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(i, client) for i in range(args.clients)))
        elapsed = time.perf_counter() - start
    return {
        "clients": args.clients,
        "seconds": round(elapsed, 2),
        "requests": requests,
        "requests_per_sec": round(requests / elapsed, 2),
        "tokens_per_sec": round(tokens / elapsed, 1),
        "ttft_ms": {"p50": round(percentile(ttfts, 0.5) * 1000, 1), "p99": round(percentile(ttfts, 0.99) * 1000, 1)},
    }


async def batch_vs_sequential(url: str, args: argparse.Namespace) -> dict[str, object]:
    limits = httpx.Limits(max_connections=args.batch + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        together = await asyncio.gather(
            *(one_request(client, args.prompt, args.max_tokens, seed=i) for i in range(args.batch))
        )
        concurrent_s = time.perf_counter() - start
        start = time.perf_counter()
        alone = [await one_request(client, args.prompt, args.max_tokens, seed=i) for i in range(args.batch)]
        sequential_s = time.perf_counter() - start
    concurrent_tps = sum(n for _, n in together) / concurrent_s
    sequential_tps = sum(n for _, n in alone) / sequential_s
    return {
        "requests": args.batch,
        "concurrent": {"seconds": round(concurrent_s, 2), "tokens_per_sec": round(concurrent_tps, 1)},
        "sequential": {"seconds": round(sequential_s, 2), "tokens_per_sec": round(sequential_tps, 1)},
        "ttft_ms_p50": {
            "concurrent": round(statistics.median(t for t, _ in together) * 1000, 1),
            "sequential": round(statistics.median(t for t, _ in alone) * 1000, 1),
        },
        "speedup": round(concurrent_tps / sequential_tps, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--duration", type=float, default=10.0, help="Seconds of load.")
    p.add_argument("--batch", type=int, default=16, help="Requests of the batch-vs-sequential comparison.")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=16, help="The server's --max-batch.")
    p.add_argument("--prompt", default="To be, or not to be, that is the question: whether 'tis nobler")
    p.add_argument("--device", default="cpu")
    p.add_argument("--port", type=int, default=0, help="0: a free port.")
    args = p.parse_args()
    if args.port == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            args.port = s.getsockname()[1]
    url = f"http://127.0.0.1:{args.port}"
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / args.preset
        build_checkpoint(args.preset, checkpoint)
        proc = start_server(checkpoint, args.port, args)
        try:
            wait_ready(url, proc)
            asyncio.run(batch_vs_sequential(url, argparse.Namespace(**{**vars(args), "batch": 2})))  # warm up
            comparison = asyncio.run(batch_vs_sequential(url, args))
            under_load = asyncio.run(load(url, args))
            stats = httpx.get(f"{url}/metrics", timeout=10).text
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    batch_max = next((line.split()[-1] for line in stats.splitlines() if line.startswith("forge_batch_size_max ")), "?")
    print(
        json.dumps(
            {
                "benchmark": "serve_load",
                "preset": args.preset,
                "max_tokens": args.max_tokens,
                "server_max_batch": args.max_batch,
                "load": under_load,
                "batch_vs_sequential": comparison,
                "engine_batch_size_max": float(batch_max) if batch_max != "?" else None,
                "environment": environment(resolve_device(args.device)),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
