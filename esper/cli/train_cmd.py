"""`esper train-policy`: PPO over many runs of the lifecycle (runtime §7.2, policy §7); under
torchrun, or with `--nproc N`, the envs are spread over the processes (policy §7.4)."""

import sys
from pathlib import Path

import click

from esper.cli.errors import EXIT_INTERRUPTED, UserError
from esper.cli.options import csv_list, merged, worker_args
from esper.cli.run_failures import reported
from esper.compute.launch import launch
from esper.policy import run_config
from esper.policy.dist_ranks import DIST_MODES, Group, Solo, check_envs, join
from esper.policy.run_config import RunConfig
from esper.policy.runner import create_run_dir, load_data
from esper.policy.trainer import PolicyTrainer, RoundSummary
from esper.policy.training_run import TrainingOutcome, execute_training, resume_training, resumed_training_config
from esper.tasks import TaskData

# flag -> (section, key)
_KEYS = {
    "task": ("run", "task"), "data": ("run", "data"), "slots": ("run", "slots"), "blueprints": ("run", "blueprints"),
    "seed": ("run", "seed"), "device": ("run", "device"), "backend": ("run", "backend"), "fsync": ("run", "fsync"),
    "episode_length": ("run", "epochs"), "checkpoint_every": ("run", "checkpoint_every"),
    "max_seeds": ("lifecycle", "max_seeds"), "amp": ("train", "amp"), "reward_mode": ("reward", "mode"),
    "rounds": ("ppo", "rounds"), "envs": ("ppo", "envs"), "rollout_length": ("ppo", "rollout_length"),
    "lr": ("ppo", "lr"), "gamma": ("ppo", "gamma"), "gae_lambda": ("ppo", "gae_lambda"), "clip": ("ppo", "clip"),
    "ppo_epochs": ("ppo", "epochs"), "minibatches": ("ppo", "minibatches"), "target_kl": ("ppo", "target_kl"),
    "entropy_start": ("ppo", "entropy_start"), "entropy_end": ("ppo", "entropy_end"), "init": ("ppo", "init"),
    "eval_every": ("ppo", "eval_every"), "eval_episodes": ("ppo", "eval_episodes"),
}


def _layer(options: dict) -> dict:
    layer: dict = {"run": {"policy": "ppo"}}
    for flag, value in options.items():
        if value is None:
            continue
        if flag in ("slots", "blueprints"):
            value = csv_list(value)
        elif isinstance(value, Path):
            value = str(value)
        section, key = _KEYS[flag]
        layer.setdefault(section, {})[key] = value
    return layer


def _print_round(rounds: int):
    def show(summary: RoundSummary) -> None:
        u = summary.update
        ret = "-" if summary.mean_return is None else f"{summary.mean_return:+.3f}"
        ev = "-" if u.explained_variance is None else f"{u.explained_variance:+.2f}"
        click.echo(f"round {summary.round:>4}/{rounds}  episodes {summary.episodes:>3}  return {ret}  "
                   f"kl {u.approx_kl:.4f}  clip {max(u.clip_fraction.values()):.2f}  expl.var {ev}  "
                   f"epochs {u.epochs_run}/{u.ppo_epochs}  {summary.seconds:.1f} s", err=True)
    return show


def _print_evaluation(round_: int, scores: list, seconds: float) -> None:
    shown = [s for s in scores if s is not None]
    mean = f"{sum(shown) / len(shown):.2f}" if shown else "-"
    click.echo(f"evaluation after round {round_}: {len(scores)} greedy held-out episodes, mean final val score "
               f"{mean}  {seconds:.1f} s", err=True)


