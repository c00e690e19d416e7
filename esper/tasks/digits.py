"""scikit-learn's bundled 8×8 digits: stratified 1,257 / 270 / 270, split seed 0."""

import hashlib

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from esper.tasks.split import Split

_HELD_OUT = 540  # validation + test, halved below


def load() -> tuple[tuple[Split, Split, Split], str]:
    bunch = load_digits()
    # Fixed little-endian dtypes so the digest does not depend on the platform's int size.
    pixels = np.ascontiguousarray(bunch.data, dtype="<f8")
    targets = np.ascontiguousarray(bunch.target, dtype="<i8")
    digest = hashlib.sha256(pixels.tobytes() + targets.tobytes()).hexdigest()

    images = (pixels / 16.0).reshape(-1, 1, 8, 8)
    x_train, x_rest, y_train, y_rest = train_test_split(
        images, targets, test_size=_HELD_OUT, stratify=targets, random_state=0
    )
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, test_size=_HELD_OUT // 2, stratify=y_rest, random_state=0
    )
    # One scalar mean and std from the training split only, so no statistic leaks from held-out data.
    mean, std = x_train.mean(), x_train.std()

    def split(x: np.ndarray, y: np.ndarray) -> Split:
        standardised = ((x - mean) / std).astype(np.float32)
        return Split(torch.from_numpy(standardised), torch.from_numpy(y.astype(np.int64)))

    return (split(x_train, y_train), split(x_val, y_val), split(x_test, y_test)), digest
