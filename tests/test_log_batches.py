"""`RecordStream.batches()`: the records iteration yields, one complete batch per list, from any
start seq; iterating a stream is these batches chained."""

import pytest

from esper.events import catalogue as c
from esper.events.log import LogReader
from event_factory import example
from log_helpers import write_log


@pytest.mark.parametrize("start", [0, 1, 3, 4, 7, 9])
def test_batches_are_the_records_grouped_by_batch_end(tmp_path, start):
    path = tmp_path / "events.elog"
    sizes = [1, 3, 2, 1, 3]
    written = write_log(path, [[example(c.EpochCompleted)] * n for n in sizes])
    batches = list(LogReader(path).records(start).batches())
    assert all(batch and batch[-1].batch_end and not any(r.batch_end for r in batch[:-1]) for batch in batches)
    assert [r for batch in batches for r in batch] == [r for r in written if r.seq >= start]
    assert list(LogReader(path).records(start)) == [r for r in written if r.seq >= start]
