"""Folding a stream of records into the decider state and the projections, in one pass."""

from typing import Any, Iterable

import attrs

from esper.lifecycle.evolve import evolve
from esper.lifecycle.projections import Projections, Projector
from esper.lifecycle.state import RunState, initial_state


@attrs.frozen
class Folded:
    state: RunState
    projections: Projections
    records: int


def fold(records: Iterable[Any]) -> Folded:
    state, projector, count = initial_state(), Projector(), 0
    for record in records:
        state = evolve(state, record)
        projector.apply(record)
        count += 1
    return Folded(state=state, projections=projector.snapshot(), records=count)
