"""The loader's worker processes (esper/replay/log_table.py, events spec §8): several logs read in
parallel, each handed back as an Arrow file in a private temporary directory, give the database
that loading each alone gives; a damaged or unknown log among them fails as it does alone; and the
temporary directory is gone afterwards either way."""

import random
import tempfile
from pathlib import Path

import pytest

from esper.events import catalogue as c
from esper.events.log import LogCorruptError, UnknownEventType
from esper.replay.loader import connect
from event_factory import example
from log_helpers import future_event_frame, write_log
from synthetic_logs import write_run


@pytest.fixture
def scratch(tmp_path, monkeypatch) -> Path:
    """Where the loader's temporary directories go, so a test can see that none is left."""
    directory = tmp_path / "scratch"
    directory.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    return directory


@pytest.fixture
def logs(tmp_path) -> list[Path]:
    paths = []
    for run in range(4):
        paths.append(tmp_path / f"run-{run}.elog")
        write_run(paths[-1], run, n_envs=2, episodes=1, epochs=8, rng=random.Random(run))
    return paths


def raw_rows(con) -> list[tuple]:
    return con.execute("SELECT * FROM raw_events ORDER BY filename, seq").fetchall()


def test_logs_read_in_parallel_load_as_each_alone(logs, scratch):
    together = connect(logs)
    alone = sorted((row for path in logs for row in raw_rows(connect([path]))), key=lambda r: (r[-1], r[0]))
    assert raw_rows(together) == alone
    assert together.execute("SELECT count(DISTINCT run_id) FROM raw_events").fetchall() == [(4,)]
    assert together.execute("SELECT DISTINCT typeof(event) FROM raw_events").fetchall() == [("JSON",)]
    assert list(scratch.iterdir()) == []


def test_a_damaged_log_among_many_is_named(logs, scratch):
    data = bytearray(logs[2].read_bytes())
    data[len(data) // 2] ^= 0xFF
    logs[2].write_bytes(bytes(data))
    with pytest.raises(LogCorruptError, match=logs[2].name):
        connect(logs)
    assert list(scratch.iterdir()) == []


def test_an_unknown_event_type_among_many_fails_unless_kept(logs, tmp_path, scratch):
    future = tmp_path / "future.elog"
    write_log(future, [[example(c.EpochCompleted)]])
    with open(future, "ab") as f:
        f.write(future_event_frame(2))
    with pytest.raises(UnknownEventType):
        connect([*logs, future])
    con = connect([*logs, future], allow_unknown_events=True)
    assert con.execute("SELECT type FROM events WHERE filename = ? AND seq = 2", [str(future)]).fetchall() == [
        ("FutureEvent",)]
    assert list(scratch.iterdir()) == []
