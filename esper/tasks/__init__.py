"""Tasks: specifications, data loading and batching (runtime §2)."""

from esper.tasks.batches import eval_batches, train_batches
from esper.tasks.data import TaskData, load_task
from esper.tasks.errors import DataError
from esper.tasks.spec import TASKS, OptimizerSpec, TaskSpec, get_task
from esper.tasks.split import Split

__all__ = [
    "TASKS",
    "DataError",
    "OptimizerSpec",
    "Split",
    "TaskData",
    "TaskSpec",
    "eval_batches",
    "get_task",
    "load_task",
    "train_batches",
]
