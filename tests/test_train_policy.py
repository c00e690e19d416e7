"""`esper train-policy` (policy §7–§8): vectorised rollouts, learning on the simulator, the log's
order and audit trail, policy checkpoints, resume equality and `esper run --policy ppo:PATH`."""

import statistics
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from esper.cli.main import cli
from esper.events import catalogue as ev
from esper.events.codec import stable_payload
from esper.events.log_reader import LogReader
from esper.lifecycle.fold import fold
from esper.policy import run_config
from esper.policy.ppo_policy import read_checkpoint
from esper.policy.runner import Run, execute, load_data
from esper.policy.trainer import PolicyTrainer
from esper.policy.training_run import execute_training, resume_training
from esper.replay import connect


def config(**sections):
    layers = {"run": {"task": "digits", "backend": "simulated", "epochs": 6, "policy": "ppo", "fsync": "never",
                      "threads": 1}, "ppo": {"envs": 2, "rounds": 3}}
    for section, values in sections.items():
        layers[section] = {**layers.get(section, {}), **values}
    return run_config.resolve(layers)


def train(run_dir: Path, cfg, on_round=None):
    run_dir.mkdir(parents=True)
    return execute_training(PolicyTrainer(cfg, run_dir, load_data(cfg, check_policy=False), on_round))


def records(run_dir: Path) -> list:
    return list(LogReader(run_dir / "events.elog").records())


def payloads(run_dir: Path) -> list[bytes]:
    return [stable_payload(r) for r in records(run_dir)[1:]]


def network(path: Path) -> dict:
    return read_checkpoint(path)["policy"]["network"]


def interrupt_after(round_: int):
    def stop(summary) -> None:
        if summary.round == round_:
            raise KeyboardInterrupt

    return stop


# -- the log --------------------------------------------------------------------------------


def test_steps_are_env_major_and_updates_follow_every_env(tmp_path):
    outcome = train(tmp_path / "t", config(ppo={"rollout_length": 3}))
    assert outcome.status == "completed" and outcome.rounds == 3
    log = records(outcome.run_dir)
    # Within a step, env 0's batches all come before env 1's: the env sequence of the env-scoped
    # records between two run-scoped records is sorted, step by step (a step ends at each env's
    # EpochTicked or EpisodeFinished).
    step: list[int] = []
    for record in log:
        if record.env is None:
            assert step == sorted(step)
            step = []
            continue
        step.append(record.env)
        if isinstance(record.event, (ev.EpochTicked, ev.EpisodeFinished)) and record.env == 1:
            assert step == sorted(step), step
            step = []
    updates = [r.event for r in log if isinstance(r.event, ev.PolicyUpdated)]
    assert [u.round for u in updates] == [1, 2, 3] and all(u.steps == 2 * 3 for u in updates)
    # A round cut mid-episode bootstraps: segments are the envs' pieces of episodes within the round.
    assert all(u.segments >= 2 for u in updates)
    state = fold(log).state
    assert state.status == "completed" and log[0].event.n_envs == 2
    assert (outcome.run_dir / "policy" / "latest").read_text().strip() == "round-000003.pt"


def test_every_decision_is_rewarded_and_components_sum(tmp_path):
    outcome = train(tmp_path / "t", config(reward={"mode": "shaped"}))
    con = connect([outcome.run_dir])
    decided, rewarded = con.execute(
        "SELECT (SELECT count(*) FROM raw_events WHERE type = 'PolicyDecided'), "
        "(SELECT count(*) FROM raw_events WHERE type = 'RewardComputed')").fetchone()
    assert decided == rewarded == 2 * 3 * 5  # envs x rounds x (E - 1) decisions
    for r in records(outcome.run_dir):
        if isinstance(r.event, ev.RewardComputed):
            assert r.event.total_raw == pytest.approx(sum(v for v in r.event.components.values() if v is not None))


# -- learning -------------------------------------------------------------------------------

LEARN = dict(run={"epochs": 15, "blueprints": ["conv_light", "attention"], "checkpoint_every": 0},
             ppo={"envs": 8, "rounds": 30, "eval_every": 30, "eval_episodes": 8})


def episode_returns(run_dir: Path, evaluation: bool | None = None) -> list[float]:
    """Σ total_raw per episode (from the log), optionally only (non-)evaluation episodes."""
    log = records(run_dir)
    kind = {(r.env, r.episode): r.event.evaluation for r in log if isinstance(r.event, ev.EpisodeStarted)}
    sums: dict = {}
    for r in log:
        if isinstance(r.event, ev.RewardComputed) and (evaluation is None or kind[(r.env, r.episode)] == evaluation):
            sums[(r.env, r.episode)] = sums.get((r.env, r.episode), 0.0) + r.event.total_raw
    return list(sums.values())


