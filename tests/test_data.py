"""Corpora from files, folders and strings, and the cached token dataset."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import forge.data as data_module
from forge.data import Corpus, TokenDataset, cache_dir
from forge.errors import ConfigError, DataError
from forge.tokenizer import Tokenizer


def _texts(corpus: Corpus) -> list[str]:
    return ["".join(doc) for doc in corpus.documents()]


# -- Corpus ------------------------------------------------------------------------
def test_corpus_from_file(hamlet: Path) -> None:
    corpus = Corpus.from_source(hamlet)
    assert corpus.files == (hamlet,)
    assert corpus.num_documents == 1
    assert _texts(corpus) == [hamlet.read_text(encoding="utf-8")]
    assert corpus.label == str(hamlet)


def test_corpus_from_str_path(hamlet: Path) -> None:
    assert Corpus.from_source(str(hamlet)).files == (hamlet,)


def test_corpus_from_folder_is_recursive_and_filters_suffixes(tmp_path: Path) -> None:
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "a.txt").write_text("alpha\n", encoding="utf-8")
    (tmp_path / "sub" / "b.md").write_text("# beta\n", encoding="utf-8")
    (tmp_path / "sub" / "deeper" / "c.TXT").write_text("gamma\n", encoding="utf-8")
    (tmp_path / "ignored.json").write_text('{"x": 1}', encoding="utf-8")
    (tmp_path / "sub" / "ignored.py").write_text("print(1)\n", encoding="utf-8")
    (tmp_path / "binary.bin").write_bytes(b"\x00\xff\xfe")  # not a text suffix: never read
    corpus = Corpus.from_source(tmp_path)
    assert {p.name for p in corpus.files} == {"a.txt", "b.md", "c.TXT"}
    assert sorted(_texts(corpus)) == ["# beta\n", "alpha\n", "gamma\n"]


def test_corpus_from_list_of_strings() -> None:
    corpus = Corpus.from_source(["to be", "or not to be"])
    assert corpus.num_documents == 2
    assert _texts(corpus) == ["to be", "or not to be"]


def test_fingerprint_depends_on_content_and_document_boundaries() -> None:
    a = Corpus.from_source(["ab", "c"]).fingerprint()
    assert a == Corpus.from_source(["ab", "c"]).fingerprint()
    assert a != Corpus.from_source(["a", "bc"]).fingerprint()
    assert a != Corpus.from_source(["ab", "d"]).fingerprint()


def test_missing_path_raises_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-file.txt"
    with pytest.raises(DataError) as info:
        Corpus.from_source(missing)
    assert str(missing) in str(info.value)


def test_empty_file_raises_naming_it(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(DataError) as info:
        Corpus.from_source(empty)
    assert str(empty) in str(info.value)


def test_whitespace_only_file_is_empty(tmp_path: Path) -> None:
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\t\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        Corpus.from_source(blank)


def test_empty_folder_raises_naming_it(tmp_path: Path) -> None:
    folder = tmp_path / "empty-folder"
    folder.mkdir()
    (folder / "notes.json").write_text("{}", encoding="utf-8")
    with pytest.raises(DataError) as info:
        Corpus.from_source(folder)
    assert str(folder) in str(info.value)


@pytest.mark.parametrize(
    "payload",
    [
        b"text then a NUL \x00 byte\n",
        b"invalid utf-8 \xff\xfe\xc3\x28 here\n",
        bytes(range(256)),
    ],
    ids=["nul", "invalid-utf8", "all-bytes"],
)
def test_binary_file_raises_naming_it(tmp_path: Path, payload: bytes) -> None:
    binary = tmp_path / "data.txt"
    binary.write_bytes(payload)
    with pytest.raises(DataError) as info:
        Corpus.from_source(binary)
    assert str(binary) in str(info.value)


def test_binary_file_inside_folder_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "good.txt").write_text("fine text\n", encoding="utf-8")
    bad = tmp_path / "bad.md"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(DataError) as info:
        Corpus.from_source(tmp_path)
    assert str(bad) in str(info.value)


@pytest.mark.parametrize("texts", [[], [""], ["   ", "\n"]])
def test_empty_list_raises(texts: list[str]) -> None:
    with pytest.raises(DataError, match="empty"):
        Corpus.from_source(texts)


def test_list_with_non_strings_raises() -> None:
    with pytest.raises(DataError, match="str"):
        Corpus.from_source(["text", 42])  # type: ignore[list-item]


def test_cache_dir_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGE_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FORGE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "forge"


def test_session_cache_is_isolated(forge_cache_dir: Path) -> None:
    assert cache_dir() == forge_cache_dir
    assert Path.home() / ".cache" not in cache_dir().parents


# -- TokenDataset ----------------------------------------------------------------
@pytest.fixture
def hamlet_dataset(hamlet: Path, bpe_tokenizer: Tokenizer, tmp_path: Path) -> TokenDataset:
    return TokenDataset.build(Corpus.from_source(hamlet), bpe_tokenizer, directory=tmp_path)


def test_build_writes_the_tokens_of_the_corpus(hamlet: Path, bpe_tokenizer: Tokenizer, tmp_path: Path) -> None:
    ds = TokenDataset.build(Corpus.from_source(hamlet), bpe_tokenizer, directory=tmp_path)
    expected = bpe_tokenizer.encode(hamlet.read_text(encoding="utf-8"))
    # Chunking at line ends may split BPE words differently only at chunk joins; Hamlet is one chunk.
    assert ds.tokens.tolist() == expected
    assert ds.path.parent == tmp_path
    assert ds.tokens.dtype == np.uint16


def test_build_separates_documents_with_eos(char_tokenizer: Tokenizer, tmp_path: Path) -> None:
    ds = TokenDataset.build(Corpus.from_source(["ab", "cd"]), char_tokenizer, directory=tmp_path)
    encode = char_tokenizer.encode
    assert ds.tokens.tolist() == [*encode("ab"), char_tokenizer.eos_id, *encode("cd")]


def test_build_defaults_to_the_cache_dir(char_tokenizer: Tokenizer, forge_cache_dir: Path) -> None:
    ds = TokenDataset.build(Corpus.from_source(["default cache location"]), char_tokenizer)
    assert ds.path.parent == forge_cache_dir / "tokens"


def test_build_reuses_the_cached_file(
    hamlet: Path, bpe_tokenizer: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus = Corpus.from_source(hamlet)
    first = TokenDataset.build(corpus, bpe_tokenizer, directory=tmp_path)
    stat = first.path.stat()
    calls: list[Path] = []
    real_write = data_module._write_tokens
    monkeypatch.setattr(data_module, "_write_tokens", lambda *a, **k: calls.append(a[2]) or real_write(*a, **k))
    second = TokenDataset.build(corpus, bpe_tokenizer, directory=tmp_path)
    assert second.path == first.path
    assert calls == []
    assert second.path.stat().st_mtime_ns == stat.st_mtime_ns
    assert np.array_equal(second.tokens, first.tokens)
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]  # no temp files


def test_build_key_depends_on_tokenizer_and_corpus(char_tokenizer: Tokenizer, tmp_path: Path) -> None:
    other_tok = Tokenizer.train(["xyz"], kind="char")
    a = TokenDataset.build(Corpus.from_source(["to be"]), char_tokenizer, directory=tmp_path)
    b = TokenDataset.build(Corpus.from_source(["to be"]), other_tok, directory=tmp_path)
    c = TokenDataset.build(Corpus.from_source(["or not"]), char_tokenizer, directory=tmp_path)
    assert len({a.path, b.path, c.path}) == 3


# -- a chat model's plain text: turns ended by the end-of-turn token (issue 15) ------------------
CHATML = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


def _chat_tokenizer(template: str | None = CHATML) -> Tokenizer:
    """A char tokenizer with ChatML's specials, eos <|endoftext|> as in many GGUFs, and a chat template."""
    specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    plain = Tokenizer.train(["abcdefghijklmnopqrstuvwxyz .,\n"], kind="char", special_tokens=specials)
    return Tokenizer(plain.hf, eos="<|endoftext|>", stop=("<|im_end|>",), chat_template=template)


