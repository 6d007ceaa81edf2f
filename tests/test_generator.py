"""The Generator: stop strings, streaming, async streaming, batches, limits and finish reasons.

Most tests use a "bigram" Transformer (see conftest): a real model whose
weights are set so that greedy decoding follows a fixed next-character table,
with a char tokenizer so each character is one token. That makes every
expected output known in advance, independent of the code under test.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import torch

from forge.errors import ConfigError, ContextLengthError, GenerationError
from forge.generator import Completion, GenerationConfig, Generator, admit, likelihoods
from forge.models import create_model, padded_vocab
from forge.tokenizer import EOS, Tokenizer

CYCLE = "abcdefgh"
#: a -> b -> ... -> h -> a, and v -> w -> x -> end of text.
TABLE: dict[str | int, str | int] = {
    **{c: CYCLE[(i + 1) % len(CYCLE)] for i, c in enumerate(CYCLE)},
    "v": "w",
    "w": "x",
    "x": EOS,
}


def expected_after(prompt_last: str, n: int) -> str:
    """The first n characters of the cycle after ``prompt_last``."""
    start = CYCLE.index(prompt_last) + 1
    return "".join(CYCLE[(start + i) % len(CYCLE)] for i in range(n))


@pytest.fixture
def gen(bigram_model: Callable[..., torch.nn.Module], char_tokenizer: Tokenizer) -> Generator:
    return Generator(bigram_model(char_tokenizer, TABLE), char_tokenizer)  # type: ignore[arg-type]


@pytest.fixture(scope="module", params=["bpe", "char"])
def random_gen(request: pytest.FixtureRequest, bpe_tokenizer: Tokenizer, char_tokenizer: Tokenizer) -> Generator:
    """A random tiny model: sampling gives varied, seed-dependent text, invalid UTF-8 byte runs included."""
    tokenizer = bpe_tokenizer if request.param == "bpe" else char_tokenizer
    torch.manual_seed(0)
    model = create_model("tiny", vocab_size=padded_vocab(tokenizer.vocab_size), n_layer=2, context_length=64)
    return Generator(model, tokenizer)


GREEDY = {"temperature": 0}


# -- the bigram model really is what the tests assume ----------------------------
def test_bigram_model_follows_the_table(gen: Generator) -> None:
    assert gen.generate("a", max_tokens=10, **GREEDY) == expected_after("a", 10)
    assert gen.generate("zzc", max_tokens=3, **GREEDY) == "def"


# -- stop strings -----------------------------------------------------------------
def test_stop_string_spanning_tokens_is_cut(gen: Generator) -> None:
    [result] = gen.complete("a", max_tokens=20, stop=["def"], **GREEDY)
    assert result.text == "bc"
    assert "def" not in result.text
    assert result.finish_reason == "stop"


def test_bare_string_stop_is_one_sequence(gen: Generator) -> None:
    # "fg" as characters would stop at "d"; as one sequence it stops before "fg".
    assert gen.generate("a", max_tokens=20, stop="fg", **GREEDY) == "bcde"


def test_earliest_of_several_stops_wins(gen: Generator) -> None:
    assert gen.generate("a", max_tokens=20, stop=["hab", "efg"], **GREEDY) == "bcd"


def test_stops_completing_on_the_same_token_cut_at_the_earliest(gen: Generator) -> None:
    # Both complete when "f" arrives; "cdef" starts first.
    assert gen.generate("a", max_tokens=20, stop=["ef", "cdef"], **GREEDY) == "b"


def test_stop_in_a_later_cycle(gen: Generator) -> None:
    # "hab" first completes after the first wrap-around.
    assert gen.generate("c", max_tokens=20, stop=["hab"], **GREEDY) == "defg"


def test_stop_matching_at_the_start(gen: Generator) -> None:
    [result] = gen.complete("a", max_tokens=20, stop=["bc"], **GREEDY)
    assert result.text == ""
    assert result.finish_reason == "stop"


def test_stop_is_not_matched_inside_the_prompt(gen: Generator) -> None:
    assert gen.generate("abc", max_tokens=3, stop=["ab"], **GREEDY) == "def"


def test_partial_stop_is_released_at_the_end(gen: Generator) -> None:
    """Text held back as a possible stop prefix is returned when generation ends without the stop."""
    [result] = gen.complete("a", max_tokens=3, stop=["dX"], **GREEDY)
    assert result.text == "bcd"
    assert result.finish_reason == "length"


def test_eos_stops_generation(gen: Generator) -> None:
    [result] = gen.complete("v", max_tokens=10, **GREEDY)
    assert result.text == "wx"
    assert result.finish_reason == "stop"
    assert result.completion_tokens == 2  # the end-of-text token is not part of the completion


def test_eos_can_be_ignored(gen: Generator) -> None:
    [result] = gen.complete("v", max_tokens=4, stop_at_eos=False, **GREEDY)
    assert result.text.startswith("wx" + EOS)
    assert result.finish_reason == "length"
    assert result.completion_tokens == 4


def test_stop_none_means_no_stop_sequences(gen: Generator) -> None:
    """``stop=None`` (what an OpenAI-style request sends for "no stops") is the same as no stops."""
    assert gen.generate("a", max_tokens=5, stop=None, **GREEDY) == expected_after("a", 5)


# -- finish reasons and limits ------------------------------------------------------
def test_length_finish(gen: Generator) -> None:
    [result] = gen.complete("a", max_tokens=6, **GREEDY)
    assert result == Completion(
        text=expected_after("a", 6),
        finish_reason="length",
        prompt_tokens=1,
        completion_tokens=6,
        token_ids=gen.tokenizer.encode(expected_after("a", 6)),
    )


@pytest.mark.parametrize("max_tokens", [1, 7, 30])
def test_max_tokens_is_respected(random_gen: Generator, max_tokens: int) -> None:
    for seed in range(3):
        [result] = random_gen.complete("to be", max_tokens=max_tokens, temperature=1.0, seed=seed)
        assert result.completion_tokens <= max_tokens
        assert len(result.token_ids) == result.completion_tokens
        if result.finish_reason == "length":
            assert result.completion_tokens == max_tokens


def test_prompt_longer_than_context_raises(gen: Generator) -> None:
    context = gen.model.config.context_length
    with pytest.raises(GenerationError, match=str(context)):
        gen.generate("a" * context, max_tokens=5)
    with pytest.raises(GenerationError):
        gen.generate(["a", "b" * (context + 10)], max_tokens=5)


def test_generation_stops_at_the_context(gen: Generator) -> None:
    context = gen.model.config.context_length
    [result] = gen.complete("a" * (context - 3), max_tokens=50, **GREEDY)
    assert result.completion_tokens == 3
    assert result.text == "bcd"
    assert result.finish_reason == "length"
    assert result.prompt_tokens == context - 3


# -- admission: one function for the generator and the engine ----------------------
def test_admit_checks_the_prompt_once_and_sets_the_budget(char_tokenizer: Tokenizer) -> None:
    tok, cfg = char_tokenizer, GenerationConfig(max_tokens=50, seed=3, logprobs=2, stop_at_eos=False)
    where = {"context": 16, "vocab_size": 320, "device": "cpu"}
    a = admit(tok, cfg, prompt="abc", **where)  # type: ignore[arg-type]
    assert a.seq.prompt == tok.encode_prompt("abc") and a.prompt_tokens == len(a.seq.prompt)
    assert a.seq.max_new_tokens == 16 - a.prompt_tokens  # cut to the context: the finish reason says "length"
    assert a.seq.stop_ids == frozenset() and a.seq.logprobs == 2 and a.row.logprobs == []
    again = admit(tok, cfg, ids=a.seq.prompt, **where)  # type: ignore[arg-type]
    assert again.seq.prompt == a.seq.prompt and a.seq.generator is not None and again.seq.generator is not None
    assert torch.equal(again.seq.generator.get_state(), a.seq.generator.get_state())  # the same seed
    empty = admit(tok, cfg, ids=[], **where)  # type: ignore[arg-type]
    assert empty.prompt_tokens == 0 and empty.seq.prompt in ([tok.bos_id], [tok.eos_id])
    with pytest.raises(ContextLengthError) as refused:
        admit(tok, cfg, ids=[5] * 16, **where)  # type: ignore[arg-type]
    e = refused.value
    assert (e.field, e.prompt_tokens, e.context, e.requested) == ("prompt", 16, 16, None)
    assert e.http_status == 400 and e.code == "context_length_exceeded" and "16 tokens" in e.message
    with pytest.raises(ContextLengthError) as refused:
        admit(tok, cfg, ids=[5] * 10, strict=True, **where)  # type: ignore[arg-type]
    e = refused.value
    assert (e.field, e.prompt_tokens, e.requested) == ("max_tokens", 10, 50)
    assert all(n in e.message for n in ("16", "60", "max_tokens", "at most 6"))
    assert admit(tok, cfg.replace(max_tokens=6), ids=[5] * 10, strict=True, **where).seq.max_new_tokens == 6  # type: ignore[arg-type]


def test_the_generator_takes_encoded_prompts_and_strict_budgets(gen: Generator) -> None:
    ids = gen.tokenizer.encode_prompt("a")
    assert "".join(gen.stream("a", ids=ids, max_tokens=4, **GREEDY)) == expected_after("a", 4)
    both = gen.complete(["a", "c"], ids=[ids, gen.tokenizer.encode_prompt("c")], max_tokens=3, **GREEDY)
    assert [r.text for r in both] == [expected_after("a", 3), expected_after("c", 3)]
    context = gen.model.config.context_length
    with pytest.raises(ContextLengthError) as refused:
        gen.complete("a" * (context - 4), max_tokens=10, strict=True)
    assert refused.value.field == "max_tokens"
    [cut] = gen.complete("a" * (context - 4), max_tokens=10, **GREEDY)
    assert cut.completion_tokens == 4 and cut.finish_reason == "length"


def test_empty_prompt_list_raises(gen: Generator) -> None:
    with pytest.raises(GenerationError):
        gen.complete([])


def test_empty_prompt_starts_from_end_of_text(gen: Generator) -> None:
    [result] = gen.complete("", max_tokens=3, **GREEDY)
    assert result.completion_tokens <= 3


# -- batches ----------------------------------------------------------------------
def test_batch_returns_a_list_in_order(gen: Generator) -> None:
    prompts = ["a", "xyzc", "e", "qqqqqqg"]
    out = gen.generate(prompts, max_tokens=5, **GREEDY)
    assert out == [expected_after(p[-1], 5) for p in prompts]


def test_batch_with_stops_finishes_rows_independently(gen: Generator) -> None:
    results = gen.complete(["a", "e", "v"], max_tokens=5, stop=["cd"], **GREEDY)
    assert [r.text for r in results] == ["b", "fghab", "wx"]
    assert [r.finish_reason for r in results] == ["stop", "length", "stop"]
    assert [r.prompt_tokens for r in results] == [1, 1, 1]


def test_batch_rows_equal_single_prompts(random_gen: Generator) -> None:
    prompts = ["to be or", "not", "that is the question"]
    batch = random_gen.generate(prompts, max_tokens=12, **GREEDY)
    assert batch == [random_gen.generate(p, max_tokens=12, **GREEDY) for p in prompts]


def test_single_prompt_returns_a_string(gen: Generator) -> None:
    assert isinstance(gen.generate("a", max_tokens=2, **GREEDY), str)
    assert isinstance(gen.generate(["a"], max_tokens=2, **GREEDY), list)


# -- seeds, streaming, async ------------------------------------------------------
def test_same_seed_same_text(random_gen: Generator) -> None:
    a = random_gen.generate("to be", max_tokens=30, temperature=1.0, seed=11)
    assert a == random_gen.generate("to be", max_tokens=30, temperature=1.0, seed=11)
    others = {random_gen.generate("to be", max_tokens=30, temperature=1.0, seed=s) for s in range(12, 15)}
    assert others != {a}


def test_stream_concatenates_to_generate(random_gen: Generator) -> None:
    options = {"max_tokens": 40, "temperature": 1.0, "seed": 5}
    pieces = list(random_gen.stream("to be", **options))
    assert "".join(pieces) == random_gen.generate("to be", **options)
    assert all(pieces)  # no empty pieces


def test_stream_with_stop_concatenates_to_generate(gen: Generator) -> None:
    pieces = list(gen.stream("a", max_tokens=20, stop=["efg"], **GREEDY))
    assert "".join(pieces) == gen.generate("a", max_tokens=20, stop=["efg"], **GREEDY) == "bcd"


def test_stream_holds_back_a_possible_stop_prefix(gen: Generator) -> None:
    # "de" could start the stop "dex": it is held back, then released with "f" once "dex" is impossible.
    pieces = list(gen.stream("a", max_tokens=8, stop=["dex"], **GREEDY))
    assert "".join(pieces) == expected_after("a", 8)
    assert pieces[:3] == ["b", "c", "def"]


def test_stream_waits_for_complete_utf8(
    bigram_model: Callable[..., torch.nn.Module], char_tokenizer: Tokenizer
) -> None:
    """'é' is two byte tokens for this tokenizer; the stream never emits half a character."""
    assert len(char_tokenizer.encode("é")) == 2
    first, second = (char_tokenizer.hf.token_to_id(f"<0x{b:02X}>") for b in "é".encode())
    table: dict[str | int, str | int] = {"a": first, first: second, second: "b", "b": EOS}
    gen = Generator(bigram_model(char_tokenizer, table), char_tokenizer)  # type: ignore[arg-type]
    pieces = list(gen.stream("a", max_tokens=10, **GREEDY))
    assert pieces == ["é", "b"]
    [result] = gen.complete("a", max_tokens=10, **GREEDY)
    assert result.text == "éb"
    assert result.completion_tokens == 3


def test_stream_after_an_invalid_byte_run_concatenates_to_generate(
    bigram_model: Callable[..., torch.nn.Module], char_tokenizer: Tokenizer
) -> None:
    """A model may emit byte tokens that are not valid UTF-8 together; the stream must still add up.

    The bytes D8 B9 decode to 'ع'; a following FF makes the run invalid. Whatever the
    final text shows for it, the streamed pieces must concatenate to that same text.
    """
    d8, b9, ff = (char_tokenizer.hf.token_to_id(f"<0x{b:02X}>") for b in (0xD8, 0xB9, 0xFF))
    table: dict[str | int, str | int] = {"a": d8, d8: b9, b9: ff, ff: "b", "b": EOS}
    gen = Generator(bigram_model(char_tokenizer, table), char_tokenizer)  # type: ignore[arg-type]
    [result] = gen.complete("a", max_tokens=10, **GREEDY)
    assert result.token_ids == [d8, b9, ff, *char_tokenizer.encode("b")]
    assert "".join(gen.stream("a", max_tokens=10, **GREEDY)) == result.text
    assert result.text.endswith("b")


def test_astream_equals_stream(random_gen: Generator) -> None:
    options = {"max_tokens": 30, "temperature": 1.0, "seed": 9}

    async def collect() -> list[str]:
        return [piece async for piece in random_gen.astream("to be", **options)]

    assert asyncio.run(collect()) == list(random_gen.stream("to be", **options))


def test_astream_raises_generation_errors(gen: Generator) -> None:
    async def collect() -> list[str]:
        return [piece async for piece in gen.astream("a" * 200, max_tokens=3)]

    with pytest.raises(GenerationError):
        asyncio.run(collect())


def test_agenerate_equals_generate(random_gen: Generator) -> None:
    options = {"max_tokens": 20, "temperature": 1.0, "seed": 2}
    result = asyncio.run(random_gen.agenerate(["to be", "or"], **options))
    assert result == random_gen.generate(["to be", "or"], **options)


def test_config_object_and_options_combine(gen: Generator) -> None:
    config = GenerationConfig(max_tokens=20, temperature=0, stop=("fgh",))
    assert gen.generate("a", config) == "bcde"
    assert gen.generate("a", config, max_tokens=2) == "bc"


# -- GenerationConfig ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 0),
        ("max_tokens", True),
        ("stop", ("",)),
        ("temperature", -1.0),
        ("top_k", 0),
        ("top_p", 2.0),
        ("repetition_penalty", 0.0),
    ],
)
def test_generation_config_validation(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        GenerationConfig(**{field: value})  # type: ignore[arg-type]


def test_generation_config_bare_stop_string() -> None:
    assert GenerationConfig(stop="###").stop == ("###",)


def test_likelihoods_prefer_the_context_a_text_follows(char_tokenizer: Tokenizer, bigram_model: Callable) -> None:
    """The model's judgement of which context a text belongs to: after "a" comes "b", after "c" comes "d"."""
    model = bigram_model(char_tokenizer, {"a": "b", "b": "c", "c": "d", "d": "e"})
    scores = likelihoods(model, char_tokenizer, ["xxa", "c", "zzzzd"], "bcd")
    assert scores[0] > scores[1] and scores[0] > scores[2]  # padded rows of different lengths compare fairly
    after_c, after_a = likelihoods(model, char_tokenizer, ["xxc", "a"], "de")
    assert after_c > after_a
    assert likelihoods(model, char_tokenizer, [], "b") == []
