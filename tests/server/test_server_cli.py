"""`forge serve` refuses what it cannot serve with one line and an exit code, before listening."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from helpers import run_cli


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip().startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0].lower()


def test_untrained_preset(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["serve", "tiny", "--device", "cpu"], capsys)
    assert code == 2
    assert "trained model" in one_line(err)


def test_context_longer_than_the_model(tiny_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["serve", tiny_ckpt, "--device", "cpu", "--context", "100000"], capsys)
    assert code == 2
    line = one_line(err)
    assert "context" in line and "100000" in line and "512" in line


def test_missing_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["serve", tmp_path / "nothing", "--device", "cpu"], capsys)
    assert code == 4
    assert "does not exist" in one_line(err)


def test_port_in_use(tiny_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = run_cli(["serve", tiny_ckpt, "--device", "cpu", "--port", port], capsys)
    assert code == 1
    assert f"127.0.0.1:{port}" in one_line(err)


def test_help_lists_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["serve", "--help"], capsys)
    assert code == 0
    for option in ("--host", "--port", "--api-key", "--max-batch", "--max-queue", "--context", "--device", "--dtype"):
        assert option in out


def test_serving_every_address_without_a_key_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "nothing")  # the warning comes first; then it fails, serving nothing
    _, _, err = run_cli(["serve", missing, "--device", "cpu", "--host", "0.0.0.0"], capsys)
    assert "warning: serving on 0.0.0.0 without --api-key" in err
    _, _, err = run_cli(["serve", missing, "--device", "cpu", "--host", "0.0.0.0", "--api-key", "sk-x"], capsys)
    assert "without --api-key" not in err


def test_help_lists_the_client_limits(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["serve", "--help"], capsys)
    assert code == 0
    for option in ("--header-timeout", "--body-timeout", "--max-connections"):
        assert option in out
    code, _, _ = run_cli(["serve", "tiny", "--header-timeout", "0"], capsys)
    assert code == 2  # outside its bounds
