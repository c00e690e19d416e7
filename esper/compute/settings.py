"""Run, training and governor settings: the `[run]`, `[train]` and `[governor]` config sections."""

import attrs
from attrs import validators as v

SLOT_IDS = ("early", "mid", "late")


@attrs.frozen
class RunSettings:
    task: str = "digits"
    data: str = ""  # a path; empty: the task's own data (required for cifar10*)
    policy: str = "heuristic"
    epochs: int = attrs.field(default=30, validator=v.ge(1))
    seed: int = attrs.field(default=0, validator=v.ge(0))
    device: str = "auto"
    backend: str = attrs.field(default="torch", validator=v.in_(("torch", "simulated", "ddp")))
    deterministic: bool = True
    threads: int = attrs.field(default=0, validator=v.ge(0))  # 0: cores / envs per process
    slots: tuple[str, ...] = attrs.field(default=SLOT_IDS, converter=tuple)
    blueprints: tuple[str, ...] = attrs.field(default=(), converter=tuple)  # empty: catalogue minus noop
    checkpoint_every: int = attrs.field(default=1, validator=v.ge(0))  # 0: no run checkpoints
    keep_checkpoints: int = attrs.field(default=2, validator=v.ge(2))
    fsync: str = attrs.field(default="epoch", validator=v.in_(("always", "epoch", "never")))
    test_every: int = attrs.field(default=0, validator=v.ge(0))  # 0: test only at the end
    greedy: bool = True


@attrs.frozen
class TaskSettings:
    host: str = ""  # a host preset of the task's topology; empty: the task's own (text: tiny)


@attrs.frozen
class TrainSettings:
    amp: str = attrs.field(default="off", validator=v.in_(("off", "bf16", "fp16")))
    compile: bool = False
    lr_schedule: str = attrs.field(default="none", validator=v.in_(("none", "cosine")))
    warmup_steps: int = attrs.field(default=100, validator=v.ge(0))
    min_lr_ratio: float = attrs.field(default=0.1, validator=[v.ge(0.0), v.le(1.0)])
    grad_clip: float = attrs.field(default=0.0, validator=v.ge(0.0))  # 0: off
    counterfactual_all_off: bool = True
    fused_counterfactuals: bool = True  # one replicated forward for every configuration


@attrs.frozen
class GovernorSettings:
    enabled: bool = True
    window: int = attrs.field(default=20, validator=v.ge(1))
    min_history: int = attrs.field(default=10, validator=v.ge(1))
    absolute: float = attrs.field(default=12.0, validator=v.gt(0.0))  # text: 15
    sigma_k: float = attrs.field(default=6.0, validator=v.gt(0.0))
    mean_multiple: float = attrs.field(default=3.0, validator=v.gt(0.0))
    consecutive: int = attrs.field(default=3, validator=v.ge(1))
    lobotomy_mean_ratio: float = attrs.field(default=0.6, validator=v.gt(0.0))
    lobotomy_band: float = attrs.field(default=0.065, validator=v.gt(0.0))
    max_rollbacks: int = attrs.field(default=3, validator=v.ge(0))
    snapshot_every: int = attrs.field(default=5, validator=v.ge(1))
