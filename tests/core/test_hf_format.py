"""Hugging Face folders: read_hf gives transformers' logits, write_hf loads in transformers, bad input is refused.

Every HF model is built here from a config with random weights; nothing is downloaded.
Parity bound: fp32 logits of Forge and transformers differ by at most ``FP32_BOUND`` = 1e-4
(measured 0.6e-5 to 2e-5; the logits have a standard deviation of about 2.4 and reach about 10).
"""

from __future__ import annotations

import copy
import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

import forge.core.formats.hf as hf_module
from forge.config import ModelConfig
from forge.core.formats import Pretrained, SpecialTokens
from forge.core.formats.hf import SUPPORTED_ARCHITECTURES, config_from_hf, config_to_hf, read_hf, write_hf
from forge.core.transformer import Transformer
from forge.errors import CheckpointError, ConfigError
from forge.models import padded_vocab
from forge.tokenizer import EOS, Tokenizer

transformers = pytest.importorskip("transformers")

#: Max |Forge - transformers| over fp32 logits; measured about 1e-5.
FP32_BOUND = 1e-4
#: Max |Forge fp32 - transformers| after exporting the weights as f16 / bf16 (transformers computes in fp32,
#: so this is the weights' rounding, amplified by two layers); measured about 0.04 and 0.35.
F16_BOUND = 0.1
BF16_BOUND = 1.0

BOS, IM_END = "<s>", "<|im_end|>"
TEXTS = [
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles",
    "Hello world! Forge trains language models. 12345 + 678 = 13023; naïve café ünïcödé",
]
SAMPLES = ["To be, or not to be", "  leading spaces and\nnewlines\t", "café 😀 <|im_end|> end", ""]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    """A byte-level BPE with an end of text, a bos and ChatML's end of turn."""
    return Tokenizer.train(TEXTS * 5, kind="bpe", vocab_size=300, special_tokens=(EOS, BOS, IM_END))


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that logits are far from uniform; norms and biases random too, to test their mapping."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() >= 2:
                p.copy_(0.3 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(1.0 + 0.1 * noise)  # norm scales


def _bos_template(hf: HFTokenizer, bos: str) -> HFTokenizer:
    """A copy whose post-processor prepends bos, as Llama 3's tokenizer.json does."""
    copy = HFTokenizer.from_str(hf.to_str())
    copy.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, hf.token_to_id(bos))]
    )
    return copy


def _save_hf(
    path: Path,
    model: Any,
    tok: Tokenizer,
    tokenizer_config: dict[str, Any],
    *,
    bos_template: bool = False,
    **save: Any,
) -> Path:
    model.save_pretrained(path, **save)
    (_bos_template(tok.hf, BOS) if bos_template else tok.hf).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return path


def _ids(tok: Tokenizer, *tokens: str | None) -> dict[str, int | None]:
    names = ("bos_token_id", "eos_token_id")
    return {n: (tok.hf.token_to_id(t) if t else None) for n, t in zip(names, tokens, strict=True)}


# -- reading: the same logits as transformers ------------------------------------------------------------------


def _llama(tok: Tokenizer, **kw: Any) -> Any:
    cfg = transformers.LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        attn_implementation="eager",
        **_ids(tok, BOS, EOS),
        **kw,
    )
    return transformers.LlamaForCausalLM(cfg)


def _mistral(tok: Tokenizer, **kw: Any) -> Any:
    cfg = transformers.MistralConfig(
        vocab_size=tok.vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=128,
        rope_theta=1e6,
        attn_implementation="eager",
        **_ids(tok, BOS, EOS),
        **kw,
    )
    return transformers.MistralForCausalLM(cfg)


def _qwen2(tok: Tokenizer, **kw: Any) -> Any:
    cfg = transformers.Qwen2Config(
        vocab_size=padded_vocab(tok.vocab_size),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        attn_implementation="eager",
        **_ids(tok, None, EOS),
        **kw,
    )
    return transformers.Qwen2ForCausalLM(cfg)


def _gpt2(tok: Tokenizer, **kw: Any) -> Any:
    cfg = transformers.GPT2Config(
        vocab_size=tok.vocab_size,
        n_positions=128,
        n_embd=64,
        n_layer=2,
        n_head=4,
        attn_implementation="eager",
        **_ids(tok, EOS, EOS),
        **kw,
    )
    return transformers.GPT2LMHeadModel(cfg)


