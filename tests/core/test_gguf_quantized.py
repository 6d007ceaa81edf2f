"""GGUF files kept quantized at load: exact values, row permutation and fusion on blocks, mixed types, the app.

The block types' own bit-exact mapping is tested in test_quantize.py; the dequantized reading in test_gguf.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from forge import models  # noqa: E402
from forge.app import Forge  # noqa: E402
from forge.config import ModelConfig  # noqa: E402
from forge.core.formats import SpecialTokens  # noqa: E402
from forge.core.formats.gguf import read_gguf  # noqa: E402
from forge.core.formats.gguf_write import write_gguf  # noqa: E402
from forge.core.quantize import Int4Weight, Int8GroupWeight, Int8Weight, QuantizedWeight, dequantize_model  # noqa: E402
from forge.core.transformer import Transformer  # noqa: E402
from forge.models import padded_vocab  # noqa: E402
from forge.tokenizer import EOS, Tokenizer  # noqa: E402

Q = gguf.GGMLQuantizationType
TEXT = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! " * 30
SPECIAL = SpecialTokens(bos=EOS, eos=EOS, pad=EOS, stop=[EOS], add_bos=False)
#: The Forge class each written block type is kept as.
KEPT_AS = {"q8_0": Int8GroupWeight, "q4_0": Int4Weight, "q4_1": Int4Weight}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train([TEXT], kind="bpe", vocab_size=300, special_tokens=[EOS])


def _model(family: str, tok: Tokenizer, small_config: Callable[..., ModelConfig], **overrides: object) -> Transformer:
    overrides.setdefault("d_ff", {"gpt2": 256, "llama": 128}[family])
    cfg = small_config(family, vocab_size=padded_vocab(tok.vocab_size), **overrides)
    torch.manual_seed(0)
    model = Transformer(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.15 if p.dim() >= 2 else 0.1) + (1.0 if "norm" in name else 0.0))
    return model.eval()


def _write(path: Path, model: Transformer, tok: Tokenizer, dtype: str) -> Path:
    write_gguf(path, model.config, model.state_dict(), tok.hf, SPECIAL, None, dtype=dtype)
    return path


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", ["q8_0", "q4_0", "q4_1"])
def test_kept_quantized_weights_hold_exactly_the_dequantized_values(
    family: str, dtype: str, tokenizer: Tokenizer, small_config: Callable[..., ModelConfig], tmp_path: Path
) -> None:
    """llama: q and k rows un-permuted and q|k|v, gate|up fused on the blocks' rows; gpt2: fused in the file."""
    path = _write(tmp_path / "m.gguf", _model(family, tokenizer, small_config), tokenizer, dtype)
    kept, floats = read_gguf(path).state_dict, read_gguf(path, quantized=False).state_dict
    assert kept.keys() == floats.keys()
    for name, value in kept.items():
        if isinstance(value, QuantizedWeight):
            assert torch.equal(value.dequantize(torch.float32), floats[name]), name
        else:
            assert value.dim() == 1 or name == "pos_emb.weight", name  # norms, biases: float32 as stored
            assert torch.equal(value, floats[name]), name
    assert isinstance(kept["blocks.0.attn.qkv.weight"], KEPT_AS[dtype])
    assert isinstance(kept["tok_emb.weight"], Int8GroupWeight)  # q4 files keep the embeddings at Q8_0
    assert kept["lm_head.weight"] is kept["tok_emb.weight"]  # tied: one module, the embedding and the head


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_kept_quantized_model_computes_like_its_dequantized_twin(
    family: str, tokenizer: Tokenizer, small_config: Callable[..., ModelConfig], tmp_path: Path
) -> None:
    path = _write(tmp_path / "m.gguf", _model(family, tokenizer, small_config), tokenizer, "q4_1")
    kept, twin = models.load(path), models.load(path, quantized=False)
    runs_in = models.quantized_dtype("cpu")  # float32 with Forge's C++ kernels, bfloat16 for aten's
    assert next(kept.model.parameters()).dtype == runs_in
    assert kept.model.tok_emb.weight.dtype == runs_in and kept.model.lm_head.weight is kept.model.tok_emb.weight
    ids = torch.randint(0, kept.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = kept.model(ids).float(), twin.model(ids)
    # bf16 activations against fp32: measured 1-2% of the largest logit.
    assert (got - want).abs().max() <= 0.05 * want.abs().max(), float((got - want).abs().max() / want.abs().max())
    # Dequantized again, the model holds the file's float32 weights (its norms were rounded to bf16 with it).
    plain = dequantize_model(kept.model).float()
    assert not any(isinstance(m, QuantizedWeight) for m in plain.modules())
    assert plain.lm_head.weight is plain.tok_emb.weight
    assert torch.equal(plain.blocks[1].mlp.up.weight, twin.model.blocks[1].mlp.up.weight)
    assert torch.equal(plain.tok_emb.weight, twin.model.tok_emb.weight)


def _retype(src: Path, dst: Path, name: str) -> Path:
    """Copy a GGUF file with tensor ``name`` stored as F16 (from its dequantized values) instead of blocks."""
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub)
    for t in reader.tensors:
        shape = tuple(reversed(t.shape.tolist()))
        if t.name == name:
            values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float16)
            writer.add_tensor(t.name, values, raw_dtype=Q.F16)
        else:
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def test_parts_of_different_types_are_fused_in_float(
    tokenizer: Tokenizer, small_config: Callable[..., ModelConfig], tmp_path: Path
) -> None:
    q8 = _write(tmp_path / "q8.gguf", _model("llama", tokenizer, small_config), tokenizer, "q8_0")
    path = _retype(q8, tmp_path / "mixed.gguf", "blk.0.attn_k.weight")
    kept, floats = read_gguf(path).state_dict, read_gguf(path, quantized=False).state_dict
    fused = kept["blocks.0.attn.qkv.weight"]
    assert not isinstance(fused, QuantizedWeight) and torch.equal(fused, floats["blocks.0.attn.qkv.weight"])
    assert isinstance(kept["blocks.1.attn.qkv.weight"], Int8GroupWeight)  # other layers stay quantized


