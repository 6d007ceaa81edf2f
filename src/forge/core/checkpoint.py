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
import stat
import uuid
from collections.abc import Callable, Iterator
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
    "check_replaceable",
    "fsync_file",
    "load_checkpoint",
    "read_manifest",
    "read_training_state",
    "recover_swap",
    "save_checkpoint",
    "write_durably",
    "write_error",
]

FORMAT = "forge-checkpoint"
VERSION = 1
MANIFEST = "forge.json"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
STATE = "training_state.pt"
#: The files every checkpoint's manifest must list: nothing is loaded unverified.
REQUIRED = (CONFIG, WEIGHTS)
MAX_MANIFEST_BYTES = 1 << 20


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


def check_replaceable(
    target: Path, *, marker: str = MANIFEST, owned: Callable[[Path], bool] | None = None, what: str = "checkpoint"
) -> None:
    """Refuse to replace ``target`` unless it is absent, an empty folder, or one Forge wrote.

    A folder is Forge's if ``owned(target)`` is true (default: it holds
    ``marker``). Anything else may be the user's own data, which a swap would
    delete, so it is never replaced.
    """
    if not target.exists() and not target.is_symlink():
        return
    if not target.is_dir() or target.is_symlink():
        kind = "a symbolic link" if target.is_symlink() else "a file"
        raise CheckpointError(
            f"cannot write the {what} to {str(target)!r}: it is {kind}, not a folder; choose a new or empty folder"
        )
    is_ours = owned(target) if owned is not None else (target / marker).is_file()
    if is_ours or not any(target.iterdir()):
        return
    why = f" (no {marker})" if owned is None else ""
    raise CheckpointError(
        f"refusing to replace {str(target)!r}: it is a non-empty folder that Forge did not write{why}, "
        f"and writing the {what} there would delete its contents; choose a new or empty folder"
    )


def write_error(target: Path, what: str, error: OSError) -> CheckpointError:
    """The one-line error for a write to ``target`` that failed midway (a full disk, a size limit, permissions)."""
    # A short write without an errno (numpy's tofile says "N requested and M written") is a full disk too.
    reason = error.strerror or f"the write stopped short ({error or type(error).__name__}); is the disk full?"
    return CheckpointError(
        f"could not write the {what} to {str(target)!r}: {reason}; free some disk space or check permissions, "
        "or choose another path (what was there before is unchanged)"
    )


@contextlib.contextmanager
def atomic_directory(
    target: Path,
    *,
    marker: str = MANIFEST,
    owned: Callable[[Path], bool] | None = None,
    what: str = "checkpoint",
) -> Iterator[Path]:
    """Yield a hidden sibling directory to fill; on success it replaces ``target`` in two renames.

    The old directory is moved aside, the new one renamed into place, and the
    old one deleted; the parent is fsynced. A crash leaves the old directory or
    the new one, and :func:`recover_swap` (run here first, and by readers)
    finishes a swap interrupted between the renames. ``marker`` is the file
    that makes a directory complete (written last by the caller). A ``target``
    Forge did not write is never replaced (:func:`check_replaceable`), and a
    failed write (a full disk) raises a :class:`CheckpointError` with
    ``target`` left as it was and no temporary directory behind.
    """
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(target, what, e) from None
    recover_swap(target, marker)
    check_replaceable(target, marker=marker, owned=owned, what=what)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a crash mid-write
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    old = None
    try:
        tmp.mkdir()
        yield tmp
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
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not target.exists():
            os.replace(old, target)  # the new one never arrived: put the old one back now
        raise write_error(target, what, e) from None
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
    manifest_file = root / MANIFEST
    if not manifest_file.exists() and not manifest_file.is_symlink():
        raise CheckpointError(
            f"{str(root)!r} is not a Forge checkpoint (no {MANIFEST}); pass a directory written by `forge train`"
        )
    _check_regular(root, MANIFEST)
    if manifest_file.stat().st_size > MAX_MANIFEST_BYTES:
        raise CheckpointError(f"checkpoint {str(root)!r} is corrupted: {MANIFEST} is too large for a manifest")
    try:
        manifest = json.loads(manifest_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint {str(root)!r} is corrupted: {MANIFEST} is not valid JSON") from None
    except OSError as e:
        raise CheckpointError(f"checkpoint {str(root)!r} could not be read ({e.strerror or e}); re-save it") from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or not isinstance(manifest.get("files"), dict)
    ):
        raise CheckpointError(f"checkpoint {str(root)!r} is corrupted: {MANIFEST} is not a Forge manifest")
    for name in manifest["files"]:
        _check_entry(root, name)
    if verify:
        for name, digest in manifest["files"].items():
            if _sha256(root / name) != digest:
                raise CheckpointError(
                    f"checkpoint {str(root)!r} is corrupted: {name} does not match its recorded sha256; "
                    "re-save it or use an earlier checkpoint"
                )
    return manifest


