"""Run checkpoints (runtime §6.2–6.3): written to a temporary directory, fsynced, renamed into place.

Tensors and primitives only, so they load with `weights_only=True`; lifecycle state never enters a
checkpoint, because it is folded from the log.
"""

import hashlib
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


def write_checkpoint(run_dir: Path, step: int, state: dict[str, Any]) -> tuple[str, str, int]:
    """Returns (path relative to the run directory, sha256, size in bytes)."""
    root = run_dir / "checkpoints"
    root.mkdir(exist_ok=True)
    final = root / f"step-{step:06d}"
    temporary = root / f".step-{step:06d}.tmp"
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir()
    target = temporary / STATE_FILE
    with open(target, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(temporary)
    if final.exists():
        shutil.rmtree(final)
    os.rename(temporary, final)
    _fsync_dir(root)
    data = (final / STATE_FILE).read_bytes()
    return str((final / STATE_FILE).relative_to(run_dir)), hashlib.sha256(data).hexdigest(), len(data)


def read_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def prune(run_dir: Path, keep: int) -> None:
    """Only after the step that wrote the newest checkpoint is committed: never lose the last good one."""
    root = run_dir / "checkpoints"
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old)
