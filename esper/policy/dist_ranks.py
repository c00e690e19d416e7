"""The processes of `esper train-policy` under torchrun (policy §7.4): which envs a rank owns, and
the collectives that carry log batches, trajectories and weights between ranks.

`Solo` is one process owning every env; its collectives are identities, so the trainer has one code
path whatever the world size. `Group` is a gloo process group: every message is a pickled CPU
object (event batches, segments, a small policy's weights), which gloo carries on CUDA machines
too without staging it through a GPU. A collective that fails, or waits past `dist.timeout_s`,
raises `PeerLost` on that rank: a one-line error, exit code 3.
"""

import importlib
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from esper.compute.data_parallel import peer_failures
from esper.compute.distributed import launcher_rank
from esper.compute.errors import SetupError
from esper.compute.settings import DistSettings

DIST_MODES = ("auto", "off")


class Solo:
    rank, world = 0, 1

    def owns(self, env: int) -> bool:
        return True

    def device(self, device: torch.device) -> torch.device:
        return device

    def gather(self, item: Any) -> list[Any]:
        return [item]

    def broadcast(self, item: Any) -> Any:
        return item

    def any(self, flag: bool) -> bool:
        return flag

    def close(self) -> None:
        pass


class Group:
    """This rank of a process group that torchrun started; env i belongs to rank i mod W."""

    def __init__(self, rank: int, world: int, local_rank: int):
        self.rank, self.world, self.local_rank = rank, world, local_rank

    def owns(self, env: int) -> bool:
        return env % self.world == self.rank

    def device(self, device: torch.device) -> torch.device:
        """The rank's own GPU, cuda:LOCAL_RANK, when the run asks for CUDA."""
        if device.type != "cuda":
            return device
        device = torch.device("cuda", self.local_rank)
        torch.cuda.set_device(device)
        return device

    def gather(self, item: Any) -> list[Any] | None:
        """Every rank's item, in rank order, on rank 0; None elsewhere."""
        items = [None] * self.world if self.rank == 0 else None
        with peer_failures(self.rank):
            dist.gather_object(item, items, dst=0)
        return items

    def broadcast(self, item: Any) -> Any:
        """Rank 0's item, on every rank."""
        box = [item]
        with peer_failures(self.rank):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (an interrupt reaches ranks at different steps)."""
        value = torch.tensor([int(flag)])
        with peer_failures(self.rank):
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def launched_world() -> int:
    """How many processes torchrun started; 1 without torchrun."""
    return launcher_rank()[1] if "WORLD_SIZE" in os.environ else 1


def check_envs(envs: int, world: int) -> None:
    if envs < world:
        raise SetupError(f"--envs {envs} leaves a process without an env: env i runs on rank i mod {world}, so "
                         f"{world} processes need at least {world} envs (raise --envs or start fewer processes)")


def join(mode: str, envs: int, settings: DistSettings) -> Solo | Group:
    """One process, or this rank of the group torchrun started; every refusal comes before the group
    exists, so each rank reports it as one line and none waits for the others."""
    if launched_world() == 1:
        return Solo()
    rank, world = launcher_rank()
    if mode == "off":
        raise SetupError(f"--dist off refuses to train distributed, and torchrun started {world} processes (run "
                         "esper train-policy without torchrun, or drop --dist off)")
    check_envs(envs, world)
    # Importing torch._inductor (as torch.use_deterministic_algorithms does) while a group exists
    # leaves references to the group behind (torch 2.13): it would outlive destroy_process_group, and
    # its gloo threads abort the interpreter at exit. Imported first, it holds none.
    importlib.import_module("torch._inductor.config")
    with peer_failures(rank):
        dist.init_process_group("gloo", timeout=timedelta(seconds=settings.timeout_s))
    return Group(rank, world, int(os.environ["LOCAL_RANK"]))
