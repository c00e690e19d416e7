"""The decider's state (events §2, lifecycle §4.1): frozen attrs values, replaced, never mutated."""

from typing import Any

import attrs

from esper.events.catalogue import CatalogueEntry, SlotInfo
from esper.events.enums import Stage
from esper.lifecycle.config import LifecycleConfig
from esper.lifecycle.stages import ACTIVE, LIVE


_FIELDS: dict[type, tuple[str, ...]] = {}


def replace(instance: Any, **changes: Any) -> Any:
    """`attrs.evolve` without its per-call introspection: the fold calls this for nearly every
    record, and attrs.evolve was most of replay's time. Only for the validator-free state classes."""
    cls = type(instance)
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = tuple(f.name for f in attrs.fields(cls))
    for name in names:
        if name not in changes:
            changes[name] = getattr(instance, name)
    return cls(**changes)


@attrs.frozen
class Counterfactual:
    value: float
    epoch: int
    alpha: float  # the seed's own alpha when measured (G5 wants one taken at 1.0)


@attrs.frozen
class SeedState:
    """A seed bound to a slot, from germination until its slot is released back to DORMANT."""

    seed_id: str
    blueprint: str
    blend_kind: str
    steps_total: int
    step: int = 0
    alpha: float = 0.0
    seed_params: int = 0
    blend_params: int = 0
    identity_at_birth: bool = True
    germinated_epoch: int = 0
    acc_at_germination: float | None = None
    acc_at_stage_start: float | None = None
    current_acc: float | None = None
    best_acc: float | None = None
    epochs_total: int = 0
    grad_ratio_ema: float | None = None
    ratio_epoch: int | None = None  # epoch of the last measured ratio: G2 reads only a fresh one
    training_leaks: int = 0
    last_counterfactual: Counterfactual | None = None  # last ablation
    last_shadow: Counterfactual | None = None
    healthy: bool | None = None
    cull_reason: str | None = None


@attrs.frozen
class SlotState:
    slot_id: str
    enabled: bool
    stage: Stage = Stage.DORMANT
    entered_epoch: int = 0
    previous_stage: Stage = Stage.UNKNOWN
    epochs_in_previous_stage: int = 0
    seed: SeedState | None = None

    def epochs_in_stage(self, epoch: int) -> int:
        return epoch - self.entered_epoch

    @property
    def live(self) -> bool:
        return self.stage in LIVE

    @property
    def active(self) -> bool:
        return self.stage in ACTIVE


@attrs.frozen
class EnvState:
    episode: int
    status: str  # running | finished
    epoch: int
    ticked: bool
    slots: tuple[SlotState, ...]
    seed_counter: int = 0
    max_epochs: int = 0
    last_val_acc: float | None = None
    last_val_loss: float | None = None
    best_val_acc: float | None = None
    total_params: int = 0
    decisions: tuple[int, ...] = ()  # epochs with a recorded PolicyDecided, this episode
    seeds_germinated: int = 0
    seeds_fossilized: int = 0
    seeds_culled: int = 0
    rollbacks: int = 0
    episode_return: float | None = None

    def slot(self, slot_id: str) -> SlotState | None:
        for slot in self.slots:
            if slot.slot_id == slot_id:
                return slot
        return None

    def with_slot(self, new: SlotState) -> "EnvState":
        return replace(self, slots=tuple(new if s.slot_id == new.slot_id else s for s in self.slots))

    def live_seeds(self) -> int:
        return sum(1 for s in self.slots if s.live)


@attrs.frozen
class RunState:
    status: str | None = None  # None until RunStarted; running | completed | failed | interrupted
    config: LifecycleConfig = LifecycleConfig()
    topology: str = ""
    catalogue: tuple[CatalogueEntry, ...] = ()
    slots_info: tuple[SlotInfo, ...] = ()
    n_envs: int = 0
    episodes_completed: int = 0
    envs: dict[int, EnvState] = attrs.Factory(dict)

    def with_env(self, env: int, state: EnvState) -> "RunState":
        return replace(self, envs={**self.envs, env: state})

    def blueprint(self, name: str) -> CatalogueEntry | None:
        return next((c for c in self.catalogue if c.name == name), None)


def initial_state() -> RunState:
    return RunState()


def env_digest_value(env: EnvState) -> dict[str, Any]:
    """The plain-data form hashed into `state_digest` (enums as ints, tuples as arrays)."""
    return attrs.asdict(env, recurse=True, value_serializer=_plain)


def _plain(_inst, _field, value):
    if isinstance(value, Stage):
        return int(value)
    return value
