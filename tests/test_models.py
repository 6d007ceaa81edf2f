"""Creating, saving and loading models with their tokenizers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from forge.config import ModelConfig, get_preset
from forge.core.checkpoint import save_checkpoint
from forge.core.transformer import Transformer
from forge.errors import CheckpointError, PresetNotFoundError
from forge.models import create_model, describe, load, padded_vocab, save
from forge.tokenizer import Tokenizer


@pytest.mark.parametrize(("n", "expected"), [(1, 64), (64, 64), (65, 128), (269, 320), (50257, 50304)])
def test_padded_vocab(n: int, expected: int) -> None:
    assert padded_vocab(n) == expected


def test_padded_vocab_other_multiple() -> None:
    assert padded_vocab(10, multiple=8) == 16


def test_create_model_from_preset_with_overrides() -> None:
    model = create_model("tiny", vocab_size=320, n_layer=2)
    assert model.config == get_preset("tiny").replace(vocab_size=320, n_layer=2)
    assert model.tok_emb.weight.shape == (320, 128)
    assert len(model.blocks) == 2


def test_create_model_from_config() -> None:
    cfg = get_preset("llama-tiny").replace(vocab_size=128)
    assert create_model(cfg).config is cfg


def test_create_model_unknown_preset() -> None:
    with pytest.raises(PresetNotFoundError, match="did you mean 'tiny'"):
        create_model("tinyy")


@pytest.fixture(params=["tiny", "llama-tiny"])
def saved(request: pytest.FixtureRequest, char_tokenizer: Tokenizer, tmp_path: Path) -> tuple[Transformer, Path]:
    torch.manual_seed(0)
    model = create_model(request.param, vocab_size=padded_vocab(char_tokenizer.vocab_size), n_layer=2).eval()
    path = save(tmp_path / "ckpt", model, char_tokenizer, meta={"note": "test"})
    return model, path


def test_save_load_round_trip_gives_the_same_logits(saved: tuple[Transformer, Path]) -> None:
    model, path = saved
    loaded = load(path)
    idx = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded.model.eval()(idx), model(idx))


def test_load_restores_every_parameter(saved: tuple[Transformer, Path]) -> None:
    model, path = saved
    loaded = load(path).model
    original = dict(model.named_parameters(remove_duplicate=False))
    for name, p in loaded.named_parameters(remove_duplicate=False):
        assert torch.equal(p, original[name]), name


def test_load_keeps_weight_tying(saved: tuple[Transformer, Path]) -> None:
    _, path = saved
    loaded = load(path).model
    assert loaded.config.tie_embeddings
    assert loaded.lm_head.weight is loaded.tok_emb.weight
    assert loaded.num_params() == create_model(loaded.config).num_params()


def test_load_returns_the_tokenizer_and_config(saved: tuple[Transformer, Path], char_tokenizer: Tokenizer) -> None:
    model, path = saved
    loaded = load(path)
    assert loaded.config == model.config
    assert loaded.path == path
    assert loaded.tokenizer.encode("to be 😀") == char_tokenizer.encode("to be 😀")
    assert loaded.training_state is None
    assert loaded.step == 0


def test_untied_model_round_trip(char_tokenizer: Tokenizer, tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = get_preset("tiny").replace(vocab_size=320, n_layer=1, tie_embeddings=False)
    model = create_model(cfg).eval()
    loaded = load(save(tmp_path / "untied", model, char_tokenizer)).model
    assert loaded.lm_head.weight is not loaded.tok_emb.weight
    idx = torch.arange(10)[None]
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))


def test_training_state_only_when_asked(char_tokenizer: Tokenizer, tmp_path: Path) -> None:
    model = create_model("tiny", vocab_size=320, n_layer=1)
    state = {"step": 7, "optimizer": {"lr": torch.tensor(0.5)}}
    path = save(tmp_path / "with-state", model, char_tokenizer, training_state=state)
    assert load(path).training_state is None
    with_state = load(path, with_state=True)
    assert with_state.step == 7
    assert with_state.training_state is not None
    assert torch.equal(with_state.training_state["optimizer"]["lr"], torch.tensor(0.5))


def test_describe(char_tokenizer: Tokenizer, tmp_path: Path) -> None:
    model = create_model("llama-tiny", vocab_size=320, n_layer=1)
    path = save(tmp_path / "d", model, char_tokenizer, training_state={"step": 3}, meta={"data": "x.txt"})
    info = describe(path)
    assert info["family"] == "llama"
    assert info["parameters"] == model.num_params()
    assert info["non_embedding_parameters"] == model.num_params(non_embedding=True)
    assert info["tokenizer_vocab"] == char_tokenizer.vocab_size
    assert info["step"] == 3
    assert info["meta"] == {"data": "x.txt"}
    assert ModelConfig.from_dict(info["config"]) == model.config


def test_load_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "missing")


def test_load_without_tokenizer(tmp_path: Path) -> None:
    model = create_model("tiny", vocab_size=320, n_layer=1)
    path = save_checkpoint(tmp_path / "no-tok", model=model, config=model.config.to_dict())
    with pytest.raises(CheckpointError, match=r"tokenizer\.json"):
        load(path)


def test_load_with_invalid_config(char_tokenizer: Tokenizer, tmp_path: Path) -> None:
    model = create_model("tiny", vocab_size=320, n_layer=1)
    bad = {**model.config.to_dict(), "n_layers": 3}
    path = save_checkpoint(
        tmp_path / "bad-config",
        model=model,
        config=bad,
        files={"tokenizer.json": char_tokenizer.to_str().encode()},
    )
    with pytest.raises(CheckpointError, match="config"):
        load(path)


def test_load_with_mismatched_weights(char_tokenizer: Tokenizer, tmp_path: Path) -> None:
    model = create_model("tiny", vocab_size=320, n_layer=1)
    config = model.config.replace(n_layer=2).to_dict()
    path = save_checkpoint(
        tmp_path / "mismatch",
        model=model,
        config=config,
        files={"tokenizer.json": char_tokenizer.to_str().encode()},
    )
    with pytest.raises(CheckpointError, match="missing"):
        load(path)


def test_saved_config_is_readable_json(saved: tuple[Transformer, Path]) -> None:
    model, path = saved
    assert json.loads((path / "config.json").read_text()) == model.config.to_dict()


def test_a_config_claiming_more_than_its_weights_is_refused_before_allocating(
    char_tokenizer: Tokenizer, tmp_path: Path
) -> None:
    # Building this config's model for real would take about 200 GB; only its shapes are compared.
    model = create_model("tiny", vocab_size=320, n_layer=1)
    huge = model.config.replace(d_model=32768, n_head=64, n_layer=4).to_dict()
    path = save_checkpoint(
        tmp_path / "huge", model=model, config=huge, files={"tokenizer.json": char_tokenizer.to_str().encode()}
    )
    with pytest.raises(CheckpointError, match=r"does not match its config: .* but the config implies \(\d+, 32768\)"):
        load(path)
