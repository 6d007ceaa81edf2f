"""`forge eval` and ``Forge.evaluate``: bits per byte and perplexity over sliding windows, checked against a
plain per-window computation, on a tiny trained model and on SmolLM2."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import click
import pytest
import torch
import torch.nn.functional as F

import forge.evaluate as evaluate_module
from forge.app import Forge
from forge.cli import cli
from forge.config import specs
from forge.core.quantize import quantize_model
from forge.core.transformer import Transformer
from forge.errors import ConfigError, DataError
from forge.evaluate import EvalConfig, evaluate, plan
from forge.tokenizer import Tokenizer
from helpers import run_cli

#: The tiny preset's context: its training windows, and so its evaluation window by default.
CONTEXT = 256


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, notes: Path) -> Path:
    """The tiny preset with a char tokenizer, trained for 20 steps on Hamlet: it predicts better than chance."""
    path = tmp_path_factory.mktemp("eval") / "tiny"
    app = Forge(model="tiny", tokenizer="char", device="cpu")
    options: dict[str, Any] = {"batch_size": 4, "context": CONTEXT, "eval_every": 0, "eval_batches": 1}
    asyncio.run(app.train(notes, steps=20, precision="fp32", **options))
    app.save(path)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> Forge:
    return Forge.load(tiny_dir, device="cpu")


@pytest.fixture(scope="module")
def passage(hamlet_text: str) -> str:
    """Held out from the tiny model's training (the first 8000 characters of Hamlet): about 1,500 characters."""
    return hamlet_text[12_000:13_500]


def reference_loss(model: Transformer, ids: list[int], spans: list[tuple[int, int, int]]) -> float:
    """The summed loss, one window at a time through the model's own forward: ``model(x)`` then cross-entropy."""
    total = 0.0
    with torch.inference_mode():
        for begin, scored, end in spans:
            logits = model(torch.tensor([ids[begin:end]]))[0].float()  # (T, vocab)
            targets = torch.tensor(ids[scored:end])
            total += F.cross_entropy(logits[scored - 1 - begin : end - 1 - begin], targets, reduction="sum").item()
    return total


def _model(app: Forge) -> tuple[Transformer, Tokenizer]:
    assert app.model is not None and app.tokenizer is not None
    return app.model, app.tokenizer


# -- the windows ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "window", "stride"), [(2, 2, 1), (10, 6, 3), (10, 6, 5), (100, 16, 1), (100, 16, 7)])
def test_the_plan_scores_every_token_once_with_context(n: int, window: int, stride: int) -> None:
    spans = plan(n, window=window, stride=stride)
    scored = [i for _, s, e in spans for i in range(s, e)]
    assert scored == list(range(1, n))  # each token but the first, once, in order
    for begin, s, end in spans:
        assert end - begin == min(window, n) and 0 <= begin < s  # one length; a token of context at least
    for begin, s, _ in spans[1:]:
        assert s - begin >= window - stride  # later windows give every scored token this much context
    assert plan(n, window=n + 5, stride=1) == [(0, 1, n)]  # a short text: one window


def test_a_stride_must_be_below_the_window() -> None:
    with pytest.raises(ConfigError, match="stride=8 is not below the window of 8 tokens") as caught:
        EvalConfig(window=8, stride=8)
    assert caught.value.field == "stride"
    with pytest.raises(ConfigError, match="window"):
        EvalConfig(window=1)


# -- a tiny trained model --------------------------------------------------------------------------------------


def test_one_window_equals_a_full_forward(tiny: Forge, passage: str) -> None:
    model, tokenizer = _model(tiny)
    text = passage[: CONTEXT - 4]  # a char tokenizer: one token a character, so it fits one window
    ids = tokenizer.encode(text)
    assert len(ids) <= CONTEXT
    result = evaluate(model, tokenizer, text)
    expected = reference_loss(model, ids, [(0, 1, len(ids))])
    assert result.windows == 1 and result.tokens == len(ids) - 1
    assert result.bytes == len(text[1:].encode())  # the first character is context only
    assert result.loss == pytest.approx(expected / (len(ids) - 1), rel=1e-5)
    assert result.bits_per_byte == pytest.approx(expected / math.log(2) / result.bytes, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.loss))