def _paragraphs(n: int) -> str:
    return "\n\n".join(f"para {i}. " + "to be or not to be, that is the question. " * 3 for i in range(n))


def test_end_of_turn_is_the_stop_token_the_template_writes() -> None:
    assert data_module.end_of_turn(_chat_tokenizer()) == "<|im_end|>"  # not eos: the template never writes it
    assert data_module.end_of_turn(_chat_tokenizer("{{ messages[0].content }}{{ eos_token }}")) == "<|endoftext|>"
    assert data_module.end_of_turn(_chat_tokenizer(None)) is None  # a plain language model


def test_a_chat_models_plain_text_is_cut_into_turns_each_ended_by_the_end_token(tmp_path: Path) -> None:
    tok = _chat_tokenizer()
    end = tok.hf.token_to_id("<|im_end|>")
    text = _paragraphs(40)
    ds = TokenDataset.build(Corpus.from_source([text]), tok, directory=tmp_path)
    ids = ds.tokens.tolist()
    pieces = list(data_module._turns([text]))
    # Every piece is whole paragraphs, at least TURN_CHARS long (but the last), and is followed by the end token.
    assert len(pieces) > 5 and all(len(p) >= data_module.TURN_CHARS for p in pieces[:-1])
    assert all(p.startswith("para") for p in pieces) and " ".join(pieces).split() == text.split()
    assert ids.count(end) == len(pieces) and ids[-1] == end
    assert ids[: ids.index(end)] == tok.encode(pieces[0])
    # So training windows hold it, not only the end of the corpus.
    _, y = ds.batch("train", 32, 64, torch.Generator().manual_seed(0))
    assert (y == end).any(dim=1).float().mean() > 0.1


