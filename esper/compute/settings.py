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


# The `[simulated]` blueprint table: name -> (mu, sigma, rho_max, dependency delta) (policy §7.5).
# One clearly useful CNN blueprint (conv_light), one useless (norm), one harmful (attention); the rest
# mild. Every name of both catalogues has an entry; `noop` has no parameters and so no gradient.
SIMULATED_BLUEPRINTS: dict[str, tuple[float, float, float, float]] = {
    "noop": (0.0, 0.0, 0.0, 0.0),
    "norm": (0.0, 0.5, 0.5, 0.0),
    "attention": (-4.0, 1.0, 1.0, 0.0),
    "depthwise": (1.5, 1.0, 0.8, 0.0),
    "conv_light": (6.0, 1.0, 1.0, 0.0),
    "conv_heavy": (2.0, 1.5, 1.2, 0.0),
    "lora": (1.5, 1.0, 0.8, 0.0),
    "mlp": (2.0, 1.5, 1.2, 0.0),
}


def _blueprint_table(value: dict) -> dict[str, tuple[float, float, float, float]]:
    """Entries given in the config replace the built-in ones of the same name; the rest stay, so
    `--set simulated.blueprints.norm=[1, 0.5, 0.5, 0]` changes one blueprint only."""
    table = dict(SIMULATED_BLUEPRINTS)
    for name, entry in dict(value).items():
        if name not in SIMULATED_BLUEPRINTS:
            raise ValueError(f"simulated.blueprints: unknown blueprint '{name}' "
                             f"(choose from {', '.join(SIMULATED_BLUEPRINTS)})")
        values = tuple(entry)
        if len(values) != 4 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in values):
            raise ValueError(f"simulated.blueprints.{name} must be [mu, sigma, rho_max, dependency], got {entry!r}")
        mu, sigma, rho, delta = (float(x) for x in values)
        if sigma < 0 or rho < 0 or delta < 0:
            raise ValueError(f"simulated.blueprints.{name}: sigma, rho_max and dependency must be >= 0")
        table[name] = (mu, sigma, rho, delta)
    return table


@attrs.frozen
class SimulatedSettings:
    """The `[simulated]` section: the parametric environment of the `simulated` backend."""

    a0: float = attrs.field(default=10.0, validator=[v.ge(0.0), v.lt(100.0)])  # host score at t = 0 (pp)
    a_inf: float = attrs.field(default=60.0, validator=[v.ge(0.0), v.lt(100.0)])  # asymptote (pp)
    tau: float = attrs.field(default=4.0, validator=v.gt(0.0))  # host time constant (epochs)
    noise: float = attrs.field(default=0.3, validator=v.ge(0.0))  # observation noise sigma (pp)
    seed_tau: float = attrs.field(default=3.0, validator=v.gt(0.0))  # seed maturity time constant (epochs)
    nan_probability: float = attrs.field(default=0.0, validator=[v.ge(0.0), v.le(1.0)])  # per epoch
    blueprints: dict[str, tuple[float, float, float, float]] = attrs.field(
        factory=lambda: dict(SIMULATED_BLUEPRINTS), converter=_blueprint_table)


@attrs.frozen
class DistSettings:
    """The `[dist]` section: data-parallel training over torch.distributed (runtime §5.3)."""

    timeout_s: float = attrs.field(default=600.0, validator=v.gt(0.0))  # a silent peer aborts every rank
    verify_every: int = attrs.field(default=0, validator=v.ge(0))  # epochs between checksum checks; 0: never
