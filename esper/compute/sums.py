"""A pass's measurements as sums left on the device until the epoch's passes are all done.

Under data parallelism (runtime §5.3) the epoch's training and validation sums are then reduced
across ranks in one all-reduce, at one fixed point after validation; in one process the same step
is the epoch's single device-to-host copy.
"""

from typing import Any, Callable, Protocol

import attrs
import torch


class Summing(Protocol):
    world: int

    def sum(self, packed: torch.Tensor) -> torch.Tensor: ...


@attrs.frozen
class Pending:
    sums: torch.Tensor  # float64, one dimension
    finish: Callable[[list[float], int], Any]  # (this pass's reduced sums, world size) -> its result


def settle(passes: list[Pending], collective: Summing | None) -> list[Any]:
    """Every pass's result, from one reduction of all their sums."""
    flat = torch.cat([p.sums for p in passes])
    world = 1
    if collective is not None:
        flat, world = collective.sum(flat), collective.world
    values = flat.tolist()
    results, at = [], 0
    for p in passes:
        results.append(p.finish(values[at:at + p.sums.numel()], world))
        at += p.sums.numel()
    return results


def synchronize(device: torch.device) -> None:
    """Wait for the device, so a pass's measured seconds include its queued kernels."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
