"""One optimizer per env (runtime §3.1): host groups first, then one group per seed, tagged by slot.

It is torch's fused implementation, because only that one takes a skip flag on the device
(`found_inf`): a batch that must not step is skipped without reading a value back to the host.
"""

import math

import torch
from torch import nn

from esper.tasks.spec import OptimizerSpec

HOST = "host"


def _group(params: list[nn.Parameter], spec: OptimizerSpec, slot: str, weight_decay: float) -> dict:
    group = {"params": params, "lr": spec.lr, "base_lr": spec.lr, "weight_decay": weight_decay, "slot": slot}
    if spec.kind == "sgd":
        group["momentum"] = spec.momentum
    return group


def build_optimizer(host: nn.Module, spec: OptimizerSpec) -> torch.optim.Optimizer:
    params = [p for p in host.parameters() if p.requires_grad]
    if spec.decay_matrices_only:
        # Text: decay weight matrices only; biases, norms and embeddings are exempt.
        embeddings = {id(m.weight) for m in host.modules() if isinstance(m, nn.Embedding)}
        decayed = [p for p in params if p.dim() >= 2 and id(p) not in embeddings]
        exempt = [p for p in params if p.dim() < 2 or id(p) in embeddings]
        groups = [_group(decayed, spec, HOST, spec.weight_decay), _group(exempt, spec, HOST, 0.0)]
    else:
        groups = [_group(params, spec, HOST, spec.weight_decay)]
    if spec.kind == "sgd":
        return torch.optim.SGD(groups, lr=spec.lr, fused=True)
    return torch.optim.AdamW(groups, lr=spec.lr, betas=spec.betas or (0.9, 0.999), eps=1e-8, fused=True)


def prime_momentum(optimizer: torch.optim.Optimizer) -> None:
    """Zero momentum buffers for parameters that have none yet. Fused SGD fills a missing buffer
    only when the step runs, so a first step skipped on the device would leave it uninitialised;
    with dampening 0, momentum·0 + g is exactly the first step's g, so results do not change."""
    for group in optimizer.param_groups:
        if not group.get("momentum"):
            continue
        for p in group["params"]:
            state = optimizer.state[p]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def load_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """A checkpoint's optimizer state, fused whatever the checkpoint recorded: set before loading,
    since loading puts a fused AdamW's step counters on the parameters' device."""
    groups = [{**group, "fused": True, "foreach": None} for group in state["param_groups"]]
    optimizer.load_state_dict({**state, "param_groups": groups})


def add_seed_group(optimizer: torch.optim.Optimizer, slot: str, params: list[nn.Parameter],
                   spec: OptimizerSpec, factor: float) -> None:
    if not params:  # noop has no parameters, hence no group
        return
    group = _group(params, spec, slot, spec.weight_decay)
    group["lr"] = spec.lr * factor  # a new seed starts at the schedule's current factor
    optimizer.add_param_group(group)


def remove_group(optimizer: torch.optim.Optimizer, slot: str) -> None:
    """Drop the slot's group and its parameters' state (momentum, Adam moments)."""
    for group in [g for g in optimizer.param_groups if g["slot"] == slot]:
        for p in group["params"]:
            optimizer.state.pop(p, None)
    # By identity: groups hold tensors, and == on them is element-wise.
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["slot"] != slot]


def adopt_as_host(optimizer: torch.optim.Optimizer, slot: str, host_spec: OptimizerSpec) -> None:
    """A fossil is host structure now: its group takes the host's lr and weight decay."""
    factor = optimizer.param_groups[0]["lr"] / optimizer.param_groups[0]["base_lr"]
    for group in optimizer.param_groups:
        if group["slot"] == slot:
            group["base_lr"] = host_spec.lr
            group["lr"] = host_spec.lr * factor
            group["weight_decay"] = host_spec.weight_decay


def set_factor(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


def schedule_factor(step: int, kind: str, warmup: int, total: int, floor: float) -> float:
    """Linear warm-up, then cosine down to `floor` of the base lr (runtime §3.5)."""
    if kind == "none":
        return 1.0
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def slot_groups(optimizer: torch.optim.Optimizer) -> list[str]:
    return [g["slot"] for g in optimizer.param_groups]