def test_a_plain_models_text_has_no_turns(tmp_path: Path) -> None:
    tok = _chat_tokenizer(None)
    ds = TokenDataset.build(Corpus.from_source([_paragraphs(40)]), tok, directory=tmp_path)
    assert ds.tokens.tolist() == tok.encode(_paragraphs(40))  # one document: no end token inside


def test_turns_are_part_of_the_cache_key(tmp_path: Path) -> None:
    corpus = Corpus.from_source([_paragraphs(40)])
    chat = TokenDataset.build(corpus, _chat_tokenizer(), directory=tmp_path)
    plain = TokenDataset.build(corpus, _chat_tokenizer(None), directory=tmp_path)  # the same vocabulary
    assert chat.path != plain.path and chat.tokens.tolist() != plain.tokens.tolist()


def test_a_long_paragraph_is_cut_at_a_line_end() -> None:
    lines = ["a line of verse without a blank line after it\n"] * 200
    pieces = list(data_module._turns(["".join(lines)]))
    assert len(pieces) > 1 and all(len(p) <= 4 * data_module.TURN_CHARS for p in pieces)
    assert all(p.endswith("it") for p in pieces)


def test_split_sizes(hamlet_dataset: TokenDataset) -> None:
    n = hamlet_dataset.num_tokens
    assert hamlet_dataset.split_size("train") + hamlet_dataset.split_size("val") == n
    assert hamlet_dataset.split_size("val") == max(1, int(n * 0.1))


@pytest.mark.parametrize("split", ["train", "val"])
def test_batch_shapes_and_shift(hamlet_dataset: TokenDataset, split: str) -> None:
    rng = torch.Generator().manual_seed(0)
    x, y = hamlet_dataset.batch(split, 8, 32, rng)  # type: ignore[arg-type]
    assert x.shape == y.shape == (8, 32)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    lo, hi = (0, hamlet_dataset.split_at) if split == "train" else (hamlet_dataset.split_at, hamlet_dataset.num_tokens)
    windows = np.lib.stride_tricks.sliding_window_view(np.asarray(hamlet_dataset.tokens[lo:hi]), 33)  # (N, T+1)
    for row_x, row_y in zip(x.numpy(), y.numpy(), strict=True):
        # Each row must be a real window of its own split, targets included.
        full = np.concatenate([row_x, row_y[-1:]])
        assert (windows == full).all(axis=1).any(), "batch row is not a window of its split"


def test_batches_are_seeded(hamlet_dataset: TokenDataset) -> None:
    a = hamlet_dataset.batch("train", 4, 16, torch.Generator().manual_seed(3))
    b = hamlet_dataset.batch("train", 4, 16, torch.Generator().manual_seed(3))
    c = hamlet_dataset.batch("train", 4, 16, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0])
    assert not torch.equal(a[0], c[0])


def test_check_context_accepts_what_fits(hamlet_dataset: TokenDataset) -> None:
    hamlet_dataset.check_context(128)
    hamlet_dataset.check_context(hamlet_dataset.split_size("val") - 1)


