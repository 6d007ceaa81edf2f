"""The `forge` command line: every user error is one line, a non-zero exit, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from forge.cli import main
from helpers import run_cli

HAMLET_LINES = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 60


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    p = tmp_path / "notes.txt"
    p.write_text(HAMLET_LINES, encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint trained for 6 steps through the CLI."""
    root = tmp_path_factory.mktemp("cli")
    data = root / "notes.txt"
    data.write_text(HAMLET_LINES, encoding="utf-8")
    out = root / "model"
    main_args = ["train", data, "--steps", "6", "--batch-size", "2", "--context", "32", "--out", out]
    main_args += ["--tokenizer", "char", "--eval-every", "3", "--device", "cpu"]
    try:
        main([str(a) for a in [*main_args, "--seed", "1"]])
    except SystemExit as e:
        assert e.code in (0, None), e.code
    return out


def assert_user_error(code: int, err: str, expected_code: int, *needles: str) -> None:
    assert code == expected_code, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got {lines}"
    joined = " ".join(lines).lower()
    for needle in needles:
        assert needle.lower() in joined, f"{needle!r} not in {err!r}"


# -- bad input --------------------------------------------------------------------------


def test_missing_data_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["train", tmp_path / "nope.txt", "--steps", "1"], capsys)
    assert_user_error(code, err, 3, "nope.txt", "does not exist")


def test_empty_data_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n", encoding="utf-8")
    code, _, err = run_cli(["train", empty, "--steps", "1"], capsys)
    assert_user_error(code, err, 3, "empty", "empty.txt")


def test_binary_data_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blob = tmp_path / "weights.bin"
    blob.write_bytes(bytes(range(256)) * 10)
    code, _, err = run_cli(["train", blob, "--steps", "1"], capsys)
    assert_user_error(code, err, 3, "weights.bin", "binary")


def test_unknown_preset_suggests(text_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["train", text_file, "--preset", "tinyy"], capsys)
    assert_user_error(code, err, 2, "unknown preset 'tinyy'", "did you mean 'tiny'")


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--steps", "0"),
        ("--steps", "-5"),
        ("--batch-size", "0"),
        ("--context", "-1"),
        ("--lr", "0"),
        ("--lr", "-0.001"),
    ],
)
def test_zero_or_negative_numbers(text_file: Path, option: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["train", text_file, option, value], capsys)
    assert_user_error(code, err, 2, f"invalid value for '{option}'", value)


def test_context_longer_than_model(text_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["train", text_file, "--preset", "tiny", "--context", "4096"], capsys)
    assert_user_error(code, err, 2, "--context 4096", "model's context of 256")


def test_unknown_device(text_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["train", text_file, "--device", "tpu"], capsys)
    assert_user_error(code, err, 2, "invalid value for '--device'", "tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device(text_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["train", text_file, "--device", "cuda"], capsys)
    assert_user_error(code, err, 5, "'cuda' is not available", "--device cpu")


def test_corrupted_checkpoint(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(trained), str(broken)], check=True)
    weights = broken / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    code, _, err = run_cli(["generate", broken, "--prompt", "To be"], capsys)
    assert_user_error(code, err, 4, "corrupted", "model.safetensors")


def test_truncated_checkpoint(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "truncated"
    subprocess.run(["cp", "-r", str(trained), str(broken)], check=True)
    (broken / "model.safetensors").write_bytes((trained / "model.safetensors").read_bytes()[:100])
    code, _, err = run_cli(["info", broken], capsys)
    assert_user_error(code, err, 4, "corrupted")


def test_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["generate", tmp_path / "nowhere", "--prompt", "hi"], capsys)
    assert_user_error(code, err, 4, "does not exist")


def test_not_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["info", tmp_path], capsys)
    assert_user_error(code, err, 4, "not a forge checkpoint")


def test_resume_with_too_few_steps(trained: Path, text_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["train", text_file, "--resume", trained, "--steps", "3", "--out", trained], capsys)
    assert_user_error(code, err, 2, "--steps 3", "already at step 6")


def test_installed_script_prints_no_traceback(tmp_path: Path) -> None:
    """The real `forge` executable, in a subprocess, as a user runs it."""
    script = Path(sys.executable).with_name("forge")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "forge"]
    proc = subprocess.run(
        [*cmd, "train", str(tmp_path / "missing.txt")],
        capture_output=True,
        text=True,
        env=os.environ | {"COLUMNS": "200"},
    )
    assert proc.returncode == 3
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: data path '{tmp_path / 'missing.txt'}' does not exist; pass a text file or a folder of .txt/.md files"
    ]


# -- working commands ------------------------------------------------------------------------


def test_info_shows_training_state(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["info", trained, "--json"], capsys)
    assert code == 0, err
    info = json.loads(out)
    assert info["step"] == 6
    assert info["family"] == "gpt2"
    assert info["parameters"] > 0
    assert info["metrics"]["val_loss"] is not None
    code, out, _ = run_cli(["info", trained], capsys)
    assert code == 0 and "parameters" in out and "step" in out


def test_generate_is_seeded(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["generate", trained, "--prompt", "To be", "--max-tokens", "12", "--seed", "7", "--device", "cpu"]
    code, first, err = run_cli(args, capsys)
    assert code == 0, err
    assert first.startswith("To be") and len(first.strip()) > len("To be")
    _, second, _ = run_cli(args, capsys)
    assert first == second
    _, streamed, _ = run_cli([*args, "--stream"], capsys)
    assert streamed == first


def test_resume_counts_steps_in_total(trained: Path, text_file: Path, tmp_path: Path, capsys) -> None:
    copy = tmp_path / "resumed"
    subprocess.run(["cp", "-r", str(trained), str(copy)], check=True)
    code, _, err = run_cli(
        [
            "train",
            text_file,
            "--resume",
            copy,
            "--steps",
            "9",
            "--device",
            "cpu",
            "--batch-size",
            "2",
            "--context",
            "32",
        ],
        capsys,
    )
    assert code == 0, err
    _, out, _ = run_cli(["info", copy, "--json"], capsys)
    assert json.loads(out)["step"] == 9


def test_demo_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["demo", "--steps", "12", "--out", tmp_path / "demo", "--device", "cpu"], capsys)
    assert code == 0, err
    assert "val loss" in out and "samples" in out
    assert (tmp_path / "demo" / "model.safetensors").exists()
