"""ONNX export: onnxruntime runs the exported decoder with its KV cache as Forge runs the model.

Each export is made once per module (tracing takes seconds). Bounds, measured on these models:
fp32 logits differ from Forge's by about 1e-5 (logits reach about 10); int8 and int4 exports compute Forge's
forward on the very weights they hold, to about 1e-4 (:func:`_reference_logits` rebuilds them).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from forge import models
from forge.config import ModelConfig
from forge.core.formats import SpecialTokens
from forge.core.formats.onnx import ONNX_FILES, write_onnx
from forge.core.formats.onnx_quant import blocks_of
from forge.core.quantize import dequantize_model, quantize_model
from forge.core.transformer import Transformer
from forge.errors import CheckpointError, ConfigError
from forge.tokenizer import Tokenizer
from helpers import run_cli

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

FP32_BOUND = 1e-4
#: Max |ONNX - Forge on the same quantized weights|: the matmuls' blocks are summed in another order.
SAME_WEIGHTS_BOUND = 1e-3
PROMPT = "To be, or not to be, that is the question"

Export = tuple[Transformer, Path]


@pytest.fixture(scope="module")
def exported(
    tmp_path_factory: pytest.TempPathFactory,
    small_config: Callable[..., ModelConfig],
    peaked_model: Callable[..., Transformer],
    bpe_tokenizer: Tokenizer,
) -> Callable[[str, str], Export]:
    """``exported(family, dtype)``: a random two-layer model (llama: tied, grouped-query; gpt2: untied) and its
    ONNX folder, made once."""
    cache: dict[tuple[str, str], Export] = {}

    def get(family: str, dtype: str) -> Export:
        if (family, dtype) not in cache:
            vocab = models.padded_vocab(bpe_tokenizer.vocab_size)
            cfg = small_config(family, vocab_size=vocab, tie_embeddings=family == "llama")
            model = peaked_model(cfg)
            out = tmp_path_factory.mktemp(f"onnx-{family}-{dtype}") / "model"
            assert models.export(model, bpe_tokenizer, out, format="onnx", dtype=dtype) == out
            cache[family, dtype] = (model, out)
        return cache[family, dtype]

    return get


class Decoder:
    """An exported folder in onnxruntime, driven as transformers.js drives it."""

    def __init__(self, folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        self.session = ort.InferenceSession(str(folder / config["forge_export"]["file"]))
        self.names = [o.name for o in self.session.get_outputs()]
        self.inputs = [i.name for i in self.session.get_inputs()]

        self.past = [name for name in self.inputs if name.startswith("past_key_values.")]

    def run(
        self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: list[np.ndarray], keep: int = 0
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        feed.update(zip(self.past, past, strict=True))
        feed["num_logits_to_keep"] = np.array(keep, np.int64)
        logits, *present = self.session.run(None, feed)
        return logits, present

    def empty_past(self, cfg: ModelConfig, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, cfg.kv_heads, 0, cfg.head_dim), np.float32) for _ in self.past]

    def prefill(self, cfg: ModelConfig, ids: list[int], keep: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
        n = len(ids)
        empty = self.empty_past(cfg, 1)
        return self.run(np.array([ids]), np.ones((1, n), np.int64), np.arange(n)[None], empty, keep)

    def greedy(self, cfg: ModelConfig, prompt: list[int], steps: int) -> list[int]:
        """A prefill, then one token a step through the KV cache; only the last position's logits each time."""
        logits, past = self.prefill(cfg, prompt, keep=1)
        assert logits.shape[1] == 1
        out = [int(logits[0, -1].argmax())]
        for _ in range(steps - 1):
            n = len(prompt) + len(out)
            step = np.array([[out[-1]]])
            logits, past = self.run(step, np.ones((1, n), np.int64), np.array([[n - 1]]), past, keep=1)
            out.append(int(logits[0, -1].argmax()))
        return out


def _forge_greedy(model: Transformer, prompt: list[int], steps: int) -> list[int]:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


