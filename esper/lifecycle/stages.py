"""Stage sets, the transition table and the gate that guards each target (lifecycle §2, §3.1)."""

from esper.events.enums import Gate, Stage

TERMINAL = frozenset({Stage.FOSSILIZED})
ACTIVE = frozenset({Stage.TRAINING, Stage.BLENDING, Stage.PROBATIONARY, Stage.FOSSILIZED})
LIVE = ACTIVE | {Stage.GERMINATED}
CULLABLE = frozenset({Stage.GERMINATED, Stage.TRAINING, Stage.BLENDING, Stage.PROBATIONARY})
FAILURE = frozenset({Stage.CULLED, Stage.EMBARGOED, Stage.RESETTING})
AVAILABLE = frozenset({Stage.DORMANT})

TRANSITIONS: dict[Stage, frozenset[Stage]] = {
    Stage.UNKNOWN: frozenset({Stage.DORMANT}),
    Stage.DORMANT: frozenset({Stage.GERMINATED}),
    Stage.GERMINATED: frozenset({Stage.TRAINING, Stage.CULLED}),
    Stage.TRAINING: frozenset({Stage.BLENDING, Stage.CULLED}),
    Stage.BLENDING: frozenset({Stage.PROBATIONARY, Stage.CULLED}),
    Stage.PROBATIONARY: frozenset({Stage.FOSSILIZED, Stage.CULLED}),
    Stage.FOSSILIZED: frozenset(),
    Stage.CULLED: frozenset({Stage.EMBARGOED}),
    Stage.EMBARGOED: frozenset({Stage.RESETTING}),
    Stage.RESETTING: frozenset({Stage.DORMANT}),
}

NATURAL_NEXT: dict[Stage, Stage] = {
    Stage.DORMANT: Stage.GERMINATED,
    Stage.GERMINATED: Stage.TRAINING,
    Stage.TRAINING: Stage.BLENDING,
    Stage.BLENDING: Stage.PROBATIONARY,
    Stage.PROBATIONARY: Stage.FOSSILIZED,
}

_GATE_OF_TARGET = {
    Stage.GERMINATED: Gate.G0,
    Stage.TRAINING: Gate.G1,
    Stage.BLENDING: Gate.G2,
    Stage.PROBATIONARY: Gate.G3,
    Stage.FOSSILIZED: Gate.G5,
}


def is_valid_transition(source: Stage, target: Stage) -> bool:
    return target in TRANSITIONS.get(source, frozenset())


def gate_for_target(target: Stage) -> Gate:
    """Failure stages and pipeline moves are ungated; asking for their gate is a bug, not G0."""
    try:
        return _GATE_OF_TARGET[target]
    except KeyError:
        raise ValueError(f"no gate guards a transition into {target.name}") from None


def target_of_gate(gate: Gate) -> Stage:
    return next(stage for stage, g in _GATE_OF_TARGET.items() if g == gate)


def isolated(stage: Stage, topology: str, isolate_cnn: bool, isolate_transformer: bool) -> bool:
    """Whether the seed reads a detached copy of its input (lifecycle §4.3)."""
    if stage == Stage.TRAINING:
        return True
    if stage in (Stage.BLENDING, Stage.PROBATIONARY):
        return isolate_cnn if topology == "cnn" else isolate_transformer
    return False
