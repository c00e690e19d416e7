"""Stage and Gate: the lifecycle's numbered contracts, carried as ints in every payload."""

from enum import IntEnum


class Stage(IntEnum):
    UNKNOWN = 0
    DORMANT = 1
    GERMINATED = 2
    TRAINING = 3
    BLENDING = 4
    # 5 is the retired SHADOWING stage: never assigned, never reused.
    PROBATIONARY = 6
    FOSSILIZED = 7
    CULLED = 8
    EMBARGOED = 9
    RESETTING = 10


class Gate(IntEnum):
    G0 = 0
    G1 = 1
    G2 = 2
    G3 = 3
    # 4 is the retired shadowing gate: never assigned.
    G5 = 5
