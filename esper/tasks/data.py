"""Loading a task's data into memory, validated up front."""

from pathlib import Path

import attrs
import torch

from esper.tasks import cifar, digits, synthetic, text
from esper.tasks.errors import DataError
from esper.tasks.spec import TaskSpec, get_task
from esper.tasks.split import Split


# eq=False: equality over tensors is element-wise, not a bool.
@attrs.frozen(eq=False)
class TaskData:
    spec: TaskSpec
    train: Split
    val: Split
    test: Split
    # sha256 (hex) of the data as read; None for generated data.
    data_digest: str | None
    # Window length for text (tokens per sequence); None for CNN tasks.
    context: int | None = None

    def split(self, name: str) -> Split:
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r} (choose from train, val, test)")
        return getattr(self, name)

    def to(self, device: torch.device | str) -> "TaskData":
        """The same data on ``device``, so batches are cut there without per-batch copies."""
        return attrs.evolve(self, train=self.train.to(device), val=self.val.to(device), test=self.test.to(device))


def load_task(name: str, data_path: str | Path | None = None, context: int | None = None) -> TaskData:
    """Read and validate a task's data; every problem is a one-line DataError."""
    spec = get_task(name)
    if spec.dataset in ("digits", "synthetic") and data_path is not None:
        raise DataError(f"task '{name}' has built-in data and takes no data path (omit --data)")
    if spec.topology != "transformer" and context is not None:
        raise DataError(f"task '{name}' is not a text task and takes no context length")

    if spec.dataset == "digits":
        splits, digest = digits.load()
    elif spec.dataset == "synthetic":
        splits, digest = synthetic.load()
    elif spec.dataset == "cifar10":
        splits, digest = cifar.load(data_path)
    else:
        context = spec.context if context is None else context
        splits, digest = text.load(data_path, context)
    return TaskData(spec, *splits, data_digest=digest, context=context)
