"""Throughput of `esper train-policy` on the simulated backend (issue: a learned policy).

Measured side by side in one process: 16 envs stepped together (one batched policy forward per
step) against the same number of env-epochs driven one env at a time by `esper run` with the
random policy, both with the default durability (fsync per step, a checkpoint per round/epoch)
and without. Prints env-epochs per second, the PPO update's time, and the ratio.

    .venv/bin/python benchmarks/train_policy.py [--envs 16] [--episode-length 30] [--rounds 4]
"""

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from esper.events import catalogue as ev
from esper.events.log_reader import LogReader
from esper.policy import run_config
from esper.policy.runner import Run, execute, load_data
from esper.policy.trainer import PolicyTrainer
from esper.policy.training_run import execute_training


def config(envs: int, length: int, rounds: int, durable: bool, policy: str = "ppo", seed: int = 0):
    return run_config.resolve({
        "run": {"task": "digits", "backend": "simulated", "epochs": length, "policy": policy, "seed": seed,
                "fsync": "epoch" if durable else "never", "checkpoint_every": 1 if durable else 0},
        "ppo": {"envs": envs, "rounds": rounds},
    })


def train(root: Path, envs: int, length: int, rounds: int, durable: bool) -> tuple[float, list[float]]:
    cfg = config(envs, length, rounds, durable)
    run_dir = root / f"train-{durable}"
    run_dir.mkdir()
    started = time.perf_counter()
    execute_training(PolicyTrainer(cfg, run_dir, load_data(cfg, check_policy=False)))
    seconds = time.perf_counter() - started
    updates = [r.event.wall_time_s for r in LogReader(run_dir / "events.elog").records()
               if isinstance(r.event, ev.PolicyUpdated)]
    return envs * length * rounds / seconds, updates


def single(root: Path, envs: int, length: int, rounds: int, durable: bool) -> float:
    """The same env-epochs as `envs * rounds` separate runs of one env each."""
    started = time.perf_counter()
    for k in range(envs * rounds):
        cfg = config(1, length, 1, durable, policy="random", seed=k)
        run_dir = root / f"single-{durable}-{k}"
        run_dir.mkdir()
        execute(Run(cfg, run_dir, load_data(cfg)))
    return envs * length * rounds / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--envs", type=int, default=16)
    parser.add_argument("--episode-length", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    # The first call imports torch's compiler stack (~3 s here): pay it before anything is timed.
    torch.use_deterministic_algorithms(True)
    root = Path(tempfile.mkdtemp(prefix="esper-bench-train-"))
    try:
        results = {}
        for durable in (True, False):
            rate, updates = train(root, args.envs, args.episode_length, args.rounds, durable)
            baseline = single(root, args.envs, args.episode_length, args.rounds, durable)
            results[durable] = (rate, baseline, updates)
            label = "fsync per step + checkpoints" if durable else "no fsync, no checkpoints"
            print(f"{label}: train-policy {args.envs} envs {rate:,.0f} env-epochs/s; one env at a time "
                  f"(esper run, random) {baseline:,.0f} env-epochs/s; ratio {rate / baseline:.2f}")
            print(f"  PPO update ({args.envs} segments x {args.episode_length - 1} steps): median "
                  f"{1000 * statistics.median(updates):.0f} ms, max {1000 * max(updates):.0f} ms")
        rate, baseline, updates = results[True]
        print(f"RESULT env_epochs_per_s={rate:.0f} vs_single_env={rate / baseline:.2f} "
              f"update_ms={1000 * statistics.median(updates):.0f} env_epochs_per_s_no_fsync={results[False][0]:.0f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
