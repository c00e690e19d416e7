"""Child of the kill -9 harness: appends batches under fsync=always until killed, printing the
last seq of each batch once `append_batch` has returned (the batch is then acknowledged)."""

import sys
from pathlib import Path

from esper.events import catalogue as c
from esper.events.log import LogWriter
from event_factory import RUN_ID, example

path = Path(sys.argv[1])
writer = LogWriter.open_append(path, fsync="always") if path.exists() else LogWriter.create(path, fsync="always")
if writer.next_seq == 0:
    writer.append_batch(RUN_ID, None, None, [example(c.RunStarted)])
batch = [example(c.EpochCompleted), example(c.SeedMeasured), example(c.EpochTicked)]
while True:
    records = writer.append_batch(RUN_ID, 0, 0, batch[: 1 + writer.next_seq % 3])
    sys.stdout.write(f"{records[-1].seq}\n")
    sys.stdout.flush()
