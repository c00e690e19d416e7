"""The log file (events spec §5): layout, writer policies, locking, fsync failure, reader, export, CLI."""

import errno
import os
import tempfile
import tracemalloc
import zlib
from pathlib import Path

import msgspec
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from esper.events import EVENT_TYPES, catalogue as c
from esper.events.codec import record_from_json
from esper.events.log import (
    LogError,
    LogExistsError,
    LogFsyncError,
    LogLockedError,
    LogReader,
    LogWriter,
    export_jsonl,
    repair,
)
from event_factory import RUN_ID, all_examples, example
from log_helpers import ENV_EVENTS, batch_ends, encoded, future_event_frame, write_log

POLICIES = ["always", "epoch", "never"]


def test_factory_has_an_example_of_every_event_type():
    assert [type(e) for e in all_examples()] == list(EVENT_TYPES)


def test_every_event_type_round_trips(tmp_path):
    examples = all_examples()
    path = tmp_path / "events.elog"
    records = write_log(path, [examples[1:6], examples[6:]])
    read = list(LogReader(path).records())
    assert [type(r.event) for r in read] == list(EVENT_TYPES)
    assert encoded(read) == encoded(records)
    assert [r.seq for r in read] == list(range(len(EVENT_TYPES)))
    assert [r.batch_end for r in read] == [True] + [False] * 4 + [True] + [False] * (len(EVENT_TYPES) - 7) + [True]


@pytest.mark.parametrize("policy", POLICIES)
@settings(max_examples=15, deadline=None)
@given(batches=st.lists(st.lists(st.sampled_from(ENV_EVENTS), min_size=1, max_size=6), max_size=12))
def test_random_batches_read_back_identically_under_each_policy(policy, batches):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "events.elog"
        records = write_log(path, batches, fsync=policy)
        assert encoded(LogReader(path).records()) == encoded(records)
        summary = LogReader(path).scan()
        assert (summary.records, summary.last_seq, summary.tail) == (len(records), len(records) - 1, "clean")


def test_header_bytes(tmp_path):
    path = tmp_path / "events.elog"
    LogWriter.create(path).close()
    data = path.read_bytes()
    assert data[:12] == b"\x89ESPLOG\n\x01\x00\x01\x00"
    assert data[12:] == zlib.crc32(data[:12]).to_bytes(4, "little")
    assert len(data) == 16


def test_create_refuses_an_existing_file(tmp_path):
    path = tmp_path / "events.elog"
    path.write_bytes(b"precious")
    with pytest.raises(LogExistsError):
        LogWriter.create(path)
    assert path.read_bytes() == b"precious"


def test_second_writer_is_refused_and_first_is_unaffected(tmp_path):
    path = tmp_path / "events.elog"
    with LogWriter.create(path) as first:
        first.append_batch(RUN_ID, None, None, [example(c.RunStarted)])
        for opener in (LogWriter.open_append, LogWriter.create):
            with pytest.raises(LogLockedError) as info:
                opener(path)
            message = str(info.value)
            assert f"{path}.lock" in message and f"pid {os.getpid()}" in message and "\n" not in message
            assert info.value.pid == os.getpid()
        first.append_batch(RUN_ID, 0, 0, [example(c.EpochTicked)])
    assert [r.seq for r in LogReader(path).records()] == [0, 1]
    LogWriter.open_append(path).close()  # the lock is gone with the first writer


def _failing_fsync(fd):
    raise OSError(errno.EIO, "Input/output error")


@pytest.mark.parametrize("policy", ["always", "epoch"])
def test_fsync_failure_is_fatal(tmp_path, monkeypatch, policy):
    path = tmp_path / "events.elog"
    writer = LogWriter.create(path, fsync=policy)
    writer.append_batch(RUN_ID, None, None, [example(c.RunStarted)])
    writer.commit()
    assert writer.last_committed_seq == 0
    monkeypatch.setattr(os, "fsync", _failing_fsync)
    with pytest.raises(LogFsyncError, match="Input/output error"):
        writer.append_batch(RUN_ID, 0, 0, [example(c.EpochTicked)])
        writer.commit()
    monkeypatch.undo()  # even with a healthy disk again, the writer never retries
    for attempt in (
        lambda: writer.append_batch(RUN_ID, 0, 0, [example(c.EpochTicked)]),
        writer.commit,
        lambda: writer.append_batch(RUN_ID, 0, 0, [example(c.EpochTicked)]),
    ):
        with pytest.raises(LogFsyncError, match="stopped"):
            attempt()
    assert writer.last_committed_seq == 0
    writer.close()
    LogWriter.open_append(path).close()  # the lock was released


