"""`esper replay` (events §7): fold a log and show it, travel in time, verify, rerun."""

from pathlib import Path
from typing import Any

import click
import msgspec

from esper.cli.errors import EXIT_CHECK_FAILED, UserError
from esper.events.log import LogError, UnknownEventType
from esper.lifecycle.errors import ReplayError
from esper.replay import timetravel


def _json(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def _warn(message: str) -> None:
    click.echo(f"esper: warning: {message}", err=True)


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def header_text(header: dict[str, Any]) -> str:
    tail = header["tail"]
    if tail == "torn":
        tail = f"torn at offset {header['torn_offset']} ({header['torn_bytes']} bytes)"
    episodes = len(header["episodes"])
    lines = [
        f"run {header['run_id']}  task {header['task']}  policy {header['policy']}  seed {header['seed']}",
        f"status {header['status']}; {episodes} episode{'s' if episodes != 1 else ''}, {header['epochs']} epochs; "
        f"{header['events']} events (last seq {header['last_seq']}); tail {tail}",
    ]
    if header["forked_from"]:
        f = header["forked_from"]
        lines.append(f"forked from {f['run_id']} at seq {f['seq']} (prefix sha256 {f['prefix_sha256'][:16]}...)")
    return "\n".join(lines)


def seeds_text(rows: list[dict[str, Any]]) -> str:
    head = (f"{'env':>3} {'ep':>3} {'seed':<10} {'slot':<6} {'blueprint':<11} {'stage':<13} {'alpha':>5} "
            f"{'germ':>4} {'ended':>5} {'outcome':<13} {'contribution':>12}  reason")
    lines = [head, "-" * len(head)]
    for r in rows:
        ended = "-" if r["ended_epoch"] is None else str(r["ended_epoch"])
        outcome = r["outcome"]
        lines.append(
            f"{r['env']:>3} {r['episode']:>3} {r['seed_id']:<10} {r['slot']:<6} {r['blueprint']:<11} "
            f"{r['stage']:<13} {r['alpha']:>5.2f} {r['germinated_epoch']:>4} {ended:>5} {outcome:<13} "
            f"{_fmt(r['last_contribution'], '+.2f'):>12}  {r['cull_reason'] or ''}".rstrip())
    if not rows:
        lines.append("(no seeds were germinated)")
    return "\n".join(lines)


def _load(path: Path) -> timetravel.Loaded:
    try:
        return timetravel.load(path)
    except (LogError, UnknownEventType) as exc:
        raise UserError(f"{exc} (esper log check {path} says more)") from None


@click.command("replay")
@click.argument("path", metavar="LOG|RUN_DIR", type=click.Path(path_type=Path))
@click.option("--until", "until_seq", type=click.IntRange(min=0), help="Fold through the batch holding SEQ.")
@click.option("--epoch", type=click.IntRange(min=0), help="Fold through the end of epoch N (of --env/--episode).")
@click.option("--env", type=click.IntRange(min=0), help="Only this env (and the env for --epoch; default 0).")
@click.option("--episode", type=click.IntRange(min=0), help="Only this episode (and for --epoch; default 0).")
@click.option("--verify", is_flag=True, help="Check every invariant on every prefix of the log.")
@click.option("--strict", is_flag=True, help="With --verify: logic drift is a violation whatever wrote the log.")
@click.option("--rerun", is_flag=True, help="Run the recorded configuration again and compare the payloads.")
@click.option("--out", type=click.Path(path_type=Path), help="With --rerun: keep the new run in this directory.")
@click.option("--force", is_flag=True, help="With --rerun: rerun a run recorded as non-deterministic.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def replay(ctx: click.Context, path: Path, until_seq: int | None, epoch: int | None, env: int | None,
           episode: int | None, verify: bool, strict: bool, rerun: bool, out: Path | None, force: bool,
           as_json: bool) -> None:
    """Fold LOG (or the log of RUN_DIR) and print the run and its seeds."""
    modes = [name for name, on in (("--until", until_seq is not None), ("--epoch", epoch is not None),
                                   ("--verify", verify), ("--rerun", rerun)) if on]
    if len(modes) > 1:
        raise UserError(f"{' and '.join(modes)} cannot be combined (choose one)")
    if strict and not verify:
        raise UserError("--strict goes with --verify")
    if (out is not None or force) and not rerun:
        raise UserError("--out and --force go with --rerun")
    if verify:
        _verify(ctx, path, strict, as_json)
    elif rerun:
        _rerun(ctx, path, out, force, as_json)
    else:
        _show(ctx, path, until_seq, epoch, env, episode, as_json)


def _show(ctx: click.Context, path: Path, until_seq: int | None, epoch: int | None, env: int | None,
          episode: int | None, as_json: bool) -> None:
    loaded = _load(path)
    if loaded.summary.tail == "torn":
        _warn(f"{loaded.path} has a torn tail at offset {loaded.summary.torn_offset}; "
              f"folded through seq {loaded.summary.last_seq}")
    try:
        if until_seq is not None:
            replayed = timetravel.until(loaded.records, until_seq)
        elif epoch is not None:
            replayed = timetravel.at_epoch(loaded.records, epoch, env or 0, episode or 0)
        else:
            replayed = timetravel.replay(loaded.records)
    except timetravel.TimeTravelError as exc:
        raise UserError(f"{exc} (esper replay {path} shows the whole log)") from None
    except ReplayError as exc:  # a record the fold cannot apply: a damaged or foreign log
        raise UserError(f"{exc} (esper replay {path} --verify finds the first violation)") from None
    header = timetravel.run_header(loaded, replayed)
    seeds = timetravel.seed_rows(replayed, env, episode)
    digest = replayed.digest
    at = None
    if until_seq is not None or epoch is not None:
        e, k, n = replayed.point or (None, None, None)
        at = {"requested_seq": until_seq, "requested_epoch": epoch, "seq": replayed.last_seq, "env": e,
              "episode": k, "epoch": n,
              "digest": None if digest is None else {"recorded": digest.recorded, "folded": digest.folded,
                                                      "ok": digest.ok}}
    if as_json:
        click.echo(_json({"run": header, "at": at, "seeds": seeds,
                          "slots": timetravel.slot_rows(replayed, env)}))
    else:
        click.echo(header_text(header))
        if at is not None:
            where = f"at seq {at['seq']}" + ("" if at["env"] is None else
                                             f" (env {at['env']}, episode {at['episode']}, epoch {at['epoch']})")
            check = "" if digest is None else (
                f"; state digest OK ({digest.folded[:12]})" if digest.ok else
                f"; state digest MISMATCH: recorded {digest.recorded[:12]}, folded {digest.folded[:12]}")
            click.echo(where + check)
        click.echo("")
        click.echo(seeds_text(seeds))
    if digest is not None and not digest.ok:
        if not as_json:
            click.echo(f"esper: error: the folded state at seq {digest.seq} differs from the recorded "
                       f"state_digest", err=True)
        ctx.exit(EXIT_CHECK_FAILED)


def _verify(ctx: click.Context, path: Path, strict: bool, as_json: bool) -> None:
    from esper.replay.verify import verify_log

    try:
        report = verify_log(path, strict=strict)
    except (LogError, UnknownEventType) as exc:
        if as_json:
            click.echo(_json({"ok": False, "error": type(exc).__name__, "message": str(exc),
                              "offset": getattr(exc, "offset", None)}))
        raise UserError(f"{exc} (esper log check {path} says more)") from None
    for warning in report.warnings:
        _warn(warning)
    if as_json:
        v = report.violation
        click.echo(_json({
            "ok": report.ok, "records": report.records, "checks": report.checks, "warnings": list(report.warnings),
            "violation": None if v is None else {"seq": v.seq, "offset": v.offset, "invariant": v.invariant,
                                                 "expected": v.expected, "actual": v.actual},
        }))
    else:
        click.echo(report.describe())
    if not report.ok:
        ctx.exit(EXIT_CHECK_FAILED)


def _rerun(ctx: click.Context, path: Path, out: Path | None, force: bool, as_json: bool) -> None:
    from esper.replay.rerun import RerunRefused, rerun

    try:
        report = rerun(path, out, force)
    except (LogError, UnknownEventType) as exc:
        raise UserError(f"{exc} (esper log check {path} says more)") from None
    except RerunRefused as exc:
        raise UserError(str(exc)) from None
    for warning in report.warnings:
        _warn(warning)
    click.echo(_json(report.to_json()) if as_json else report.describe())
    if not report.ok:
        ctx.exit(EXIT_CHECK_FAILED)
