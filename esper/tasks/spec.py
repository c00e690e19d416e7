"""Static description of each task: data shape, host preset, batching and optimiser defaults."""

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Literal

import attrs

from esper.tasks.errors import DataError


@attrs.frozen
class OptimizerSpec:
    kind: Literal["sgd", "adamw"]
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] | None = None
    # AdamW on text decays weight matrices only; biases, norms and embeddings are exempt.
    decay_matrices_only: bool = False


@attrs.frozen
class TaskSpec:
    name: str
    dataset: Literal["digits", "cifar10", "text", "synthetic"]  # which loader reads the data
    topology: Literal["cnn", "transformer"]
    host_preset: str
    classes: int  # the vocabulary size (256 bytes) for text
    batch_size: int
    default_epochs: int
    score_kind: Literal["accuracy", "loss"]
    host_optimizer: OptimizerSpec
    seed_optimizer: OptimizerSpec
    lr_schedule: Literal["none", "cosine"] = "none"
    # Used only when lr_schedule is cosine; kept for every task so that switching the
    # schedule on by config gets the documented warm-up and floor.
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 0.0  # 0 = off
    steps_per_epoch: int | None = None  # None: one pass over the training split
    augment: bool = False
    context: int | None = None  # default window length for text; the host preset may override it

    @property
    def l_rand(self) -> float:
        """Loss of a uniform guess, in nats."""
        return math.log(self.classes)

    def score(self, *, loss, accuracy):
        """Score (runtime §1): accuracy in % for classifiers, 100·(1 − L/ln V) for text.

        ``accuracy`` is a fraction in [0, 1]. Works on floats and tensors alike.
        """
        if self.score_kind == "accuracy":
            return 100.0 * accuracy
        return 100.0 * (1.0 - loss / self.l_rand)


_CNN_HOST = OptimizerSpec("sgd", lr=0.01, momentum=0.9, weight_decay=5e-4)
_CNN_SEED = OptimizerSpec("sgd", lr=0.01, momentum=0.9, weight_decay=0.0)
_TEXT_HOST = OptimizerSpec("adamw", lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), decay_matrices_only=True)
_TEXT_SEED = OptimizerSpec("adamw", lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95))


def _cnn(name: str, dataset: str, classes: int, batch_size: int, epochs: int, augment: bool = False) -> TaskSpec:
    return TaskSpec(
        name=name,
        dataset=dataset,
        topology="cnn",
        host_preset=name,
        classes=classes,
        batch_size=batch_size,
        default_epochs=epochs,
        score_kind="accuracy",
        host_optimizer=_CNN_HOST,
        seed_optimizer=_CNN_SEED,
        augment=augment,
    )


# Read-only: the task table is never changed at run time.
TASKS: Mapping[str, TaskSpec] = MappingProxyType({
    "digits": _cnn("digits", "digits", classes=10, batch_size=64, epochs=30),
    "cifar10": _cnn("cifar10", "cifar10", classes=10, batch_size=128, epochs=25, augment=True),
    "cifar10_impaired": _cnn("cifar10_impaired", "cifar10", classes=10, batch_size=128, epochs=25, augment=True),
    "text": TaskSpec(
        name="text",
        dataset="text",
        topology="transformer",
        host_preset="tiny",
        classes=256,
        batch_size=32,
        default_epochs=20,
        score_kind="loss",
        host_optimizer=_TEXT_HOST,
        seed_optimizer=_TEXT_SEED,
        lr_schedule="cosine",
        grad_clip=1.0,
        steps_per_epoch=200,
        context=64,
    ),
    "synthetic": _cnn("synthetic", "synthetic", classes=4, batch_size=64, epochs=20),
})


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise DataError(f"unknown task '{name}' (choose from {', '.join(TASKS)})") from None
