"""Byte-level text: a local file, or by default the Python standard library's own source."""

import hashlib
import os
import sysconfig
from pathlib import Path

import numpy as np
import torch

from esper.tasks.errors import DataError
from esper.tasks.split import Split

_HELD_OUT_CAP = 128 * 1024  # bytes per validation and test split
_HINT = "pass --data with a text file, or omit --data to use the Python standard library's source"


def load(data_path: str | Path | None, context: int) -> tuple[tuple[Split, Split, Split], str]:
    if context < 1:
        raise DataError(f"text context must be at least 1 byte, got {context}")
    if data_path is None:
        corpus, source = stdlib_corpus()
    else:
        corpus, source = _read_file(Path(data_path)), f"'{data_path}'"

    n = len(corpus)
    train_end, val_end = n * 9 // 10, n * 19 // 20
    parts = {
        "training": corpus[:train_end],
        "validation": corpus[train_end:val_end][:_HELD_OUT_CAP],
        "test": corpus[val_end:][:_HELD_OUT_CAP],
    }
    # Runtime §2: room for ten windows of context + 1 bytes in every split.
    need = 10 * (context + 1)
    for name, part in parts.items():
        if len(part) < need:
            raise DataError(
                f"text data too small: {source} ({n} bytes) gives a {name} split of {len(part)} bytes,"
                f" and each split needs at least {need} (10 windows of context {context} + 1)"
                f" (pass a larger text file)"
            )
    splits = tuple(Split(torch.from_numpy(np.frombuffer(part, dtype=np.uint8).copy())) for part in parts.values())
    return splits, hashlib.sha256(corpus).hexdigest()


def _read_file(path: Path) -> bytes:
    if not path.exists():
        raise DataError(f"text data not found: '{path}' does not exist ({_HINT})")
    if not path.is_file():
        raise DataError(f"text data not found: '{path}' is not a file ({_HINT})")
    try:
        return path.read_bytes()
    except OSError as error:
        raise DataError(f"cannot read text data '{path}': {error.strerror} ({_HINT})") from None


def stdlib_corpus() -> tuple[bytes, str]:
    """Every ``*.py`` under the stdlib directory outside site-packages, in sorted relative-path order.

    Returns the concatenated bytes and a description of the source for messages.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for directory, subdirectories, names in os.walk(root):
        # Installed third-party packages are not the standard library (and differ per machine).
        subdirectories[:] = [d for d in subdirectories if d != "site-packages"]
        files.extend(Path(directory, name) for name in names if name.endswith(".py"))
    files.sort(key=lambda path: path.relative_to(root).as_posix())
    source = f"the Python standard library's source under '{root}'"
    try:
        return b"".join(path.read_bytes() for path in files), source
    except OSError as error:
        raise DataError(f"cannot read {source}: '{error.filename}': {error.strerror} ({_HINT})") from None
