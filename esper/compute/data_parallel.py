"""One rank's share of data-parallel training (runtime §5.3), used by the torch backend on every rank.

Per epoch the collectives are fixed, whatever the lifecycle state: the wrapper's gradient all-reduce
on each batch (plus one for incubation gradients while a seed incubates), one all-reduce averaging
the running statistics between training and validation, one all-reduce of the epoch's measurements
after validation, a wrapper rebuild when the trainable parameter set changed, and every
`dist.verify_every` epochs an all-gather of parameter checksums. (Rank 0's broadcast that opens the
epoch is in `distributed`.)
"""

import gc
import hashlib
import itertools
import re
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from esper.compute.errors import CompileError, PeerLost
from esper.compute.slot import GrowingModel

Batch = tuple[torch.Tensor, torch.Tensor]

# Gloo reports a lost or silent peer as a plain RuntimeError; these words tell it from a bug.
_PEER_FAILURE = re.compile(r"gloo|nccl|timed out|connection closed|process group", re.IGNORECASE)


@contextmanager
def peer_failures(rank: int) -> Iterator[None]:
    try:
        yield
    except (PeerLost, CompileError):
        raise
    except RuntimeError as error:
        if isinstance(error, dist.DistError) or _PEER_FAILURE.search(str(error)):
            first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
            raise PeerLost(f"rank {rank}: a distributed peer was lost or timed out: {first[:300]} "
                           "(check the other ranks' output; raise dist.timeout_s if a rank is only slow)") from None
        raise


class DataParallel:
    """This rank's shard of every pass, the gradient-averaging wrapper and the reductions."""

    def __init__(self, rank: int, world: int, verify_every: int):
        self.rank, self.world, self.verify_every = rank, world, verify_every
        self.wrapper: DistributedDataParallel | None = None
        self.rebuilds = 0
        self._signature: tuple = ()

    # -- data -----------------------------------------------------------------------------------

    def shard_train(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        """Positions r, r+W, … of every global batch, so the ranks' batches together are the global
        batch of one process; the last batch is padded by wrap-around to a multiple of W."""
        first: Batch | None = None
        for x, y in batches:
            first = first or (x, y)
            short = -len(x) % self.world
            if short:
                x, y = torch.cat([x, first[0][:short]]), torch.cat([y, first[1][:short]])
            yield x[self.rank::self.world], y[self.rank::self.world]

    def shard_eval(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        """Every W-th batch: the ranks together see each example exactly once, without padding."""
        return itertools.islice(batches, self.rank, None, self.world)

    # -- the wrapper ----------------------------------------------------------------------------

    def wrap(self, model: GrowingModel) -> DistributedDataParallel:
        """The wrapper over the parameters this epoch's training forwards use, rebuilt when that set
        changed; building it broadcasts rank 0's parameters and checks that every rank agrees."""
        unused = _unused_parameters(model)
        signature = tuple((name, id(p)) for name, p in model.named_parameters()
                          if p.requires_grad and name not in unused)
        if self.wrapper is None or signature != self._signature:
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(unused))
            with peer_failures(self.rank):
                # Running statistics are averaged after the pass, not broadcast on every forward.
                self.wrapper = DistributedDataParallel(model, forward_sync_buffers=False)
            self._signature = signature
            self.rebuilds += 1
        return self.wrapper

    def release(self) -> None:
        """Free the wrapper while the process group still exists. Its reducer holds the group, and
        when it is the last holder the group's destructor waits on a gloo thread that waits for the
        interpreter lock the destructor's caller holds: a hang at exit. The wrapper sits in a
        reference cycle, hence the collection."""
        self.wrapper = None
        gc.collect()

    # -- reductions -----------------------------------------------------------------------------

    def average(self, tensors: list[torch.Tensor]) -> None:
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        with peer_failures(self.rank):
            dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def average_running_statistics(self, model: nn.Module) -> None:
        """After training, so every rank validates the same model."""
        stats = _running_statistics(model)
        if not stats:
            return
        flat = torch.cat([s.reshape(-1).double() for s in stats])
        with peer_failures(self.rank):
            dist.all_reduce(flat)
        offset = 0
        for s in stats:
            s.copy_((flat[offset:offset + s.numel()] / self.world).view_as(s))
            offset += s.numel()

    def sum(self, packed: torch.Tensor) -> torch.Tensor:
        with peer_failures(self.rank):
            dist.all_reduce(packed)
        return packed

    # -- agreement ------------------------------------------------------------------------------

    def verify(self, model: GrowingModel, epoch: int) -> None:
        """Every `verify_every` epochs: all ranks must hold bit-identical parameters and buffers."""
        if not self.verify_every or epoch % self.verify_every:
            return
        mine = [(name, _digest(t)) for name, t in model.state_dict().items()]
        gathered: list = [None] * self.world
        with peer_failures(self.rank):
            dist.all_gather_object(gathered, mine)
        reference = dict(gathered[0])
        for rank, theirs in enumerate(gathered[1:], start=1):
            for name, digest in theirs:
                if reference.get(name) != digest:
                    raise PeerLost(f"after epoch {epoch} rank {rank} differs from rank 0 in '{name}' "
                                   "(the ranks' replicas diverged; this is a bug)")
            if len(theirs) != len(reference):
                raise PeerLost(f"after epoch {epoch} rank {rank} holds {len(theirs)} tensors, rank 0 "
                               f"{len(reference)} (the ranks' replicas diverged; this is a bug)")


def _unused_parameters(model: GrowingModel) -> set[str]:
    """Parameters no training forward touches this epoch: an inert slot's seed and gate, and a gate
    outside blending. The wrapper must skip them, as it expects a gradient for everything it holds."""
    unused = set()
    for slot_id, slot in model.slots.items():
        if slot.mode == "inert":
            unused |= {f"slots.{slot_id}.{name}" for name, _ in slot.named_parameters()}
        elif slot.mode != "blend" and slot.gate is not None:
            unused |= {f"slots.{slot_id}.gate.{name}" for name, _ in slot.gate.named_parameters()}
    return unused


def _running_statistics(model: nn.Module) -> list[torch.Tensor]:
    return [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
            for b in (m.running_mean, m.running_var) if b is not None]


def _digest(tensor: torch.Tensor) -> str:
    raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(raw.tobytes()).hexdigest()