def test_check_context_rejects_a_too_small_corpus(char_tokenizer: Tokenizer, tmp_path: Path) -> None:
    ds = TokenDataset.build(Corpus.from_source(["to be or not to be, " * 5]), char_tokenizer, directory=tmp_path)
    assert ds.split_size("val") == 10
    ds.check_context(9)
    with pytest.raises(DataError, match="too small") as info:
        ds.check_context(10)
    assert "val" in str(info.value)
    x, y = ds.batch("val", 3, 9, torch.Generator().manual_seed(0))  # the largest window that fits
    assert x.shape == y.shape == (3, 9)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5])
def test_val_fraction_must_be_in_range(hamlet_dataset: TokenDataset, fraction: float) -> None:
    with pytest.raises(ConfigError, match="val_fraction"):
        TokenDataset(hamlet_dataset.path, hamlet_dataset.tokens.dtype, val_fraction=fraction)


def test_large_vocab_uses_uint32() -> None:
    assert data_module._token_dtype(65536) == np.uint16
    assert data_module._token_dtype(65537) == np.uint32


def test_unreadable_file_raises_naming_it(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root can read files without read permission")
    locked = tmp_path / "locked.txt"
    locked.write_text("secret\n", encoding="utf-8")
    locked.chmod(0)
    try:
        with pytest.raises(DataError) as info:
            Corpus.from_source(locked)
        assert str(locked) in str(info.value)
    finally:
        locked.chmod(0o644)


def test_a_full_disk_while_caching_tokens_is_one_error_and_leaves_nothing(
    tmp_path: Path, char_tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int) -> None:
        raise OSError(28, os.strerror(28))  # ENOSPC, as the flush of a full disk reports it

    monkeypatch.setattr(os, "fsync", full)
    corpus = Corpus.from_source(["to be, or not to be: that is the question.\n" * 20])
    with pytest.raises(DataError, match=r"could not write the token cache.*No space left on device.*FORGE_CACHE_DIR"):
        TokenDataset.build(corpus, char_tokenizer, directory=tmp_path)
    assert list(tmp_path.iterdir()) == []


# -- conversations: a .jsonl file rendered with the model's chat template -----------------------
def _conversation_file(path: Path, n: int = 30) -> Path:
    rows = [
        {"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "to be, or not."}]}
        for i in range(n)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")  # a blank line is skipped
    return path


def test_conversations_are_rendered_with_the_chat_template_and_ended_by_the_end_token(tmp_path: Path) -> None:
    tok = _chat_tokenizer()
    end = tok.hf.token_to_id("<|im_end|>")
    data = _conversation_file(tmp_path / "chats.jsonl")
    ds = TokenDataset.build(Corpus.from_source(data), tok, directory=tmp_path / "cache")
    first = "<|im_start|>user\nhi 0<|im_end|>\n<|im_start|>assistant\nto be, or not.<|im_end|>"
    ids = ds.tokens.tolist()
    assert ids[: len(tok.encode(first))] == tok.encode(first)
    assert ids.count(end) == 2 * 30 and ids[-1] == end  # each turn ends as in chat, and no extra end token
    assert tok.decode(ids).count("<|im_start|>assistant\nto be, or not.<|im_end|>") == 30


def test_a_plain_model_gets_forges_plain_chat_layout_and_eos_between_conversations(tmp_path: Path) -> None:
    tok = Tokenizer.train(["abcdefghijklmnopqrstuvwxyzUA .,:\n0123456789"], kind="char")
    data = _conversation_file(tmp_path / "chats.jsonl", 3)
    ds = TokenDataset.build(Corpus.from_source(data), tok, directory=tmp_path / "cache")
    assert tok.decode(ds.tokens.tolist()).startswith("User: hi 0\nAssistant: to be, or not.")
    assert ds.tokens.tolist().count(tok.eos_id) == 3


@pytest.mark.parametrize(
    ("line", "said"),
    [
        ("{not json", "line 2 is not JSON"),
        ('{"text": "hello"}', 'line 2 has no "messages" list'),
        ('{"messages": [{"role": "user"}]}', "line 2: "),
    ],
)
def test_a_bad_conversation_line_is_named_with_the_fix(tmp_path: Path, line: str, said: str) -> None:
    data = tmp_path / "chats.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "ok"}]}\n' + line + "\n")
    with pytest.raises(DataError) as e:
        Corpus.from_source(data)
    assert said in e.value.message and "chats.jsonl" in e.value.message
