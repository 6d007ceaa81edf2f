"""The `forge` command line: every user error is one line, a non-zero exit, no traceback."""

from __future__ import annotations

import codecs
import errno
import io
import json
import os
import queue
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console

import forge.core.checkpoint as checkpoint_module
import forge.trainer as trainer_module
from forge.cli import main
from forge.cli.progress import TrainingDisplay
from forge.events import StartEvent, StepEvent
from forge.models import create_model, load, padded_vocab, save
from forge.tokenizer import Tokenizer
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
    assert info["family"] == "llama"  # the auto preset builds Llama-style blocks
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


# -- forge chat, as a new user meets it ---------------------------------------------------------------


def _forge(*args: object) -> list[str]:
    return [sys.executable, "-m", "forge", *(str(a) for a in args)]


@pytest.fixture(scope="module")
def looping_chat_model(tmp_path_factory: pytest.TempPathFactory, bigram_model, char_tokenizer) -> Path:
    """A char model whose greedy reply to any chat is "abcdefgh" repeated until max_tokens or Ctrl-C.

    The plain chat prompt ends in "Assistant:"; the table sends ":" to "a" and cycles a..h.
    """
    from forge.models import save

    table = {":": "a", **{c: "abcdefgh"[(i + 1) % 8] for i, c in enumerate("abcdefgh")}}
    path = tmp_path_factory.mktemp("looping") / "checkpoint"
    # Longer than a pipe's buffer (64 KiB): the reply cannot finish unread before the test's Ctrl-C arrives.
    save(path, bigram_model(char_tokenizer, table, context_length=72000), char_tokenizer)
    return path


