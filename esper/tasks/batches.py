"""Batches for training and evaluation.

All randomness comes from the generator passed in (the env's data stream), never from
torch's global generator. Random numbers are drawn on the generator's device; data is cut
where it lives (see ``TaskData.to``) and batches are moved to ``device``.
"""

from collections.abc import Iterator
from typing import Literal

import torch

from esper.tasks import cifar
from esper.tasks.data import TaskData
from esper.tasks.split import Split

Batch = tuple[torch.Tensor, torch.Tensor]


def train_batches(data: TaskData, generator: torch.Generator, device: torch.device | str) -> Iterator[Batch]:
    """One epoch of training batches.

    CNN tasks: every training sample once, in a fresh permutation; a final batch of a single
    sample is dropped (BatchNorm cannot train on it); CIFAR is augmented. Text:
    ``steps_per_epoch`` batches of windows at uniformly random offsets.
    """
    if data.spec.topology == "transformer":
        return _text_train(data, generator, device)
    return _cnn_train(data, generator, device)


def eval_batches(data: TaskData, split: Literal["val", "test"], device: torch.device | str) -> Iterator[Batch]:
    """Every sample (text: every predicted token) of ``split`` exactly once, in order, tail included."""
    if split not in ("val", "test"):
        raise ValueError(f"eval_batches takes split 'val' or 'test', got {split!r}")
    if data.spec.topology == "transformer":
        return _text_eval(data.split(split), data.context, data.spec.batch_size, device)
    return _cnn_eval(data, data.split(split), device)


def _cnn_train(data: TaskData, generator: torch.Generator, device) -> Iterator[Batch]:
    split, size = data.train, data.spec.batch_size
    order = torch.randperm(len(split), generator=generator, device=generator.device).to(split.inputs.device)
    for start in range(0, len(split), size):
        index = order[start : start + size]
        if len(index) == 1:
            return
        inputs = _prepare(data, split.inputs[index].to(device))
        if data.spec.augment:
            inputs = cifar.augment(inputs, generator)
        yield inputs, split.labels[index].to(device)


def _cnn_eval(data: TaskData, split: Split, device) -> Iterator[Batch]:
    size = data.spec.batch_size
    for start in range(0, len(split), size):
        stop = start + size
        yield _prepare(data, split.inputs[start:stop].to(device)), split.labels[start:stop].to(device)


def _prepare(data: TaskData, inputs: torch.Tensor) -> torch.Tensor:
    # CIFAR is held as uint8 to keep it small and is normalised per batch; other images are ready.
    return cifar.normalise(inputs) if data.spec.dataset == "cifar10" else inputs


def _text_train(data: TaskData, generator: torch.Generator, device) -> Iterator[Batch]:
    stream, context = data.train.inputs, data.context
    span = torch.arange(context + 1, device=stream.device)
    for _ in range(data.spec.steps_per_epoch):
        # Offsets 0 … len − context − 1, so every window has its context + 1 bytes.
        starts = torch.randint(
            0, len(stream) - context, (data.spec.batch_size,), generator=generator, device=generator.device
        )
        windows = stream[starts.to(stream.device)[:, None] + span].to(device=device, dtype=torch.int64)
        yield windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def _text_eval(split: Split, context: int, size: int, device) -> Iterator[Batch]:
    stream = split.inputs
    predicted = len(stream) - 1  # every byte but the first is a target once
    full = predicted // context
    inputs = stream[: full * context].view(full, context)
    targets = stream[1 : full * context + 1].view(full, context)
    for start in range(0, full, size):
        yield _tokens(inputs[start : start + size], device), _tokens(targets[start : start + size], device)
    tail = full * context
    if tail < predicted:
        # The shorter final window goes alone: windows in one batch share a length.
        yield _tokens(stream[tail:predicted][None], device), _tokens(stream[tail + 1 :][None], device)


def _tokens(stream: torch.Tensor, device) -> torch.Tensor:
    return stream.to(device=device, dtype=torch.int64)