def _reference_logits(model: Transformer, ids: list[int], dtype: str) -> np.ndarray:
    """Forge's forward on the weights an ``dtype`` export holds: every block's matmul weight as its blocks, the
    output head (and the embedding tied to it) int8."""
    ref = copy.deepcopy(model)
    dequantize_model(ref)
    state = models._export_weights(model)
    bits = 8 if dtype == "int8" else 4
    with torch.no_grad():
        for name, param in ref.named_parameters():
            if name.startswith("blocks.") and name.endswith(".weight") and param.dim() == 2:
                param.copy_(blocks_of(state[name], bits).dequantize())
        ref.lm_head.weight.copy_(blocks_of(state["lm_head.weight"], 8).dequantize())
        return ref(torch.tensor([ids]))[0].numpy()


# -- float32 --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fp32_logits_equal_forges(
    exported: Callable[[str, str], Export], bpe_tokenizer: Tokenizer, family: str
) -> None:
    model, folder = exported(family, "float32")
    ids = bpe_tokenizer.encode(PROMPT)
    logits, present = Decoder(folder).prefill(model.config, ids)
    with torch.no_grad():
        expected = model(torch.tensor([ids]))[0].numpy()
    assert np.abs(logits[0] - expected).max() < FP32_BOUND
    assert len(present) == 2 * model.config.n_layer
    assert present[0].shape == (1, model.config.kv_heads, len(ids), model.config.head_dim)


@pytest.mark.parametrize("dtype", ["float32", "int4"])
def test_num_logits_to_keep_gives_the_last_positions_logits(
    exported: Callable[[str, str], Export], bpe_tokenizer: Tokenizer, dtype: str
) -> None:
    model, folder = exported("llama", dtype)
    decoder = Decoder(folder)
    assert decoder.inputs[-1] == "num_logits_to_keep"
    ids = bpe_tokenizer.encode(PROMPT)
    every, present = decoder.prefill(model.config, ids, keep=0)
    assert every.shape[1] == len(ids)
    for keep in (1, 3):
        last, kept_present = decoder.prefill(model.config, ids, keep=keep)
        assert last.shape == (1, keep, every.shape[2])
        np.testing.assert_allclose(last[0], every[0, -keep:], atol=1e-5)
        assert all(np.array_equal(a, b) for a, b in zip(present, kept_present, strict=True))
    longer, _ = decoder.prefill(model.config, ids, keep=len(ids) + 5)  # more than there are: all of them
    assert longer.shape[1] == len(ids)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_decoding_through_the_kv_cache_gives_forges_greedy_tokens(
    exported: Callable[[str, str], Export], bpe_tokenizer: Tokenizer, family: str
) -> None:
    model, folder = exported(family, "float32")
    prompt = bpe_tokenizer.encode(PROMPT)
    expected = _forge_greedy(model, prompt, 9)
    assert Decoder(folder).greedy(model.config, prompt, 9) == expected  # the prefill's token, then 8 decode steps
    assert len(set(expected)) > 1  # a model that repeats one token would prove little


def test_a_left_padded_batch_gives_each_row_its_own_logits(
    exported: Callable[[str, str], Export], bpe_tokenizer: Tokenizer
) -> None:
    """transformers.js pads a batch on the left and numbers positions from each row's first real token."""
    model, folder = exported("llama", "float32")
    long, short = bpe_tokenizer.encode(PROMPT), bpe_tokenizer.encode("Whether 'tis nobler")
    pad = len(long) - len(short)
    ids = np.array([long, [0] * pad + short])
    mask = np.array([[1] * len(long), [0] * pad + [1] * len(short)])
    positions = np.array([list(range(len(long))), [1] * pad + list(range(len(short)))])
    decoder = Decoder(folder)
    logits, past = decoder.run(ids, mask, positions, decoder.empty_past(model.config, 2))
    with torch.no_grad():
        for row, seq in enumerate((long, short)):
            expected = model(torch.tensor([seq]))[0].numpy()
            assert np.abs(logits[row, -len(seq) :] - expected).max() < FP32_BOUND
    # One decode step for both rows, through the padded cache.
    nxt = logits[:, -1].argmax(-1)
    step, _ = decoder.run(nxt[:, None], np.concatenate([mask, [[1], [1]]], 1), positions[:, -1:] + 1, past)
    with torch.no_grad():
        for row, seq in enumerate((long, short)):
            expected = model(torch.tensor([[*seq, int(nxt[row])]]))[0, -1].numpy()
            assert np.abs(step[row, -1] - expected).max() < FP32_BOUND


