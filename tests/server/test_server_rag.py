"""`forge serve --db DB`: the query route and chat answers grounded in the store, over real HTTP."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from serving import ServerProcess

from forge import models
from forge.rag import NOT_FOUND
from forge.rag.embed import LocalEmbedder
from forge.rag.grounded import quotes
from forge.rag.retrieval import Rag


@pytest.fixture(scope="module")
def rag_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    try:
        smol = models.locate("smollm2")
    except Exception as e:
        pytest.skip(f"SmolLM2 is not installed: {e}")
    root = tmp_path_factory.mktemp("rag-notes")
    (root / "launch.md").write_text("The Apollo-X launch is scheduled for March 14 at Cape Canaveral.\n")
    (root / "menu.txt").write_text("The cafeteria serves tomato soup on Fridays.\n")
    db = root / "s.db"
    rag = Rag(db, embedder=LocalEmbedder.default())
    rag.add([root])
    rag.close()
    server = ServerProcess(smol, "--db", str(db), "--rag-k", "2", log=root / "serve.log")
    yield server.ready(timeout=180)
    server.stop()


def test_query_route_returns_scored_chunks(rag_server: ServerProcess) -> None:
    with rag_server.http() as http:
        r = http.post("/v1/rag/query", json={"query": "when does the rocket launch?", "k": 2})
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        assert Path(data[0]["source"]).name == "launch.md" and "March 14" in data[0]["text"]
        assert data[0]["score"] > data[1]["score"] and {"start", "end", "metadata"} <= set(data[0])
        bad = http.post("/v1/rag/query", json={"query": "x", "k": 0})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "k"
        sneaky = http.post("/v1/rag/query", json={"query": "x", "filter": {"a') OR 1=1 --": 1}})
        assert sneaky.status_code == 400 and "filter key" in sneaky.json()["error"]["message"]


def test_chat_answers_quote_and_cite_their_sources(rag_server: ServerProcess) -> None:
    body = {"messages": [{"role": "user", "content": "When is the launch?"}], "max_tokens": 64}
    with rag_server.http() as http:
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        sources = r.json()["sources"]
        assert Path(sources[0]["source"]).name == "launch.md"
        answer = r.json()["choices"][0]["message"]["content"]
        quoted = quotes(answer)  # the grammar: an exact quote of the cited source, then its [n]
        assert quoted and "March 14" in quoted[0][0], answer
        assert quoted[0][0] in sources[quoted[0][1] - 1]["text"]
        with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as stream:
            chunks = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: {")]
        assert Path(chunks[0]["sources"][0]["source"]).name == "launch.md"
        streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        assert streamed == answer


def test_chat_says_when_the_sources_lack_the_answer(rag_server: ServerProcess) -> None:
    body = {"messages": [{"role": "user", "content": "Who painted the Mona Lisa?"}], "max_tokens": 32}
    with rag_server.http() as http:
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == NOT_FOUND


def test_a_request_format_wins_over_the_quote_grammar(rag_server: ServerProcess) -> None:
    date = {"type": "string", "maxLength": 24}  # short enough that the JSON always closes within max_tokens
    schema = {"type": "object", "properties": {"date": date}, "required": ["date"], "additionalProperties": False}
    body = {
        "messages": [{"role": "user", "content": "When is the launch?"}],
        "max_tokens": 64,
        "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "d", "schema": schema}},
    }
    with rag_server.http() as http:
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert "date" in json.loads(r.json()["choices"][0]["message"]["content"])
        assert Path(r.json()["sources"][0]["source"]).name == "launch.md"


def test_a_server_without_a_store_says_how_to_add_one(tiny_server: ServerProcess) -> None:
    with tiny_server.http() as http:
        r = http.post("/v1/rag/query", json={"query": "anything"})
    assert r.status_code == 404 and "--db DB" in r.json()["error"]["message"]
