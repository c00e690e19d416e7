"""`esper report` (runtime §7.4): one self-contained HTML file from logs or run directories."""

from pathlib import Path

import click

from esper.cli.errors import UserError
from esper.events.log import LogError, UnknownEventType


@click.command("report")
@click.argument("paths", metavar="LOGS...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("report.html"), show_default=True,
              help="The HTML file to write.")
def report(paths: tuple[Path, ...], out: Path) -> None:
    """Render curves, stage swimlanes, alpha, gate verdicts and decisions of LOGS to one HTML file."""
    from esper.lifecycle.errors import ReplayError
    from esper.replay.report import expand, write

    logs = expand(paths)
    if not logs:
        raise UserError(f"no event log under {', '.join(map(str, paths))} (pass logs or run directories)")
    missing = [p for p in logs if not p.is_file()]
    if missing:
        raise UserError(f"no event log at '{missing[0]}' (pass an events.elog or a run directory)")
    try:
        written = write(logs, out)
    except (LogError, UnknownEventType) as exc:
        raise UserError(f"{exc} (esper log check says more)") from None
    except ReplayError as exc:
        raise UserError(f"{exc} (esper replay LOG --verify finds the first violation)") from None
    except OSError as exc:
        raise UserError(f"cannot write '{out}': {exc.strerror or exc}") from None
    click.echo(f"report: {written} ({len(logs)} run{'s' if len(logs) != 1 else ''})")