def test_the_app_keeps_a_gguf_quantized_unless_a_dtype_is_named(
    tokenizer: Tokenizer, small_config: Callable[..., ModelConfig], tmp_path: Path
) -> None:
    # d_ff 80: the down projection's rows are not whole blocks, so the file holds it in F16.
    path = _write(tmp_path / "m.gguf", _model("llama", tokenizer, small_config, d_ff=80), tokenizer, "q4_0")
    for dtype in (None, "auto"):
        app = Forge(path, dtype=dtype, device="cpu")
        assert app.model is not None and isinstance(app.model.blocks[0].mlp.up.weight, Int4Weight)
        assert isinstance(app.model.blocks[0].mlp.down.weight, torch.nn.Parameter)
        assert app.info()["dtype"] == str(models.quantized_dtype("cpu")).removeprefix("torch.")
    plain = Forge(path, dtype="float32", device="cpu")
    assert plain.model is not None and not any(isinstance(m, QuantizedWeight) for m in plain.model.modules())
    assert plain.info()["weight_bytes"] > 2 * app.info()["weight_bytes"]
    # quantize= requantizes nothing the file holds quantized: only its float linears.
    mixed = Forge(path, quantize="int8", device="cpu")
    assert mixed.model is not None
    assert isinstance(mixed.model.blocks[0].mlp.down.weight, Int8Weight)
    assert isinstance(mixed.model.blocks[0].mlp.up.weight, Int4Weight)
    text = mixed.sync.generate("The quick", temperature=0, max_tokens=4)
    assert isinstance(text, str)


def test_moving_a_kept_quantized_model_casts_no_quantized_values(
    tokenizer: Tokenizer, small_config: Callable[..., ModelConfig], tmp_path: Path
) -> None:
    path = _write(tmp_path / "m.gguf", _model("llama", tokenizer, small_config), tokenizer, "q4_1")
    model = models.load(path).model
    weight = model.blocks[0].mlp.up.weight
    assert isinstance(weight, Int4Weight) and weight.scale.dtype == torch.float16
    before = {name: b.clone() for name, b in weight.named_buffers()}
    model.to(torch.float32)  # the dtype to compute in, not a cast of the blocks
    assert weight.dtype == torch.float32 and weight.scale.dtype == torch.float16
    assert all(torch.equal(b, before[name]) for name, b in weight.named_buffers())
    x = torch.randn(3, weight.shape[1])
    ref = x @ weight.dequantize(torch.float32).T
    assert (weight.linear(x) - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_training_an_app_kept_quantized_trains_its_float_twin(
    tokenizer: Tokenizer, small_config: Callable[..., ModelConfig], tmp_path: Path
) -> None:
    path = _write(tmp_path / "m.gguf", _model("llama", tokenizer, small_config), tokenizer, "q8_0")
    notes = tmp_path / "notes.txt"
    notes.write_text(TEXT, encoding="utf-8")
    app = Forge(path, device="cpu")
    result = app.sync.train(notes, steps=2, batch_size=2, context=16)
    assert result.model is app.model and app.model is not None
    assert not any(isinstance(m, QuantizedWeight) for m in app.model.modules())
    assert next(app.model.parameters()).dtype == torch.float32


def test_saving_an_app_kept_quantized_writes_its_float_weights(
    tokenizer: Tokenizer, small_config: Callable[..., ModelConfig], tmp_path: Path
) -> None:
    path = _write(tmp_path / "m.gguf", _model("llama", tokenizer, small_config), tokenizer, "q4_0")
    app = Forge(path, device="cpu")
    app.save(tmp_path / "ckpt")
    assert app.model is not None and isinstance(app.model.blocks[0].attn.qkv.weight, Int4Weight)  # left as it was
    again = models.load(tmp_path / "ckpt").model
    floats = read_gguf(path, quantized=False).state_dict
    assert torch.equal(again.blocks[0].attn.qkv.weight, floats["blocks.0.attn.qkv.weight"])
    assert torch.equal(again.tok_emb.weight, floats["tok_emb.weight"]) and again.lm_head.weight is again.tok_emb.weight