#: Passed as a copy: transformers adds rope_theta to the dict it is given.
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,  # puts one of head_dim/2 = 8 frequencies in each llama3 band
}
#: id: (model builder, tokenizer_config.json, prepend bos in tokenizer.json, expected SpecialTokens).
READ_CASES: dict[str, tuple[Callable[[Tokenizer], Any], dict[str, Any], bool, SpecialTokens]] = {
    "llama": (
        _llama,
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS},
        True,
        SpecialTokens(bos=BOS, eos=EOS, stop=[EOS, IM_END], add_bos=True),
    ),
    "llama-tied": (
        lambda t: _llama(t, tie_word_embeddings=True),
        {"tokenizer_class": "LlamaTokenizerFast", "bos_token": {"content": BOS}, "eos_token": {"content": EOS}},
        False,
        SpecialTokens(bos=BOS, eos=EOS, stop=[EOS, IM_END], add_bos=True),  # LlamaTokenizer's default
    ),
    "llama3-rope": (
        lambda t: _llama(t, rope_scaling={**LLAMA3_ROPE}),
        {"tokenizer_class": "LlamaTokenizerFast", "bos_token": BOS, "eos_token": EOS, "add_bos_token": False},
        True,
        SpecialTokens(bos=BOS, eos=EOS, stop=[EOS, IM_END], add_bos=False),  # the flag rebuilds the template
    ),
    "llama-biases": (
        lambda t: _llama(t, attention_bias=True, mlp_bias=True),
        {"eos_token": EOS},
        False,
        SpecialTokens(bos=BOS, eos=EOS, stop=[EOS, IM_END]),  # bos by id, from generation_config.json
    ),
    "mistral-linear-rope": (
        lambda t: _mistral(t, sliding_window=4096, rope_scaling={"type": "linear", "factor": 2.0}),
        {"bos_token": BOS, "eos_token": EOS, "add_bos_token": True},
        False,
        SpecialTokens(bos=BOS, eos=EOS, stop=[EOS, IM_END], add_bos=True),
    ),
    "qwen2": (
        _qwen2,
        {"eos_token": IM_END, "pad_token": EOS, "chat_template": CHAT_TEMPLATE},
        False,
        SpecialTokens(eos=IM_END, pad=EOS, stop=[IM_END, EOS]),  # EOS from generation_config.json
    ),
    "gpt2": (
        _gpt2,
        {"bos_token": EOS, "eos_token": EOS},
        False,
        SpecialTokens(bos=EOS, eos=EOS, stop=[EOS, IM_END]),
    ),
    "gpt2-untied": (
        lambda t: _gpt2(t, tie_word_embeddings=False),
        {"bos_token": EOS, "eos_token": EOS},
        False,
        SpecialTokens(bos=EOS, eos=EOS, stop=[EOS, IM_END]),
    ),
}


def _forge_model(pretrained: Pretrained) -> Transformer:
    model = Transformer(pretrained.config)
    model.load_state_dict(pretrained.state_dict, strict=True)
    return model.eval()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("case", list(READ_CASES))
