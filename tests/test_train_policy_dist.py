"""`esper train-policy` under torchrun (policy §7.4): gloo on CPU, two real processes.

Every multi-process test has a subprocess timeout and a short `dist.timeout_s`, so a hang fails
the test instead of blocking the suite.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import torch
from click.testing import CliRunner

from esper.cli.main import cli
from esper.events import catalogue as ev
from esper.events.codec import stable_payload
from esper.events.log_reader import LogReader
from esper.lifecycle.fold import fold
from esper.policy.ppo_policy import read_checkpoint

TESTS = Path(__file__).parent
# Whole-episode rounds (T = E - 1), held-out evaluation on 3 envs (one rank owns 2, the other 1) and
# a checkpoint every round.
TRAINING = ["--backend", "simulated", "--task", "digits", "--envs", "4", "--episode-length", "6", "--rounds", "3",
            "--eval-every", "2", "--eval-episodes", "3", "--seed", "5", "--quiet", "--set", "run.threads=1",
            "--set", "run.fsync=never", "--set", "dist.timeout_s=20"]
# Outputs of a batched forward, whose last bits may change with the batch's composition.
FORWARD_FLOATS = {"PolicyDecided": ("log_prob", "log_prob_total", "value", "entropy"),
                  "PolicyUpdated": ("logprob_drift",)}


def esper(*args: str, runner: list[str] | None = None, fault: str = "") -> subprocess.CompletedProcess:
    command = runner or [sys.executable, "-m", "esper"]
    return subprocess.run([*command, "train-policy", *args], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, ESPER_TEST_FAULT=fault))


def in_process(*args: str):
    return CliRunner().invoke(cli, ["train-policy", *args])


def torchrun(*args: str, fault: str = "") -> subprocess.CompletedProcess:
    """Both ranks through tests/train_policy_dist_child.py, which gives rank 1 the fault, if any."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                str(TESTS / "train_policy_dist_child.py")]
    return esper(*args, runner=launcher, fault=fault)


def records(run_dir: Path) -> list:
    return list(LogReader(run_dir / "events.elog").records())


def esper_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("esper:")]


def assert_same_log(one: list, two: list) -> None:
    """Identical payloads, but for the batched forward's floats, within 1e-6 (and the rationale's
    printed probabilities and value, which print those floats)."""
    assert len(one) == len(two)
    for a, b in zip(one[1:], two[1:]):
        if stable_payload(a) == stable_payload(b):
            continue
        floats = FORWARD_FLOATS.get(type(a.event).__name__)
        assert floats is not None, (a, b)
        pa, pb = (msgspec.msgpack.decode(stable_payload(r))[-1] for r in (a, b))
        for name in floats:
            x, y = pa.pop(name), pb.pop(name)
            x, y = (x, y) if isinstance(x, dict) else ({0: x}, {0: y})
            assert x.keys() == y.keys() and all(abs(x[k] - y[k]) <= 1e-6 for k in x), (name, x, y)
        if "rationale" in pa:
            pa["rationale"], pb["rationale"] = (re.sub(r"[-+\d.]+", "#", p["rationale"]) for p in (pa, pb))
        assert pa == pb


def network(run_dir: Path) -> dict:
    latest = (run_dir / "policy" / "latest").read_text().strip()
    return read_checkpoint(run_dir / "policy" / latest)["policy"]["network"]


def assert_same_weights(one: Path, two: Path) -> None:
    a, b = network(one), network(two)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_log_and_learn_what_one_does_and_resume_with_either(tmp_path):
    """W = 1 against `--nproc 2`: the same log within the batched forward's floats, bit-identical
    weights; then each resumes for a fourth round in one process and in two (a checkpoint holds
    every env, whatever the world size that wrote it), and all four resumed trainings agree."""
    single = in_process(*TRAINING, "--out", str(tmp_path), "--name", "one")
    assert single.exit_code == 0, single.stderr
    double = esper(*TRAINING, "--out", str(tmp_path), "--name", "two", "--nproc", "2")
    assert double.returncode == 0, double.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # rank 1 created nothing
    assert double.stdout == single.stdout.replace("/one/", "/two/").replace("/one\n", "/two\n")
    log = records(tmp_path / "two")
    assert log[0].event.world_size == 2 and log[0].event.n_envs == 7
    assert fold(log).state.status == "completed"
    assert len([r for r in log if isinstance(r.event, ev.PolicyUpdated)]) == 3
    assert {r.env for r in log if isinstance(r.event, ev.EpisodeStarted) and r.event.evaluation} == {4, 5, 6}
    assert_same_log(records(tmp_path / "one"), log)
    assert_same_weights(tmp_path / "one", tmp_path / "two")

    for name in ("one", "two"):
        resumed = in_process("--resume", str(tmp_path / name), "--rounds", "4", "--quiet")
        assert resumed.exit_code == 0, resumed.stderr
        resumed = esper("--resume", str(tmp_path / name), "--rounds", "4", "--quiet", "--nproc", "2")
        assert resumed.returncode == 0, resumed.stderr
    reference = records(tmp_path / "one.r1")
    assert fold(reference).state.status == "completed" and reference[0].event.world_size == 1
    for name in ("two.r1", "one.r2", "two.r2"):
        log = records(tmp_path / name)
        assert log[0].event.world_size == (2 if name.endswith("r2") else 1)
        assert_same_log(reference, log)
        assert_same_weights(tmp_path / "one.r1", tmp_path / name)


@pytest.mark.parametrize("args, message", [
    (["--dist", "off"], "--dist off refuses to train distributed, and torchrun started 2 processes"),
    (["--envs", "1"], "--envs 1 leaves a process without an env: env i runs on rank i mod 2"),
])
def test_refusals_under_torchrun_are_one_line_on_every_rank_that_reaches_them(tmp_path, args, message):
    result = torchrun(*TRAINING, "--out", str(tmp_path), *args)
    assert result.returncode != 0
    lines = esper_lines(result.stderr)
    # torchrun stops the other rank once one exits, which may be before it got as far.
    assert 1 <= len(lines) <= 2 and all(line.startswith("esper: error: ") and message in line for line in lines), \
        result.stderr
    assert "Traceback" not in result.stderr.split("esper: error:")[0]  # nothing of the workers' own
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("args, message", [
    (["--nproc", "3"], "--envs 2 leaves a process without an env"),
    (["--nproc", "2", "--dist", "off"], "--dist off refuses"),
    (["--nproc", "2", "--resume", "somewhere"], "holds no run log to resume"),
])
def test_nproc_refusals_come_before_any_process_starts(tmp_path, args, message):
    result = in_process(*TRAINING, "--envs", "2", "--out", str(tmp_path), *args)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("fault", ["lost", "stall"])
def test_a_lost_or_silent_rank_stops_the_training_with_one_line(tmp_path, fault):
    """Rank 1 dies, or stops answering, in round 2: rank 0's next collective fails at once, or
    after `dist.timeout_s`; it prints one line and records the failure in the log."""
    result = torchrun(*TRAINING, "--out", str(tmp_path), "--name", "f", "--set", "dist.timeout_s=5", fault=fault)
    assert result.returncode != 0
    lines = esper_lines(result.stderr)
    assert lines == [lines[0]] and lines[0].startswith("esper: error: rank 0: a distributed peer was lost or "
                                                       "timed out"), result.stderr
    log = records(tmp_path / "f")
    finished = log[-1].event
    assert isinstance(finished, ev.RunFinished) and finished.status == "failed" and finished.error_type == "PeerLost"
    assert [r.event.round for r in log if isinstance(r.event, ev.PolicyUpdated)] == [1]