@click.command("train-policy")
@click.option("--task", help="digits (default), cifar10, cifar10_impaired, text, synthetic.")
@click.option("--data", type=click.Path(path_type=Path), help="Data directory or file.")
@click.option("--backend", type=click.Choice(["torch", "simulated"]), help="Compute backend (default torch).")
@click.option("--envs", type=click.IntRange(min=1), help="Environments stepped together (default 4).")
@click.option("--episode-length", type=click.IntRange(min=2), help="Epochs per episode (default: the task's).")
@click.option("--rounds", type=click.IntRange(min=1), help="PPO updates (default 50).")
@click.option("--rollout-length", type=click.IntRange(min=1), help="Decisions per env per round (default E-1).")
@click.option("--reward-mode", type=click.Choice(["shaped", "sparse", "simplified"]), help="Reward (default simplified).")
@click.option("--lr", type=float, help="Adam learning rate (ppo.lr).")
@click.option("--gamma", type=float, help="Discount (ppo.gamma).")
@click.option("--gae-lambda", type=float, help="GAE lambda (ppo.gae_lambda).")
@click.option("--clip", type=float, help="Clipped-surrogate epsilon (ppo.clip).")
@click.option("--ppo-epochs", type=click.IntRange(min=1), help="Epochs per update (ppo.epochs).")
@click.option("--minibatches", type=click.IntRange(min=1), help="Minibatches per epoch (ppo.minibatches).")
@click.option("--target-kl", type=float, help="KL target; the update stops above 1.5x (ppo.target_kl).")
@click.option("--entropy-start", type=float, help="Entropy coefficient at the first update.")
@click.option("--entropy-end", type=float, help="Entropy coefficient after annealing.")
@click.option("--init", type=click.Path(path_type=Path), help="Continue from this policy checkpoint.")
@click.option("--checkpoint-every", type=click.IntRange(min=0), help="Rounds between run checkpoints (default 1).")
@click.option("--eval-every", type=click.IntRange(min=0), help="Rounds between held-out greedy episodes (0: none).")
@click.option("--eval-episodes", type=click.IntRange(min=1), help="Held-out episodes per evaluation (default 4).")
@click.option("--slots", help="Comma-separated slot ids (default: early,mid,late).")
@click.option("--blueprints", help="Comma-separated blueprints the policy may use (default: all).")
@click.option("--max-seeds", type=click.IntRange(min=0), help="Live seeds per env, fossils included (0: no limit).")
@click.option("--seed", type=click.IntRange(min=0), help="Run seed (default 0).")
@click.option("--device", help="auto (default), cpu, cuda, cuda:N.")
@click.option("--amp", type=click.Choice(["off", "bf16", "fp16"]), help="Mixed precision (default off).")
@click.option("--fsync", type=click.Choice(["always", "epoch", "never"]), help="Log durability (default epoch).")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="A TOML config file.")
@click.option("--set", "assignments", multiple=True, help="KEY=VALUE config override (TOML literal).")
@click.option("--out", type=click.Path(path_type=Path), help="Parent directory of the run (default: runs).")
@click.option("--name", help="Run directory name (default: generated).")
@click.option("--resume", "resume_dir", type=click.Path(path_type=Path), help="Resume an interrupted training.")
@click.option("--dist", "dist_mode", type=click.Choice(DIST_MODES), default="auto",
              help="auto: spread the envs over torchrun's processes when started by it; off: refuse to.")
@click.option("--nproc", type=click.IntRange(min=1), help="Spread the envs over N local processes via torchrun.")
@click.option("--quiet", is_flag=True, help="No per-round progress.")
@click.pass_context
def train_policy(ctx, config_file, assignments, out, name, resume_dir, dist_mode, nproc, quiet, **options) -> None:
    """Train a PPO lifecycle policy over many runs; every decision, reward and update is logged."""
    layer = _layer(options)
    layers = ([run_config.read_file(config_file)] if config_file else []) + [layer] + \
        [run_config.parse_set(a) for a in assignments]
    with reported("train-policy", "training"):
        if nproc is not None:
            sys.exit(_launch(ctx, nproc, dist_mode, resume_dir, layers))
        if resume_dir is not None:
            if name:
                raise UserError("--name has no meaning with --resume (the resumed run is named <run>.r<k>; "
                                "--out chooses where it goes)")
            trainer = resume_training(resume_dir, out, merged(layers), dist_mode=dist_mode)
            if not quiet and trainer.leader:
                trainer.on_round, trainer.on_evaluation = _print_round(trainer.config.ppo.rounds), _print_evaluation
            outcome = execute_training(trainer, resume=True)
        else:
            config = run_config.resolve(*layers)
            data = load_data(config, check_policy=False)
            ranks = join(dist_mode, config.ppo.envs, config.dist)
            try:
                trainer = _trainer(config, data, ranks, out, name, quiet)
            except BaseException:
                ranks.close()
                raise
            outcome = execute_training(trainer)
    if trainer.leader:
        _report(outcome)
    if outcome.status == "interrupted":
        sys.exit(EXIT_INTERRUPTED)


def _report(outcome: TrainingOutcome) -> None:
    click.echo(f"{outcome.status}: {outcome.rounds} rounds, {outcome.episodes} episodes")
    if outcome.policy_path is not None:
        click.echo(f"policy: {outcome.policy_path}  (use it with: esper run --policy ppo:{outcome.policy_path})")
    click.echo(f"run directory: {outcome.run_dir}")
    if outcome.status == "interrupted":
        click.echo(f"resume with: esper train-policy --resume {outcome.run_dir}", err=True)


def _trainer(config: RunConfig, data: TaskData, ranks: Solo | Group, out: Path | None, name: str | None,
             quiet: bool) -> PolicyTrainer:
    """Rank 0 alone creates the run directory, writes and reports progress."""
    if ranks.rank != 0:
        return PolicyTrainer(config, None, data, ranks=ranks)
    trainer = PolicyTrainer(config, create_run_dir(out or Path("runs"), name, config), data,
                            None if quiet else _print_round(config.ppo.rounds), None if quiet else _print_evaluation,
                            ranks=ranks)
    click.echo(f"run directory: {trainer.run_dir}", err=True)
    return trainer


def _launch(ctx: click.Context, nproc: int, dist_mode: str, resume_dir: Path | None, layers: list[dict]) -> int:
    """Check everything here, so a user error is one line before any process starts; then torchrun."""
    if dist_mode == "off":
        raise UserError("--nproc starts a distributed training, which --dist off refuses (drop one of them)")
    if resume_dir is not None:
        config = resumed_training_config(resume_dir, merged(layers))[1]
    else:
        config = run_config.resolve(*layers)
    check_envs(config.ppo.envs, nproc)
    load_data(config, check_policy=False)
    return launch(nproc, worker_args(ctx, ("nproc",)), command="train-policy")
