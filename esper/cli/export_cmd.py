"""`esper export LOGS --parquet DIR` (events spec §8) and `esper export LOG --jsonl OUT` (§5.5)."""

from pathlib import Path

import click
import duckdb

from esper.cli.errors import UserError
from esper.cli.sql_cmd import open_logs
from esper.events.log import LogError, UnknownEventType, export_jsonl
from esper.replay.loader import expand
from esper.replay.sql import one_line
from esper.replay.views import VIEWS


@click.command("export")
@click.argument("logs")
@click.option("--parquet", "parquet_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write every view to DIR/<view>.parquet.")
@click.option("--jsonl", "jsonl_out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write one log's records to FILE, one JSON object per line.")
@click.option("--allow-unknown-events", is_flag=True,
              help="With --parquet: keep events of types this esper does not know, as type and raw JSON.")
def export(logs: str, parquet_dir: Path | None, jsonl_out: Path | None, allow_unknown_events: bool) -> None:
    """Export LOGS (a log, a run directory or a quoted glob) as Parquet views or JSON lines."""
    if (parquet_dir is None) == (jsonl_out is None):
        raise UserError("give exactly one of --parquet DIR or --jsonl FILE")
    if jsonl_out is not None:
        if allow_unknown_events:
            raise UserError("--allow-unknown-events applies to --parquet only; JSON lines hold known events")
        _jsonl(logs, jsonl_out)
    else:
        _parquet(logs, parquet_dir, allow_unknown_events)


def _jsonl(logs: str, out: Path) -> None:
    try:
        found = expand([logs])
        if len(found) != 1:
            raise UserError(f"--jsonl exports one log; '{logs}' holds {len(found)}")
        summary = export_jsonl(found[0], out)
    except (LogError, UnknownEventType, OSError) as exc:
        raise UserError(str(exc)) from None
    click.echo(f"{out}: {summary.records} records")


def _parquet(logs: str, directory: Path, allow_unknown_events: bool) -> None:
    # Files are written before anything else runs; no user SQL ever reaches this connection.
    con = open_logs(logs, allow_files=True, allow_unknown_events=allow_unknown_events)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for view in VIEWS:
            con.execute(f"COPY {view} TO ? (FORMAT parquet)", [str(directory / f"{view}.parquet")]).fetchall()
    except OSError as exc:
        raise UserError(f"cannot write to {directory}: {exc.strerror}") from None
    except duckdb.Error as exc:
        raise UserError(one_line(exc)) from None
    click.echo(f"{directory}: {len(VIEWS)} views written as Parquet")
