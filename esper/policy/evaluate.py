"""`esper evaluate` (policy §9): every contender on the same seeds, each an ordinary `esper run`.

Everything is checked before the first run starts: each policy spec, each configuration and the
data. The runs go seed by seed, every contender within a seed, so a machine that slows down over
time weighs on all contenders alike and a stopped evaluation leaves complete pairs behind.
"""

from pathlib import Path
from typing import Callable

import attrs

from esper.compute.engine import GovernorExhausted
from esper.policy import run_config
from esper.policy.run_config import RunConfig
from esper.policy.runner import Run, RunError, RunOutcome, create_run_dir, execute, load_data, make_controller
from esper.tasks import TaskData

DEFAULT_POLICIES = ("none", "random", "heuristic")


class Interrupted(Exception):
    """The evaluation stopped at a signal; the runs finished so far stay where they are."""

    def __init__(self, run_dir: Path, finished: list[Path]):
        super().__init__(f"interrupted during {run_dir}")
        self.run_dir, self.finished = run_dir, finished


@attrs.frozen
class Trial:
    policy: str
    seed: int
    config: RunConfig


@attrs.frozen
class Plan:
    trials: tuple[Trial, ...]
    data: TaskData


def parse_policies(text: str) -> tuple[str, ...]:
    specs = tuple(p.strip() for p in text.split(","))
    if not all(specs):
        raise RunError(f"empty policy spec in --policies {text!r} (give comma-separated specs, e.g. none,heuristic)")
    repeated = sorted({p for p in specs if specs.count(p) > 1})
    if repeated:
        raise RunError(f"policy '{repeated[0]}' is listed twice in --policies (list each contender once)")
    return specs


def plan(layers: list[dict], policies: tuple[str, ...], seeds: int) -> Plan:
    """One configuration per (seed, policy); `layers` are the user's, the policy and seed go on top.
    Raises ConfigError, DataError or RunError, all before any run directory exists."""
    trials = tuple(Trial(policy, seed, run_config.resolve(*layers, {"run": {"policy": policy, "seed": seed}}))
                   for seed in range(seeds) for policy in policies)
    data = load_data(trials[0].config)  # only policy and seed differ, and neither changes the data
    for trial in trials[:len(policies)]:
        make_controller(trial.config)  # an unknown spec or an unusable checkpoint fails here
    return Plan(trials, data)


def run_all(plan: Plan, out: Path,
            on_done: Callable[[int, Trial, RunOutcome | GovernorExhausted], None] | None = None) -> list[Path]:
    """Run directories, in run order. A run the governor gives up on has logged RunFinished(failed)
    and counts as a failed run of its contender; any other failure ends the evaluation."""
    finished: list[Path] = []
    for index, trial in enumerate(plan.trials):
        run = Run(trial.config, create_run_dir(out, None, trial.config), plan.data)
        try:
            result: RunOutcome | GovernorExhausted = execute(run)
        except GovernorExhausted as error:
            result = error
        except KeyboardInterrupt:
            raise Interrupted(run.run_dir, finished) from None
        if isinstance(result, RunOutcome) and result.status == "interrupted":
            raise Interrupted(run.run_dir, finished)
        finished.append(run.run_dir)
        if on_done is not None:
            on_done(index, trial, result)
    return finished
