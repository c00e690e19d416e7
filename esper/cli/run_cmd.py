"""`esper run`: train a host and grow it under a policy (runtime §7.1)."""

import os
import sys
from pathlib import Path

import click

from esper.cli.errors import EXIT_INTERRUPTED, UserError
from esper.cli.options import csv_list, merged, worker_args
from esper.cli.progress import EpochPrinter, seeds_table
from esper.cli.run_failures import reported
from esper.compute.distributed import check_batch, launcher_rank
from esper.compute.launch import launch
from esper.policy import run_config
from esper.policy.runner import Run, create_run_dir, execute, load_data, resume, resumed_run_config


@click.command("run")
@click.option("--task", help="digits (default), cifar10, cifar10_impaired, text, synthetic.")
@click.option("--data", "data", type=click.Path(path_type=Path), help="Data directory or file.")
@click.option("--policy", help="none, random or heuristic (default).")
@click.option("--epochs", type=click.IntRange(min=1), help="Epochs (default: the task's).")
@click.option("--slots", help="Comma-separated slot ids (default: early,mid,late).")
@click.option("--blueprints", help="Comma-separated blueprints the policy may use (default: all).")
@click.option("--max-seeds", type=click.IntRange(min=0), help="Live seeds per env, fossils included (0: no limit).")
@click.option("--seed", type=click.IntRange(min=0), help="Run seed (default 0).")
@click.option("--device", help="auto (default), cpu, cuda, cuda:N.")
@click.option("--backend", type=click.Choice(["torch", "ddp", "simulated"]), help="Compute backend (default torch).")
@click.option("--nproc", type=click.IntRange(min=1), help="N data-parallel processes via torchrun (--backend ddp).")
@click.option("--amp", type=click.Choice(["off", "bf16", "fp16"]), help="Mixed precision (default off).")
@click.option("--compile", "compile_model", is_flag=True, help="torch.compile the model (train.compile).")
@click.option("--fsync", type=click.Choice(["always", "epoch", "never"]), help="Log durability (default epoch).")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="A TOML config file.")
@click.option("--set", "assignments", multiple=True, help="KEY=VALUE config override (TOML literal).")
@click.option("--out", type=click.Path(path_type=Path), help="Parent directory of the run (default: runs).")
@click.option("--name", help="Run directory name (default: generated).")
@click.option("--resume", "resume_dir", type=click.Path(path_type=Path),
              help="Resume an interrupted run (a larger --epochs extends it).")
@click.option("--quiet", is_flag=True, help="No per-epoch progress.")
@click.pass_context
def run(ctx, task, data, policy, epochs, slots, blueprints, max_seeds, seed, device, backend, nproc, amp,
        compile_model, fsync, config_file, assignments, out, name, resume_dir, quiet) -> None:
    """Train a host network and grow seeds in its slots; every fact goes to the run's event log."""
    flags = {
        "task": task, "data": str(data) if data else None, "policy": policy, "epochs": epochs,
        "slots": csv_list(slots), "blueprints": csv_list(blueprints), "seed": seed, "device": device,
        "backend": backend, "fsync": fsync,
    }
    layer = {"run": {k: v for k, v in flags.items() if v is not None}}
    if max_seeds is not None:
        layer["lifecycle"] = {"max_seeds": max_seeds}
    if amp is not None:
        layer.setdefault("train", {})["amp"] = amp
    if compile_model:
        layer.setdefault("train", {})["compile"] = True
    printer = None if quiet else EpochPrinter()
    with reported("run", "run"):
        layers = [run_config.read_file(config_file)] if config_file else []
        layers += [layer] + [run_config.parse_set(a) for a in assignments]
        if nproc is not None:
            sys.exit(_launch(ctx, nproc, backend, resume_dir, layers))
        if resume_dir is not None:
            if name:
                raise UserError("--name has no meaning with --resume (the resumed run is named <run>.r<k>; "
                                "--out chooses where it goes)")
            overrides = merged(layers)
            records, config = resumed_run_config(resume_dir, overrides)
            if config.run.backend == "ddp" and "WORLD_SIZE" not in os.environ:
                world = records[0].event.world_size if records else "N"
                raise UserError(f"'{resume_dir}' is a ddp run: resume it with esper run --resume {resume_dir} "
                                f"--nproc {world} (or under torchrun)")
            data_loaded = load_data(config)
            if not _rank_zero(config.run.backend, data_loaded.spec.batch_size):
                # Another data-parallel rank: it replays nothing; rank 0's checkpoint reaches it
                # with the first epoch's broadcast.
                execute(Run(config, None, data_loaded))
                return
            the_run = resume(resume_dir, out, overrides, printer, data_loaded)
            outcome = execute(the_run, resume=True)
        else:
            config = run_config.resolve(*layers)
            data_loaded = load_data(config)
            if not _rank_zero(config.run.backend, data_loaded.spec.batch_size):
                # Another data-parallel rank: rank 0 alone creates the run directory, logs and prints.
                execute(Run(config, None, data_loaded))
                return
            the_run = Run(config, create_run_dir(out or Path("runs"), name, config), data_loaded, printer)
            click.echo(f"run directory: {the_run.run_dir}", err=True)
            outcome = execute(the_run)
    click.echo(seeds_table(outcome.seeds, outcome.epochs))
    final = outcome.final
    summary = ", ".join(f"{k} {v:.2f}" for k, v in final.items() if v is not None)
    click.echo(f"{outcome.status}: {outcome.epochs} epochs; {summary}")
    click.echo(f"run directory: {outcome.run_dir}")
    if outcome.status == "interrupted":
        world = getattr(the_run.backend, "world_size", 1)
        click.echo(f"resume with: esper run --resume {outcome.run_dir}" + (f" --nproc {world}" if world > 1 else ""),
                   err=True)
        sys.exit(EXIT_INTERRUPTED)


def _rank_zero(backend: str, batch_size: int) -> bool:
    if backend != "ddp":
        return True
    rank, world = launcher_rank()
    check_batch(batch_size, world)
    return rank == 0


def _launch(ctx: click.Context, nproc: int, backend: str | None, resume_dir: Path | None, layers: list[dict]) -> int:
    """Check everything here, so a user error is one line before any process starts; then torchrun."""
    if backend not in (None, "ddp"):
        raise UserError(f"--nproc runs the ddp backend, not {backend} (omit --backend)")
    # What the workers resolve: the file and flags, their --backend ddp, then every --set (so a
    # --set run.backend wins, and is refused below).
    flags = len(layers) - len(ctx.params["assignments"])
    layers = [*layers[:flags], {"run": {"backend": "ddp"}}, *layers[flags:]]
    if resume_dir is not None:
        config = resumed_run_config(resume_dir, merged(layers))[1]
    else:
        config = run_config.resolve(*layers)
    if config.run.backend != "ddp":
        raise UserError(f"--nproc runs the ddp backend, not {config.run.backend} (drop --set run.backend)")
    check_batch(load_data(config).spec.batch_size, nproc)
    return launch(nproc, worker_args(ctx, ("nproc", "backend")) + ["--backend", "ddp"])
