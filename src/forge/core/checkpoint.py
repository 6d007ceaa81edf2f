"""Checkpoint directories, written atomically.

A checkpoint is one directory::

    model.safetensors     weights (tied tensors stored once)
    config.json           the ModelConfig
    tokenizer.json        the tokenizer (HF tokenizers format)
    training_state.pt     optimizer, step, RNG states (optional)
    forge.json            the manifest: format version and a sha256 per file

Everything is written into a hidden sibling directory first and fsynced; the
manifest is written last, and the directory is then renamed into place. If a
previous checkpoint exists it is moved aside, the new one renamed in, and the
old one removed. A crash at any point leaves either the old checkpoint, the new
one, or a recoverable ``.old`` sibling that :func:`load_checkpoint` restores;
never a half-written directory that loads.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model

from forge.errors import CheckpointError

__all__ = [
    "Checkpoint",
    "atomic_directory",
    "fsync_file",
    "load_checkpoint",
    "read_manifest",
    "recover_swap",
    "save_checkpoint",
    "write_durably",
]

FORMAT = "forge-checkpoint"
VERSION = 1
MANIFEST = "forge.json"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
STATE = "training_state.pt"


@dataclass
class Checkpoint:
    """What a checkpoint directory holds, loaded."""

    path: Path
    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    files: dict[str, bytes] = field(default_factory=dict)
    training_state: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_file(path: Path) -> None:
    """Flush a written file to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and flush it to disk before returning."""
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def recover_swap(path: Path, marker: str = MANIFEST) -> None:
    """Finish a directory swap a crash interrupted (see :func:`atomic_directory`).

    If the new directory never arrived, put the moved-aside one back (if it is
    complete: it has ``marker``); if it did, delete what the crash left aside.
    """
    aside = sorted(path.parent.glob(f".{path.name}.old-*"))
    if path.exists():
        if (path / marker).exists():
            for old in aside:
                shutil.rmtree(old, ignore_errors=True)
        return
    for old in aside:
        if (old / marker).exists():
            os.replace(old, path)
            return


@contextlib.contextmanager
def atomic_directory(target: Path, *, marker: str = MANIFEST) -> Iterator[Path]:
    """Yield a hidden sibling directory to fill; on success it replaces ``target`` in two renames.

    The old directory is moved aside, the new one renamed into place, and the
    old one deleted; the parent is fsynced. A crash leaves the old directory or
    the new one, and :func:`recover_swap` (run here first, and by readers)
    finishes a swap interrupted between the renames. ``marker`` is the file
    that makes a directory complete (written last by the caller).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_swap(target, marker)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
        os.replace(tmp, target)
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: torch.nn.Module,
    config: dict[str, Any],
    files: dict[str, bytes] | None = None,
    training_state: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory at ``path`` atomically; returns the path."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"cannot save a checkpoint to {str(target)!r}: it is a file; choose a directory path")
    with atomic_directory(target, marker=MANIFEST) as tmp:
        # safetensors' save_model stores tied weights once and records which to restore.
        save_model(model, str(tmp / WEIGHTS))
        fsync_file(tmp / WEIGHTS)
        write_durably(tmp / CONFIG, json.dumps(config, indent=2).encode())
        for name, data in (files or {}).items():
            write_durably(tmp / name, data)
        if training_state is not None:
            with (tmp / STATE).open("wb") as f:
                torch.save(training_state, f)
                f.flush()
                os.fsync(f.fileno())
        hashes = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
        manifest = {"format": FORMAT, "version": VERSION, "files": hashes, "meta": meta or {}}
        write_durably(tmp / MANIFEST, json.dumps(manifest, indent=2).encode())  # last: it marks the checkpoint complete
    return target


def read_manifest(path: str | os.PathLike[str], *, verify: bool = True) -> dict[str, Any]:
    """The manifest of the checkpoint at ``path``, after checking every file's hash."""
    root = Path(path)
    recover_swap(root)
    if not root.exists():
        raise CheckpointError(f"checkpoint {str(root)!r} does not exist; pass the directory `forge train --out` wrote")
    if not root.is_dir():
        raise CheckpointError(f"checkpoint {str(root)!r} is a file; pass the checkpoint directory")
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{str(root)!r} is not a Forge checkpoint (no {MANIFEST}); pass a directory written by `forge train`"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint {str(root)!r} is corrupted: {MANIFEST} is not valid JSON") from None
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"checkpoint {str(root)!r} is corrupted: {MANIFEST} is not a Forge manifest")
    if verify:
        for name, digest in manifest["files"].items():
            file = root / name
            if not file.exists():
                raise CheckpointError(f"checkpoint {str(root)!r} is incomplete: {name} is missing; re-save it")
            if _sha256(file) != digest:
                raise CheckpointError(
                    f"checkpoint {str(root)!r} is corrupted: {name} does not match its recorded sha256; "
                    "re-save it or use an earlier checkpoint"
                )
    return manifest


def load_checkpoint(
    path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu", with_state: bool = True
) -> Checkpoint:
    """Load and verify a checkpoint directory written by :func:`save_checkpoint`."""
    root = Path(path)
    manifest = read_manifest(root)
    names = set(manifest["files"])
    try:
        config = json.loads((root / CONFIG).read_text())
        state_dict = load_file(str(root / WEIGHTS), device=str(map_location))
        training_state = None
        if with_state and STATE in names:
            training_state = torch.load(root / STATE, map_location=map_location, weights_only=True)
    except (OSError, json.JSONDecodeError, SafetensorError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {str(root)!r} could not be read ({e}); re-save it") from None
    files = {n: (root / n).read_bytes() for n in names if n not in {CONFIG, WEIGHTS, STATE, MANIFEST}}
    return Checkpoint(
        path=root,
        config=config,
        state_dict=state_dict,
        files=files,
        training_state=training_state,
        meta=manifest.get("meta", {}),
    )
