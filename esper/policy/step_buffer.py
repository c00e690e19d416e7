"""An env's batches of one engine step, held until every env's are appended env-major (events §1).

The engine writes to a `StepBuffer` as to a log writer: each batch folds at once (evolve reads no
seq), and the trainer appends the buffers in env order when the step ends, so the log is the same
however the envs' work was interleaved, and whichever process stepped them (policy §7.4).
"""

from collections.abc import Sequence

import attrs

from esper.events.catalogue import Event


@attrs.frozen
class PendingRecord:
    """A record before the log writer stamps its seq and timestamp."""

    env: int | None
    episode: int | None
    event: Event


class StepBuffer:
    def __init__(self) -> None:
        self.batches: list[tuple[str, int | None, int | None, list[Event]]] = []

    def append_batch(self, run_id: str, env: int | None, episode: int | None,
                     events: Sequence[Event]) -> list[PendingRecord]:
        self.batches.append((run_id, env, episode, list(events)))
        return [PendingRecord(env, episode, event) for event in events]

    def take(self) -> list[tuple[str, int | None, int | None, list[Event]]]:
        """The batches held, in order; the buffer is empty afterwards."""
        batches, self.batches = self.batches, []
        return batches
