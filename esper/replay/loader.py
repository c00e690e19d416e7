"""`connect(paths)`: event logs as one DuckDB database of fixed views (events spec §8).

Logs are read into Arrow tables, each handed to DuckDB without a copy (a registered relation) and
appended to `raw_events` while the next logs are still being read; every view is fixed SQL text
over that table, so no path or user value is ever formatted into SQL.
"""

import glob
import sys
from collections.abc import Iterable
from pathlib import Path

import duckdb
import msgspec
import pyarrow as pa

from esper.events.enums import Gate, Stage
from esper.events.log import LOG_NAME, LogError, LogSummary
from esper.replay.log_table import log_tables
from esper.replay.views import VIEWS


# The columns of events spec §8, pinned; log_table.SCHEMA lists the same ones in this order.
RAW_EVENTS = (
    "CREATE TABLE raw_events (seq BIGINT, run_id VARCHAR, env INTEGER, episode INTEGER, ts BIGINT, "
    "schema INTEGER, batch_end BOOLEAN, type VARCHAR, event JSON, filename VARCHAR)"
)

# Logs are appended in groups of about one DuckDB row group: an insert per small log costs half again.
ROW_GROUP = 122_880


def expand(paths: Iterable[str | Path]) -> list[Path]:
    """Files, run directories (every `*.elog` below them) and globs, as a sorted list without
    repeats. A path that matches nothing is an error, never silently an empty database."""
    found: set[Path] = set()
    for item in paths:
        text = str(item)
        matches = sorted(glob.glob(text, recursive=True)) if glob.has_magic(text) else [text]
        before = len(found)
        for match in map(Path, matches):
            if match.is_dir():
                found.update(p for p in match.rglob("*.elog") if p.is_file())
            elif match.exists():
                found.add(match)
        if len(found) == before:
            raise LogError(f"no event log found at '{text}' (give a {LOG_NAME}, a run directory or a quoted glob)")
    return sorted(found)


def connect(paths: Iterable[str | Path], *, allow_files: bool = False,
            allow_unknown_events: bool = False) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection holding every log of `paths` and the views over them.
    Unless `allow_files`, the connection can no longer read or write files once loaded."""
    logs = expand(paths)
    con = duckdb.connect()
    summaries = _load_raw_events(con, logs, allow_unknown_events)
    _check_run_ids(summaries)
    for summary in summaries:
        _warn_tail(summary)
    con.register("arrow_logs", _logs_table(summaries))
    con.execute("CREATE TABLE logs AS SELECT * FROM arrow_logs").fetchall()
    con.unregister("arrow_logs")
    for name, enum in (("stages", Stage), ("gates", Gate)):
        con.execute(f"CREATE TABLE {name} (id INTEGER PRIMARY KEY, name VARCHAR NOT NULL)").fetchall()
        for member in enum:
            con.execute(f"INSERT INTO {name} VALUES (?, ?)", [member.value, member.name]).fetchall()
    for name, sql in VIEWS.items():
        con.execute(f"CREATE VIEW {name} AS {sql}").fetchall()
    if not allow_files:
        con.execute("SET enable_external_access = false").fetchall()
    return con


def _load_raw_events(con: duckdb.DuckDBPyConnection, logs: list[Path], allow_unknown: bool) -> list[LogSummary]:
    """Every log into `raw_events`, appended a group at a time while the workers read the next."""
    con.execute(RAW_EVENTS).fetchall()
    # While logs load, the workers that read them hold the cores; a single insert thread then
    # spends about half the CPU time of two on the same rows.
    con.execute("SET threads = 1").fetchall()
    summaries, pending = [], []
    for table, summary in log_tables(logs, allow_unknown):
        summaries.append(summary)
        pending.append(table)
        if sum(t.num_rows for t in pending) >= ROW_GROUP:
            _append(con, pending)
            pending = []
    _append(con, pending)
    con.execute("RESET threads").fetchall()
    return summaries


def _append(con: duckdb.DuckDBPyConnection, tables: list[pa.Table]) -> None:
    if tables:
        con.register("arrow_events", pa.concat_tables(tables))
        con.execute("INSERT INTO raw_events SELECT * FROM arrow_events").fetchall()
        con.unregister("arrow_events")


def _check_run_ids(summaries: list[LogSummary]) -> None:
    """Views are keyed by run_id: two copies of one run would silently count twice."""
    seen: dict[str, str] = {}
    for s in summaries:
        if s.run_id is not None and s.run_id in seen:
            raise LogError(f"{seen[s.run_id]} and {s.path} hold the same run '{s.run_id}'; load one of them")
        if s.run_id is not None:
            seen[s.run_id] = s.path


def _warn_tail(s: LogSummary) -> None:
    through = "no records" if s.last_seq is None else f"through seq {s.last_seq}"
    if s.tail == "torn":
        print(f"esper: warning: {s.path} has a torn tail at offset {s.torn_offset} ({s.torn_bytes} bytes); "
              f"loaded {through}", file=sys.stderr)
    elif s.tail == "live":
        print(f"esper: warning: {s.path} is being written; loaded {through}", file=sys.stderr)


_LOGS = pa.schema([
    ("run_id", pa.string()), ("filename", pa.string()), ("records", pa.int64()), ("last_seq", pa.int64()),
    ("tail", pa.string()), ("torn_offset", pa.int64()), ("torn_bytes", pa.int64()),
])


def _logs_table(summaries: list[LogSummary]) -> pa.Table:
    rows = [{**msgspec.structs.asdict(s), "filename": s.path} for s in summaries]
    return pa.Table.from_pylist(rows, schema=_LOGS)
