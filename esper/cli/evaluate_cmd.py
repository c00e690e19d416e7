"""`esper evaluate` (runtime §7.2, policy §9): contenders on the same seeds, then the comparison table."""

import contextlib
import sys
import tempfile
import time
from pathlib import Path

import click
import msgspec

from esper.cli.errors import EXIT_INTERRUPTED, RunFailed, UserError
from esper.cli.options import csv_list, layers


@click.command("evaluate")
@click.option("--policies", default="none,random,heuristic", show_default=True,
              help="Comma-separated policy specs: none, random, heuristic, ppo:CHECKPOINT (greedy).")
@click.option("--seeds", type=click.IntRange(min=1), default=10, show_default=True,
              help="Run every policy on seeds 0 ... N-1.")
@click.option("--backend", type=click.Choice(["torch", "simulated"]), help="Compute backend (default torch).")
@click.option("--task", help="digits (default), cifar10, cifar10_impaired, text, synthetic.")
@click.option("--data", "data", type=click.Path(path_type=Path), help="Data directory or file.")
@click.option("--epochs", type=click.IntRange(min=1), help="Epochs per run (default: the task's).")
@click.option("--slots", help="Comma-separated slot ids (default: early,mid,late).")
@click.option("--blueprints", help="Comma-separated blueprints the policies may use (default: all).")
@click.option("--max-seeds", type=click.IntRange(min=0), help="Live seeds per env, fossils included (0: no limit).")
@click.option("--device", help="auto (default), cpu, cuda, cuda:N.")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="A TOML config file.")
@click.option("--set", "assignments", multiple=True, help="KEY=VALUE config override (TOML literal).")
@click.option("--out", type=click.Path(path_type=Path),
              help="Keep every run directory under DIR (default: a temporary directory, removed at the end).")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
@click.option("--quiet", is_flag=True, help="No per-run progress.")
def evaluate(policies, seeds, backend, task, data, epochs, slots, blueprints, max_seeds, device, config_file,
             assignments, out, as_json, quiet) -> None:
    """Run every policy of --policies on the same seeds and compare them with the `none` host alone."""
    from esper.compute.checkpoints import CheckpointWriteError
    from esper.events.log_errors import LogError, LogFsyncError, UnknownEventType
    from esper.policy import evaluate as contest
    from esper.policy.run_config import ConfigError
    from esper.policy.runner import RunError
    from esper.replay import evaluation, evaluation_table
    from esper.tasks.errors import DataError

    flags = {"run": {"task": task, "data": str(data) if data else None, "epochs": epochs, "slots": csv_list(slots),
                     "blueprints": csv_list(blueprints), "device": device, "backend": backend, "greedy": True},
             "lifecycle": {"max_seeds": max_seeds}}
    try:
        specs = contest.parse_policies(policies)
        plan = contest.plan(layers(config_file, flags, assignments), specs, seeds)
        keep = contextlib.nullcontext(out) if out else tempfile.TemporaryDirectory(prefix="esper-evaluate-")
        with keep as where:
            where = Path(where)
            if not quiet:
                click.echo(f"evaluate: {len(specs)} policies x {seeds} seeds = {len(plan.trials)} runs under {where}",
                           err=True)
            dirs = contest.run_all(plan, where, None if quiet else _Progress(len(plan.trials)))
            comparison = evaluation.from_logs(dirs)
    except contest.Interrupted as stop:
        kept = f"; finished runs are under {out}" if out else ""
        click.echo(f"interrupted during {stop.run_dir.name} after {len(stop.finished)} runs{kept}", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except LogFsyncError as error:
        raise RunFailed(f"{error} (free some space, or check the disk)") from None
    except CheckpointWriteError as error:
        raise RunFailed(f"{error} (free some space, or pass --set run.checkpoint_every=0)") from None
    except (ConfigError, DataError, RunError, LogError, UnknownEventType) as error:
        raise UserError(str(error)) from None
    except OSError as error:
        raise RunFailed(f"{error} (free some space or choose another --out)") from None
    if as_json:
        click.echo(msgspec.json.format(msgspec.json.encode(comparison.to_json()), indent=2).decode())
    else:
        click.echo(evaluation_table.text(comparison))
    if out and not quiet:
        click.echo(f"runs kept under {out} (esper report {out} renders this table again)", err=True)


class _Progress:
    """One line on stderr as each run ends."""

    def __init__(self, total: int) -> None:
        self.total, self.since = total, time.monotonic()

    def __call__(self, index, trial, result) -> None:
        from esper.compute.engine import GovernorExhausted

        now, took = time.monotonic(), time.monotonic() - self.since
        self.since = now
        if isinstance(result, GovernorExhausted):
            what = f"failed: {result}"
        else:
            test = result.final.get("test_acc")
            fossils = sum(s.stage.name == "FOSSILIZED" for s in result.seeds)
            what = (f"{result.status}, test {'-' if test is None else f'{test:.2f}'}, "
                    f"seeds germinated {len(result.seeds)}, fossilized {fossils}")
        click.echo(f"[{index + 1}/{self.total}] {trial.policy} seed {trial.seed}: {what} in {took:.1f} s", err=True)
