"""The functional core: stages, gates, the decider and projections. Pure Python, no torch, no I/O."""

from esper.events.enums import Gate, Stage
from esper.lifecycle.config import LifecycleConfig
from esper.lifecycle.decide import decide, state_digest
from esper.lifecycle.errors import DomainError, ReplayError
from esper.lifecycle.evolve import evolve
from esper.lifecycle.gates import GateVerdict, evaluate_gate
from esper.lifecycle.state import RunState, initial_state

__all__ = [
    "DomainError", "Gate", "GateVerdict", "LifecycleConfig", "ReplayError", "RunState", "Stage",
    "decide", "evaluate_gate", "evolve", "initial_state", "state_digest",
]
