"""Damaged logs (events spec §5.3, §11): truncation, byte flips, garbage and unknown event types.

The rule under test: damage is either a torn tail (cut back to the last complete batch) or an
error naming its offset; never a silently different sequence of records.
"""

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from esper.events import catalogue as c
from esper.events.codec import UnknownEventType
from esper.events.log import LogCorruptError, LogError, LogHeaderError, LogReader, LogWriter
from esper.events.log_format import header_bytes
from event_factory import RUN_ID, example
from log_helpers import ENV_EVENTS, batch_ends, encoded, frame, frames, future_event_frame, write_log

BATCHES = st.lists(st.lists(st.sampled_from(ENV_EVENTS), min_size=1, max_size=5), min_size=1, max_size=6)
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _log(directory: str, batches) -> tuple[Path, bytes, list]:
    path = Path(directory) / "events.elog"
    records = write_log(path, batches)
    return path, path.read_bytes(), records


def _complete_before(data: bytes, records: list, cut: int) -> list:
    """The records of every batch that ends at or before `cut`."""
    complete = 0
    for (_, end), record in zip(frames(data), records):
        if end > cut:
            break
        if record.batch_end:
            complete = record.seq + 1
    return records[:complete]


def test_truncation_at_every_offset_of_the_last_batch_is_recovered(tmp_path):
    path, data, records = _log(tmp_path, [[example(c.EpochTicked)] * 2, ENV_EVENTS[:5]])
    last_start = batch_ends(data, records)[-2]
    for cut in range(last_start, len(data) + 1):
        path.write_bytes(data[:cut])
        expected = _complete_before(data, records, cut)
        stream = LogReader(path).records()
        assert encoded(stream) == encoded(expected), cut
        tail = "clean" if cut in (last_start, len(data)) else "torn"
        assert (stream.summary.tail, stream.summary.records) == (tail, len(expected)), cut

        with LogWriter.open_append(path, fsync="never") as writer:
            assert writer.next_seq == len(expected), cut
        assert path.read_bytes() == data[: last_start if tail == "torn" else cut], cut
        if tail == "torn":
            aside = Path(f"{path}.torn-{last_start}")
            assert aside.read_bytes() == data[last_start:cut], cut
            aside.unlink()


@SETTINGS
@given(batches=BATCHES, where=st.floats(0, 1))
def test_open_append_after_truncation_recovers_saves_aside_and_continues(batches, where):
    with tempfile.TemporaryDirectory() as d:
        path, data, records = _log(d, batches)
        cut = 16 + round(where * (len(data) - 16))
        path.write_bytes(data[:cut])
        kept = _complete_before(data, records, cut)
        end = max([16] + [e for e in batch_ends(data, records) if e <= cut])
        with LogWriter.open_append(path) as writer:
            assert writer.next_seq == len(kept)
            more = writer.append_batch(RUN_ID, 0, 0, [example(c.EpochTicked if kept else c.RunStarted)])
        assert encoded(LogReader(path).records()) == encoded(kept + more)
        aside = Path(f"{path}.torn-{end}")
        assert aside.exists() == (cut > end)
        if cut > end:
            assert aside.read_bytes() == data[end:cut]


def _damage(data: bytes, at: int, zero: bool, mask: int) -> bytes:
    damaged = bytearray(data)
    if zero:
        damaged[at : at + 4] = bytes(4)
    else:
        damaged[at] ^= mask
    return bytes(damaged)


