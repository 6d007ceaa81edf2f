"""Grounded answers: quotes that are real, citations that are true, and "not in the sources" otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

from forge import models
from forge.rag import NOT_FOUND, Rag
from forge.rag.embed import LocalEmbedder
from forge.rag.grounded import Passage, _pieces, passages, quotes, rerank
from forge.rag.retrieval import Citation, cited

PLAY = """ACT II. SCENE VII.

DUKE SENIOR.
Thou seest we are not all alone unhappy;
This wide and universal theatre
Presents more woeful pageants than the scene
Wherein we play in.

JAQUES.
All the world's a stage,
And all the men and women merely players;
They have their exits and their entrances;
And one man in his time plays many parts,
His acts being seven ages.
"""
NOTES = {
    "launch.md": "# Launch\n\nThe Apollo-X launch is scheduled for March 14 at Cape Canaveral.\n\n"
    "The countdown starts at 06:00 local time.",
    "roster.txt": "Maria leads the propulsion team. Kenji runs the telemetry desk.\n\n"
    "The team meets every Tuesday in room 4B.",
    "as_you_like_it.txt": PLAY,
}
QUESTIONS = [
    "When is the Apollo-X launch scheduled?",
    "Who runs the telemetry desk?",
    "Who says all the world's a stage?",
    "Where does the team meet?",
]


def _words(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def rag(tmp_path_factory: pytest.TempPathFactory) -> Rag:
    try:
        models.locate("smollm2")
    except Exception as e:
        pytest.skip(f"SmolLM2 is not installed: {e}")
    rag = Rag(tmp_path_factory.mktemp("grounded") / "s.db", embedder=LocalEmbedder.default())
    rag.add(texts=NOTES)
    return rag


def test_a_passage_is_led_by_its_paragraph_heading() -> None:
    pieces = _pieces(PLAY)
    first = (
        "All the world's a stage, And all the men and women merely players; They have their exits and their entrances;"
    )
    assert ("JAQUES", first) in pieces  # three lines: the one that matches a question and the two after it
    assert all(heading in ("", "DUKE SENIOR", "JAQUES") for heading, _ in pieces)
    assert all(len(text.split()) >= 3 for _, text in pieces)  # no one-word fragments ("[Exit.]")


def test_a_chunk_that_begins_mid_speech_keeps_its_speaker() -> None:
    """Chunks overlap and are cut at line ends, so one may begin inside JAQUES's speech: its lines are his."""
    cut = PLAY.index("And one man")
    before, rest = PLAY[:cut], PLAY[cut:]
    assert _pieces(rest, before)[0] == (
        "JAQUES",
        "And one man in his time plays many parts, His acts being seven ages.",
    )
    assert _pieces(rest)[0][0] == ""  # without the text before, the speaker is unknown: no heading is made up
    # A chunk that begins a paragraph of its own takes nothing from the one before.
    cut = PLAY.index("JAQUES.")
    assert all(h in ("", "JAQUES") for h, _ in _pieces(PLAY[cut:], PLAY[:cut]))
    assert _pieces(PLAY[cut:], PLAY[:cut])[0][0] == "JAQUES"


def test_the_same_quote_from_overlapping_chunks_is_kept_once_with_its_heading() -> None:
    cut = PLAY.index("They have")
    sources = [
        Citation(1, "p.txt", cut, len(PLAY), PLAY[cut:], 0.9),  # the tail of the speech, no heading in it
        Citation(2, "p.txt", 0, len(PLAY), PLAY, 0.8),  # the whole speech, headed
    ]
    found = passages("Who plays many parts?", sources, LocalEmbedder.default(), 100)
    texts = [p.text for p in found]
    assert len(texts) == len(set(texts))
    tail = next(p for p in found if p.text.startswith("They have their exits"))
    assert (tail.heading, tail.number) == ("JAQUES", 2)