def test_read_hf_matches_transformers_logits(case: str, tok: Tokenizer, tmp_path: Path) -> None:
    build, tok_config, bos_template, special = READ_CASES[case]
    torch.manual_seed(0)
    hf_model = build(tok)
    _randomize(hf_model, seed=1)
    hf_model.eval()
    if case == "qwen2":  # an end of turn and the end of text both stop generation
        hf_model.generation_config.eos_token_id = [tok.hf.token_to_id(IM_END), tok.hf.token_to_id(EOS)]
    folder = _save_hf(tmp_path / case, hf_model, tok, tok_config, bos_template=bos_template)

    pretrained = read_hf(folder)
    model = _forge_model(pretrained)
    ids = torch.randint(0, pretrained.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = hf_model(ids).logits, model(ids)
    assert expected.std() > 1.0  # far from uniform, so the bound means something
    diff = _max_diff(got, expected)
    print(f"{case}: max |Forge - transformers| = {diff:.2e}")
    assert diff < FP32_BOUND

    assert pretrained.special == special
    assert pretrained.meta == {
        "format": "hf",
        "architecture": hf_model.config.architectures[0],
        "name": case,
        "torch_dtype": "float32",
    }
    assert pretrained.chat_template == tok_config.get("chat_template")
    assert all(t.dtype == torch.float32 for t in pretrained.state_dict.values())
    assert pretrained.tokenizer.encode("To be", add_special_tokens=False).ids == tok.encode("To be")


def test_read_hf_sharded_bf16(tok: Tokenizer, tmp_path: Path) -> None:
    """Shards listed in model.safetensors.index.json, stored as bf16, come back as the same values in fp32."""
    torch.manual_seed(0)
    hf_model = _llama(tok)
    _randomize(hf_model, seed=3)
    hf_model.to(torch.bfloat16)
    sharded = _save_hf(tmp_path / "sharded", hf_model, tok, {"eos_token": EOS}, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    single = _save_hf(tmp_path / "single", hf_model.float(), tok, {"eos_token": EOS})
    a, b = read_hf(sharded), read_hf(single)
    assert a.meta["torch_dtype"] == "bfloat16"
    assert a.state_dict.keys() == b.state_dict.keys()
    for name, t in a.state_dict.items():
        assert t.dtype == torch.float32
        assert torch.equal(t, b.state_dict[name]), name


def test_read_hf_notes_a_sliding_window_shorter_than_the_context(tok: Tokenizer, tmp_path: Path) -> None:
    folder = _save_hf(tmp_path / "m", _mistral(tok, sliding_window=64), tok, {"eos_token": EOS})
    assert read_hf(folder).meta["sliding_window"] == 64
    folder = _save_hf(tmp_path / "n", _mistral(tok, sliding_window=None), tok, {"eos_token": EOS})
    assert "sliding_window" not in read_hf(folder).meta


# -- writing: transformers loads the export --------------------------------------------------------------------


def _forge_case(small_config: Callable[..., ModelConfig], tok: Tokenizer, kind: str) -> ModelConfig:
    vocab = padded_vocab(tok.vocab_size)
    return {
        "llama": lambda: small_config("llama", vocab_size=vocab),
        "llama-untied-llama3": lambda: small_config(
            "llama", vocab_size=vocab, tie_embeddings=False, context_length=128, rope_scaling={**LLAMA3_ROPE}
        ),
        "llama-biases": lambda: small_config("llama", vocab_size=vocab, bias=True),
        "qwen2": lambda: small_config("llama", vocab_size=vocab, qkv_bias=True, rope_theta=1e6),
        "gpt2": lambda: small_config("gpt2", vocab_size=vocab),
        "gpt2-untied": lambda: small_config("gpt2", vocab_size=vocab, tie_embeddings=False, d_ff=96),
    }[kind]()


EXPORT_ARCH = {
    "llama": "LlamaForCausalLM",
    "llama-untied-llama3": "LlamaForCausalLM",
    "llama-biases": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "gpt2-untied": "GPT2LMHeadModel",
}
SPECIAL = SpecialTokens(bos=BOS, eos=EOS, pad=EOS, stop=[EOS, IM_END], add_bos=True)


def _export(
    tmp_path: Path,
    kind: str,
    small_config: Callable[..., ModelConfig],
    peaked_model: Callable[..., Transformer],
    tok: Tokenizer,
    dtype: str = "f32",
) -> tuple[Transformer, Path]:
    model = peaked_model(_forge_case(small_config, tok, kind))
    _randomize(model, seed=4)
    out = tmp_path / f"{kind}-{dtype}"
    write_hf(out, model.config, model.state_dict(), tok.hf, SPECIAL, CHAT_TEMPLATE, dtype=dtype)
    return model, out


def _hf_logits(folder: Path, ids: torch.Tensor) -> tuple[str, torch.Tensor]:
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        return type(hf_model).__name__, hf_model(ids).logits


@pytest.mark.parametrize("kind", list(EXPORT_ARCH))
def test_write_hf_loads_in_transformers_with_equal_logits(
    kind: str,
    tmp_path: Path,
    small_config: Callable[..., ModelConfig],
    peaked_model: Callable[..., Transformer],
    tok: Tokenizer,
) -> None:
    model, out = _export(tmp_path, kind, small_config, peaked_model, tok)
    ids = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(5))
    arch, expected = _hf_logits(out, ids)
    with torch.no_grad():
        got = model(ids)
    diff = _max_diff(got, expected)
    print(f"export {kind}: max |Forge - transformers| = {diff:.2e}")
    assert arch == EXPORT_ARCH[kind]
    assert expected.std() > 1.0
    assert diff < FP32_BOUND

    # Round trip: the same config, tensors, special tokens and chat template.
    back = read_hf(out)
    assert back.config == model.config
    assert back.special == SPECIAL
    assert back.chat_template == CHAT_TEMPLATE
    state = model.state_dict()
    assert back.state_dict.keys() == state.keys()
    for name, t in state.items():
        assert torch.equal(back.state_dict[name], t), name
    assert "lm_head.weight" not in load_file(out / "model.safetensors") or not model.config.tie_embeddings


@pytest.mark.parametrize(("dtype", "bound"), [("f16", F16_BOUND), ("bf16", BF16_BOUND)])
def test_write_hf_half_precision(
    dtype: str,
    bound: float,
    tmp_path: Path,
    small_config: Callable[..., ModelConfig],
    peaked_model: Callable[..., Transformer],
    tok: Tokenizer,
) -> None:
    """Weights rounded to f16/bf16 on disk; transformers computes in fp32, so only the rounding differs."""
    model, out = _export(tmp_path, "llama", small_config, peaked_model, tok, dtype=dtype)
    half = torch.float16 if dtype == "f16" else torch.bfloat16
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {half}
    assert read_hf(out).meta["torch_dtype"] == str(half).removeprefix("torch.")
    ids = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(6))
    _, expected = _hf_logits(out, ids)
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(half).float())
        diff, exact = _max_diff(model(ids), expected), _max_diff(rounded(ids), expected)
    print(f"export {dtype}: max |Forge fp32 - transformers| = {diff:.2e}; with the same rounded weights {exact:.2e}")
    assert diff < bound
    assert exact < FP32_BOUND  # the export itself loses nothing beyond the rounding