def test_batched_windows_equal_one_window_at_a_time(tiny: Forge, passage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows batched 3 to a forward, and logits 7 rows at a time, change nothing."""
    model, tokenizer = _model(tiny)
    text = passage[:400]
    ids = tokenizer.encode(text)
    spans = plan(len(ids), window=48, stride=20)
    expected = reference_loss(model, ids, spans)
    monkeypatch.setattr(evaluate_module, "_BATCH_TOKENS", 3 * 48)
    monkeypatch.setattr(evaluate_module, "_LOGIT_ROWS", 7)
    result = evaluate(model, tokenizer, text, window=48, stride=20)
    assert result.windows == len(spans) > 3
    assert result.loss * result.tokens == pytest.approx(expected, rel=1e-5)
    assert 0 < result.bits_per_byte < math.log2(tokenizer.vocab_size)  # better than chance: it was trained


def test_a_bos_model_scores_its_first_token_and_every_byte(tiny: Forge) -> None:
    model, tokenizer = _model(tiny)
    with_bos = Tokenizer(tokenizer.hf, eos=tokenizer.eos, bos=tokenizer.eos, add_bos=True)
    text = "to be, or not to be"
    result = evaluate(model, with_bos, text)
    assert with_bos.bos_id is not None
    ids = [with_bos.bos_id, *tokenizer.encode(text)]
    assert result.tokens == len(text) and result.bytes == len(text.encode())  # a char tokenizer
    expected = reference_loss(model, ids, [(0, 1, len(ids))])
    assert result.loss * result.tokens == pytest.approx(expected, rel=1e-5)


def test_a_long_text_is_cut_at_max_tokens_and_says_so(tiny: Forge, passage: str) -> None:
    model, tokenizer = _model(tiny)
    result = evaluate(model, tokenizer, passage, max_tokens=100)
    assert result.truncated and result.tokens == 100 and result.bytes == len(passage[1:101].encode())
    assert not evaluate(model, tokenizer, passage[:50], max_tokens=100).truncated


def test_the_app_evaluates_a_file_and_a_string_alike(tiny: Forge, passage: str, tmp_path: Path) -> None:
    path = tmp_path / "passage.txt"
    path.write_text(passage, encoding="utf-8")
    from_file = asyncio.run(tiny.evaluate(path, window=48))
    from_text = asyncio.run(tiny.evaluate(passage, window=48))
    assert from_file["bits_per_byte"] == pytest.approx(from_text["bits_per_byte"])
    assert from_file["stride"] == 24 and from_file["dtype"] == "float32" and from_file["quantize"] is None


# -- the command ---------------------------------------------------------------------------------------------------


def test_eval_prints_json(tiny_dir: Path, tiny: Forge, passage: str, tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "passage.txt"
    path.write_text(passage, encoding="utf-8")
    code, out, err = run_cli(["eval", tiny_dir, path, "--json", "--device", "cpu", "--dtype", "fp32"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["bits_per_byte"] == pytest.approx(asyncio.run(tiny.evaluate(path))["bits_per_byte"], rel=1e-5)
    assert result["perplexity"] > 1 and result["window"] == CONTEXT and result["text"] == str(path)
    code, out, err = run_cli(["eval", tiny_dir, path, "--device", "cpu", "--max-tokens", "40"], capsys)
    assert code == 0, err
    assert "bits per byte" in out and "40 tokens" in out
    assert "--max-tokens 40" in err and "first 40 tokens" in err


def test_eval_s_flags_are_eval_config_s_fields() -> None:
    """Options defined once (tests/test_options.py's rule): each flag has its field's name, range and default."""
    command = cli.commands["eval"]
    options = {p.name: p for p in command.params if isinstance(p, click.Option)}
    for field in dataclasses.fields(EvalConfig):
        option = options[field.name]
        spec = specs(EvalConfig)[field.name]
        assert option.opts[0] == "--" + field.name.replace("_", "-") and option.default == field.default
        assert isinstance(option.type, click.IntRange) and option.type.min == spec.bound.low[0]  # type: ignore[union-attr]
    assert options["quantize"].default is None and options["dtype"].default == "auto"


@pytest.mark.parametrize(
    ("content", "args", "code", "needles"),
    [
        (None, [], 2, ["missing.txt", "does not exist"]),
        ("", [], 3, ["is empty"]),
        ("   \n", [], 3, ["is empty"]),
        ("a", [], 3, ["1 token", "at least 2"]),
        (b"\x00\x01binary", [], 3, ["binary"]),
        (
            "to be or not",
            ["--window", "8", "--stride", "8"],
            2,
            ["--stride 8 is not below the window of 8", "--stride 7 "],
        ),
        ("to be or not", ["--window", "1000"], 2, ["--window 1000 is longer than the model's context of 256"]),
        ("to be or not", ["--max-tokens", "0"], 2, ["--max-tokens"]),
    ],
)
def test_bad_input_is_one_line_and_exits_non_zero(
    tiny_dir: Path, tmp_path: Path, capsys: Any, content: Any, args: list[str], code: int, needles: list[str]
) -> None:
    path = tmp_path / "missing.txt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    got, _, err = run_cli(["eval", tiny_dir, path, "--device", "cpu", *args], capsys)
    assert got == code, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


def test_eval_of_a_preset_says_to_train_it(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "t.txt"
    path.write_text("to be or not to be", encoding="utf-8")
    code, _, err = run_cli(["eval", "tiny", path], capsys)
    assert code == 2 and "no trained weights" in err and "forge train" in err


def test_the_python_api_names_fields_not_flags(tiny: Forge) -> None:
    model, tokenizer = _model(tiny)
    with pytest.raises(ConfigError, match=r"window=1000 is longer than the model's context of 256") as caught:
        evaluate(model, tokenizer, "to be or not to be", window=1000)
    assert caught.value.field == "window"
    with pytest.raises(DataError, match="does not exist"):
        evaluate(model, tokenizer, Path("no/such/file.txt"))


# -- SmolLM2 ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_text(hamlet_text: str) -> str:
    """About 250 SmolLM2 tokens of Hamlet."""
    return hamlet_text[9_000:10_000]


def test_smollm2_one_window_equals_a_full_forward(smollm2_app: Forge, smol_text: str) -> None:
    model, tokenizer = _model(smollm2_app)
    ids = tokenizer.encode(smol_text)
    result = evaluate(model, tokenizer, smol_text)
    assert result.windows == 1 and result.window == model.config.context_length
    expected = reference_loss(model, ids, [(0, 1, len(ids))])
    assert result.loss * result.tokens == pytest.approx(expected, rel=1e-4)
    assert 0.5 < result.bits_per_byte < 3  # a real English model on English text


def test_smollm2_overlapping_windows_predict_better(smollm2_app: Forge, smol_text: str) -> None:
    """More context for each token (stride 16 in windows of 48) gives a lower loss than windows that don't overlap."""
    model, tokenizer = _model(smollm2_app)
    overlapping = evaluate(model, tokenizer, smol_text, window=48, stride=16)
    disjoint = evaluate(model, tokenizer, smol_text, window=48, stride=47)
    assert overlapping.tokens == disjoint.tokens and overlapping.windows > disjoint.windows
    assert overlapping.bits_per_byte < disjoint.bits_per_byte


def test_smollm2_int8_scores_as_well_as_float(smollm2_app: Forge, smol_text: str) -> None:
    """Int8 weights (as ``Forge(quantize="int8", dtype="bfloat16")`` holds them) lose little: within 5% of float32."""
    model, tokenizer = _model(smollm2_app)
    float_bpb = evaluate(model, tokenizer, smol_text).bits_per_byte
    int8 = copy.deepcopy(model).to(torch.bfloat16)  # bf16 activations: the int8 matmul's fast path on a CPU
    quantize_model(int8, "int8")
    result = evaluate(int8, tokenizer, smol_text)
    assert result.tokens > 200 and math.isfinite(result.bits_per_byte)
    assert abs(result.bits_per_byte - float_bpb) / float_bpb < 0.05
