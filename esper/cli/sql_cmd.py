"""`esper sql LOGS [QUERY]` (events spec §8): read-only SQL over one or many logs, or a prompt."""

import sys
from pathlib import Path

import click

from esper.cli.errors import UserError
from esper.events.log import LogError, UnknownEventType
from esper.replay.loader import connect
from esper.replay.sql import FORMATS, VIEWS_QUERY, QueryError, Result, execute, render, run


def open_logs(logs: str, **options):
    """`loader.connect` for a command line: a log that cannot be read is a one-line user error."""
    try:
        return connect([logs], **options)
    except (LogError, UnknownEventType) as exc:
        raise UserError(str(exc)) from None


@click.command("sql")
@click.argument("logs")
@click.argument("query", required=False)
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
              help="How results are printed.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write results to FILE.")
@click.option("--views", "list_views", is_flag=True, help="List the views and their columns.")
@click.option("--allow-files", is_flag=True, help="Let queries read and write files (trusted use only).")
@click.option("--allow-unknown-events", is_flag=True,
              help="Keep events of types this esper does not know, as their type and raw JSON.")
def sql(logs: str, query: str | None, fmt: str, out: Path | None, list_views: bool, allow_files: bool,
        allow_unknown_events: bool) -> None:
    """Query LOGS (a log, a run directory or a quoted glob) with SQL; without QUERY, a prompt.

    Only reading statements run. `esper sql runs/x --views` lists what there is to query.
    """
    con = open_logs(logs, allow_files=allow_files, allow_unknown_events=allow_unknown_events)
    with click.open_file(str(out) if out else "-", "w") as stream:
        try:
            if list_views:
                _print(stream, [execute(con, VIEWS_QUERY)], fmt)
            elif query is not None:
                _print(stream, run(con, query), fmt)
            else:
                _prompt(con, stream, fmt)
        except QueryError as exc:
            raise UserError(str(exc)) from None


def _print(stream, results: list[Result], fmt: str) -> None:
    for result in results:
        click.echo(render(result, fmt), file=stream)


def _prompt(con, stream, fmt: str) -> None:
    """Lines are gathered until one ends with `;`, then run; an error is one line and the prompt
    goes on. `.quit`, `.exit` or end of input leaves."""
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())

        click.echo("esper sql: statements end with ';'; .quit leaves", err=True)
    pending: list[str] = []
    while True:
        try:
            line = input(("   ...> " if pending else "esper> ") if interactive else "")
        except EOFError:
            break
        if not pending and line.strip() in (".quit", ".exit"):
            return
        pending.append(line)
        if line.rstrip().endswith(";"):
            _run_one(con, stream, "\n".join(pending), fmt)
            pending = []
    if "".join(pending).strip():
        _run_one(con, stream, "\n".join(pending), fmt)


def _run_one(con, stream, text: str, fmt: str) -> None:
    try:
        _print(stream, run(con, text), fmt)
    except QueryError as exc:
        click.echo(f"esper: error: {exc}", err=True)
