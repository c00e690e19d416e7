"""`esper fork` (events §7): a new run from a quiescent point of a log, under another policy."""

from pathlib import Path

import attrs
import click
import msgspec

from esper.cli.errors import EXIT_CHECK_FAILED, RunFailed, UserError
from esper.events.log import LogError, UnknownEventType


@click.command("fork")
@click.argument("path", metavar="LOG|RUN_DIR", type=click.Path(path_type=Path))
@click.option("--at", "seq", type=click.IntRange(min=0), help="The quiescent seq to fork at.")
@click.option("--policy", help="The new run's policy: none, random or heuristic.")
@click.option("--out", type=click.Path(path_type=Path), help="The new run directory (default: <run dir>.f<k>).")
@click.option("--list", "list_points", is_flag=True, help="List the quiescent points of the log.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def fork(ctx: click.Context, path: Path, seq: int | None, policy: str | None, out: Path | None, list_points: bool,
         as_json: bool) -> None:
    """Reproduce LOG up to a quiescent seq (with its own decisions), then continue under --policy."""
    from esper.replay import fork as forking
    from esper.replay.timetravel import load

    if list_points:
        if seq is not None or policy is not None or out is not None:
            raise UserError("--list takes no --at, --policy or --out")
        try:
            loaded = load(path)
            points = forking.quiescent_points(loaded.records, loaded.path.parent)
        except (LogError, UnknownEventType) as exc:
            raise UserError(f"{exc} (esper log check {path} says more)") from None
        if as_json:
            click.echo(msgspec.json.encode([attrs.asdict(p) for p in points]))
            return
        click.echo(f"{'seq':>6} {'after':<18} {'env':>3} {'ep':>3} {'epoch':>5} {'checkpoint':>10}")
        for p in points:
            click.echo(f"{p.seq:>6} {p.type:<18} {_dash(p.env):>3} {_dash(p.episode):>3} {_dash(p.epoch):>5} "
                       f"{_dash(p.checkpoint_seq):>10}")
        return
    if seq is None or policy is None:
        raise UserError("esper fork needs --at SEQ and --policy P (or --list)")
    from esper.compute.engine import GovernorExhausted
    try:
        outcome = forking.fork(path, seq, policy, out)
    except (LogError, UnknownEventType) as exc:
        raise UserError(f"{exc} (esper log check {path} says more)") from None
    except forking.ForkRefused as exc:
        raise UserError(str(exc)) from None
    except GovernorExhausted as exc:  # the new policy's continuation failed, as `esper run` would
        raise RunFailed(f"{exc} (the fork's log ends with RunFinished(failed))") from None
    except forking.ForkDiverged as exc:
        if as_json:
            click.echo(msgspec.json.encode({"ok": False, "divergence": exc.divergence.to_json()}))
        else:
            click.echo(exc.divergence.describe())
        click.echo(f"esper: error: the fork's prefix differs from the parent's (the partial fork is in "
                   f"{exc.run_dir})", err=True)
        ctx.exit(EXIT_CHECK_FAILED)
        return
    if as_json:
        click.echo(msgspec.json.encode({"ok": True, **outcome.to_json()}))
        return
    source = (f"from the checkpoint at seq {outcome.checkpoint_seq}" if outcome.checkpoint_seq is not None
              else "from the start")
    click.echo(f"forked {outcome.parent_run_id} at seq {outcome.seq} {source}: {outcome.reproduced} records "
               f"re-executed and checked, {outcome.copied} copied")
    click.echo(f"{outcome.status}: {outcome.epochs} epochs under policy {outcome.policy}; {outcome.records} records")
    click.echo(f"run directory: {outcome.run_dir}")


def _dash(value) -> str:
    return "-" if value is None else str(value)
