"""The fast fold equals the reference fold (events §2, §6).

`fold` runs on mutable twins (fast_evolve.Evolver, fast_projector.FastProjector); the reference is
`state = evolve(state, record)` from `initial_state()` with a `Projector` fed the same records.
Checked at every batch boundary, with the state digests, on:
  - the logs of the decider state machine (random commands, refused ones included), where the
    folds must also equal the engine's live state after every batch;
  - realistic multi-env logs written to disk and read back (benchmarks/synthetic_log.py);
  - damaged logs (records dropped, repeated, swapped or altered): both folds fail the same way, with
    the same ReplayError, or both succeed with equal results;
  - unstamped records (no seq), as the engine folds a buffered step.
"""

import random
from pathlib import Path
from types import SimpleNamespace

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esper.events import catalogue as ev
from esper.events.codec import decode_record, encode_record
from esper.events.enums import Stage
from esper.events.log import LogReader
from esper.lifecycle.decide import state_digest
from esper.lifecycle.evolve import evolve
from esper.lifecycle.fast_evolve import Evolver
from esper.lifecycle.fast_projector import FastProjector
from esper.lifecycle.fold import fold
from esper.lifecycle.projections import Projector
from esper.lifecycle.state import initial_state
from esper.lifecycle.thawed import thaw
from synthetic_logs import write_run
from test_decider_machine import DeciderMachine


def check_every_batch(records: list, live: dict[int, object] | None = None) -> None:
    """Both folds side by side; at each batch end the states, their digests and the projections
    agree (and equal the live state where `live` has one for that record count)."""
    state, projector = initial_state(), Projector()
    evolver, fast = Evolver(), FastProjector()
    for n, record in enumerate(records, 1):
        state = evolve(state, record)
        projector.apply(record)
        evolver.apply(record)
        fast.apply(record)
        if not record.batch_end:
            continue
        folded = evolver.state()
        assert folded == state, f"state after record {n}"
        assert {e: state_digest(s) for e, s in folded.envs.items()} == {e: state_digest(s) for e, s in state.envs.items()}
        assert fast.snapshot() == projector.snapshot(), f"projections after record {n}"
        assert thaw(state).freeze() == state
        if live is not None and n in live:
            assert folded == live[n]
        if isinstance(record.event, (ev.EpochTicked, ev.EpisodeFinished)):
            assert record.event.state_digest == state_digest(folded.envs[record.env])
    whole = fold(records)
    assert (whole.state, whole.projections, whole.records) == (state, projector.snapshot(), len(records))


class FastFoldMachine(DeciderMachine):
    def teardown(self):
        records = [decode_record(encode_record(r)) for r in self.ledger.records]
        check_every_batch(records, dict(self.boundaries))


TestFastFoldMachine = FastFoldMachine.TestCase
TestFastFoldMachine.settings = settings(
    max_examples=100, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)


def synthetic_records(directory: Path, seed: int, n_envs: int = 2, episodes: int = 2, epochs: int = 25) -> list:
    path = directory / f"run-{seed}.elog"
    write_run(path, seed, n_envs=n_envs, episodes=episodes, epochs=epochs, rng=random.Random(seed))
    return list(LogReader(path).records())


@pytest.mark.parametrize("seed", range(4))
def test_synthetic_logs_fold_alike(tmp_path, seed):
    records = synthetic_records(tmp_path, seed)
    assert {type(r.event) for r in records} >= {ev.SeedFossilized, ev.SeedCulled, ev.CounterfactualMeasured}
    check_every_batch(records)


def reference_fold(records: list):
    state, projector = initial_state(), Projector()
    for record in records:
        state = evolve(state, record)
        projector.apply(record)
    return state, projector.snapshot()


def outcome(fold_fn, records: list):
    try:
        return "ok", fold_fn(records)
    except Exception as exc:  # the comparison is of whatever each fold raises
        return type(exc), str(exc), getattr(exc, "seq", None), getattr(exc, "reason", None)


@pytest.fixture(scope="module")
def valid_log(tmp_path_factory) -> list:
    return synthetic_records(tmp_path_factory.mktemp("damaged"), 7, n_envs=2, episodes=2, epochs=12)


def _alter(event, draw):
    """One payload field of a seed event set to another plausible value."""
    choices = {"seed_id": ["early#99", "mid#1", "late#2"], "slot": ["bogus", "early", "mid", "late"],
               "from_stage": list(Stage), "to_stage": list(Stage)}
    fields = [f for f in choices if f in event.__struct_fields__]
    if not fields:
        return event
    field = draw(st.sampled_from(fields))
    return msgspec.structs.replace(event, **{field: draw(st.sampled_from(choices[field]))})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_logs_fail_alike(valid_log, data):
    records = list(valid_log)
    for _ in range(data.draw(st.integers(1, 3), label="damages")):
        i = data.draw(st.integers(0, len(records) - 1), label="at")
        kind = data.draw(st.sampled_from(["drop", "repeat", "swap", "env", "episode", "payload"]), label="kind")
        r = records[i]
        if kind == "drop":
            del records[i]
        elif kind == "repeat":
            records.insert(i, r)
        elif kind == "swap" and i + 1 < len(records):
            records[i], records[i + 1] = records[i + 1], r
        elif kind == "env":
            records[i] = msgspec.structs.replace(r, env=data.draw(st.sampled_from([None, 0, 1, 5])))
        elif kind == "episode":
            records[i] = msgspec.structs.replace(r, episode=data.draw(st.sampled_from([None, 0, 1, 2])))
        elif kind == "payload":
            records[i] = msgspec.structs.replace(r, event=_alter(r.event, data.draw))
    expected = outcome(reference_fold, records)
    actual = outcome(lambda rs: (lambda f: (f.state, f.projections))(fold(rs)), records)
    assert actual == expected


def test_unstamped_records_fold_alike(tmp_path):
    """Records with no seq or run id, as a buffered step has before rank 0 stamps it."""
    records = [SimpleNamespace(env=r.env, episode=r.episode, event=r.event, batch_end=r.batch_end)
               for r in synthetic_records(tmp_path, 3, n_envs=1, episodes=1, epochs=10)]
    folded = fold(records)
    assert (folded.state, folded.projections) == reference_fold(records)
