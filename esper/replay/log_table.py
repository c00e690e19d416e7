"""One log as an Arrow table of raw events (events spec §8): every record decoded and validated by
the log reader, its payload re-encoded as JSON for DuckDB's json functions.

Decoding is pure Python and is what loading costs, so several logs are read by worker processes,
one core each. A worker writes each table as an Arrow file in a private temporary directory and
the caller maps it: sent back through a pipe instead, the tables cost a third more time.
"""

import gc
import multiprocessing
import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from itertools import repeat
from pathlib import Path

import msgspec
import pyarrow as pa

from esper.events.catalogue import EVENT_TYPES
from esper.events.codec import UnknownEventType, decode_event
from esper.events.log import LogError, LogReader, LogSummary, RecordStream

_CONSTANT = pa.dictionary(pa.int32(), pa.string())
# Arrow's JSON type reaches DuckDB as JSON without the parse a cast from text would cost; the text
# is msgspec's own encoding, valid by construction.
JSON = pa.json_(pa.large_string())
SCHEMA = pa.schema([
    ("seq", pa.int64()), ("run_id", _CONSTANT), ("env", pa.int32()), ("episode", pa.int32()),
    ("ts", pa.int64()), ("schema", pa.int32()), ("batch_end", pa.bool_()), ("type", pa.string()),
    ("event", JSON), ("filename", _CONSTANT),
])
_PER_RECORD = [f for f in SCHEMA if f.name not in ("run_id", "filename")]  # the run-wide two are added whole
CHUNK = 8192  # records held as Python objects at a time, so memory stays bounded on any log
_TAGS = {cls: cls.__struct_config__.tag for cls in EVENT_TYPES}
_json = msgspec.json.Encoder()


def log_table(path: Path, allow_unknown: bool = False) -> tuple[pa.Table, LogSummary]:
    """The complete batches of the log at `path`. A torn tail ends the table where the reader stops
    (the summary says so); corruption raises. An event type this esper does not know raises
    `UnknownEventType`, unless `allow_unknown` keeps it as its tag and raw JSON."""
    try:
        return _table(path, LogReader(path).records(), raw=False)
    except UnknownEventType:
        if not allow_unknown:
            raise
    return _table(path, RecordStream(path, payloads=False), raw=True)


def log_tables(paths: list[Path], allow_unknown: bool = False) -> Iterator[tuple[pa.Table, LogSummary]]:
    """`log_table` of every path, in order, on as many cores as there are; each is yielded as soon
    as it and those before it are done, so the caller's work overlaps the workers'."""
    workers = min(len(paths), os.cpu_count() or 1)
    if workers < 2 or "fork" not in multiprocessing.get_all_start_methods():
        yield from (log_table(p, allow_unknown) for p in paths)
        return
    # fork: a worker starts in milliseconds with esper loaded, and unlike spawn it never re-runs the
    # caller's __main__. Frozen, the parent's objects are out of the workers' garbage collections
    # until a worker turns its collector off: a DuckDB connection collected in a forked child kills it.
    with tempfile.TemporaryDirectory(prefix="esper-load-") as directory:
        files = [Path(directory) / f"{i}.arrow" for i in range(len(paths))]
        gc.freeze()
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=gc.disable)
        try:
            results = pool.map(_try_table, paths, files, repeat(allow_unknown))  # forks every worker now
            gc.unfreeze()
            # A failed log is read again here so that its own exception is raised: the log errors
            # take constructor arguments that do not survive the trip back from a worker.
            for path, file, summary in zip(paths, files, results):
                if summary is None:
                    yield log_table(path, allow_unknown)
                    continue
                table = pa.ipc.open_file(pa.memory_map(str(file))).read_all()  # mapped, not copied
                file.unlink()  # the mapping outlives the name; the space goes once the table does
                yield table, summary
        finally:
            gc.unfreeze()
            # Before the directory goes: after an error, the logs not yet read are not wanted.
            pool.shutdown(cancel_futures=True)


def _try_table(path: Path, file: Path, allow_unknown: bool) -> LogSummary | None:
    """In a worker: the log's table written to `file`, and its summary; None if either failed
    (a full temporary disk included), so that the caller reads that log itself."""
    try:
        table, summary = log_table(path, allow_unknown)
        with pa.OSFile(str(file), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        return summary
    except (LogError, UnknownEventType, OSError):
        return None


def _untyped(path: Path, seq: int, raw: msgspec.Raw) -> tuple[str, bytes]:
    """A payload read with its envelope only: decoded (so validated) when its type is known, kept
    as plain data when it is not."""
    try:
        event = decode_event(raw)
    except msgspec.ValidationError as exc:
        data = msgspec.msgpack.decode(raw)
        if not isinstance(data, dict) or data.get("type") in _TAGS.values():
            raise LogError(f"{path}: the payload of seq {seq} does not decode ({exc})") from None
        return str(data.get("type")), _json.encode(data)
    return _TAGS[type(event)], _json.encode(event)


def _table(path: Path, stream: RecordStream, raw: bool) -> tuple[pa.Table, LogSummary]:
    chunks, pending = [], []
    for batch in stream.batches():
        pending += batch
        if len(pending) >= CHUNK:
            chunks.append(_columns(path, pending, raw))
            pending = []
    if pending or not chunks:
        chunks.append(_columns(path, pending, raw))
    summary, n = stream.summary, sum(len(chunk[0]) for chunk in chunks)
    columns = [pa.chunked_array(arrays, field.type) for arrays, field in zip(zip(*chunks), _PER_RECORD)]
    columns.insert(1, _constant(summary.run_id, n))
    columns.append(_constant(str(path), n))
    return pa.Table.from_arrays(columns, schema=SCHEMA), summary


def _columns(path: Path, records: list, raw: bool) -> list[pa.Array]:
    """The per-record columns of some records: whole-list comprehensions, and every payload
    appended to one JSON buffer."""
    data, ends = bytearray(), [0]
    if raw:
        types = []
        for r in records:
            tag, encoded = _untyped(path, r.seq, r.event)
            types.append(tag)
            data += encoded
            ends.append(len(data))
    else:
        encode_into, tags = _json.encode_into, _TAGS
        types = [tags[type(r.event)] for r in records]
        for r in records:
            encode_into(r.event, data, -1)  # appends, without a bytes object per record
            ends.append(len(data))
    events = pa.LargeStringArray.from_buffers(len(records), pa.array(ends, pa.int64()).buffers()[1],
                                              pa.py_buffer(data))
    return [
        pa.array([r.seq for r in records], pa.int64()), pa.array([r.env for r in records], pa.int32()),
        pa.array([r.episode for r in records], pa.int32()), pa.array([r.ts for r in records], pa.int64()),
        pa.array([r.schema for r in records], pa.int32()), pa.array([r.batch_end for r in records], pa.bool_()),
        pa.array(types, pa.string()), pa.ExtensionArray.from_storage(JSON, events),
    ]


def _constant(value: str | None, n: int) -> pa.DictionaryArray:
    """One value n times, stored once (DuckDB reads a dictionary column as VARCHAR)."""
    return pa.DictionaryArray.from_arrays(pa.repeat(pa.scalar(0, pa.int32()), n), pa.array([value], pa.string()))
