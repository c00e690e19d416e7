"""Log throughput, measured side by side in one run on the same records (events spec §11).

(a) the raw limit: a bare loop that msgpack-encodes and frames the records into memory;
(b) esper's LogWriter, fsync="epoch", committing every EPOCH batches;
(c) esper's replay: read, CRC, decode and fold into the decider state and projections;
(d) the `eventsourcing` library's SQLite aggregate recorder, one transaction per batch.

Target: b/a >= 0.5. Run: `make bench` or `.venv/bin/python benchmarks/log_throughput.py [N]`.
"""

import os
import random
import sqlite3
import struct
import sys
import tempfile
import time
import uuid
import zlib
from pathlib import Path

import msgspec

from esper.events import Gate, Record, SCHEMA_VERSION, Stage
from esper.events import catalogue as c
from esper.events.log import LogReader, LogWriter

N = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
BATCH = 5
EPOCH = 10  # batches per commit
REPEATS = 3  # the fast measurements keep their best run
RUN_ID = "bench-run"


def run_started() -> c.RunStarted:
    return c.RunStarted(
        config={"task": "digits"}, seed=0, esper_version="0.1.0", torch_version=None, python_version="3.11",
        msgspec_version=msgspec.__version__, platform="linux", device="cpu", deterministic=True,
        num_threads=2, task="digits", topology="cnn",
        host=c.HostInfo(preset="cnn-digits", param_count=422, input_shape=(1, 8, 8), classes=10),
        slots=(), catalogue=(), n_envs=1, world_size=1, score_kind="accuracy", config_hash="0" * 64,
        data_digest=None, log_format=1, started_at="2026-01-01T00:00:00Z", hostname="bench", pid=1,
    )


def step_batch(rng: random.Random, epoch: int) -> list[c.Event]:
    """One env step's worth of typical events, with values that vary like real measurements."""
    seed = {"epoch": epoch, "slot": "mid", "seed_id": f"env0-mid-{epoch // 30}"}
    acc = rng.uniform(10, 99)
    return [
        c.EpochCompleted(
            epoch=epoch, train_loss=rng.random(), train_acc=acc, val_loss=rng.random(), val_acc=acc - 1,
            n_train=1257, n_val=270, total_params=438, lr=0.01, forward_passes=3, non_finite=False,
            rolled_back=False, train_time_s=rng.random(), val_time_s=rng.random(),
            counterfactual_time_s=rng.random(), samples_per_s=rng.uniform(1e3, 1e4), wall_time_s=rng.random(),
        ),
        c.SeedMeasured(
            **seed, stage=Stage.TRAINING, grad_ratio=rng.random(), grad_ratio_ema=rng.random(),
            seed_grad_norm=rng.random(), host_grad_norm=rng.random(), isolation_leaks=0, finite=True,
            vanishing=False, exploding=False,
        ),
        c.GateEvaluated(
            **seed, blueprint="norm", gate=Gate.G2, target_stage=Stage.BLENDING, passed=rng.random() < 0.5,
            score=rng.random(),
            checks=(c.Check(tag="grad_ratio", passed=True, value=rng.random(), threshold=0.05, comparator=">="),),
            message="", trigger="tick",
        ),
        c.StageChanged(
            **seed, from_stage=Stage.TRAINING, to_stage=Stage.BLENDING, reason="auto", trigger="tick",
            epochs_in_previous_stage=rng.randrange(10),
        ),
        c.EpochTicked(epoch=epoch, state_digest=rng.randbytes(32).hex()),
    ]