def _check_entry(root: Path, name: object) -> None:
    """A manifest entry must be a plain file name, of a regular file inside the checkpoint."""
    # A name with a separator or ``..``, or an absolute one, would read outside the folder (../../etc/...).
    if not isinstance(name, str) or name in ("", ".", "..", MANIFEST) or any(c in name for c in "/\\\0"):
        raise CheckpointError(
            f"checkpoint {str(root)!r} is corrupted: its manifest lists {name!r}, which is not a file name inside "
            "the checkpoint; re-save it or use an earlier checkpoint"
        )
    _check_regular(root, name)


def _check_regular(root: Path, name: str) -> None:
    # lstat: a symlink, FIFO or device (/dev/zero would hang the hash) is never followed or read.
    try:
        mode = (root / name).lstat().st_mode
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {str(root)!r} is incomplete: {name} is missing; re-save it") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(
            f"checkpoint {str(root)!r} is corrupted: {name} is not a regular file (a link, folder, FIFO or device); "
            "re-save it or use an earlier checkpoint"
        )


def load_checkpoint(
    path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu", with_state: bool = True
) -> Checkpoint:
    """Load and verify a checkpoint directory written by :func:`save_checkpoint`."""
    root = Path(path)
    manifest = read_manifest(root)
    names = set(manifest["files"])
    for name in REQUIRED:
        if name not in names:
            raise CheckpointError(
                f"checkpoint {str(root)!r} is corrupted: its manifest does not list {name}, so it can't be verified; "
                "re-save it or use an earlier checkpoint"
            )
    try:
        config = json.loads((root / CONFIG).read_text())
        state_dict = load_file(str(root / WEIGHTS), device=str(map_location))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, SafetensorError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {str(root)!r} could not be read ({e}); re-save it") from None
    training_state = _load_state(root, map_location) if with_state and STATE in names else None
    files = {n: (root / n).read_bytes() for n in names if n not in {CONFIG, WEIGHTS, STATE, MANIFEST}}
    return Checkpoint(
        path=root,
        config=config,
        state_dict=state_dict,
        files=files,
        training_state=training_state,
        meta=manifest.get("meta", {}),
    )


def read_training_state(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """A checkpoint's training state alone (None if it has none), without loading its weights."""
    root = Path(path)
    return _load_state(root, "cpu") if (root / STATE).is_file() else None


def _load_state(root: Path, map_location: str | torch.device) -> dict[str, Any]:
    try:
        state = torch.load(root / STATE, map_location=map_location, weights_only=True)
    # Any failure of the restricted unpickler means the file is not what Forge wrote: a pickle payload
    # (UnpicklingError, whose text advises weights_only=False, advice never to pass on), or damage.
    except Exception:
        raise CheckpointError(
            f"checkpoint {str(root)!r} has a {STATE} Forge will not load: it is damaged or holds Python objects "
            "other than tensors and numbers, which Forge refuses to unpickle; use an earlier checkpoint, or start "
            f"from its weights alone with `forge train --model {root}`"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {str(root)!r} is corrupted: {STATE} is not a training state; re-save it")
    return state