@SETTINGS
@given(batches=BATCHES, which=st.floats(0, 1), inside=st.floats(0, 1), zero=st.booleans(), mask=st.integers(1, 255))
def test_damage_is_an_error_at_its_offset_or_a_torn_tail(batches, which, inside, zero, mask):
    with tempfile.TemporaryDirectory() as d:
        path, data, records = _log(d, batches)
        spans = frames(data)
        index = round(which * (len(spans) - 1))
        start, end = spans[index]
        at = start + round(inside * (end - start - (4 if zero else 1)))
        damaged = _damage(data, at, zero, mask)
        assume(damaged != data)
        path.write_bytes(damaged)
        if index < len(spans) - 1:
            with pytest.raises(LogCorruptError) as info:
                list(LogReader(path).records())
            assert info.value.offset == start
            assert info.value.last_good_seq == (index - 1 if index else None)
            assert info.value.next_valid_offset == spans[index + 1][0]
            with pytest.raises(LogCorruptError):
                LogWriter.open_append(path)
            assert path.read_bytes() == damaged
        else:
            kept = _complete_before(data, records, start)
            stream = LogReader(path).records()
            assert encoded(stream) == encoded(kept)
            assert stream.summary.tail == "torn"
            with LogWriter.open_append(path) as writer:
                assert writer.next_seq == len(kept)


@settings(max_examples=30, deadline=None)
@given(at=st.integers(0, 15), zero=st.booleans(), mask=st.integers(1, 255))
def test_header_damage_is_a_header_error(at, zero, mask):
    data = header_bytes()
    damaged = _damage(data, min(at, 12) if zero else at, zero, mask)
    assume(damaged != data)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "events.elog"
        path.write_bytes(damaged)
        with pytest.raises(LogHeaderError):
            LogReader(path)
        with pytest.raises(LogHeaderError):
            LogWriter.open_append(path)


GARBAGE = st.one_of(
    st.binary(max_size=600),
    st.lists(st.binary(min_size=1, max_size=60).map(frame), max_size=5).map(b"".join),
)


@settings(max_examples=150, deadline=None)
@given(prefix=st.sampled_from(["none", "header", "log"]), garbage=GARBAGE)
def test_random_bytes_only_raise_log_errors(prefix, garbage):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "events.elog"
        head = {"none": b"", "header": header_bytes()}.get(prefix)
        if head is None:
            write_log(path, [ENV_EVENTS[:2]])
            head = path.read_bytes()
        path.write_bytes(head + garbage)
        try:
            summary = LogReader(path).scan()
        except (LogError, UnknownEventType):
            return
        assert summary.tail in ("clean", "torn")
        LogWriter.open_append(path, fsync="never").close()


def test_unknown_event_type_names_seq_and_offset(tmp_path):
    path = tmp_path / "events.elog"
    write_log(path, [])
    offset = path.stat().st_size
    with open(path, "ab") as f:
        f.write(future_event_frame(1))
    with pytest.raises(UnknownEventType) as info:
        LogReader(path).scan()
    assert (info.value.seq, info.value.offset, info.value.type) == (1, offset, "FutureEvent")
    assert "FutureEvent at seq 1 (offset" in str(info.value) and "upgrade esper" in str(info.value)
    assert [r.seq for r in LogReader(path).records(2)] == []  # skipped payloads are not decoded


def test_search_for_the_next_valid_frame_crosses_read_windows(tmp_path):
    path, data, records = _log(tmp_path, [[example(c.EpochCompleted)] * 5] * 1500)  # about 3.5 MiB
    spans = frames(data)
    first = next(i for i, (start, _) in enumerate(spans) if start > 100_000)
    after = next(i for i, (start, _) in enumerate(spans) if start > spans[first][0] + (3 << 19))
    zeroed = data[: spans[first][0]] + bytes(spans[after][0] - spans[first][0]) + data[spans[after][0] :]
    path.write_bytes(zeroed)
    with pytest.raises(LogCorruptError) as info:
        LogReader(path).scan()
    assert (info.value.offset, info.value.next_valid_offset) == (spans[first][0], spans[after][0])

    path.write_bytes(zeroed[: spans[after][0]])  # the same zeros as a tail: torn, not corrupt
    summary = LogReader(path).scan()
    assert summary.tail == "torn" and summary.records == len(_complete_before(data, records, spans[first][0]))
