"""forge.rag.chunking: token-budgeted chunks that break at paragraphs, sentences and lines."""

from __future__ import annotations

import re
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forge.rag.chunking import Chunk, chunk_text, content_hash
from forge.tokenizer import Tokenizer

Counter = Callable[[str], int]


def words(s: str) -> int:
    return len(s.split())


def quarter_chars(s: str) -> int:
    """About a token per four characters, rounded up: counts joined text differently from its parts."""
    return -(-len(s) // 4)


def with_bos_eos(s: str) -> int:
    """A counter that adds two special tokens to every count, as many tokenizers do."""
    return len(s.split()) + 2


def check(text: str, chunks: list[Chunk], count: Counter, max_tokens: int) -> None:
    """The invariants every chunking must hold."""
    covered = [False] * len(text)
    for i, chunk in enumerate(chunks):
        assert text[chunk.start : chunk.end] == chunk.text
        assert chunk.text
        assert chunk.text == chunk.text.strip()
        if i:
            assert chunks[i - 1].start < chunk.start
            assert chunks[i - 1].end < chunk.end
        lone_word = len(chunk.text.split()) == 1
        assert count(chunk.text) <= max_tokens or lone_word, (count(chunk.text), chunk.text)
        covered[chunk.start : chunk.end] = [True] * (chunk.end - chunk.start)
    missed = [i for i, c in enumerate(text) if not c.isspace() and not covered[i]]
    assert not missed, f"characters at {missed[:10]} are in no chunk"


PROSE = (
    "It was the best of times, it was the worst of times. It was the age of wisdom! "
    "Was it the age of foolishness? Mr. Lorry said so. It was the epoch of belief.\n\n"
    "There were a king with a large jaw and a queen with a plain face, on the throne of England. "
    "It was clearer than crystal to the lords of the State preserves of loaves and fishes.\n\n"
    "France, less favoured on the whole as to matters spiritual than her sister of the shield and trident, "
    "rolled with exceeding smoothness down hill, making paper money and spending it."
)

VERSE = "\n".join(
    [
        "To be, or not to be, that is the question:",
        "Whether 'tis nobler in the mind to suffer",
        "The slings and arrows of outrageous fortune,",
        "Or to take arms against a sea of troubles",
        "And by opposing end them. To die: to sleep;",
        "No more; and by a sleep to say we end",
        "The heart-ache and the thousand natural shocks",
        "That flesh is heir to, 'tis a consummation",
        "Devoutly to be wish'd. To die, to sleep;",
        "To sleep: perchance to dream: ay, there's the rub;",
        "For in that sleep of death what dreams may come",
        "When we have shuffled off this mortal coil,",
    ]
)


def test_empty_or_blank_text_has_no_chunks() -> None:
    assert chunk_text("", words) == []
    assert chunk_text(" \n\n\t \u3000", words) == []


def test_short_text_is_one_stripped_chunk() -> None:
    text = "\n\n  To be, or not to be.  \n"
    assert chunk_text(text, words) == [Chunk("To be, or not to be.", 4, 24)]


@pytest.mark.parametrize("count", [words, quarter_chars, with_bos_eos])
@pytest.mark.parametrize("max_tokens", [8, 12, 30, 200])
def test_invariants_on_prose_and_verse(count: Counter, max_tokens: int) -> None:
    for text in [PROSE, VERSE, PROSE + "\n\n" + VERSE]:
        chunks = chunk_text(text, count, max_tokens=max_tokens, overlap=max_tokens // 4)
        check(text, chunks, count, max_tokens)


def test_paragraphs_are_kept_whole_when_they_fit() -> None:
    paragraphs = PROSE.split("\n\n")
    longest = max(words(p) for p in paragraphs)
    chunks = chunk_text(PROSE, words, max_tokens=longest + 5, overlap=10)
    assert len(chunks) > 1
    for paragraph in paragraphs:
        assert any(paragraph in chunk.text for chunk in chunks), paragraph
    # Each chunk breaks at the end of a paragraph.
    ends = {PROSE.index(p) + len(p) for p in paragraphs}
    assert all(chunk.end in ends for chunk in chunks)


def test_consecutive_chunks_overlap_by_whole_lines() -> None:
    chunks = chunk_text(VERSE, words, max_tokens=30, overlap=10)
    assert len(chunks) >= 3
    lines = VERSE.split("\n")
    for before, after in pairwise(chunks):
        shared = VERSE[after.start : before.end]
        assert after.start < before.end, "no overlap"
        assert 1 <= words(shared) <= 15  # about the overlap, never more than half the budget
        assert all(line in lines for line in shared.split("\n"))  # whole lines, not fragments


def test_no_overlap_when_zero() -> None:
    chunks = chunk_text(VERSE, words, max_tokens=30, overlap=0)
    assert all(after.start > before.end for before, after in pairwise(chunks))
    assert "\n".join(c.text for c in chunks) == VERSE  # verse lines are boundaries


def test_overlap_is_capped_at_half_the_budget() -> None:
    chunks = chunk_text(VERSE, words, max_tokens=20, overlap=19)
    assert len(chunks) > 2
    for before, after in pairwise(chunks):
        assert words(VERSE[after.start : before.end]) <= 10


def test_sentences_break_after_punctuation_before_a_capital() -> None:
    sentences = [
        "Mr. Lorry waited by the door.",  # no break after an abbreviation
        "He said: 'Recalled to life.'",  # a break after a closing quote
        "He went to St. Paul's today.",
        "Did he come back here?",
        "Yes, at dawn he did, e.g. today.",  # nor before a lower-case word
    ]
    chunks = chunk_text(" ".join(sentences), words, max_tokens=8, overlap=0)
    assert [c.text for c in chunks] == sentences


def test_a_huge_sentence_is_split_by_words() -> None:
    text = "Intro sentence here. " + " ".join(f"word{i}" for i in range(1000)) + ". Outro sentence."
    chunks = chunk_text(text, words, max_tokens=50, overlap=10)
    check(text, chunks, words, 50)
    assert len(chunks) >= 20
    assert max(words(c.text) for c in chunks) == 50  # packed to the budget
    assert chunks[0].text.startswith("Intro sentence here. word0")


def test_a_word_longer_than_the_budget_is_a_chunk_of_its_own() -> None:
    long_word = "x" * 200
    text = f"Short start. {long_word} Short end."
    chunks = chunk_text(text, quarter_chars, max_tokens=10, overlap=2)
    check(text, chunks, quarter_chars, 10)
    assert long_word in [c.text for c in chunks]


def test_special_token_overhead_is_allowed_for_once() -> None:
    chunks = chunk_text(VERSE, with_bos_eos, max_tokens=32, overlap=0)
    check(VERSE, chunks, with_bos_eos, 32)
    # Without the allowance each line would cost two extra tokens and chunks would hold fewer lines.
    assert max(with_bos_eos(c.text) for c in chunks) >= 28


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 4}, r"max_tokens=4.*at least 8"),
        ({"max_tokens": 100, "overlap": -1}, r"overlap=-1.*less than max_tokens=100.*overlap=20"),
        ({"max_tokens": 100, "overlap": 100}, r"overlap=100.*less than max_tokens=100"),
    ],
)
def test_arguments_are_validated(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        chunk_text("text", words, **kwargs)


def test_a_counter_whose_overhead_fills_the_budget_is_refused() -> None:
    with pytest.raises(ValueError, match=r"count_tokens\(''\) is 5.*without special tokens"):
        chunk_text("text", lambda s: len(s.split()) + 5, max_tokens=8, overlap=0)


def test_each_unit_is_counted_once() -> None:
    seen: list[str] = []

    def counting(s: str) -> int:
        seen.append(s)
        return words(s)

    text = "\n\n".join([PROSE, VERSE] * 5)
    chunks = chunk_text(text, counting, max_tokens=40, overlap=8)
    distinct_units = {s for s in seen if s.strip() and s not in {c.text for c in chunks}}
    assert len(seen) == len(set(seen)), "a string was counted twice"
    # Units once each, chunks once each to check the sums: about twice the text, not once per packing step.
    assert sum(map(len, seen)) < 3 * len(text)
    assert len(distinct_units) < len(text.split())


def test_content_hash_ignores_layout_only() -> None:
    assert content_hash("To be,\n  or not\tto be ") == content_hash("To be, or not to be")
    assert content_hash("To be") != content_hash("To  bee")
    assert re.fullmatch(r"[0-9a-f]{64}", content_hash(""))


# A real play


def test_hamlet_by_words(hamlet: Path) -> None:
    text = hamlet.read_text(encoding="utf-8")
    chunks = chunk_text(text, words, max_tokens=200, overlap=40)
    check(text, chunks, words, 200)
    sizes = [words(c.text) for c in chunks]
    assert sum(sizes) / len(sizes) > 150  # packed, not one speech per chunk
    overlapping = sum(after.start < before.end for before, after in pairwise(chunks))
    assert overlapping >= 0.9 * (len(chunks) - 1)


def test_hamlet_by_bpe_tokens(hamlet: Path, bpe_tokenizer: Tokenizer) -> None:
    text = hamlet.read_text(encoding="utf-8")[:60_000]
    count = lambda s: len(bpe_tokenizer.encode(s))
    chunks = chunk_text(text, count, max_tokens=128, overlap=24)
    check(text, chunks, count, 128)
    assert sum(count(c.text) for c in chunks) / len(chunks) > 90


# Properties

_PIECES = st.one_of(
    st.text(alphabet="abcXYZé", min_size=1, max_size=12),
    st.sampled_from([" ", "  ", "\n", "\n\n", " \n \n ", "\t", "\u00a0", "\u2028", ". ", "? ", "! ", ".' ", "Mr. "]),
)
_TEXTS = st.one_of(
    st.lists(_PIECES, max_size=80).map("".join),
    st.text(alphabet=st.sampled_from("ab. \n\tX!\u3000"), max_size=300),
)


@settings(max_examples=150, deadline=None)
@given(
    text=_TEXTS,
    count=st.sampled_from([words, quarter_chars, with_bos_eos]),
    max_tokens=st.integers(8, 40),
    overlap_fraction=st.floats(0, 0.99),
)
def test_chunks_cover_the_text_in_order_within_budget(
    text: str, count: Counter, max_tokens: int, overlap_fraction: float
) -> None:
    overlap = int(overlap_fraction * max_tokens)
    check(text, chunk_text(text, count, max_tokens=max_tokens, overlap=overlap), count, max_tokens)
