"""ModelConfig validation and the preset registry."""

from __future__ import annotations

import dataclasses

import pytest

from forge.config import MAX_SIZES, PRESETS, ModelConfig, get_preset, preset_names
from forge.errors import ConfigError, PresetNotFoundError

BASE = {"vocab_size": 256, "context_length": 64, "n_layer": 2, "n_head": 4, "d_model": 64}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_get_preset_matches_exactly(name: str) -> None:
    assert get_preset(name) is PRESETS[name]


def test_preset_names_lists_the_registry() -> None:
    assert preset_names() == list(PRESETS)
    assert {"tiny", "small", "gpt2", "llama-tiny"} <= set(preset_names())


def test_near_miss_suggests_the_close_preset() -> None:
    with pytest.raises(PresetNotFoundError) as info:
        get_preset("tinyy")
    assert "did you mean 'tiny'" in str(info.value)
    assert "'tinyy'" in str(info.value)


def test_near_miss_is_a_config_error_and_a_key_error() -> None:
    with pytest.raises(ConfigError):
        get_preset("gpt3")
    with pytest.raises(KeyError):
        get_preset("gpt3")


@pytest.mark.parametrize("name", ["TINY", "tiny ", "Tiny"])
def test_matching_is_exact_not_fuzzy(name: str) -> None:
    with pytest.raises(PresetNotFoundError):
        get_preset(name)


def test_far_miss_lists_presets_without_a_suggestion() -> None:
    with pytest.raises(PresetNotFoundError) as info:
        get_preset("zzzzzzzzzzzz")
    message = str(info.value)
    assert "did you mean" not in message
    assert all(name in message for name in PRESETS)


def test_family_of_presets() -> None:
    assert get_preset("tiny").family == "gpt2"
    assert get_preset("llama-tiny").family == "llama"
    llama = get_preset("llama-tiny")
    assert llama.kv_heads < llama.n_head  # grouped-query attention


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("vocab_size", 0),
        ("context_length", -1),
        ("n_layer", 0),
        ("n_head", 0),
        ("d_model", 0),
        ("n_layer", 2.0),
        ("n_head", True),
        ("d_model", 65),  # not divisible by n_head=4
        ("n_kv_head", 3),  # does not divide n_head=4
        ("n_kv_head", 0),
        ("n_kv_head", 8),
        ("norm", "batchnorm"),
        ("activation", "relu"),
        ("position", "alibi"),
        ("dropout", 1.0),
        ("dropout", -0.1),
        ("d_ff", 0),
    ],
)
def test_invalid_field_raises_config_error_naming_it(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        ModelConfig(**{**BASE, field: value})  # type: ignore[arg-type]
    assert field in str(info.value)
    assert repr(value) in str(info.value)


def test_rope_needs_an_even_head_dim() -> None:
    with pytest.raises(ConfigError, match="d_model"):
        ModelConfig(**{**BASE, "n_head": 4, "d_model": 36, "position": "rope"})  # head_dim 9


def test_config_is_frozen() -> None:
    cfg = ModelConfig(**BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n_layer = 3  # type: ignore[misc]


def test_replace_validates_again() -> None:
    cfg = ModelConfig(**BASE)
    assert cfg.replace(n_layer=3).n_layer == 3
    with pytest.raises(ConfigError, match="n_layer"):
        cfg.replace(n_layer=0)


def test_derived_properties() -> None:
    cfg = ModelConfig(**BASE)
    assert cfg.head_dim == 16
    assert cfg.kv_heads == 4
    assert cfg.ff_dim == 4 * 64
    swiglu = cfg.replace(activation="swiglu")
    assert swiglu.ff_dim % 64 == 0
    assert swiglu.ff_dim >= 8 * 64 // 3
    assert cfg.replace(d_ff=100).ff_dim == 100


def test_dict_round_trip() -> None:
    cfg = get_preset("llama-tiny")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_from_dict_rejects_unknown_fields() -> None:
    with pytest.raises(ConfigError, match="n_layers"):
        ModelConfig.from_dict({**BASE, "n_layers": 2})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("context_length", 2_000_000_000),  # a GGUF declaring this made loading allocate 256 GB
        ("vocab_size", 1 << 30),
        ("n_layer", 1_000_000),
        ("d_model", 1 << 24),
        ("d_ff", 1 << 24),
    ],
)
def test_sizes_past_any_real_model_are_config_errors(field: str, value: int) -> None:
    changes = {field: value, "n_head": 1} if field == "d_model" else {field: value}
    with pytest.raises(
        ConfigError, match=rf"ModelConfig\.{field} = {value} is invalid: must be at most {MAX_SIZES[field]}"
    ):
        get_preset("tiny").replace(**changes)


def test_every_preset_is_within_the_size_bounds() -> None:
    for cfg in PRESETS.values():
        assert all(getattr(cfg, name) is None or getattr(cfg, name) <= most for name, most in MAX_SIZES.items())
