"""Prompt memory: a long prompt sharing a prefix with a recent one is tokenized only past it, exactly."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from forge.app import Forge
from forge.generator import GenerationConfig
from forge.models import create_model, padded_vocab, save
from forge.prompt_memory import MAX_PROMPTS, MIN_CHARS, PromptMemory, reusable
from forge.tokenizer import Tokenizer

# Pieces that stress the pre-tokenizer's regex around a cut: contractions, digit runs, whitespace runs,
# punctuation, letters outside ASCII, and text after a space that is not a letter.
PIECES = [
    " the",
    " king's",
    " they'll",
    " I'm",
    " 2024",
    " 3.14159",
    "  ",
    "   \n",
    "\n\n",
    "\t",
    " --",
    "!?",
    " café",
    " naïve",
    " Ωmega",
    " 東京",
    " 😀",
    "'s",
    "'ve",
    " a",
    " b",
    "\r\n",
    " 12ab34",
    "x",
    "y z",
]


@pytest.fixture(scope="module")
def play(hamlet: Path) -> str:
    """All of Hamlet (~190k characters)."""
    return hamlet.read_text(encoding="utf-8")


def _texts(seed: int, base: str, added: list[str]) -> list[str]:
    """Prompts that share prefixes of every length with each other and with ``base``, diverging anywhere."""
    rng = random.Random(seed)
    out = []
    for _ in range(40):
        head = base[: rng.randrange(MIN_CHARS, len(base))]
        tail = "".join(rng.choice(PIECES + added) for _ in range(rng.randrange(0, 40)))
        if rng.random() < 0.3:  # diverge inside a word, a number or whitespace of the shared text
            head = head + rng.choice(["ing", "9", " ", "'", "\n", added[0] if added else "<"])
        out.append(head + tail)
    return out


def _check(tok: Tokenizer, texts: list[str]) -> PromptMemory:
    memory = tok.prompt_memory()
    assert memory is not None
    for text in texts:
        assert tok.encode_prompts([text])[0] == tok.hf.encode(text, add_special_tokens=False).ids, text[-80:]
    return memory


def test_smollm2_prompts_tokenize_as_a_whole_text_does(smollm2_app, play: str) -> None:
    tok = smollm2_app.tokenizer
    added = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    base = play[:20000]
    for text in added:  # added tokens sit in the shared text too
        at = base.index(" ", 5000 + 997 * len(text))
        base = base[:at] + text + base[at:]
    memory = _check(tok, _texts(0, base, added))
    assert memory.stats["hits"] >= 30  # the prompts shared prefixes: most were served from memory
    assert memory.stats["chars_reused"] > 30 * MIN_CHARS


def test_a_trained_bpe_tokenizer_uses_the_memory_too(play: str) -> None:
    tok = Tokenizer.train([play[:60000]], vocab_size=600)
    memory = _check(tok, _texts(1, play[60000:90000], ["<|endoftext|>"]))
    assert memory.stats["hits"] >= 30


def test_a_chat_prompt_keeps_its_system_prompt_and_tokenizes_the_new_turn(smollm2_app, play: str) -> None:
    tok = smollm2_app.tokenizer
    system = [{"role": "system", "content": "Answer from this text.\n\n" + play[:9000]}]
    first = smollm2_app.render([*system, {"role": "user", "content": "Who speaks first?"}])
    second = smollm2_app.render([*system, {"role": "user", "content": "Name one image the verse uses."}])
    memory = tok.prompt_memory()
    assert memory is not None
    before = dict(memory.stats)
    assert tok.encode_prompt(first) == tok.hf.encode(first, add_special_tokens=False).ids
    assert tok.encode_prompt(second) == tok.hf.encode(second, add_special_tokens=False).ids
    assert memory.stats["hits"] == before["hits"] + 1
    assert memory.stats["chars_reused"] - before["chars_reused"] > 8900  # all but the end of the system prompt


def test_a_cut_never_splits_an_added_token(play: str) -> None:
    """An added token with a space between letters holds a would-be cut: the memory must not cut there."""
    tok = Tokenizer.train([play[:30000]], vocab_size=400)
    tok.hf.add_special_tokens(["<my token>"])
    head = play[40000 : 40000 + MIN_CHARS]
    a, b = head + " <my token> and more words 1", head + " <my token> and more words 2, and then some more words"
    memory = _check(tok, [a, b])
    assert tok.hf.token_to_id("<my token>") in tok.hf.encode(b).ids
    assert memory.stats["hits"] == 0  # the only cut near the shared end lies inside the token: b is encoded whole
    c = b + " here"  # all of b is shared: a cut after the token is near
    _check(tok, [c])
    assert memory.stats["hits"] == 1


def test_memory_is_bounded_and_skips_tokenizers_it_cannot_serve(play: str, char_tokenizer) -> None:
    tok = Tokenizer.train([play[:30000]], vocab_size=400)
    texts = [f"{i} {play[i * 100 : i * 100 + MIN_CHARS + 10]}" for i in range(MAX_PROMPTS + 5)]
    memory = _check(tok, texts)
    assert len(memory) == MAX_PROMPTS
    assert memory.stats["hits"] == 0  # each starts with its own number: nothing shared
    # The char tokenizer has no pre-tokenizer (BPE with byte fallback): it is called whole, every time.
    assert char_tokenizer.prompt_memory() is None
    text = play[: MIN_CHARS * 2]
    assert char_tokenizer.encode_prompts([text, text]) == [char_tokenizer.encode(text)] * 2


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({}, True),
        ({"normalizer": {"type": "NFC"}}, False),
        ({"pre_tokenizer": {"type": "Metaspace", "replacement": "▁"}}, False),
        ({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True, "use_regex": True}}, False),
        ({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}}, False),
        ({"model": {"type": "BPE", "byte_fallback": True}}, False),
        ({"model": {"type": "Unigram"}}, False),
    ],
)
def test_reusable_reads_the_pipeline(change: dict, expected: bool) -> None:
    config = {
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": True},
                {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
            ],
        },
        "model": {"type": "BPE", "byte_fallback": False},
    }
    assert reusable({**config, **change}) is expected


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_a_server_remembers_prompts_only_with_its_prefix_cache_on(
    tmp_path: Path, play: str, prefix_cache: bool
) -> None:
    """Requests through the app and its batching engine: ``prefix_cache=False`` reuses nothing of a shared
    prompt, its tokens included; on, the second request is tokenized past the shared part. Same text both ways."""
    tok = Tokenizer.train([play[:30000]], vocab_size=400)
    path = tmp_path / "ckpt"
    save(path, create_model("tiny", vocab_size=padded_vocab(tok.vocab_size), context_length=2048), tok)
    system = play[50000 : 50000 + MIN_CHARS + 500]

    questions = (" Who is it?", " What is it?")

    async def main() -> tuple[list[str], dict[str, int]]:
        app = Forge.load(path, defaults=GenerationConfig(temperature=0, max_tokens=4))
        await app.start_batching(max_batch=2, prefix_cache=prefix_cache)
        try:
            texts = [await app.generate(system + question) for question in questions]
        finally:
            await app.stop_batching()
        memory = app.tokenizer.prompt_memory()
        assert memory is not None
        return texts, dict(memory.stats)

    texts, stats = asyncio.run(main())
    assert stats["hits"] == (1 if prefix_cache else 0)
    assert stats["lookups"] == (2 if prefix_cache else 0)
    plain = Forge.load(path, defaults=GenerationConfig(temperature=0, max_tokens=4))
    assert texts == [plain.sync.generate(system + q) for q in questions]