def test_ppo_learns_on_the_simulator_to_keep_the_useful_blueprint_and_cull_the_harmful(tmp_path):
    """conv_light adds ~6 pp in the simulator, attention costs ~4 pp. After 30 updates the greedy
    policy on held-out seeds earns far more than the random policy on the same seeds, and in
    the training log's last rounds it fossilizes conv_light seeds and culls attention seeds."""
    outcome = train(tmp_path / "ppo", config(**LEARN))
    learned = episode_returns(outcome.run_dir, evaluation=True)
    assert len(learned) == 8

    random_returns = []
    for seed in range(8):
        cfg = config(run={**LEARN["run"], "policy": "random", "seed": 100 + seed})
        (tmp_path / f"random-{seed}").mkdir()
        run = Run(cfg, tmp_path / f"random-{seed}", load_data(cfg))
        execute(run)
        random_returns += episode_returns(run.run_dir)
    margin = statistics.mean(learned) - statistics.mean(random_returns)
    spread = statistics.stdev(random_returns)
    assert margin > 2 * spread, (statistics.mean(learned), statistics.mean(random_returns), spread)

    con = connect([outcome.run_dir])
    late = dict(((bp, outcome_), n) for bp, outcome_, n in con.execute(
        "SELECT blueprint, outcome, count(*) FROM seeds WHERE episode >= 20 AND env < 8 GROUP BY ALL").fetchall())
    assert late.get(("conv_light", "fossilized"), 0) >= 1
    assert late.get(("attention", "fossilized"), 0) == 0
    culled_by_policy = con.execute(
        "SELECT count(*) FROM seeds WHERE blueprint = 'attention' AND outcome = 'culled' "
        "AND cull_reason = 'ppo'").fetchone()[0]
    assert culled_by_policy >= 1


# -- checkpoints and resume -----------------------------------------------------------------


@pytest.mark.parametrize("backend, rollout", [("simulated", 0), ("simulated", 3), ("torch", 4)])
def test_resume_equals_an_uninterrupted_training(tmp_path, backend, rollout):
    """Interrupted after round 2 and resumed: the same log payloads and bit-identical weights,
    with rounds aligned to episodes (T = E - 1) and cut mid-episode (T = 3 or 4 of E = 6)."""
    cfg = config(run={"backend": backend}, ppo={"rollout_length": rollout})
    whole = train(tmp_path / "whole", cfg)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "cut", cfg, interrupt_after(2))
    assert fold(records(tmp_path / "cut")).state.status == "interrupted"
    resumed = execute_training(resume_training(tmp_path / "cut", None, {}), resume=True)
    assert resumed.run_dir.name == "cut.r1" and resumed.status == "completed"
    assert records(resumed.run_dir)[0].event.forked_from is not None
    assert payloads(resumed.run_dir) == payloads(whole.run_dir)
    a, b = network(whole.policy_path), network(resumed.policy_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_changed_options_and_extends_rounds(tmp_path):
    cfg = config()
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "cut", cfg, interrupt_after(1))
    code, _, err = cli_run("train-policy", "--resume", str(tmp_path / "cut"), "--lr", "0.1")
    assert code == 2 and "ppo.lr" in err and err.count("\n") == 1
    code, _, err = cli_run("train-policy", "--resume", str(tmp_path / "cut"), "--rounds", "2")
    assert code == 2 and "--rounds 2 would shorten" in err
    resumed = execute_training(resume_training(tmp_path / "cut", None, {"ppo": {"rounds": 4}}), resume=True)
    assert resumed.rounds == 4


# -- the command line -----------------------------------------------------------------------


def cli_run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_train_policy_on_digits_with_torch_end_to_end_then_run_uses_it(tmp_path):
    code, out, err = cli_run("train-policy", "--task", "digits", "--envs", "2", "--episode-length", "4",
                             "--rounds", "2", "--out", str(tmp_path), "--name", "t", "--set", "run.threads=1")
    assert code == 0, err
    assert "completed: 2 rounds, 4 episodes" in out and "round    2/2" in err
    policy = tmp_path / "t" / "policy" / "round-000002.pt"
    assert policy.is_file()
    state = fold(records(tmp_path / "t")).state
    assert state.status == "completed" and state.episodes_completed == 4
    code, out, err = cli_run("run", "--quiet", "--epochs", "4", "--policy", f"ppo:{policy}", "--out", str(tmp_path),
                             "--name", "uses", "--set", "run.threads=1")
    assert code == 0, err
    decided = [r.event for r in records(tmp_path / "uses") if isinstance(r.event, ev.PolicyDecided)]
    assert decided and all(d.policy == "ppo" and d.rationale.startswith("ppo greedy") for d in decided)


@pytest.mark.parametrize("args, message", [
    (["--backend", "simulated", "--set", "ppo.clp=1"], "unknown config key 'ppo.clp' (did you mean 'ppo.clip'?)"),
    (["--backend", "simulated", "--init", "missing.pt"], "policy checkpoint not found: 'missing.pt'"),
    (["--backend", "simulated", "--set", "ppo.gamma=1.5"], "gamma"),
    (["--backend", "simulated", "--amp", "bf16"], "simulated backend"),
    (["--resume", "nowhere"], "holds no run log to resume"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
    code, _, err = cli_run("train-policy", "--out", str(tmp_path), *args)
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_init_continues_from_a_policy_and_checks_its_contract(tmp_path):
    first = train(tmp_path / "first", config())
    second = train(tmp_path / "second", config(ppo={"init": str(first.policy_path), "rounds": 1}))
    assert second.status == "completed"
    code, _, err = cli_run("train-policy", "--backend", "simulated", "--slots", "mid", "--init",
                           str(first.policy_path), "--out", str(tmp_path))
    assert code == 2 and "slot_ids: policy has early, mid, late, task has mid" in err