def test_the_folder_is_what_transformers_js_loads(
    exported: Callable[[str, str], Export], bpe_tokenizer: Tokenizer
) -> None:
    model, folder = exported("llama", "float32")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == model.config.kv_heads
    assert config["transformers.js_config"] == {"dtype": "fp32"}
    assert config["forge_export"] == {"format": "onnx", "dtype": "float32", "file": "onnx/model.onnx"}
    assert config["eos_token_id"] == bpe_tokenizer.hf.token_to_id(bpe_tokenizer.eos)
    assert {p.name for p in folder.iterdir()} >= {"onnx", "tokenizer.json", "generation_config.json"}
    decoder = Decoder(folder)
    n = model.config.n_layer
    assert decoder.inputs == ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kv}" for i in range(n) for kv in ("key", "value")
    ] + ["num_logits_to_keep"]  # transformers.js feeds it (0: every position's logits)
    assert decoder.names == ["logits"] + [f"present.{i}.{kv}" for i in range(n) for kv in ("key", "value")]


# -- int8 and int4 ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "dtype"), [("llama", "int8"), ("llama", "int4"), ("gpt2", "int4")])
def test_quantized_exports_compute_forges_forward_on_their_weights(
    exported: Callable[[str, str], Export], bpe_tokenizer: Tokenizer, family: str, dtype: str
) -> None:
    model, folder = exported(family, dtype)
    ids = bpe_tokenizer.encode(PROMPT)
    decoder = Decoder(folder)
    logits = decoder.prefill(model.config, ids)[0][0]
    expected = _reference_logits(model, ids, dtype)
    assert np.abs(logits - expected).max() < SAME_WEIGHTS_BOUND
    graph = onnx.load(str(folder / ONNX_FILES[dtype][0])).graph
    ops = {node.op_type for node in graph.node}
    assert "MatMulNBits" in ops
    # A tied embedding is looked up in the head's int8 blocks: no float copy of the vocabulary is left.
    tied = model.config.tie_embeddings
    looked_up = {n.input[0] for n in graph.node if n.op_type == "Gather"}
    assert any(name.endswith(".gather.data") for name in looked_up) == tied
    largest = max(np.prod(t.dims) for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    assert (largest < model.config.vocab_size * model.config.d_model) == tied
    # Greedy through the cache follows the same argmax as Forge on those weights.
    prompt, steps = ids[:4], 8
    tokens = decoder.greedy(model.config, prompt, steps)
    for i, token in enumerate(tokens):
        assert token == int(_reference_logits(model, prompt + tokens[:i], dtype)[-1].argmax())


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_quantized_exports_mostly_agree_with_forge(
    exported: Callable[[str, str], Export], bpe_tokenizer: Tokenizer, dtype: str
) -> None:
    """Top-1 agreement over 48 positions with Forge's float32 forward (int8) and with ``quantize="int4"`` (int4:
    the same round-to-nearest blocks, but a float head), on a random model whose std-0.3 weights quantization hits
    harder than trained ones. Measured: int8 0.92, int4 0.98 (against float32, int4 gets only 0.44 on this model)."""
    model, folder = exported("llama", dtype)
    ids = bpe_tokenizer.encode(PROMPT + ", whether 'tis nobler in the mind to suffer the slings and arrows")
    logits = Decoder(folder).prefill(model.config, ids)[0][0]
    forge = quantize_model(copy.deepcopy(model), "int4") if dtype == "int4" else model
    with torch.no_grad():
        expected = forge(torch.tensor([ids]))[0].numpy()
    assert (logits.argmax(-1) == expected.argmax(-1)).mean() >= 0.85


# -- bad input ---------------------------------------------------------------------------------------------------


def _write(out: Path, model: Transformer, tok: Tokenizer, **kwargs: str) -> Path:
    special = SpecialTokens(eos=tok.eos, stop=list(tok.stop))
    return write_onnx(out, model.config, model.state_dict(), tok.hf, special, **kwargs)


@pytest.fixture
def tiny(small_config: Callable[..., ModelConfig], bpe_tokenizer: Tokenizer) -> Transformer:
    return Transformer(small_config("llama", vocab_size=models.padded_vocab(bpe_tokenizer.vocab_size)))


def test_an_unknown_dtype_is_refused(tiny: Transformer, bpe_tokenizer: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="dtype='int3' is not supported; use one of float32, int8, int4"):
        _write(tmp_path / "m", tiny, bpe_tokenizer, dtype="int3")
    with pytest.raises(ConfigError, match="can't be exported to onnx; use one of float32, int8, int4") as e:
        models.export(tiny, bpe_tokenizer, tmp_path / "m", format="onnx", dtype="q4_0")
    assert e.value.field == "dtype"
    assert list(tmp_path.iterdir()) == []


def test_a_missing_parent_folder_is_refused(tiny: Transformer, bpe_tokenizer: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"parent folder .*missing.* does not exist; create it first"):
        _write(tmp_path / "missing" / "m", tiny, bpe_tokenizer)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_forge_did_not_write_is_never_replaced(
    tiny: Transformer, bpe_tokenizer: Tokenizer, tmp_path: Path
) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(CheckpointError, match=r"refusing to replace .*Forge did not write"):
        _write(mine, tiny, bpe_tokenizer)
    assert [p.name for p in mine.iterdir()] == ["config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary folder left


def test_an_architecture_transformers_js_cannot_run_is_refused(
    small_config: Callable[..., ModelConfig], bpe_tokenizer: Tokenizer, tmp_path: Path
) -> None:
    vocab = models.padded_vocab(bpe_tokenizer.vocab_size)
    odd = Transformer(small_config("llama", vocab_size=vocab, norm="layernorm"))  # RoPE with LayerNorm
    with pytest.raises(ConfigError, match="ONNX export can't handle this architecture"):
        _write(tmp_path / "m", odd, bpe_tokenizer)
    assert list(tmp_path.iterdir()) == []


def test_forge_export_writes_and_replaces_its_own_onnx_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bpe_tokenizer: Tokenizer
) -> None:
    torch.manual_seed(0)
    models.save(tmp_path / "ckpt", models.create_model("llama-tiny", vocab_size=512), bpe_tokenizer)
    out = tmp_path / "web"
    for _ in range(2):  # the second run replaces the first's folder
        code, stdout, err = run_cli(
            ["export", tmp_path / "ckpt", "--format", "onnx", "--dtype", "int4", "--out", out], capsys
        )
        assert code == 0, err
    assert "onnx int4" in stdout and "model_q4.onnx" in stdout
    assert (out / "onnx" / "model_q4.onnx").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "web"]


