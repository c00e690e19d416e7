"""The compute backend interface (runtime §5.1). Only plain data crosses it, never tensors, so the
torch, distributed and simulated backends are interchangeable under one engine."""

from typing import Any, Protocol

import attrs


@attrs.frozen
class HostSummary:
    preset: str
    param_count: int
    input_shape: tuple[int, ...]
    classes: int
    slots: tuple[tuple[str, int, tuple[int, ...]], ...]  # (slot id, channels, feature shape)


@attrs.frozen
class SeedBuild:
    """A built seed's probe report for G0 (lifecycle §4.9)."""

    shape_ok: bool
    finite: bool
    identity: bool | None
    param_count: int
    blend_params: int


@attrs.frozen
class SeedGradients:
    """One slot's gradient statistics over an epoch (lifecycle §4.3–4.4); None = not measured."""

    grad_ratio: float | None
    seed_grad_norm: float | None
    host_grad_norm: float | None
    isolation_leaks: int | None
    finite: bool


@attrs.frozen
class TrainStats:
    loss: float
    score: float
    samples: int
    non_finite: bool
    seeds: dict[str, SeedGradients]
    lr: float
    seconds: float
    amp_scale: float | None = None  # the fp16 gradient scaler's scale at the end of the epoch
    recompiles: int | None = None  # graphs compiled during the pass (None: not compiling)
    peak_memory_bytes: int | None = None  # the device's peak over the epoch's passes (None on CPU)


@attrs.frozen
class Evaluation:
    loss: float
    score: float
    examples: int
    next_token_acc: float | None = None


@attrs.frozen
class ValStats:
    main: Evaluation
    ablations: dict[str, Evaluation]  # slot -> its alpha forced to 0
    shadows: dict[str, Evaluation]  # slot -> its alpha forced to 1 (TRAINING seeds)
    all_off: Evaluation | None
    forward_passes: int
    seconds: float
    counterfactual_seconds: float
    recompiles: int | None = None


@attrs.frozen
class EpochPlan:
    """What one epoch trains and measures, chosen by the engine from the folded state before it."""

    epoch: int
    ratio_slots: tuple[str, ...] = ()  # gradient ratio measured
    incubating: tuple[str, ...] = ()  # TRAINING seeds, which learn from the incubation pass
    leak_slots: tuple[str, ...] = ()  # isolation checked this epoch
    ablate: tuple[str, ...] = ()  # validated again with alpha forced to 0
    shadow: tuple[str, ...] = ()  # validated again with alpha forced to 1
    all_off: bool = False


class Backend(Protocol):
    def build(self) -> HostSummary: ...

    def germinate(self, slot: str, blueprint: str, blend_kind: str, init_seed: int) -> SeedBuild: ...

    def drop(self, slot: str) -> None: ...

    def set_slot(self, slot: str, mode: str, alpha: float, isolated: bool, fossil: bool) -> None: ...

    def run_epoch(self, plan: EpochPlan) -> tuple[TrainStats, ValStats]:
        """Train one epoch, then validate with the plan's counterfactuals."""

    def validate(self, ablate: tuple[str, ...], shadow: tuple[str, ...], all_off: bool) -> ValStats:
        """Validation alone: after a rollback, of the restored model."""

    def test(self) -> Evaluation: ...

    def snapshot(self, epoch: int) -> Any: ...

    def restore(self, handle: Any) -> None: ...

    def reset_optimizer_state(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def extend(self, max_epochs: int) -> None: ...

    def param_counts(self) -> tuple[int, int]: ...