def test_exported_tokenizer_encodes_like_forge(
    tmp_path: Path,
    small_config: Callable[..., ModelConfig],
    peaked_model: Callable[..., Transformer],
    tok: Tokenizer,
) -> None:
    _, out = _export(tmp_path, "gpt2", small_config, peaked_model, tok)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    forge_tok = Tokenizer(tok.hf, eos=EOS, bos=BOS, add_bos=True)
    for text in SAMPLES:
        assert hf_tok.encode(text, add_special_tokens=False) == forge_tok.encode(text), text
        assert hf_tok.encode(text) == forge_tok.encode_prompt(text), text  # bos first, once
        assert hf_tok.decode(forge_tok.encode(text)) == text
    assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token) == (BOS, EOS, EOS)
    assert hf_tok.chat_template == CHAT_TEMPLATE
    # Without add_bos (GPT-2's way), nothing is prepended.
    model = peaked_model(_forge_case(small_config, tok, "gpt2"))
    write_hf(tmp_path / "plain", model.config, model.state_dict(), tok.hf, SpecialTokens(bos=EOS, eos=EOS))
    plain = transformers.AutoTokenizer.from_pretrained(tmp_path / "plain")
    assert [plain.encode(t) for t in SAMPLES] == [tok.encode(t) for t in SAMPLES]


def test_write_hf_replaces_a_previous_export_and_recovers_an_interrupted_swap(
    tmp_path: Path,
    small_config: Callable[..., ModelConfig],
    peaked_model: Callable[..., Transformer],
    tok: Tokenizer,
) -> None:
    first, out = _export(tmp_path, "llama", small_config, peaked_model, tok)
    second = peaked_model(first.config, seed=9)
    write_hf(out, second.config, second.state_dict(), tok.hf, SPECIAL)
    assert torch.equal(read_hf(out).state_dict["tok_emb.weight"], second.tok_emb.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temp or moved-aside folder left
    # A crash after moving the old folder aside and before renaming the new one in: reading restores the old one.
    out.rename(tmp_path / f".{out.name}.old-12345678")
    assert torch.equal(read_hf(out).state_dict["tok_emb.weight"], second.tok_emb.weight)


def test_write_hf_bad_arguments(
    tmp_path: Path, small_config: Callable[..., ModelConfig], peaked_model: Callable[..., Transformer], tok: Tokenizer
) -> None:
    model = peaked_model(_forge_case(small_config, tok, "llama"))
    cfg, state = model.config, model.state_dict()
    with pytest.raises(ConfigError, match=r"dtype='fp8'.*f32, f16, bf16"):
        write_hf(tmp_path / "a", cfg, state, tok.hf, SPECIAL, dtype="fp8")
    with pytest.raises(ConfigError, match=r"missing.*blocks.1.attn.qkv.weight"):
        write_hf(tmp_path / "a", cfg, {k: v for k, v in state.items() if "1.attn.qkv" not in k}, tok.hf, SPECIAL)
    with pytest.raises(ConfigError, match=r"blocks.0.mlp.up.weight has shape"):
        write_hf(tmp_path / "a", cfg, {**state, "blocks.0.mlp.up.weight": torch.zeros(3, 64)}, tok.hf, SPECIAL)
    with pytest.raises(ConfigError, match=r"special.bos = '<nope>' is not in the tokenizer"):
        write_hf(tmp_path / "a", cfg, state, tok.hf, SpecialTokens(bos="<nope>", eos=EOS))
    with pytest.raises(ConfigError, match=r"no Hugging Face equivalent"):
        config_to_hf(cfg.replace(norm="layernorm"))
    with pytest.raises(ConfigError, match=r"no Hugging Face equivalent"):
        config_to_hf(cfg.replace(bias=True, qkv_bias=False))
    with pytest.raises(ConfigError, match=r"no Hugging Face equivalent"):
        config_to_hf(small_config("gpt2", n_kv_head=2))
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"refusing to replace.*Forge did not write"):
        write_hf(other, cfg, state, tok.hf, SPECIAL)
    assert (other / "keep.txt").read_text() == "mine"
    assert not list(tmp_path.glob(".*"))  # nothing half-written left behind