@pytest.mark.parametrize("seed", [None, 1, 2])
def test_every_quote_is_real_and_cites_the_source_it_came_from(rag: Rag, seed: int | None) -> None:
    """Greedy and sampled at temperature 1: whatever the model picks is a true quote with a true [n]."""
    sampling = {} if seed is None else {"temperature": 1.0, "seed": seed}
    for question in QUESTIONS:
        answer = rag.answer(question, k=3, max_tokens=80, **sampling)
        found = quotes(answer.text)
        assert found, f"{question!r}: {answer.text!r} quotes nothing"
        by_number = {s.number: _words(s.text) for s in answer.sources}
        for quote, number in found:
            assert number in by_number, f"{answer.text!r} cites [{number}], which was not given"
            assert quote in by_number[number], f"{quote!r} is not in source [{number}]"
        assert answer.citations == cited(answer.text, answer.sources) and answer.citations


def test_the_readme_question_is_answered_with_the_speaker_and_a_citation(rag: Rag) -> None:
    answer = rag.answer("Who says all the world's a stage?", k=3)
    assert answer.text.startswith("JAQUES: ") and "All the world's a stage" in answer.text
    assert [Path(c.source).name for c in answer.citations] == ["as_you_like_it.txt"]


def test_a_question_the_sources_cannot_answer_says_so(rag: Rag) -> None:
    for question in ("What is the boiling point of water in kelvin?", "Who painted the Mona Lisa?"):
        answer = rag.answer(question, k=3)
        assert answer.text == NOT_FOUND and answer.citations == []
        pieces, _ = rag.answer_stream(question, k=3)
        assert "".join(pieces) == NOT_FOUND


@pytest.mark.parametrize("seed", [0, 1])
def test_a_free_answer_cites_a_source_or_declines(rag: Rag, seed: int) -> None:
    for question in QUESTIONS[:2]:
        answer = rag.answer(question, k=3, mode="free", max_tokens=48, temperature=1.0, seed=seed)
        assert answer.text == NOT_FOUND or answer.citations, answer.text
        assert not answer.citations or all(1 <= c.number <= len(answer.sources) for c in answer.citations)


def test_a_bad_mode_is_named(rag: Rag) -> None:
    with pytest.raises(Exception, match="mode must be 'quote' or 'free', got 'poem'"):
        rag.answer("Who runs the telemetry desk?", mode="poem")  # type: ignore[arg-type]


def test_the_rerank_blends_the_models_judgement_with_the_passages_own_scores(rag: Rag) -> None:
    """Weight 1 (the default): the model's order alone, whatever the passages' own scores; weight 0: those
    scores alone."""
    model, tokenizer = rag.app.model, rag.app.tokenizer
    question = "Who runs the telemetry desk?"
    right = Passage(1, "", "Kenji runs the telemetry desk.", score=0.0, similarity=0.0)
    wrong = Passage(2, "", "The countdown starts at 06:00 local time.", score=9.0, similarity=0.0)
    other = Passage(3, "", "The team meets every Tuesday in room 4B.", score=8.0, similarity=0.0)
    choices = [wrong, right, other]
    assert rerank(model, tokenizer, question, choices)[0] is right  # the model reads which passage is asked about
    assert rerank(model, tokenizer, question, choices, weight=0.0) == [wrong, other, right]


def test_a_short_token_limit_picks_a_quote_that_fits(rag: Rag) -> None:
    """The best passage's quote may be longer than ``max_tokens``: the answer then quotes the best one that fits
    instead of failing (the benchmark's 64 tokens met a 67-token cast list)."""
    tokenizer = rag.app.tokenizer
    assert tokenizer is not None
    question = "Who says all the world's a stage?"
    full = rag.answer(question)
    limit = len(tokenizer.encode(full.text)) - 4  # the unconstrained choice no longer fits
    short = rag.answer(question, max_tokens=limit)
    assert short.text != full.text
    assert len(tokenizer.encode(short.text)) < limit
    assert quotes(short.text) and short.citations