def test_epoch_writes_on_commit_and_never_writes_on_close(tmp_path):
    for policy, size_after_commit in (("epoch", None), ("never", 16)):
        path = tmp_path / f"{policy}.elog"
        with LogWriter.create(path, fsync=policy) as writer:
            writer.append_batch(RUN_ID, None, None, [example(c.RunStarted)])
            assert path.stat().st_size == 16
            writer.commit()
            if size_after_commit:
                assert path.stat().st_size == size_after_commit
            else:
                assert path.stat().st_size > 16 and writer.last_committed_seq == 0
        assert [r.seq for r in LogReader(path).records()] == [0]


def test_a_full_buffer_is_written_early_but_not_committed(tmp_path):
    path = tmp_path / "events.elog"
    with LogWriter.create(path, fsync="epoch") as writer:
        writer.append_batch(RUN_ID, None, None, [example(c.RunStarted)])
        while path.stat().st_size == 16:
            writer.append_batch(RUN_ID, 0, 0, [example(c.EpochCompleted)] * 50)
        assert writer.last_committed_seq is None
        writer.commit()
        assert writer.last_committed_seq == writer.next_seq - 1


def test_writer_guards_the_log_rules(tmp_path):
    with LogWriter.create(tmp_path / "events.elog") as writer:
        with pytest.raises(ValueError, match="RunStarted"):
            writer.append_batch(RUN_ID, 0, 0, [example(c.EpochTicked)])
        writer.append_batch(RUN_ID, None, None, [example(c.RunStarted)])
        with pytest.raises(ValueError, match="run_id"):
            writer.append_batch("another-run", 0, 0, [example(c.EpochTicked)])
        assert writer.next_seq == 1


def test_open_append_continues_at_the_next_seq(tmp_path):
    path = tmp_path / "events.elog"
    write_log(path, [[example(c.EpochTicked)] * 3])
    with LogWriter.open_append(path) as writer:
        assert (writer.next_seq, writer.last_committed_seq) == (4, 3)
        assert writer.append_batch(RUN_ID, 0, 0, [example(c.EpochTicked)])[0].seq == 4
    assert [r.seq for r in LogReader(path).records()] == list(range(5))


def test_frames_larger_than_a_read_chunk_and_the_size_limit(tmp_path):
    path = tmp_path / "events.elog"
    big = msgspec.structs.replace(example(c.RunStarted), config={"blob": "x" * (3 << 20)})
    with LogWriter.create(path, fsync="never") as writer:
        writer.append_batch(RUN_ID, None, None, [big])
        too_big = msgspec.structs.replace(big, config={"blob": "x" * (17 << 20)})
        with pytest.raises(ValueError, match="encodes to"):
            writer.append_batch(RUN_ID, None, None, [example(c.EpochTicked), too_big])
        assert writer.next_seq == 1
        writer.append_batch(RUN_ID, 0, 0, [example(c.EpochTicked)])
    assert [len(r.event.config.get("blob", "")) for r in LogReader(path).records() if r.seq == 0] == [3 << 20]
    assert LogReader(path).scan().records == 2


def test_reading_streams_in_bounded_memory(tmp_path):
    path = tmp_path / "events.elog"
    write_log(path, [[example(c.EpochCompleted)] * 5] * 3200)
    assert path.stat().st_size > 7 << 20
    tracemalloc.start()
    try:
        count = sum(1 for _ in LogReader(path).records())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 16001 and peak < 3 << 20


def test_start_seq(tmp_path):
    path = tmp_path / "events.elog"
    write_log(path, [[example(c.EpochTicked)] * 4 for _ in range(5)])
    reader = LogReader(path)
    assert [r.seq for r in reader.records(7)] == list(range(7, 21))
    assert [r.seq for r in reader.records(21)] == []
    stream = reader.records(10)
    assert len(list(stream)) == 11 and stream.summary.records == 21


def test_reader_reports_live_while_a_writer_holds_the_log(tmp_path):
    path = tmp_path / "events.elog"
    with LogWriter.create(path, fsync="always") as writer:
        writer.append_batch(RUN_ID, None, None, [example(c.RunStarted)])
        summary = LogReader(path).scan()
        assert (summary.tail, summary.last_seq) == ("live", 0)
    assert LogReader(path).scan().tail == "clean"