# -- bad input -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory, tok: Tokenizer) -> Path:
    """A valid tiny Llama folder; tests copy it and break the copy."""
    torch.manual_seed(0)
    model = _llama(tok)
    return _save_hf(tmp_path_factory.mktemp("hf") / "llama", model, tok, {"eos_token": EOS})


@pytest.fixture
def broken(llama_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(llama_dir, tmp_path / "llama"))


def _edit_config(folder: Path, **changes: Any) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_missing_folder_or_files(broken: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"folder .*nope.* does not exist"):
        read_hf(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=r"is a file"):
        read_hf(broken / "config.json")
    (broken / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"has no tokenizer.json"):
        read_hf(broken)
    (broken / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"has no config.json"):
        read_hf(broken)


def test_no_safetensors_explains_bin_pickles(broken: Path) -> None:
    (broken / "model.safetensors").rename(broken / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"no \*.safetensors.*pytorch_model.bin.*pickles.*safe_serialization"):
        read_hf(broken)
    (broken / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match=r"no \*.safetensors weights \(none\)"):
        read_hf(broken)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors(broken: Path, damage: str) -> None:
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x07" * 100, "empty": b""}[damage])
    with pytest.raises(CheckpointError, match=r"model.safetensors.*not a readable safetensors file.*download it again"):
        read_hf(broken)


def test_missing_unexpected_and_misshapen_tensors(broken: Path) -> None:
    weights = broken / "model.safetensors"
    good = load_file(weights)
    save_file({k: v for k, v in good.items() if "layers.1.self_attn.k_proj" not in k}, weights)
    with pytest.raises(CheckpointError, match=r"lack 1 tensor.*model.layers.1.self_attn.k_proj.weight"):
        read_hf(broken)
    save_file({**good, "model.layers.0.self_attn.o_proj.bias": torch.zeros(64)}, weights)
    with pytest.raises(CheckpointError, match=r"does not account for.*o_proj.bias"):
        read_hf(broken)
    save_file({**good, "model.layers.0.rotary_emb.inv_freq": torch.zeros(8)}, weights)
    read_hf(broken)  # a stale buffer is ignored
    save_file({**good, "model.layers.0.mlp.up_proj.weight": torch.zeros(96, 64)}, weights)
    with pytest.raises(
        CheckpointError, match=r"up_proj.weight .* has shape \(96, 64\) but config.json implies \(128, 64\)"
    ):
        read_hf(broken)


def test_sharded_index_naming_a_missing_shard(broken: Path) -> None:
    index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"shard model-00001-of-00002.safetensors .* is missing"):
        read_hf(broken)
    (broken / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"index.json.* is not valid JSON"):
        read_hf(broken)


def test_unsupported_architecture_lists_the_supported_ones(broken: Path) -> None:
    _edit_config(broken, architectures=["FalconForCausalLM"], model_type="falcon")
    with pytest.raises(
        CheckpointError, match=r"FalconForCausalLM is not supported.*" + ", ".join(SUPPORTED_ARCHITECTURES)
    ):
        read_hf(broken)


LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 64,
}
GPT2 = {"model_type": "gpt2", "vocab_size": 256, "n_positions": 64, "n_embd": 64, "n_layer": 2, "n_head": 4}