# -- SmolLM2 (the shipped Q4_1 GGUF) ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_int4(tmp_path_factory: pytest.TempPathFactory) -> tuple[models.LoadedModel, Path]:
    try:
        loaded = models.load("smollm2")
    except Exception as e:
        pytest.skip(f"SmolLM2 is not installed: {e}")
    out = tmp_path_factory.mktemp("smollm2") / "smollm2-onnx"
    models.export(loaded.model, loaded.tokenizer, out, format="onnx", dtype="int4")
    return loaded, out


@pytest.mark.slow
def test_smollm2_int4_export_keeps_the_gguf_weights(
    smollm2_int4: tuple[models.LoadedModel, Path], hamlet_text: str
) -> None:
    """The Q4_1 blocks go into MatMulNBits as they are: the export computes Forge's forward on the GGUF's
    weights (dequantized here). Measured: 256 of 256 forced-decoding argmaxes equal, logits within 2e-4."""
    loaded, folder = smollm2_int4
    tok, cfg = loaded.tokenizer, loaded.model.config
    forge = copy.deepcopy(loaded.model)
    dequantize_model(forge)
    forge.float().eval()
    decoder = Decoder(folder)
    prompt = tok.encode("The capital of France is")
    expected = _forge_greedy(forge, prompt, 16)
    assert decoder.greedy(cfg, prompt, 16) == expected
    assert tok.decode(expected).startswith(" Paris")
    ids = tok.encode(hamlet_text[5000:8000])[:256]
    logits = decoder.prefill(cfg, ids)[0][0]
    with torch.no_grad():
        reference = forge(torch.tensor([ids]))[0].numpy()
    assert (logits.argmax(-1) == reference.argmax(-1)).mean() >= 0.99
    assert (folder / "onnx" / "model_q4.onnx").stat().st_size < 130e6  # measured 117 MB (the GGUF: 98 MB)
