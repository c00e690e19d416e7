"""One log as an Arrow table of raw events (events spec §8): every record decoded and validated by
the log reader, its payload re-encoded as JSON for DuckDB's json functions.

Decoding is pure Python and is what loading costs, so several logs are read by worker processes,
one core each.
"""

import gc
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from itertools import repeat
from pathlib import Path

import msgspec
import pyarrow as pa

from esper.events.catalogue import EVENT_TYPES
from esper.events.codec import UnknownEventType, decode_event
from esper.events.log import LogError, LogReader, LogSummary, RecordStream

_CONSTANT = pa.dictionary(pa.int32(), pa.string())
SCHEMA = pa.schema([
    ("seq", pa.int64()), ("run_id", _CONSTANT), ("env", pa.int32()), ("episode", pa.int32()),
    ("ts", pa.int64()), ("schema", pa.int32()), ("batch_end", pa.bool_()), ("type", pa.string()),
    ("event", pa.large_string()), ("filename", _CONSTANT),
])
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


def log_tables(paths: list[Path], allow_unknown: bool = False) -> list[tuple[pa.Table, LogSummary]]:
    """`log_table` of every path, in order, on as many cores as there are."""
    workers = min(len(paths), os.cpu_count() or 1)
    if workers < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return [log_table(p, allow_unknown) for p in paths]
    # fork: a worker starts in milliseconds with esper loaded, and unlike spawn it never re-runs the
    # caller's __main__. Frozen, the parent's objects are out of the workers' garbage collections:
    # a DuckDB connection collected in a forked child kills it.
    gc.freeze()
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(_try_table, paths, repeat(allow_unknown)))
    finally:
        gc.unfreeze()
    # A failed log is read again here so that its own exception is raised: the log errors take
    # constructor arguments that do not survive the trip back from a worker.
    return [log_table(p, allow_unknown) if r is None else r for p, r in zip(paths, results)]


def _try_table(path: Path, allow_unknown: bool) -> tuple[pa.Table, LogSummary] | None:
    try:
        return log_table(path, allow_unknown)
    except (LogError, UnknownEventType):
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
    """The loop every record goes through, so it stays as lean as the reader's own."""
    seq, env, episode, ts, schema, batch_end, types = [], [], [], [], [], [], []
    data, ends = bytearray(), [0]
    encode_into, tags = _json.encode_into, _TAGS
    for r in stream:
        seq.append(r.seq)
        env.append(r.env)
        episode.append(r.episode)
        ts.append(r.ts)
        schema.append(r.schema)
        batch_end.append(r.batch_end)
        if raw:
            tag, encoded = _untyped(path, r.seq, r.event)
            types.append(tag)
            data += encoded
        else:
            types.append(tags[type(r.event)])
            encode_into(r.event, data, -1)  # appends, without a bytes object per record
        ends.append(len(data))
    summary, n = stream.summary, len(seq)
    columns = [
        pa.array(seq, pa.int64()), _constant(summary.run_id, n), pa.array(env, pa.int32()),
        pa.array(episode, pa.int32()), pa.array(ts, pa.int64()), pa.array(schema, pa.int32()),
        pa.array(batch_end, pa.bool_()), pa.array(types, pa.string()),
        pa.LargeStringArray.from_buffers(n, pa.array(ends, pa.int64()).buffers()[1], pa.py_buffer(data)),
        _constant(str(path), n),
    ]
    return pa.Table.from_arrays(columns, schema=SCHEMA), summary


def _constant(value: str | None, n: int) -> pa.DictionaryArray:
    """One value n times, stored once (DuckDB reads a dictionary column as VARCHAR)."""
    return pa.DictionaryArray.from_arrays(pa.repeat(pa.scalar(0, pa.int32()), n), pa.array([value], pa.string()))
