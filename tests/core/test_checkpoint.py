"""Checkpoint directories: atomic writes, corruption detection, recovery of an interrupted swap."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import forge.core.checkpoint as ckpt_module
from forge.config import ModelConfig
from forge.core.checkpoint import load_checkpoint, read_manifest, save_checkpoint
from forge.core.transformer import Transformer
from forge.errors import CheckpointError


@pytest.fixture
def model(small_config: Callable[..., ModelConfig]) -> Transformer:
    torch.manual_seed(0)
    return Transformer(small_config("gpt2", n_layer=1))


def _save(path: Path, model: Transformer, **kwargs: object) -> Path:
    return save_checkpoint(path, model=model, config=model.config.to_dict(), **kwargs)  # type: ignore[arg-type]


def _siblings(path: Path) -> list[str]:
    """Names in the parent directory other than the checkpoint itself."""
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


def _same_weights(ckpt_state: dict[str, torch.Tensor], model: Transformer) -> bool:
    params = dict(model.state_dict())
    return all(torch.equal(t, params[name]) for name, t in ckpt_state.items())


def test_round_trip(model: Transformer, tmp_path: Path) -> None:
    path = _save(
        tmp_path / "ckpt",
        model,
        files={"extra.bin": b"\x00\x01payload"},
        training_state={"step": 5, "t": torch.arange(3)},
        meta={"run": "a"},
    )
    assert path == tmp_path / "ckpt"
    loaded = load_checkpoint(path)
    assert loaded.config == model.config.to_dict()
    assert loaded.files == {"extra.bin": b"\x00\x01payload"}
    assert loaded.meta == {"run": "a"}
    assert loaded.training_state is not None
    assert loaded.training_state["step"] == 5
    assert torch.equal(loaded.training_state["t"], torch.arange(3))
    assert _same_weights(loaded.state_dict, model)
    assert load_checkpoint(path, with_state=False).training_state is None


def test_tied_weights_are_stored_once(model: Transformer, tmp_path: Path) -> None:
    loaded = load_checkpoint(_save(tmp_path / "ckpt", model))
    assert len({"tok_emb.weight", "lm_head.weight"} & set(loaded.state_dict)) == 1


def test_manifest_records_every_file(model: Transformer, tmp_path: Path) -> None:
    path = _save(tmp_path / "ckpt", model, files={"tokenizer.json": b"{}"}, training_state={"step": 1})
    manifest = read_manifest(path)
    assert manifest["format"] == "forge-checkpoint"
    assert manifest["version"] == 1
    assert set(manifest["files"]) == {"model.safetensors", "config.json", "tokenizer.json", "training_state.pt"}
    assert {p.name for p in path.iterdir()} == set(manifest["files"]) | {"forge.json"}


def test_save_twice_replaces_atomically(model: Transformer, tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    _save(path, model, meta={"n": 1})
    assert load_checkpoint(path).meta == {"n": 1}
    with torch.no_grad():
        model.tok_emb.weight.add_(1.0)
    _save(path, model, meta={"n": 2})
    loaded = load_checkpoint(path)
    assert loaded.meta == {"n": 2}
    assert _same_weights(loaded.state_dict, model)
    assert _siblings(path) == []  # no temp or .old directories left


def test_crash_midway_keeps_the_previous_checkpoint(
    model: Transformer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ckpt"
    _save(path, model, meta={"n": 1})
    original = load_checkpoint(path).state_dict

    real_write = ckpt_module.write_durably

    def crash_on_manifest(target: Path, data: bytes) -> None:
        if target.name == "forge.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(target, data)

    monkeypatch.setattr(ckpt_module, "write_durably", crash_on_manifest)
    with torch.no_grad():
        model.tok_emb.weight.add_(1.0)
    # A full disk is a user error in one line, not an OSError traceback.
    with pytest.raises(CheckpointError, match=r"No space left on device.*unchanged"):
        _save(path, model, meta={"n": 2})
    monkeypatch.undo()

    loaded = load_checkpoint(path)
    assert loaded.meta == {"n": 1}
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in original.items())
    assert _siblings(path) == []


def test_crash_during_the_swap_is_recovered(
    model: Transformer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old checkpoint was moved aside but the new one never renamed in: loading puts the old one back."""
    path = tmp_path / "ckpt"
    _save(path, model, meta={"n": 1})
    real_replace = os.replace

    def crash_on_second_rename(src: object, dst: object) -> None:
        if Path(str(src)).name.startswith(".ckpt.tmp-"):
            raise KeyboardInterrupt  # the process dies between the two renames
        real_replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(ckpt_module.os, "replace", crash_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        _save(path, model, meta={"n": 2})
    monkeypatch.undo()

    assert not path.exists()
    assert [n.startswith(".ckpt.old-") for n in _siblings(path)] == [True]
    assert load_checkpoint(path).meta == {"n": 1}
    assert path.is_dir()
    assert _siblings(path) == []


def test_moved_aside_old_sibling_is_recovered(model: Transformer, tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    _save(path, model, meta={"n": 1})
    os.replace(path, tmp_path / ".ckpt.old-1234abcd")
    assert read_manifest(path)["meta"] == {"n": 1}
    assert path.is_dir()
    assert not (tmp_path / ".ckpt.old-1234abcd").exists()


def test_recovery_ignores_an_incomplete_old_sibling(model: Transformer, tmp_path: Path) -> None:
    (tmp_path / ".ckpt.old-00000000").mkdir()  # no manifest: not a checkpoint
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "ckpt")


def test_save_recovers_before_writing(model: Transformer, tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    _save(path, model, meta={"n": 1})
    os.replace(path, tmp_path / ".ckpt.old-1234abcd")
    _save(path, model, meta={"n": 2})
    assert load_checkpoint(path).meta == {"n": 2}
    assert _siblings(path) == []


def test_flipped_byte_is_detected(model: Transformer, tmp_path: Path) -> None:
    path = _save(tmp_path / "ckpt", model)
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted") as info:
        load_checkpoint(path)
    assert "model.safetensors" in str(info.value)


def test_missing_manifest_is_detected(model: Transformer, tmp_path: Path) -> None:
    path = _save(tmp_path / "ckpt", model)
    (path / "forge.json").unlink()
    with pytest.raises(CheckpointError, match=r"forge\.json"):
        load_checkpoint(path)


def test_invalid_manifest_is_detected(model: Transformer, tmp_path: Path) -> None:
    path = _save(tmp_path / "ckpt", model)
    (path / "forge.json").write_text("{truncated")
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(path)
    (path / "forge.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(path)


def test_missing_file_is_detected(model: Transformer, tmp_path: Path) -> None:
    path = _save(tmp_path / "ckpt", model, training_state={"step": 1})
    (path / "training_state.pt").unlink()
    with pytest.raises(CheckpointError, match=r"training_state\.pt"):
        load_checkpoint(path)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist") as info:
        load_checkpoint(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value)


def test_a_file_is_not_a_checkpoint(model: Transformer, tmp_path: Path) -> None:
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        load_checkpoint(file)
    with pytest.raises(CheckpointError, match="is a file"):
        _save(file, model)


def test_errors_carry_exit_code_and_status(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "nowhere")
    assert info.value.exit_code == 4
    assert info.value.http_status == 404


# -- what a save may replace; what a manifest may name; what a training state may hold (issue 14) ----------------


def test_refuses_to_replace_a_folder_forge_did_not_write(model: Transformer, tmp_path: Path) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("my notes")
    with pytest.raises(CheckpointError, match=r"refusing to replace.*Forge did not write.*choose a new or empty"):
        _save(notes, model)
    assert [p.name for p in notes.iterdir()] == ["a.txt"]
    assert (notes / "a.txt").read_text() == "my notes"
    assert _siblings(notes) == []


def test_an_empty_folder_becomes_a_checkpoint(model: Transformer, tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.mkdir()
    _save(path, model, meta={"n": 1})
    assert load_checkpoint(path).meta == {"n": 1}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _list_in_manifest(path: Path, name: str, digest: str | None = None) -> None:
    """Edit the manifest as an attacker could: its entries are trusted only as far as they are checked."""
    manifest = json.loads((path / "forge.json").read_text())
    if digest is None:
        del manifest["files"][name]
    else:
        manifest["files"][name] = digest
    (path / "forge.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("where", ["parent", "absolute", "subfolder"])
def test_manifest_entries_outside_the_folder_are_refused(model: Transformer, tmp_path: Path, where: str) -> None:
    path = _save(tmp_path / "ckpt", model)
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    (path / "sub").mkdir()
    (path / "sub" / "secret.txt").write_text("not yours")
    name = {"parent": "../secret.txt", "absolute": str(secret), "subfolder": "sub/secret.txt"}[where]
    _list_in_manifest(path, name, _sha256(secret))
    with pytest.raises(CheckpointError, match="not a file name inside the checkpoint"):
        load_checkpoint(path)


def test_manifest_entries_must_be_regular_files(model: Transformer, tmp_path: Path) -> None:
    path = _save(tmp_path / "ckpt", model)
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    (path / "link").symlink_to(secret)
    _list_in_manifest(path, "link", _sha256(secret))
    with pytest.raises(CheckpointError, match="link is not a regular file"):
        load_checkpoint(path)
    _list_in_manifest(path, "link")
    # A FIFO (like /dev/zero, a device) would block the hash forever; a writer unblocks the unfixed read.
    fifo = path / "pipe"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.open("wb").close(), daemon=True)
    writer.start()
    _list_in_manifest(path, "pipe", "0" * 64)
    try:
        with pytest.raises(CheckpointError, match="pipe is not a regular file"):
            load_checkpoint(path)
    finally:
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))  # lets the writer's open return
        writer.join(timeout=10)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_every_file_loaded_must_be_listed_and_verified(model: Transformer, tmp_path: Path, name: str) -> None:
    path = _save(tmp_path / "ckpt", model)
    _list_in_manifest(path, name)  # then the file could be swapped unnoticed
    with pytest.raises(CheckpointError, match=f"does not list {name}"):
        load_checkpoint(path)


class _Payload:
    """Unpickling this runs os.mkdir: what a malicious training_state.pt would do with weights_only=False."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.mkdir, (self.marker,)


def test_a_pickle_payload_in_the_training_state_is_refused_in_one_line(model: Transformer, tmp_path: Path) -> None:
    path = _save(tmp_path / "ckpt", model, training_state={"step": 1})
    marker = tmp_path / "pwned"
    torch.save({"step": _Payload(marker)}, path / "training_state.pt")
    _list_in_manifest(path, "training_state.pt", _sha256(path / "training_state.pt"))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "refuses to unpickle" in message and "training_state.pt" in message
    assert "weights_only" not in message and "\n" not in message  # never torch's advice to unpickle anything
    assert not marker.exists()
    assert load_checkpoint(path, with_state=False).training_state is None  # the weights still load
