"""The `ddp` backend (runtime §5.3): one env, data-parallel over W processes started by torchrun.

Rank 0 runs the engine against a `Leader`: the torch backend, plus a record of every call that
changes the model. A call that runs passes (an epoch, validation after a rollback, the test) first
broadcasts that record and itself, so an epoch opens with one broadcast; the other ranks `follow`: they apply the same changes in the same order, then join the same
pass. They decide nothing, write nothing and evaluate no gate, so no decision waits on a collective.
"""

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from esper.compute.backend import EpochPlan, Evaluation, HostSummary, SeedBuild, TrainStats, ValStats
from esper.compute.data_parallel import DataParallel, peer_failures
from esper.compute.errors import SetupError
from esper.compute.settings import DistSettings, TrainSettings
from esper.compute.torch_backend import TorchBackend
from esper.lifecycle.config import LifecycleConfig
from esper.tasks import TaskData

LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
STOP = "stop"


def launcher_rank() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment."""
    missing = [name for name in LAUNCHER_VARIABLES if name not in os.environ]
    if missing:
        raise SetupError(f"--backend ddp runs under torchrun, and {', '.join(missing)} is not set (launch with "
                         "torchrun --nproc-per-node N -m esper run --backend ddp ..., or use esper run --nproc N)")
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except ValueError:
        raise SetupError(f"torchrun's RANK and WORLD_SIZE must be integers, got {os.environ['RANK']!r} and "
                         f"{os.environ['WORLD_SIZE']!r}") from None
    return rank, world


def check_batch(batch_size: int, world: int) -> None:
    if batch_size % world:
        raise SetupError(f"the batch of {batch_size} does not split over {world} processes (each rank takes "
                         f"batch / processes; choose a process count that divides {batch_size})")


def start(task: TaskData, train: TrainSettings, lifecycle: LifecycleConfig, slots: tuple[str, ...],
          device: torch.device, settings: DistSettings) -> "Leader | Follower":
    """Join the process group (gloo on CPU, nccl on CUDA, device cuda:LOCAL_RANK) and build this
    rank's replica."""
    rank, world = launcher_rank()
    check_batch(task.spec.batch_size, world)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    with peer_failures(rank):
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=settings.timeout_s))
    inner = TorchBackend(task, train, lifecycle, slots, device, DataParallel(rank, world, settings.verify_every))
    return Leader(inner) if rank == 0 else Follower(inner)


class _Rank:
    """What both sides share: the replica, and the one broadcast that opens every pass."""

    def __init__(self, inner: TorchBackend):
        self.inner = inner
        self.rank = inner.parallel.rank
        self.world_size = inner.parallel.world
        self.device = inner.device
        self.open = True

    def _broadcast(self, message: Any) -> Any:
        box = [message]
        with peer_failures(self.rank):
            dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def _close(self) -> None:
        if self.open:
            self.open = False
            self.inner.parallel.release()
            dist.destroy_process_group()


class Leader(_Rank):
    """Rank 0's backend, driven by the engine like any other."""

    def __init__(self, inner: TorchBackend):
        super().__init__(inner)
        self.changes: list[tuple[str, tuple]] = []
        self.passing = False  # inside a pass the other ranks wait in its collectives, not for a message

    @property
    def seeds(self) -> dict[str, tuple[str, str]]:
        return self.inner.seeds

    @property
    def episode_seed(self) -> int:
        return self.inner.episode_seed

    def _change(self, name: str, *args: Any) -> Any:
        self.changes.append((name, args))
        return getattr(self.inner, name)(*args)

    def _pass(self, name: str, *args: Any) -> Any:
        changes, self.changes = self.changes, []
        self._broadcast((changes, (name, args)))
        self.passing = True
        with peer_failures(self.rank):
            result = getattr(self.inner, name)(*args)
        self.passing = False
        return result

    def build(self, episode_seed: int, max_epochs: int) -> HostSummary:
        return self._change("build", episode_seed, max_epochs)

    def germinate(self, slot: str, blueprint: str, blend_kind: str, init_seed: int) -> SeedBuild:
        return self._change("germinate", slot, blueprint, blend_kind, init_seed)

    def drop(self, slot: str) -> None:
        self._change("drop", slot)

    def set_slot(self, slot: str, mode: str, alpha: float, isolated: bool, fossil: bool) -> None:
        self._change("set_slot", slot, mode, alpha, isolated, fossil)

    def restore(self, handle: Any) -> None:
        self._change("restore", handle)  # rank 0's snapshot travels with the change

    def reset_optimizer_state(self) -> None:
        self._change("reset_optimizer_state")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._change("load_state_dict", state)

    def extend(self, max_epochs: int) -> None:
        self._change("extend", max_epochs)

    def run_epoch(self, plan: EpochPlan) -> tuple[TrainStats, ValStats]:
        return self._pass("run_epoch", plan)

    def validate(self, ablate: tuple[str, ...], shadow: tuple[str, ...], all_off: bool) -> ValStats:
        return self._pass("validate", ablate, shadow, all_off)

    def test(self) -> Evaluation:
        return self._pass("test")

    def snapshot(self, epoch: int) -> Any:
        return self.inner.snapshot(epoch)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def param_counts(self) -> tuple[int, int]:
        return self.inner.param_counts()

    def close(self) -> None:
        """Release the other ranks; after a failure inside a pass they are in its collectives, and
        only the launcher stopping them or the timeout ends them."""
        try:
            if self.open and not self.passing:
                self._broadcast(([], (STOP, ())))
        finally:
            self._close()


class Follower(_Rank):
    """Ranks 1…W−1: apply rank 0's changes and join its passes until it stops."""

    def follow(self) -> None:
        try:
            while True:
                changes, (name, args) = self._broadcast(None)
                for change, change_args in changes:
                    getattr(self.inner, change)(*change_args)
                if name == STOP:
                    return
                with peer_failures(self.rank):
                    getattr(self.inner, name)(*args)
        finally:
            self._close()
