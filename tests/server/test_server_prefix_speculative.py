"""The server with prefix caching and n-gram speculation: the same answers, and /metrics counts the reuse."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from forge import Forge
from forge.server import create_server

SHARED = "abcdefgh" * 4  # 32 characters: two blocks of 16 tokens every request starts with


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert found is not None, f"{name} is not in /metrics"
    return float(found.group(1))


@pytest.fixture(scope="module")
def clients(bigram_chat_dir: Path) -> Iterator[tuple[TestClient, TestClient]]:
    plain = create_server(Forge.load(bigram_chat_dir, device="cpu"), prefix_cache=False)
    fast = create_server(Forge.load(bigram_chat_dir, device="cpu"), speculate="ngram")
    with TestClient(plain) as a, TestClient(fast) as b:
        yield a, b


def complete(client: TestClient, prompt: str) -> str:
    body = {"prompt": prompt, "max_tokens": 12, "temperature": 0}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_cached_and_speculative_answers_are_the_plain_ones(clients: tuple[TestClient, TestClient]) -> None:
    plain, fast = clients
    prompts = [SHARED + "abc", SHARED + "efgha", SHARED + "bc"]
    assert [complete(fast, p) for p in prompts] == [complete(plain, p) for p in prompts]
    text = fast.get("/metrics").text
    assert metric(text, "forge_prefix_cache_lookups_total") == 3
    assert metric(text, "forge_prefix_cache_hits_total") == 2
    assert metric(text, "forge_prefix_cache_tokens_reused_total") == 2 * 32
    assert metric(text, "forge_prefix_cache_blocks") >= 2
    assert metric(text, "forge_prefix_cache_evictions_total") == 0
    proposed = metric(text, "forge_speculative_proposed_tokens_total")
    assert 0 < metric(text, "forge_speculative_accepted_tokens_total") <= proposed
    assert metric(text, "forge_speculative_steps_total") > 0
    off = plain.get("/metrics").text
    assert "forge_prefix_cache_hits_total" not in off  # --no-prefix-cache: no cache, no counters
    assert metric(off, "forge_speculative_steps_total") == 0


def test_a_bad_speculate_mode_is_refused(bigram_chat_dir: Path) -> None:
    from forge.errors import ConfigError

    with pytest.raises(ConfigError, match="speculate"):
        create_server(Forge.load(bigram_chat_dir, device="cpu"), speculate="draft-model")