@pytest.mark.parametrize("preset", ["tiny", "smollm2-135m"])
def test_chat_on_an_untrained_preset_says_so(preset: str) -> None:
    """It crashed with `TypeError: unsupported operand type(s) for /: 'NoneType' and 'float'`."""
    proc = subprocess.run(_forge("chat", preset), input="hi\n/exit\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "no trained weights" in proc.stderr and "forge train" in proc.stderr and "forge chat smollm2" in proc.stderr


@pytest.mark.parametrize("name", ["nowhere.gguf", "model.safetensors"])
def test_chat_on_a_missing_file_says_it_does_not_exist(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A bare file name that is no preset was reported as "unknown preset"."""
    code, _, err = run_cli(["chat", name], capsys)
    assert_user_error(code, err, 4, name, "does not exist")
    assert "unknown preset" not in err


def test_an_over_long_chat_message_is_refused_and_the_session_goes_on(bigram_dir: Path) -> None:
    """The bigram model's context is 64 tokens; a 100-character message does not fit."""
    script = "a" * 100 + "\nhello\n"
    proc = subprocess.run(
        _forge("chat", bigram_dir, "--temperature", "0", "--max-tokens", "4", "--device", "cpu"),
        input=script,
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | {"NO_COLOR": "1", "COLUMNS": "300"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    out = proc.stdout
    assert "not sent: the prompt is 1" in out and "tokens but the context is 64" in out
    assert "you> hello" in out and out.count("bot>") == 2  # the next message is answered


class _Output:
    """The child's output from a reader thread, in chunks (a read that never returns cannot hang the suite).

    Chunks, not characters: handing 64 KiB over one character at a time took minutes whenever another thread
    of the test process held the GIL, and the Ctrl-C tests then timed out in the full suite.
    """

    def __init__(self, stream) -> None:
        self.chunks: queue.Queue[str] = queue.Queue()
        self.pending = ""  # read past the last needle: the next read starts here
        fd = stream.fileno()

        def pump() -> None:
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            while data := os.read(fd, 1 << 16):
                self.chunks.put(decoder.decode(data))
            self.chunks.put("")  # end of output

        threading.Thread(target=pump, daemon=True).start()

    def until(self, needle: str, seen: list[str], timeout: float = 120) -> str:
        """Read until ``needle`` appears (the child's output is unbuffered), for at most ``timeout`` seconds;
        the text up to and including it goes to ``seen``."""
        text, deadline = self.pending, time.monotonic() + timeout
        while needle not in text:
            try:
                chunk = self.chunks.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"{needle!r} did not come in {timeout:g} s; output: {''.join(seen) + text!r}"
                ) from None
            if not chunk:
                raise AssertionError(f"{needle!r} never came; output so far: {''.join(seen) + text!r}")
            text += chunk
        cut = text.index(needle) + len(needle)
        text, self.pending = text[:cut], text[cut:]
        seen.append(text)
        return text

    def rest(self, timeout: float = 60) -> str:
        """Everything still to come, until the output ends."""
        text, self.pending = self.pending, ""
        while chunk := self.chunks.get(timeout=timeout):
            text += chunk
        return text


@pytest.mark.parametrize("leave", ["eof", "ctrl-c"])
def test_chat_ctrl_c_stops_the_reply_and_the_session_goes_on(looping_chat_model: Path, leave: str) -> None:
    """SIGINT mid-reply printed two chained tracebacks and generation ran on; now the reply stops.

    Each reply would run for 70,000 tokens, more than the pipe holds, so it is still running when the
    signal comes, however loaded the machine (with 8,000 a loaded run finished it first). Ctrl-C ends
    it, the next message is answered, and then end of input (Ctrl-D) or a Ctrl-C at the prompt leaves
    quietly. Were a generation still running, the process could not exit before the timeout.
    """
    import signal

    args = ("chat", looping_chat_model, "--temperature", "0", "--max-tokens", "70000", "--device", "cpu")
    child = subprocess.Popen(
        _forge(*args),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"NO_COLOR": "1", "PYTHONUNBUFFERED": "1"},
        # Ctrl-C as a terminal gives it: a child inherits an ignored SIGINT, and something earlier in the
        # full suite leaves the test process ignoring it (the child then never sees its Ctrl-C).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert child.stdin is not None and child.stdout is not None and child.stderr is not None
    seen: list[str] = []
    output = _Output(child.stdout)
    try:
        for message in ("hi", "again"):
            child.stdin.write(message + "\n")
            child.stdin.flush()
            output.until("bot> abcdefghabcdefgh", seen)  # mid-reply
            child.send_signal(signal.SIGINT)
            output.until("(reply stopped", seen)
        if leave == "ctrl-c":
            output.until("\n", seen)  # back at the prompt
            child.send_signal(signal.SIGINT)
        child.stdin.close()  # end of input
        child.wait(timeout=60)
        err = child.stderr.read()
        rest = output.rest()
    finally:
        child.kill()
    assert child.returncode in ((0,) if leave == "eof" else (0, 130)), err
    assert "Traceback" not in err and "aclose" not in err
    out = "".join(seen) + rest
    assert out.count("you> ") == 2 and out.count("(reply stopped") == 2


# -- forge train / export: never the user's data, a full disk, Ctrl-C, progress in a log (issue 14) -------------

TRAIN_FAST = ["--batch-size", "2", "--context", "32", "--tokenizer", "char", "--eval-every", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def bpe_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny model with a byte-level BPE tokenizer: what GGUF export needs."""
    tokenizer = Tokenizer.train([HAMLET_LINES], kind="bpe", vocab_size=300)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bpe") / "model"
    save(path, create_model("tiny", vocab_size=padded_vocab(tokenizer.vocab_size)), tokenizer)
    return path


CHATML = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


@pytest.mark.parametrize("fmt", ["gguf", "hf"])
def test_export_keeps_the_chat_template_and_stop_tokens(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    """Issue 15: a fine-tuned chat model must still stop after export, so its template and stop tokens travel."""
    plain = Tokenizer.train([HAMLET_LINES], kind="bpe", vocab_size=300, special_tokens=SPECIALS)
    tokenizer = Tokenizer(
        plain.hf, eos="<|im_end|>", bos="<|im_start|>", stop=(SPECIALS[2], SPECIALS[0]), chat_template=CHATML
    )
    torch.manual_seed(0)
    save(tmp_path / "model", create_model("tiny", vocab_size=padded_vocab(tokenizer.vocab_size)), tokenizer)
    out = tmp_path / ("m.gguf" if fmt == "gguf" else "m-hf")
    code, _, err = run_cli(["export", tmp_path / "model", "--format", fmt, "--out", out], capsys)
    assert code == 0, err
    back = load(out).tokenizer
    assert back.chat_template == CHATML and back.eos == "<|im_end|>"
    assert {back.token(i) for i in back.stop_ids} == {"<|im_end|>", "<|endoftext|>"}


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_train_never_writes_over_its_own_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text(HAMLET_LINES)
    code, _, err = run_cli(["train", notes, "--out", notes, "--steps", "2", *TRAIN_FAST], capsys)
    assert_user_error(code, err, 4, "refusing to replace", str(notes), "choose a new or empty folder")
    assert _contents(notes) == {"a.txt": HAMLET_LINES.encode()}
    assert [p.name for p in tmp_path.iterdir()] == ["notes"]


def test_train_on_a_full_disk_fails_in_one_line_and_keeps_the_checkpoint(
    trained: Path, text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = _contents(run)

    def full(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint_module, "write_durably", full)
    code, _, err = run_cli(["train", text_file, "--resume", run, "--steps", "8", *TRAIN_FAST], capsys)
    assert_user_error(code, err, 4, "could not write", str(run), "no space left on device", "unchanged")
    assert _contents(run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "run"]  # no temporary folder left


def test_export_never_overwrites_what_forge_did_not_write(
    bpe_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    code, _, err = run_cli(["export", bpe_checkpoint, "--format", "gguf", "--out", notes], capsys)
    assert_user_error(code, err, 4, "refusing to replace", str(notes), "not a GGUF file")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text("mine")
    code, _, err = run_cli(["export", bpe_checkpoint, "--format", "gguf", "--out", folder], capsys)
    assert_user_error(code, err, 4, str(folder), "is a folder")
    code, _, err = run_cli(["export", bpe_checkpoint, "--format", "hf", "--out", folder], capsys)
    assert_user_error(code, err, 4, "refusing to replace", "Forge did not write")
    assert notes.read_text() == "mine" and _contents(folder) == {"a.txt": b"mine"}
    # What Forge wrote is replaced: a second export over the first succeeds.
    for fmt, out in (("gguf", tmp_path / "m.gguf"), ("hf", tmp_path / "hf")):
        for _ in range(2):
            code, _, err = run_cli(["export", bpe_checkpoint, "--format", fmt, "--out", out], capsys)
            assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "hf", "m.gguf", "notes.txt"]


def test_export_on_a_full_disk_fails_in_one_line_keeping_the_old_file(bpe_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.gguf"
    assert main(["export", str(bpe_checkpoint), "--format", "gguf", "--dtype", "f32", "--out", str(out)]) == 0
    before = out.read_bytes()

    def small_disk() -> None:  # writes past 256 KiB fail with EFBIG (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, 256 << 10))

    proc = subprocess.run(
        _forge("export", bpe_checkpoint, "--format", "gguf", "--dtype", "f32", "--out", out),
        capture_output=True,
        text=True,
        env=os.environ | {"COLUMNS": "200"},
        preexec_fn=small_disk,
        timeout=300,
    )
    assert_user_error(proc.returncode, proc.stderr, 4, "could not write the GGUF file", "disk full")
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]  # no temporary file left


def test_ctrl_c_in_train_saves_says_how_to_resume_and_exits_130(
    text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_step = trainer_module.Trainer._train_step
    calls: list[int] = []

    def step(self: trainer_module.Trainer) -> tuple[float, float, float]:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C during the third step
        return real_step(self)

    monkeypatch.setattr(trainer_module.Trainer, "_train_step", step)
    out = tmp_path / "run"
    code, _, err = run_cli(["train", text_file, "--out", out, "--steps", "10", *TRAIN_FAST], capsys)
    assert code == 130, err  # so `forge train ... && forge export ...` stops here
    assert "Traceback" not in err
    assert f"checkpoint saved to {out}" in err and f"--resume {out} --steps 10" in err
    assert load(out, with_state=True).step == 2


def test_train_prints_plain_progress_lines_when_not_a_terminal(
    text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(["train", text_file, "--out", tmp_path / "run", "--steps", "3", *TRAIN_FAST], capsys)
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert lines and lines[0].startswith("step 1/3") and lines[-1].startswith("step 3/3"), out
    assert all("loss" in line and "tok/s" in line and "eta" in line for line in lines)


def test_plain_progress_prints_a_line_per_interval() -> None:
    now = [0.0]
    buffer = io.StringIO()
    display = TrainingDisplay(Console(file=buffer, width=200), interval=10.0, clock=lambda: now[0])
    display(
        StartEvent(
            start_step=0,
            total_steps=40,
            parameters=10**6,
            device="cpu",
            precision="float32",
            compiled=False,
            train_tokens=1000,
            val_tokens=100,
            tokens_per_step=64,
        )
    )
    for step in range(1, 41):
        now[0] = float(step)  # one step a second
        display(
            StepEvent(
                step=step,
                total_steps=40,
                loss=2.0,
                lr=1e-3,
                grad_norm=1.0,
                tokens_per_sec=64.0,
                elapsed=float(step),
                eta=float(40 - step),
            )
        )
    steps = [line.split()[1] for line in buffer.getvalue().splitlines() if line.startswith("step ")]
    assert steps == ["1/40", "11/40", "21/40", "31/40", "40/40"]


def test_info_reads_gguf_files(capsys: pytest.CaptureFixture[str]) -> None:
    """`forge info` refused the GGUF files that chat, generate and export accept."""
    from forge import models

    try:
        path = models.locate("smollm2")
    except Exception as e:
        pytest.skip(f"SmolLM2 is not installed: {e}")
    code, out, err = run_cli(["info", path, "--json"], capsys)
    assert code == 0, err
    info = json.loads(out)
    assert info["format"] == "gguf" and info["source"]["architecture"] == "llama"
    assert 130e6 < info["parameters"] < 140e6 and info["config"]["context_length"] == 8192
    assert info["source"]["file_type"] == "MOSTLY_Q4_1" and info["chat_template"] is True
    code, out, err = run_cli(["info", path], capsys)
    assert code == 0, err
    for needle in ("GGUF file", "architecture", "llama", "8192", "quantization", "Q4_1", "chat template"):
        assert needle in out, needle


def test_info_reads_hf_folders(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exported = tmp_path / "model-hf"
    code, _, err = run_cli(["export", trained, "--format", "hf", "--out", exported], capsys)
    assert code == 0, err
    code, out, err = run_cli(["info", exported, "--json"], capsys)
    assert code == 0, err
    info = json.loads(out)
    _, original, _ = run_cli(["info", trained, "--json"], capsys)
    assert info["format"] == "hf" and info["source"]["architecture"] and info["chat_template"] is False
    assert info["parameters"] == json.loads(original)["parameters"]
    assert info["config"]["context_length"] == json.loads(original)["config"]["context_length"]
    code, out, err = run_cli(["info", exported], capsys)
    assert code == 0, err
    assert "Hugging Face folder" in out and "architecture" in out and "chat template" in out


def test_demo_keeps_to_its_time_budget(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """On a slow CPU the demo ran its 50-step floor (7 minutes for a 120 s budget) and said "about 50 steps fit".

    With a budget already spent by the speed measurement, it trains fewer steps than that floor and says
    how many it really trained.
    """
    out_dir = tmp_path / "demo"
    code, out, err = run_cli(["demo", "--seconds", "0.01", "--out", out_dir, "--device", "cpu"], capsys)
    assert code == 0, err
    trained_line = next(line for line in out.splitlines() if line.startswith("trained "))
    reported = int(trained_line.split()[1])
    _, info, _ = run_cli(["info", out_dir, "--json"], capsys)
    assert reported == json.loads(info)["step"] < 50
    assert "about 50 steps fit" not in out