@pytest.mark.parametrize(
    ("hf_config", "message"),
    [
        ({**LLAMA, "head_dim": 32}, "head_dim = 32.*hidden_size / num_attention_heads = 16"),
        ({**LLAMA, "attention_bias": True}, r"attention_bias, mlp_bias = \(True, False\).*both or in neither"),
        ({**LLAMA, "hidden_act": "gelu"}, "hidden_act = 'gelu'.*silu"),
        ({**LLAMA, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.*default, linear and llama3"),
        ({**LLAMA, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "lacks a field its rope_type needs"),
        ({**LLAMA, "hidden_size": None}, "lacks 'hidden_size'"),
        ({**LLAMA, "num_key_value_heads": 3}, "n_kv_head = 3 is invalid"),
        ({**GPT2, "activation_function": "gelu"}, "activation_function = 'gelu'.*tanh approximation"),
        ({**GPT2, "scale_attn_by_inverse_layer_idx": True}, r"1/sqrt\(head_dim\) only"),
        ({"model_type": "bert"}, "model_type 'bert' is not supported"),
        ({}, "names no architectures"),
    ],
)
def test_configs_forge_cannot_represent_exactly(hf_config: dict[str, Any], message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        config_from_hf(hf_config)


def test_config_from_hf_reads_both_rope_layouts() -> None:
    """transformers 5 saves rope_parameters; older configs have rope_theta and rope_scaling."""
    new = config_from_hf({**LLAMA, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}})
    old = config_from_hf({**LLAMA, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert new == old
    assert (new.rope_theta, new.rope_scaling) == (5e5, {"rope_type": "linear", "factor": 2.0})
    assert config_from_hf({**LLAMA, "rope_scaling": {"rope_type": "default"}}).rope_scaling is None
    with pytest.raises(ConfigError, match=r"needs the dict of a config.json"):
        config_from_hf("config.json")  # type: ignore[arg-type]


def test_special_tokens_and_chat_template_sources(broken: Path, tok: Tokenizer) -> None:
    """special_tokens_map.json overrides tokenizer_config.json; chat_template.jinja overrides both templates."""
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": CHAT_TEMPLATE}]
    (broken / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": None, "eos_token": BOS, "chat_template": named})
    )
    (broken / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": IM_END, "special": True}}))
    got = read_hf(broken)
    assert (got.special.eos, got.special.stop[0], got.chat_template) == (IM_END, IM_END, CHAT_TEMPLATE)
    (broken / "chat_template.jinja").write_text("{{ messages }}")
    assert read_hf(broken).chat_template == "{{ messages }}"
    # An explicit null bos (Qwen2's) is kept although generation_config.json has a bos_token_id.
    assert json.loads((broken / "generation_config.json").read_text())["bos_token_id"] == tok.hf.token_to_id(BOS)
    assert read_hf(broken).special.bos is None
    (broken / "tokenizer_config.json").write_text(json.dumps({}))
    assert read_hf(broken).special.bos == BOS


# -- what an export may replace, and a full disk (issue 14) -------------------------------------------------------


def test_write_hf_never_replaces_a_model_folder_forge_did_not_write(
    tmp_path: Path, small_config: Callable[..., ModelConfig], peaked_model: Callable[..., Transformer], tok: Tokenizer
) -> None:
    """A downloaded model has config.json too: only a folder Forge exported (its weights say so) is replaced."""
    model = peaked_model(_forge_case(small_config, tok, "llama"))
    downloaded = tmp_path / "downloaded"
    downloaded.mkdir()
    (downloaded / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    save_file({"w": torch.ones(2)}, str(downloaded / "model.safetensors"), metadata={"format": "pt"})
    before = sorted((p.name, p.read_bytes()) for p in downloaded.iterdir())
    with pytest.raises(CheckpointError, match=r"refusing to replace.*Forge did not write.*choose a new or empty"):
        write_hf(downloaded, model.config, model.state_dict(), tok.hf, SPECIAL)
    assert sorted((p.name, p.read_bytes()) for p in downloaded.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["downloaded"]


def test_write_hf_on_a_full_disk_keeps_the_previous_export(
    tmp_path: Path,
    small_config: Callable[..., ModelConfig],
    peaked_model: Callable[..., Transformer],
    tok: Tokenizer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first, out = _export(tmp_path, "llama", small_config, peaked_model, tok)
    second = peaked_model(first.config, seed=9)

    def full(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(hf_module, "write_durably", full)
    with pytest.raises(CheckpointError, match=r"could not write the Hugging Face folder.*No space left on device"):
        write_hf(out, second.config, second.state_dict(), tok.hf, SPECIAL)
    monkeypatch.undo()
    assert torch.equal(read_hf(out).state_dict["tok_emb.weight"], first.tok_emb.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temporary folder left