def test_reader_never_modifies_or_creates_files(tmp_path):
    path = tmp_path / "events.elog"
    write_log(path, [[example(c.EpochTicked)] * 3])
    (tmp_path / "events.elog.lock").unlink()
    data = path.read_bytes()
    with open(path, "r+b") as f:
        f.truncate(len(data) - 5)
    LogReader(path).scan()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.elog"]
    assert path.read_bytes() == data[:-5]


def test_export_jsonl(tmp_path, capsys):
    path = tmp_path / "events.elog"
    records = write_log(path, [all_examples()[1:8], all_examples()[8:]])
    out = tmp_path / "events.jsonl"
    summary = export_jsonl(path, out)
    lines = out.read_bytes().splitlines()
    assert summary.records == len(lines) == len(records)
    assert [msgspec.json.decode(line)["seq"] for line in lines] == [r.seq for r in records]
    # JSON has no NaN: the example's one non-finite value (loss_at_panic) is written as null.
    for line, record in zip(lines, records):
        if isinstance(record.event, c.GovernorRolledBack):
            assert msgspec.json.decode(line)["event"]["loss_at_panic"] is None
        else:
            assert encoded([record_from_json(line)]) == encoded([record])

    data = path.read_bytes()
    path.write_bytes(data[: batch_ends(data, records)[-1] - 3])
    summary = export_jsonl(path, out)
    assert len(out.read_bytes().splitlines()) == summary.records == 8
    assert "torn tail" in capsys.readouterr().err


def test_repair_saves_the_cut_bytes(tmp_path):
    path = tmp_path / "events.elog"
    records = write_log(path, [[example(c.EpochTicked)] * 2] * 3)
    data = path.read_bytes()
    cut = batch_ends(data, records)[1]
    aside = repair(path, cut)
    assert aside == Path(f"{path}.removed-{cut}")
    assert aside.read_bytes() == data[cut:] and path.read_bytes() == data[:cut]
    assert repair(path, cut) is None
    with pytest.raises(LogError, match="outside"):
        repair(path, 3)


def test_unreadable_paths_are_log_errors(tmp_path):
    for path in (tmp_path / "missing.elog", tmp_path):
        with pytest.raises(LogError):
            LogReader(path)
    (tmp_path / "short.elog").write_bytes(b"\x89ESP")
    with pytest.raises(LogError, match="shorter"):
        LogReader(tmp_path / "short.elog")


# -- esper log check / repair ---------------------------------------------------------------------


def _run(*args):
    from esper.cli.main import cli  # imported here: a broken sibling command fails only the CLI tests

    return CliRunner().invoke(cli, list(args))


def test_cli_log_check(tmp_path):
    path = tmp_path / "events.elog"
    records = write_log(path, [[example(c.EpochTicked)] * 2] * 3)
    data = path.read_bytes()

    ok = _run("log", "check", str(tmp_path))
    assert ok.exit_code == 0 and "7 records, last seq 6: OK" in ok.stdout
    as_json = _run("log", "check", "--json", str(path))
    assert as_json.exit_code == 0 and '"tail":"clean"' in as_json.stdout

    end = batch_ends(data, records)[-2]
    path.write_bytes(data[: end + 10])
    torn = _run("log", "check", str(path))
    assert torn.exit_code == 0
    assert f"torn tail at offset {end} (10 bytes); readable through seq 4" in torn.stdout

    damaged = bytearray(data)
    damaged[end + 20] ^= 0xFF
    path.write_bytes(bytes(damaged))
    corrupt = _run("log", "check", str(path))
    assert corrupt.exit_code == 2
    assert f"corrupt at offset {end}" in corrupt.stderr and corrupt.stderr.count("\n") == 1

    fixed = _run("log", "repair", str(path), "--truncate-at", str(end))
    assert fixed.exit_code == 0 and _run("log", "check", str(path)).exit_code == 0

    with open(path, "ab") as f:
        f.write(future_event_frame(5))
    unknown = _run("log", "check", str(path))
    assert unknown.exit_code == 2 and "FutureEvent at seq 5" in unknown.stderr

    path.write_bytes(b"not a log at all")
    assert _run("log", "check", str(path)).exit_code == 2
    assert _run("log", "check", str(tmp_path / "nowhere")).exit_code == 2
