"""CIFAR-10 from its python-pickle batches: loading, validation, normalisation, augmentation."""

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from esper.tasks import safe_pickle
from esper.tasks.errors import DataError
from esper.tasks.split import Split

_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_FILE = "test_batch"
_CHILD = "cifar-10-batches-py"
_HINT = "pass --data with the python-pickle batches directory"
_ROWS, _PIXELS, _CLASSES = 10_000, 3 * 32 * 32, 10
_VAL = 5_000  # the last 5,000 images of data_batch_5

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
PAD = 4


def load(data_path: str | Path | None) -> tuple[tuple[Split, Split, Split], str]:
    if data_path is None:
        raise DataError(f"CIFAR-10 data not given: the task needs a directory ({_HINT})")
    directory = _batches_dir(Path(data_path))
    paths = [directory / name for name in (*_TRAIN_FILES, _TEST_FILE)]
    for path in paths:  # every file's presence before any parsing, which is slow
        if not path.is_file():
            raise DataError(f"CIFAR-10 data not found: '{directory}' has no {path.name} ({_HINT})")
    digest = hashlib.sha256()
    batches = []
    for path in paths:
        try:
            raw = path.read_bytes()
        except OSError as error:
            raise DataError(f"cannot read '{path}': {error.strerror} ({_HINT})") from None
        digest.update(raw)
        batches.append(_parse(path, raw))

    images = np.concatenate([data for data, _ in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([labels for _, labels in batches])
    train_end, val_end = 5 * _ROWS - _VAL, 5 * _ROWS
    # Views of one uint8 buffer (about 184 MB), so the images are held once.
    splits = tuple(
        Split(torch.from_numpy(images[a:b]), torch.from_numpy(labels[a:b]))
        for a, b in ((0, train_end), (train_end, val_end), (val_end, 6 * _ROWS))
    )
    return splits, digest.hexdigest()


def _batches_dir(path: Path) -> Path:
    if not path.exists():
        raise DataError(f"CIFAR-10 data not found: '{path}' does not exist ({_HINT})")
    if not path.is_dir():
        raise DataError(f"CIFAR-10 data not found: '{path}' is not a directory ({_HINT})")
    first = _TRAIN_FILES[0]
    for candidate in (path, path / _CHILD):
        if (candidate / first).exists():
            return candidate
    raise DataError(f"CIFAR-10 data not found: '{path}' has no {first} ({_HINT})")


def _parse(path: Path, raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The batch's data (10,000 × 3,072 uint8) and labels (int64), or a DataError naming the defect."""

    def defect(what: str) -> DataError:
        return DataError(f"'{path}' is not a CIFAR-10 batch: {what}")

    try:
        batch = safe_pickle.loads(raw)
    except safe_pickle.ForbiddenGlobal as error:
        raise defect(str(error)) from None
    except Exception as error:  # any failure to parse untrusted bytes is a format defect, not a bug
        raise defect(f"unreadable pickle ({type(error).__name__}: {error})") from None

    if not isinstance(batch, dict):
        raise defect(f"it holds a {type(batch).__name__}, not a dict")
    data, labels = (_entry(batch, key, defect) for key in ("data", "labels"))

    if not isinstance(data, np.ndarray):
        raise defect(f"'data' is a {type(data).__name__}, not an array")
    if data.dtype != np.uint8:
        raise defect(f"'data' has dtype {data.dtype}, not uint8")
    if data.shape != (_ROWS, _PIXELS):
        raise defect(f"'data' has shape {data.shape}")

    try:
        labels = np.asarray(labels)
    except ValueError:
        raise defect("'labels' is not a list of integers") from None
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise defect("'labels' is not a list of integers")
    if labels.shape[0] != _ROWS:
        raise defect(f"'labels' has {labels.shape[0]} entries, not {_ROWS}")
    outside = labels[(labels < 0) | (labels >= _CLASSES)]
    if outside.size:
        raise defect(f"'labels' holds {outside[0]}, outside 0-{_CLASSES - 1}")
    return data, labels.astype(np.int64)


def _entry(batch: dict, key: str, defect):
    # The real files are Python 2 pickles read with encoding="bytes", so their keys are bytes.
    for candidate in (key.encode(), key):
        if candidate in batch:
            return batch[candidate]
    raise defect(f"it has no '{key}'")


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, 32, 32) → float32, standardised per channel."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per sample: a random 32×32 crop of the 4-pixel zero-padded image, then a flip with p = 0.5.

    ``images`` are already normalised, so the padding is zero in normalised space. Random
    numbers are drawn on the generator's device and moved to the images' device.
    """
    n, _, height, width = images.shape
    offsets = torch.randint(0, 2 * PAD + 1, (n, 2), generator=generator, device=generator.device)
    flips = torch.rand(n, generator=generator, device=generator.device) < 0.5
    offsets, flips = offsets.to(images.device), flips.to(images.device)

    padded = F.pad(images, (PAD, PAD, PAD, PAD)).permute(0, 2, 3, 1)  # (N, H, W, C) for gathering
    rows = offsets[:, :1] + torch.arange(height, device=images.device)
    cols = offsets[:, 1:] + torch.arange(width, device=images.device)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    sample = torch.arange(n, device=images.device)[:, None, None]
    cropped = padded[sample, rows[:, :, None], cols[:, None, :]]
    # Back to NCHW-contiguous: channels_last inputs crash GroupNorm's backward on CPU (runtime §3.3).
    return cropped.permute(0, 3, 1, 2).contiguous()
