"""What the engine shows a controller each step, and what a controller answers.

The engine is handed its controller and reward function (it never imports `esper.policy`); these
types are the whole contract between them.
"""

from typing import Protocol

import attrs

from esper.events.catalogue import PolicyDecided, RewardComputed
from esper.lifecycle.config import LifecycleConfig
from esper.lifecycle.state import EnvState


@attrs.frozen
class EpochSignals:
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float


@attrs.frozen
class CullNotice:
    """A seed culled since the controller's previous decision (heuristic penalties read these)."""

    slot: str
    blueprint: str
    reason: str
    initiator: str


@attrs.frozen
class Observation:
    env: int
    episode: int
    epoch: int
    max_epochs: int
    history: tuple[EpochSignals, ...]  # epochs 1..epoch of this episode
    state: EnvState  # the decider's own view of this env, folded from the log
    lifecycle: LifecycleConfig
    topology: str
    blueprints: tuple[str, ...]  # the policy blueprint list (catalogue minus noop, maybe narrowed)
    blueprint_params: dict[str, dict[str, int]]  # blueprint -> slot -> parameters
    host_params: int
    l_rand: float
    recent_culls: tuple[CullNotice, ...] = ()
    rolled_back: bool = False  # a governor rollback happened in this epoch


class Controller(Protocol):
    """A policy: `none`, `random`, `heuristic` or `ppo` (policy spec §2)."""

    def reset(self, env: int, episode: int, max_epochs: int) -> None: ...

    def decide(self, observation: Observation) -> PolicyDecided: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@attrs.frozen
class Executed:
    """How one command of a decision fared: refused by the domain, or judged by its gate."""

    op: str
    slot: str
    blueprint: str | None
    rejected: bool
    gate_passed: bool | None  # None when the command has no gate (cull) or was rejected


class RewardFunction(Protocol):
    """r_t for the decision at observation t, computed once epoch t+1 is known (policy spec §6)."""

    def __call__(
        self,
        before: Observation,
        decision: PolicyDecided,
        executed: tuple[Executed, ...],
        after: Observation,
        *,
        terminated: bool,
        governor: bool,
    ) -> RewardComputed: ...

