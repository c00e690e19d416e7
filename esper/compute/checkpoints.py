"""Run checkpoints (runtime §6.2–6.3): written to a temporary directory, fsynced, renamed into place.

Tensors and primitives only, so they load with `weights_only=True`; lifecycle state never enters a
checkpoint, because it is folded from the log.
"""

import hashlib
import io
import os
import shutil
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (disk full, I/O error): the run stops, exit code 3."""

    def __init__(self, path: Path, cause: OSError):
        super().__init__(cause.errno, cause.strerror)
        self.path = path

    def __str__(self) -> str:
        return f"writing checkpoint {self.path} failed: {self.strerror}"


def write_checkpoint(run_dir: Path, step: int, state: dict[str, Any]) -> tuple[str, str, int]:
    """Returns (path relative to the run directory, sha256, size in bytes)."""
    root = run_dir / "checkpoints"
    final = root / f"step-{step:06d}"
    temporary = root / f".step-{step:06d}.tmp"
    # Serialised in memory: torch.save reports a failed write (ENOSPC) to a file as a RuntimeError
    # about its zip writer's position; os.write raises the OSError it is.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getbuffer()
    try:
        root.mkdir(exist_ok=True)
        if temporary.exists():
            shutil.rmtree(temporary)
        temporary.mkdir()
        fd = os.open(temporary / STATE_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = data
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(temporary)
        if final.exists():
            shutil.rmtree(final)
        os.rename(temporary, final)
        _fsync_dir(root)
    except OSError as exc:
        shutil.rmtree(temporary, ignore_errors=True)  # give back what a full disk let us write
        raise CheckpointWriteError(final, exc) from exc
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return str((final / STATE_FILE).relative_to(run_dir)), hashlib.sha256(data).hexdigest(), len(data)


def read_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def prune(run_dir: Path, keep: int) -> None:
    """Only after the step that wrote the newest checkpoint is committed: never lose the last good one."""
    root = run_dir / "checkpoints"
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old)