def build(n: int) -> list[list[c.Event]]:
    rng = random.Random(0)
    return [step_batch(rng, i)[:BATCH] for i in range(n // BATCH)]


def as_records(batches: list[list[c.Event]]) -> list[Record]:
    """The records the writer would stamp, so (a) encodes exactly what (b) writes."""
    ts = time.time_ns() // 1000
    records, seq = [], 1
    for batch in batches:
        for i, event in enumerate(batch):
            records.append(Record(seq=seq, run_id=RUN_ID, env=0, episode=0, ts=ts, schema=SCHEMA_VERSION,
                                  batch_end=i == len(batch) - 1, event=event))
            seq += 1
    return records


def raw_rate(records: list[Record]) -> float:
    encode, head, crc32 = msgspec.msgpack.Encoder().encode, struct.Struct("<II").pack, zlib.crc32
    start = time.perf_counter()
    buf = bytearray()
    for record in records:
        payload = encode(record)
        buf += head(len(payload), crc32(payload))
        buf += payload
    return len(records) / (time.perf_counter() - start)


def append_rate(path: Path, batches: list[list[c.Event]], fsync: str = "epoch") -> float:
    path.unlink(missing_ok=True)
    writer = LogWriter.create(path, fsync=fsync)
    writer.append_batch(RUN_ID, None, None, [run_started()])
    append, commit = writer.append_batch, writer.commit
    start = time.perf_counter()
    for i, batch in enumerate(batches, 1):
        append(RUN_ID, 0, 0, batch)
        if i % EPOCH == 0:
            commit()
    writer.close()
    return sum(map(len, batches)) / (time.perf_counter() - start)


def fsync_latency(directory: Path, appends: int = 200) -> float:
    """Seconds per small append + fsync on this disk: what each commit under `epoch` costs."""
    fd = os.open(directory / "fsync.probe", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    start = time.perf_counter()
    for _ in range(appends):
        os.write(fd, bytes(4096))
        os.fsync(fd)
    os.close(fd)
    return (time.perf_counter() - start) / appends


def replay_rates(directory: Path) -> tuple[float, float]:
    """Esper's replay: read, CRC, decode and fold into the decider state and projections, on a valid
    lifecycle stream of the same size (the timing records above are not one); and, to show where
    its time goes, the same logs only read and decoded. Best of REPEATS each."""
    from synthetic_log import write_logs

    from esper.lifecycle.fold import fold

    paths = write_logs(directory / "replay", N)

    def rate(count_records) -> float:
        start = time.perf_counter()
        count = sum(count_records(p) for p in paths)
        return count / (time.perf_counter() - start)

    replay = max(rate(lambda p: fold(LogReader(p).records()).records) for _ in range(REPEATS))
    decode = max(rate(lambda p: sum(1 for _ in LogReader(p).records())) for _ in range(REPEATS))
    return replay, decode


def eventsourcing_rate(directory: Path, records: list[Record], batch_sizes: list[int]) -> float:
    from eventsourcing.persistence import StoredEvent
    from eventsourcing.sqlite import SQLiteAggregateRecorder, SQLiteDatastore

    datastore = SQLiteDatastore(db_name=str(directory / "events.sqlite"))
    recorder = SQLiteAggregateRecorder(datastore)
    recorder.create_table()
    encode, run = msgspec.msgpack.Encoder().encode, uuid.uuid4()
    start = time.perf_counter()
    at = 0
    for size in batch_sizes:
        recorder.insert_events([
            StoredEvent(originator_id=run, originator_version=r.seq, topic=type(r.event).__name__, state=encode(r))
            for r in records[at : at + size]
        ])
        at += size
    rate = len(records) / (time.perf_counter() - start)
    datastore.close()
    return rate


def main() -> None:
    batches = build(N)
    records = as_records(batches)
    with tempfile.TemporaryDirectory() as d:
        directory = Path(d)
        log = directory / "events.elog"
        raw = max(raw_rate(records) for _ in range(REPEATS))
        append = max(append_rate(log, batches) for _ in range(REPEATS))
        unsynced = max(append_rate(log, batches, fsync="never") for _ in range(REPEATS))
        latency = fsync_latency(directory)
        replay, decode = replay_rates(directory)
        es = eventsourcing_rate(directory, records, [len(b) for b in batches])
    print(f"{len(records)} records in batches of {BATCH}, commit every {EPOCH} batches; "
          f"python {sys.version.split()[0]}, msgspec {msgspec.__version__}, sqlite {sqlite3.sqlite_version}")
    print(f"(a) raw encode + frame in memory      {raw:12,.0f} events/s")
    print(f"(b) esper LogWriter, fsync=epoch      {append:12,.0f} events/s")
    print(f"    the same with fsync=never         {unsynced:12,.0f} events/s  (b'/a = {unsynced / raw:.2f}; "
          f"one fsync here takes {latency * 1e6:.0f} us, {len(records) // len(batches) * EPOCH} events per commit)")
    print(f"(c) esper replay (read, CRC, decode, fold into state and projections) {replay:12,.0f} events/s")
    print(f"    of which read, CRC and decode alone run at {decode:12,.0f} events/s, so the fold takes "
          f"{1 - replay / decode:.0%} of replay's time")
    print(f"(d) eventsourcing SQLite recorder     {es:12,.0f} events/s  (WAL, a transaction per batch)")
    print(f"b/a = {append / raw:.2f} (target >= 0.5)   b/d = {append / es:.1f}")
    print(f"RESULT append_vs_raw={append / raw:.3f} append_vs_eventsourcing={append / es:.2f} "
          f"replay_events_per_s={replay:.0f}")


if __name__ == "__main__":
    main()
