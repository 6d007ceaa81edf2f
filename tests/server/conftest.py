"""Real `forge serve` processes for the server tests, started together once per session.

* ``tiny_server``: a random "tiny" model (context 512) whose char tokenizer has no
  end-of-text token, so it generates until max_tokens; API key and a CORS origin.
* ``bigram_server``: the bigram checkpoint of tests/conftest.py with a chat template
  that is just the messages' contents, so greedy text is exact: "a" -> "bcdefgh...".
* ``queue_server``: the tiny model with ``--max-batch 1 --max-queue 1``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from serving import ORIGIN, ServerProcess

from forge.models import create_model, load, padded_vocab, save
from forge.tokenizer import Tokenizer

CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
TINY_CONTEXT = 512
TINY_TEXT = "to be, or not to be: that is the question.\nabcdefghijklmnopqrstuvwxyz"


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = Tokenizer.train([TINY_TEXT], kind="char", special_tokens=())  # no EOS: never stops early
    torch.manual_seed(0)
    model = create_model("tiny", vocab_size=padded_vocab(tokenizer.vocab_size), context_length=TINY_CONTEXT)
    path = tmp_path_factory.mktemp("serve-tiny") / "tiny"
    save(path, model, tokenizer)
    return path


@pytest.fixture(scope="session")
def bigram_chat_dir(tmp_path_factory: pytest.TempPathFactory, bigram_dir: Path) -> Path:
    loaded = load(bigram_dir)
    loaded.tokenizer.chat_template = CHAT_TEMPLATE
    path = tmp_path_factory.mktemp("serve-bigram") / "bigram"
    save(path, loaded.model, loaded.tokenizer)
    return path


@pytest.fixture(scope="session")
def servers(
    tmp_path_factory: pytest.TempPathFactory, tiny_ckpt: Path, bigram_chat_dir: Path
) -> Iterator[dict[str, ServerProcess]]:
    logs = tmp_path_factory.mktemp("serve-logs")
    started = {
        "tiny": ServerProcess(tiny_ckpt, "--cors-origin", ORIGIN, log=logs / "tiny.log"),
        "bigram": ServerProcess(bigram_chat_dir, log=logs / "bigram.log"),
        "queue": ServerProcess(tiny_ckpt, "--max-batch", "1", "--max-queue", "1", log=logs / "queue.log"),
    }
    yield started
    for server in started.values():
        server.stop()


@pytest.fixture(scope="session")
def tiny_server(servers: dict[str, ServerProcess]) -> ServerProcess:
    return servers["tiny"].ready()


@pytest.fixture(scope="session")
def bigram_server(servers: dict[str, ServerProcess]) -> ServerProcess:
    return servers["bigram"].ready()


@pytest.fixture(scope="session")
def queue_server(servers: dict[str, ServerProcess]) -> ServerProcess:
    return servers["queue"].ready()
