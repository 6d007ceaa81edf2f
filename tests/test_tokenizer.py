"""Tokenizers: lossless round trips for any text, persistence, and options."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forge.errors import ConfigError, DataError
from forge.tokenizer import EOS, Tokenizer

# Text far from the training corpus: emoji, control characters, the EOS marker
# inside running text, lone byte-token lookalikes and the replacement character.
AWKWARD = [
    "",
    " ",
    "a<|endoftext|>b",
    EOS,
    EOS + EOS,
    "\x00\x01\x1b[0m\r\n\t\x7f",
    "😀 émoji, 中文, עברית, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "<0x41><0xFF>",
    "\ufffd",
    "  leading and   inner  spaces  ",
    "Ñ" * 50,
]

texts = st.one_of(
    st.text(),
    st.lists(st.one_of(st.text(max_size=10), st.just(EOS), st.sampled_from(AWKWARD)), max_size=8).map("".join),
)

round_trip_settings = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(params=["bpe", "char"])
def tokenizer(request: pytest.FixtureRequest, bpe_tokenizer: Tokenizer, char_tokenizer: Tokenizer) -> Tokenizer:
    return bpe_tokenizer if request.param == "bpe" else char_tokenizer


@pytest.mark.parametrize("text", AWKWARD)
def test_round_trip_awkward_text(tokenizer: Tokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text


@round_trip_settings
@given(text=texts)
def test_bpe_round_trip_any_text(bpe_tokenizer: Tokenizer, text: str) -> None:
    assert bpe_tokenizer.decode(bpe_tokenizer.encode(text)) == text


@round_trip_settings
@given(text=texts)
def test_char_round_trip_any_text(char_tokenizer: Tokenizer, text: str) -> None:
    assert char_tokenizer.decode(char_tokenizer.encode(text)) == text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_incremental_decoding_is_prefix_stable(tokenizer: Tokenizer, data: st.DataObject) -> None:
    """Decoding a prefix of any ids gives a prefix of the full decoding, unless it ends mid-character.

    The generator streams text by decoding growing id lists and emitting what is
    new; that only adds up to the final text if earlier output never changes.
    """
    ids = data.draw(st.lists(st.integers(0, tokenizer.vocab_size - 1), max_size=12))
    full = tokenizer.decode(ids)
    for n in range(len(ids)):
        part = tokenizer.decode(ids[:n])
        if not part.endswith("\ufffd"):  # the generator waits for the next byte here
            assert full.startswith(part), (ids[:n], part, full)


def test_eos_is_one_special_token(tokenizer: Tokenizer) -> None:
    assert tokenizer.eos_id is not None
    assert tokenizer.encode(EOS) == [tokenizer.eos_id]
    ids = tokenizer.encode(f"ab{EOS}cd")
    assert ids.count(tokenizer.eos_id) == 1


def test_char_tokenizer_has_one_token_per_seen_character(char_tokenizer: Tokenizer) -> None:
    text = "to be or not"
    assert len(char_tokenizer.encode(text)) == len(text)


def test_char_tokenizer_falls_back_to_bytes_for_unseen_characters(char_tokenizer: Tokenizer) -> None:
    assert len(char_tokenizer.encode("€")) == len("€".encode())  # three byte tokens


def test_bpe_merges_frequent_words(bpe_tokenizer: Tokenizer, hamlet_text: str) -> None:
    sample = hamlet_text[:2000]
    assert len(bpe_tokenizer.encode(sample)) < 0.7 * len(sample.encode())


def test_encode_batch_matches_encode(tokenizer: Tokenizer) -> None:
    texts = ["to be", "", "or not 😀", EOS]
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(t) for t in texts]


def test_save_load_gives_identical_ids(tokenizer: Tokenizer, tmp_path: Path, hamlet_text: str) -> None:
    path = tmp_path / "nested" / "tokenizer.json"
    tokenizer.save(path)
    loaded = Tokenizer.load(path)
    sample = hamlet_text[:3000] + " 😀 " + EOS + " \x00"
    assert loaded.encode(sample) == tokenizer.encode(sample)
    assert loaded.vocab_size == tokenizer.vocab_size
    assert loaded.eos_id == tokenizer.eos_id
    assert loaded.decode(loaded.encode(sample)) == sample
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temp file left behind


def test_str_round_trip(tokenizer: Tokenizer) -> None:
    again = Tokenizer.from_str(tokenizer.to_str())
    assert again.encode("hello there 😀") == tokenizer.encode("hello there 😀")


def test_load_missing_file_raises_data_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(DataError, match=r"nope\.json"):
        Tokenizer.load(missing)


def test_load_bad_json_raises_data_error(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError):
        Tokenizer.load(path)


@pytest.mark.parametrize("vocab_size", [300, 512, 1000])
def test_bpe_vocab_size_is_respected(hamlet_text: str, vocab_size: int) -> None:
    tok = Tokenizer.train([hamlet_text], kind="bpe", vocab_size=vocab_size)
    assert tok.vocab_size == vocab_size


def test_bpe_vocab_grows_with_the_option(hamlet_text: str) -> None:
    small = Tokenizer.train([hamlet_text], kind="bpe", vocab_size=300)
    large = Tokenizer.train([hamlet_text], kind="bpe", vocab_size=1000)
    assert len(large.encode(hamlet_text)) < len(small.encode(hamlet_text))


@pytest.mark.parametrize("vocab_size", [0, 100, 256])
def test_bpe_vocab_too_small_raises_config_error(vocab_size: int) -> None:
    with pytest.raises(ConfigError, match="vocab_size") as info:
        Tokenizer.train(["to be or not to be"], kind="bpe", vocab_size=vocab_size)
    assert "257" in str(info.value)  # 256 bytes + the EOS token


def test_unknown_kind_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="'word'"):
        Tokenizer.train(["to be"], kind="word")  # type: ignore[arg-type]


def test_training_is_deterministic(hamlet_text: str) -> None:
    a = Tokenizer.train([hamlet_text], kind="bpe", vocab_size=400)
    b = Tokenizer.train([hamlet_text], kind="bpe", vocab_size=400)
    assert a.to_str() == b.to_str()
