"""GGUF export to the block types (Q8_0, Q4_0, Q4_1), read back by Forge and llama.cpp; quantized models exported.

The reference for every rounding is ``gguf.quants`` (llama.cpp's own reference quantizers, in numpy).
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from forge import models  # noqa: E402
from forge.app import Forge  # noqa: E402
from forge.core.formats.gguf import read_gguf  # noqa: E402
from forge.core.generate import generate_tokens  # noqa: E402
from forge.core.quantize import GGUF_Q4_0, GGUF_Q4_1, Int4Weight, QuantizedWeight, quantize_model  # noqa: E402
from forge.core.sampling import SamplingParams  # noqa: E402
from forge.core.transformer import Transformer  # noqa: E402
from forge.models import LoadedModel  # noqa: E402
from helpers import run_cli  # noqa: E402

Q = gguf.GGMLQuantizationType
BLOCK_TYPES = ["q4_0", "q4_1", "q8_0"]
SAMPLES = ["To be, or not to be, that is the question", "Ophelia!  Nymph, in thy orisons\n", "ĀĒ 42 + 7"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, hamlet_text: str) -> Path:
    """A Forge-trained llama-family checkpoint (byte-level BPE, d_model 128, d_ff 352), a few steps in."""
    out = tmp_path_factory.mktemp("trained") / "ckpt"
    app = Forge("llama-tiny")
    asyncio.run(
        app.train([hamlet_text], steps=6, batch_size=4, context=64, eval_every=0, eval_batches=2, precision="fp32")
    )
    app.save(out)
    return out


@pytest.fixture
def loaded(trained: Path) -> LoadedModel:
    return models.load(trained)


def _rounded(name: str, w: torch.Tensor, dtype: str) -> torch.Tensor:
    """``w`` rounded as the export should store it: gguf.quants' round trip, Q8_0 for the embeddings and head of a
    Q4 file, float16 for rows that are not whole 32-value blocks."""
    x = w.detach().float().numpy()
    if x.shape[-1] % 32:
        return torch.from_numpy(x.astype(np.float16).astype(np.float32))
    qtype = Q.Q8_0 if name in ("tok_emb.weight", "lm_head.weight") else Q[dtype.upper()]
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype))


def _kinds(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def _file_type(path: Path) -> int:
    return int(gguf.GGUFReader(path).fields["general.file_type"].contents())


def _greedy(model: Transformer, ids: list[int], n: int, vocab: int) -> list[int]:
    steps = generate_tokens(model, [ids], max_new_tokens=n, params=SamplingParams(temperature=0), vocab_limit=vocab)
    return [int(t[0]) for t in steps]


@pytest.mark.parametrize("dtype", BLOCK_TYPES)
def test_block_types_read_back_as_gguf_quants_rounds(loaded: LoadedModel, tmp_path: Path, dtype: str) -> None:
    model, tok = loaded.model, loaded.tokenizer
    path = models.export(model, tok, tmp_path / f"m-{dtype}.gguf", dtype=dtype)
    pre = read_gguf(path, quantized=False)
    assert pre.config == model.config
    for text in SAMPLES:
        assert pre.tokenizer.encode(text, add_special_tokens=False).ids == tok.encode(text)
    assert (pre.special.eos, pre.special.bos, pre.chat_template) == (tok.eos, tok.bos, tok.chat_template)

    kinds = _kinds(path)
    assert _file_type(path) == gguf.LlamaFileType[f"MOSTLY_{dtype.upper()}"]
    assert kinds["token_embd.weight"] == "Q8_0"  # tied: the embeddings are the head too
    assert kinds["blk.0.attn_q.weight"] == kinds["blk.1.ffn_down.weight"] == dtype.upper()
    assert kinds["blk.0.attn_norm.weight"] == kinds["output_norm.weight"] == "F32"

    rounded = {k: _rounded(k, w, dtype) if w.dim() == 2 else w for k, w in model.state_dict().items()}
    for key, want in rounded.items():
        assert torch.equal(pre.state_dict[key], want), key
    # The file's model is the in-memory rounded one: the same logits and greedy tokens; Forge(path) generates.
    copy = Transformer(model.config)
    copy.load_state_dict(rounded)
    from_file, ids = models.load(path, quantized=False).model, tok.encode(SAMPLES[0])
    with torch.no_grad():
        torch.testing.assert_close(from_file(torch.tensor([ids])), copy.eval()(torch.tensor([ids])))
    assert _greedy(from_file, ids, 8, tok.vocab_size) == _greedy(copy, ids, 8, tok.vocab_size)
    text = Forge(path).sync.generate("To be", temperature=0, max_tokens=8)
    assert isinstance(text, str) and text


def test_q4_keeps_an_untied_head_at_q8_0_and_odd_rows_at_f16(loaded: LoadedModel, tmp_path: Path, small_config) -> None:
    cfg = small_config("llama", vocab_size=loaded.model.config.vocab_size, tie_embeddings=False, d_ff=80)
    model = Transformer(cfg).eval()
    path = models.export(model, loaded.tokenizer, tmp_path / "m.gguf", dtype="q4_1")
    kinds = _kinds(path)
    assert kinds["token_embd.weight"] == kinds["output.weight"] == "Q8_0"
    assert kinds["blk.0.ffn_up.weight"] == "Q4_1"
    assert kinds["blk.0.ffn_down.weight"] == "F16"  # its rows are 80 long: not whole blocks
    got = read_gguf(path, quantized=False).state_dict
    for key, w in model.state_dict().items():
        want = _rounded(key, w, "q4_1") if w.dim() == 2 else w
        assert torch.equal(got[key], want), key


@pytest.mark.parametrize(("scheme", "dtype"), [("int8", "float32"), ("int4", "float32"), ("int4", "q4_0")])
def test_a_quantized_model_exports_its_dequantized_weights(
    loaded: LoadedModel, tmp_path: Path, scheme: str, dtype: str
) -> None:
    model = quantize_model(loaded.model, scheme)
    floats = {name: m.dequantize(torch.float32) for name, m in model.named_modules() if isinstance(m, QuantizedWeight)}
    assert len(floats) == 4 * model.config.n_layer  # qkv, proj, up, down: every linear but the head
    path = models.export(model, loaded.tokenizer, tmp_path / "m.gguf", dtype=dtype)
    got = read_gguf(path, quantized=False).state_dict
    for name, w in floats.items():
        assert torch.equal(got[name], w if dtype == "float32" else _rounded(name, w, dtype)), name
    hf = models.export(model, loaded.tokenizer, tmp_path / "hf", format="hf", dtype="float32")
    down = "blocks.1.mlp.down.weight"
    assert torch.equal(models.load(hf).model.state_dict()[down], floats[down])


def _q4_weight(out: int, width: int, qtype: int, seed: int) -> tuple[Int4Weight, np.ndarray]:
    """An int4 weight made from random GGUF blocks whose values 2..12 don't span 0..15: requantizing them would
    give other blocks, so equal bytes in the file mean they were written as they are."""
    rng = np.random.default_rng(seed)
    n = out * width // 32
    head = [rng.uniform(0.01, 0.05, n).astype(np.float16)]
    if qtype == GGUF_Q4_1:
        head.append(rng.uniform(-0.4, -0.1, n).astype(np.float16))
    q = rng.integers(2, 13, (n, 32)).astype(np.uint8)
    nibbles = q[:, :16] | (q[:, 16:] << 4)
    blocks = np.concatenate([h[:, None].view(np.uint8) for h in head] + [nibbles], axis=1)
    return Int4Weight.from_gguf(qtype, blocks, (out, width)), blocks.reshape(out, -1)


@pytest.mark.parametrize("dtype", ["q4_0", "q4_1"])
def test_q4_blocks_are_written_back_unchanged(loaded: LoadedModel, tmp_path: Path, dtype: str) -> None:
    model, qtype = loaded.model, GGUF_Q4_0 if dtype == "q4_0" else GGUF_Q4_1
    original = {}
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for i, (name, module) in enumerate(linears):
        if name != "lm_head":
            w, blocks = _q4_weight(*module.weight.shape, qtype, seed=i)
            del module.weight
            module.weight = w
            original[name] = (w, blocks)
    path = models.export(model, loaded.tokenizer, tmp_path / "m.gguf", dtype=dtype)
    raw = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}
    w, blocks = original["blocks.1.mlp.down"]
    assert np.array_equal(raw["blk.1.ffn_down.weight"].reshape(blocks.shape), blocks)
    requantized = gguf.quants.quantize(w.dequantize(torch.float32).numpy(), Q[dtype.upper()])
    assert not np.array_equal(requantized, blocks)  # so the test tells writing back from requantizing
    # q, k, v are split and row-permuted for llama.cpp; read back, each weight is bit for bit what it was.
    got = read_gguf(path, quantized=False).state_dict
    for name, (w, _) in original.items():
        assert torch.equal(got[name + ".weight"], w.dequantize(torch.float32)), name


def test_cli_exports_q4_0_and_rejects_a_bad_dtype(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m.gguf"
    code, stdout, err = run_cli(["export", trained, "--format", "gguf", "--dtype", "q4_0", "--out", out], capsys)
    assert code == 0, err
    assert "q4_0" in stdout and "m.gguf" in stdout
    assert _file_type(out) == gguf.LlamaFileType.MOSTLY_Q4_0
    assert read_gguf(out).config == models.load(trained).config
    code, _, err = run_cli(["export", trained, "--format", "gguf", "--dtype", "q4_k", "--out", out], capsys)
    assert code == 2 and "'q4_k'" in err and "q4_0" in err and "q4_1" in err and "Traceback" not in err
    code, _, err = run_cli(["export", trained, "--format", "hf", "--dtype", "q4_0", "--out", tmp_path / "hf"], capsys)
    assert code == 2 and "can't be exported to hf" in err and "Traceback" not in err


@pytest.mark.slow
def test_smollm2_exported_as_q4_0_answers_like_the_original(smollm2_app: Forge, tmp_path: Path) -> None:
    model, tok = smollm2_app.model, smollm2_app.tokenizer
    assert model is not None and tok is not None
    path = models.export(model, tok, tmp_path / "smol-q4_0.gguf", dtype="q4_0")
    assert _file_type(path) == gguf.LlamaFileType.MOSTLY_Q4_0
    q4 = models.load(path, quantized=False)
    prompt = tok.encode_prompt(smollm2_app.render([{"role": "user", "content": "What is the capital of France?"}]))
    vocab = tok.vocab_size
    ours, theirs = _greedy(model, prompt, 8, vocab), _greedy(q4.model, prompt, 8, vocab)
    agree = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), len(ours))
    print(f"SmolLM2 q4_0 vs the shipped Q4_1: the first {agree} of {len(ours)} greedy tokens agree")
    assert agree >= 4, (tok.decode(ours), tok.decode(theirs))
    assert "Paris" in tok.decode(theirs)


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
@pytest.mark.parametrize("dtype", ["q4_0", "q4_1"])
def test_exported_q4_runs_in_llama_cpp(loaded: LoadedModel, tmp_path: Path, dtype: str) -> None:
    from llama_cpp import Llama

    path = models.export(loaded.model, loaded.tokenizer, tmp_path / f"m-{dtype}.gguf", dtype=dtype)
    llm = Llama(model_path=str(path), logits_all=True, verbose=False, n_ctx=64)
    ids = llm.tokenize(SAMPLES[0].encode(), add_bos=False, special=True)
    assert ids == loaded.tokenizer.encode(SAMPLES[0])
    llm.eval(ids)
    vocab = loaded.tokenizer.vocab_size
    theirs = torch.tensor(llm.scores[: len(ids)])[:, :vocab]
    with torch.no_grad():
        ours = models.load(path, quantized=False).model(torch.tensor([ids]))[0, :, :vocab]
    # llama.cpp also rounds the activations (to 8 bits) for its Q4 matmuls, and keeps its KV cache in f16.
    error = ((theirs - ours).abs().max() / ours.abs().max()).item()
    print(f"llama.cpp {dtype}: max |logit diff| / max |logit| = {error:.2e}")
    assert error < 0.1
    generated = list(itertools.islice(llm.generate(ids, temp=0.0, reset=True), 4))
    assert len(generated) == 4 and all(0 <= t < llm.n_vocab() for t in generated)
