"""`esper log check` and `esper log repair` (events spec §5.3): inspecting and cutting a log."""

from pathlib import Path

import click
import msgspec

from esper.cli.errors import UserError
from esper.events.log import (
    LogCorruptError,
    LogError,
    LogHeaderError,
    LogReader,
    LogSummary,
    UnknownEventType,
    repair as repair_log,
    resolve,
)


@click.group("log")
def log() -> None:
    """Check or repair an event log."""


@log.command("check")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def check(path: Path, as_json: bool) -> None:
    """Scan PATH (a log, or a run directory) as a reader: count, last seq and tail."""
    log_path = resolve(path)
    try:
        summary = LogReader(log_path).scan()
    except (LogError, UnknownEventType) as exc:
        if as_json:
            click.echo(msgspec.json.encode(_error_json(log_path, exc)))
        raise UserError(f"{exc} ({_hint(log_path, exc)})") from None
    click.echo(msgspec.json.encode(summary) if as_json else _describe(summary))


@log.command("repair")
@click.argument("log_path", metavar="LOG", type=click.Path(path_type=Path))
@click.option("--truncate-at", "offset", type=int, required=True, help="Byte offset to cut the log at.")
def repair(log_path: Path, offset: int) -> None:
    """Cut LOG at OFFSET, saving the removed bytes beside it first."""
    log_path = resolve(log_path)
    try:
        aside = repair_log(log_path, offset)
    except LogError as exc:
        raise UserError(str(exc)) from None
    if aside is None:
        click.echo(f"{log_path}: nothing after offset {offset}; unchanged")
    else:
        click.echo(f"{log_path}: cut at offset {offset}; {aside.stat().st_size} bytes saved to {aside}")


def _describe(s: LogSummary) -> str:
    last = "none" if s.last_seq is None else s.last_seq
    head = f"{s.path}: {s.records} records, last seq {last}"
    if s.tail == "torn":
        return f"{head}: torn tail at offset {s.torn_offset} ({s.torn_bytes} bytes); readable through seq {last}"
    if s.tail == "live":
        return f"{head}: live (a writer holds the log); readable through seq {last}"
    return f"{head}: OK"


def _error_json(path: Path, exc: Exception) -> dict:
    return {
        "path": str(path),
        "error": type(exc).__name__,
        "message": str(exc),
        "offset": getattr(exc, "offset", None),
        "next_valid_offset": getattr(exc, "next_valid_offset", None),
        "last_good_seq": getattr(exc, "last_good_seq", None),
    }


def _hint(path: Path, exc: Exception) -> str:
    if isinstance(exc, LogCorruptError):
        return f"esper log repair {path} --truncate-at {exc.offset} cuts the damage off and saves it aside"
    if isinstance(exc, LogHeaderError):
        return "is this an esper events.elog?"
    if isinstance(exc, UnknownEventType):
        return "a newer esper wrote this log"
    return "check the path"
