"""Ctrl-C and SIGTERM under data parallelism (runtime §6.5), and `--compile` with `--backend ddp`
(runtime §3.5, §5.3): gloo on CPU, two real processes.

A terminal sends SIGINT to its foreground process group. torch's agent starts every worker in a
session of its own, so that signal reaches the launcher alone (`esper run --nproc`, or torchrun),
which passes it on. Each run here starts in a new session, and the test signals that whole group as
a terminal would. The workers live in other sessions, so "nothing left behind" is checked through a
marker in the environment every process of the run inherits.

Every subprocess has a timeout and `dist.timeout_s` is short, so a hang fails instead of blocking.
"""

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from esper.cli.main import cli
from esper.events import catalogue as ev
from esper.events.log_reader import LogReader
from esper.lifecycle.fold import fold

GUARDS = ["--set", "dist.verify_every=1", "--set", "dist.timeout_s=60", "--set", "run.threads=1"]
ESPER = [sys.executable, "-m", "esper"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "-m", "esper"]
# A sitecustomize.py, put first on PYTHONPATH (`esper run --nproc` starts `python -m esper` itself, so
# there is no child script to hand it): the workers (torchrun sets RANK for them alone) sleep in a
# torch.distributed call, from its (AFTER+1)-th call on: ESPER_TEST_SLOW="NAME:AFTER:SECONDS". Every
# rank makes the same calls, so the ranks stay in step; a signal then lands inside a pass for certain.
SITE = """\
import os

if os.environ.get("RANK") is not None and os.environ.get("ESPER_TEST_SLOW"):
    import time

    import torch.distributed as dist

    name, after, seconds = os.environ["ESPER_TEST_SLOW"].split(":")
    original, calls = getattr(dist, name), [0]

    def slowed(*args, **kwargs):
        calls[0] += 1
        if calls[0] > int(after):
            time.sleep(float(seconds))
        return original(*args, **kwargs)

    setattr(dist, name, slowed)
"""


def records(run_dir: Path) -> list:
    return list(LogReader(run_dir / "events.elog").records())


def events(run_dir: Path, kind: type) -> list:
    return [r.event for r in records(run_dir) if isinstance(r.event, kind)]


def marked(mark: str) -> list[int]:
    """Live processes whose environment carries the marker (zombies have none to read)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if f"ESPER_TEST_MARK={mark}".encode() in f.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


class Launched:
    """One command in a session of its own, its output in files (a worker left running would hold
    a pipe open)."""

    def __init__(self, command: list[str], tmp_path: Path, slow: str = "", **env: str):
        self.mark = uuid.uuid4().hex
        self.run_dir = tmp_path / "runs" / "x"
        environment = dict(os.environ, ESPER_TEST_MARK=self.mark, **env)
        if slow:
            site = tmp_path / "site"
            site.mkdir()
            (site / "sitecustomize.py").write_text(SITE)
            environment["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
            environment["ESPER_TEST_SLOW"] = slow
        self.stdout, self.stderr = tmp_path / "stdout", tmp_path / "stderr"
        with open(self.stdout, "w") as out, open(self.stderr, "w") as err:
            self.process = subprocess.Popen([*command, "--out", str(tmp_path / "runs"), "--name", "x"], stdout=out,
                                            stderr=err, env=environment, start_new_session=True)

    def wait_for(self, kind: type, count: int, after: type | None = None, timeout: float = 90) -> int:
        """Until the log holds `count` records of `kind` (after the first of `after`, if given)."""
        deadline = time.monotonic() + timeout
        log = self.run_dir / "events.elog"
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.stderr.read_text()
            if log.exists():
                found = [r.event for r in LogReader(log).records()]
                if after is not None:
                    found = found[next((i for i, e in enumerate(found) if isinstance(e, after)), len(found)):]
                seen = sum(isinstance(e, kind) for e in found)
                if seen >= count:
                    return seen
            time.sleep(0.05)
        raise AssertionError(f"no {count} {kind.__name__} records within {timeout} s: {self.stderr.read_text()}")

    def signal(self, sig: int) -> None:
        os.killpg(self.process.pid, sig)  # as a terminal does: the launcher's whole process group

    def finish(self, timeout: float = 90) -> tuple[int, str, str]:
        code = self.process.wait(timeout=timeout)
        return code, self.stdout.read_text(), self.stderr.read_text()

    def left_behind(self) -> list[int]:
        try:
            os.killpg(self.process.pid, 0)
            group = [self.process.pid]
        except ProcessLookupError:
            group = []
        deadline = time.monotonic() + 2  # a worker's last moments after its launcher returned
        while marked(self.mark) and time.monotonic() < deadline:
            time.sleep(0.05)
        return group + marked(self.mark)

    def kill(self) -> None:
        for pid in marked(self.mark):
            try:
                os.killpg(os.getpgid(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def launch(tmp_path):
    started: list[Launched] = []

    def start(*command: str, slow: str = "", **env: str) -> Launched:
        launched = Launched(list(command), tmp_path, slow, **env)
        started.append(launched)
        return launched

    yield start
    for launched in started:  # a failed test still leaves nothing running
        launched.kill()


def assert_interrupted_run(run_dir: Path, stdout: str, last: int) -> None:
    """RunFinished(interrupted) right after the commit of epoch `last`, the one that was running."""
    log = records(run_dir)
    assert isinstance(log[-1].event, ev.RunFinished) and log[-1].event.status == "interrupted", log[-1]
    assert isinstance(log[-2].event, ev.CheckpointWritten)  # the last epoch was committed whole
    assert fold(log).state.status == "interrupted"
    assert [e.epoch for e in events(run_dir, ev.EpochCompleted)] == list(range(1, last + 1))
    assert f"interrupted: {last} epochs" in stdout


# Epoch 3's pass and every later one open with a 3 s sleep on every rank: a signal sent 0.5 s after
# epoch 2 reached the log lands inside epoch 3 (sent at once, it could still come before rank 0's
# check for one that follows the commit, which must then stop the run after epoch 2).
SLOW_THIRD = "broadcast_object_list:2:3"


def inside_epoch_3(run: "Launched") -> None:
    assert run.wait_for(ev.EpochCompleted, 2) == 2
    time.sleep(0.5)


# -- esper run --nproc 2 ----------------------------------------------------------------------


def test_ctrl_c_under_nproc_lets_the_epoch_finish_and_exits_130(launch):
    """The launcher passes the signal on and waits for the workers, without torch's deadline:
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT=0 would have torch's agent SIGKILL them at once, mid-epoch.
    (SIGTERM takes the same path; the train-policy test below sends both.)"""
    run = launch(*ESPER, "run", "--quiet", "--task", "digits", "--epochs", "30", "--nproc", "2", *GUARDS,
                 slow=SLOW_THIRD, TORCH_ELASTIC_SHUTDOWN_TIMEOUT="0")
    inside_epoch_3(run)
    run.signal(signal.SIGINT)
    code, stdout, stderr = run.finish()
    assert code == 130, stderr
    assert_interrupted_run(run.run_dir, stdout, last=3)
    # Nothing but the run's own two lines: no traceback, no word from torch's agent.
    hint = f"esper run --resume {run.run_dir} --nproc 2"
    assert stderr.splitlines() == [f"run directory: {run.run_dir}", f"resume with: {hint}"]
    assert run.left_behind() == []
    alone = CliRunner().invoke(cli, ["run", "--resume", str(run.run_dir)])  # outside torchrun: one line
    assert alone.exit_code == 2 and alone.stderr.count("\n") == 1 and hint in alone.stderr, alone.stderr
    # The printed command resumes it: two ranks again, to the end.
    resumed = subprocess.run([*ESPER, *hint.split()[1:], "--quiet"], capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    resumed_log = records(run.run_dir.with_name("x.r1"))
    assert resumed_log[0].event.world_size == 2 and fold(resumed_log).state.status == "completed"
    assert [e.epoch for e in events(run.run_dir.with_name("x.r1"), ev.EpochCompleted)] == list(range(1, 31))


def test_a_second_ctrl_c_under_nproc_stops_every_rank_at_once(launch):
    """The third pass (epoch 3) opens with a 60 s sleep on every rank. The first Ctrl-C waits for
    it; the second kills the workers at once: exit 130, the log valid to its last commit (epoch 2)
    and unterminated, and no worker left."""
    run = launch(*ESPER, "run", "--quiet", "--task", "digits", "--epochs", "30", "--nproc", "2", *GUARDS,
                 slow="broadcast_object_list:2:60")
    inside_epoch_3(run)
    run.signal(signal.SIGINT)
    time.sleep(1.0)
    assert run.process.poll() is None  # the first one waits for the epoch
    run.signal(signal.SIGINT)
    second = time.monotonic()
    code, stdout, stderr = run.finish(timeout=30)
    assert time.monotonic() - second < 10
    assert code == 130, stderr
    assert "Traceback" not in stderr and stderr.splitlines() == [f"run directory: {run.run_dir}"]
    assert run.left_behind() == []
    log = records(run.run_dir)
    assert fold(log).projections.run.status == "unterminated"  # no RunFinished
    assert [e.epoch for e in events(run.run_dir, ev.EpochCompleted)] == [1, 2]
    assert isinstance(log[-1].event, ev.CheckpointWritten)  # the commit of epoch 2
    check = CliRunner().invoke(cli, ["log", "check", str(run.run_dir)])
    assert check.exit_code == 0, check.output


# -- plain torchrun ----------------------------------------------------------------------------


def test_ctrl_c_under_plain_torchrun_winds_the_workers_down(launch):
    """torchrun's agent forwards the first SIGINT to each worker (their first: the epoch finishes and
    rank 0 writes RunFinished(interrupted)) and waits for them, but only `--shutdown-timeout` seconds
    (30 by default; then SIGKILL, and the log, valid to its last commit, reads as unterminated);
    torchrun itself then exits 1 with its own traceback of the SignalException. Those are torch's."""
    run = launch(*TORCHRUN, "run", "--quiet", "--task", "digits", "--epochs", "30", "--backend", "ddp", *GUARDS,
                 slow=SLOW_THIRD)
    inside_epoch_3(run)
    run.signal(signal.SIGINT)
    code, stdout, stderr = run.finish()
    assert code == 1, stderr  # torchrun's, whatever the workers' codes
    assert "SignalException" in stderr
    assert_interrupted_run(run.run_dir, stdout, last=3)
    assert f"resume with: esper run --resume {run.run_dir} --nproc 2" in stderr
    assert run.left_behind() == []


# -- esper train-policy --nproc 2 -------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_under_train_policy_nproc_drops_the_partial_round(launch, sig):
    """Every step takes 0.4 s (a sleep before each rank's gather), a round 6 steps. The signal
    comes early in round 2: its steps so far stay in the log, but no update uses them, and the
    newest policy is still round 1's. The training then resumes, in one process, from round 1."""
    run = launch(*ESPER, "train-policy", "--quiet", "--backend", "simulated", "--task", "digits", "--envs", "4",
                 "--episode-length", "6", "--rounds", "3", "--seed", "5", "--nproc", "2", *GUARDS,
                 slow="gather_object:0:0.4")
    run.wait_for(ev.EpochCompleted, 1, after=ev.PolicyUpdated)
    run.signal(sig)
    code, stdout, stderr = run.finish()
    assert code == 130, stderr
    assert stderr.splitlines() == [f"run directory: {run.run_dir}",
                                   f"resume with: esper train-policy --resume {run.run_dir}"]
    assert run.left_behind() == []
    log = records(run.run_dir)
    assert isinstance(log[-1].event, ev.RunFinished) and log[-1].event.status == "interrupted"
    updates = events(run.run_dir, ev.PolicyUpdated)
    assert [u.round for u in updates] == [1]
    last_update = max(i for i, r in enumerate(log) if isinstance(r.event, ev.PolicyUpdated))
    partial = [r for r in log[last_update:] if isinstance(r.event, ev.EpochCompleted)]
    assert 0 < len(partial) < 4 * 6  # part of round 2 ran
    assert (run.run_dir / "policy" / "latest").read_text().strip() == "round-000001.pt"
    assert "interrupted: 1 rounds" in stdout
    resumed = CliRunner().invoke(cli, ["train-policy", "--resume", str(run.run_dir), "--quiet"])
    assert resumed.exit_code == 0, resumed.stderr
    assert [u.round for u in events(run.run_dir.with_name("x.r1"), ev.PolicyUpdated)] == [1, 2, 3]


# -- --compile with --backend ddp -------------------------------------------------------------


@pytest.mark.slow
def test_compiled_ranks_stay_identical_and_score_what_eager_ones_do(tmp_path):
    """Seed 0 germinates a conv_light seed at epoch 1 (trained in epoch 2, culled after it), so the
    seed's graphs are compiled and the wrapper is rebuilt twice. Every rank's parameters are
    compared after every epoch (dist.verify_every=1: a mismatch fails the run). Tolerance: each
    epoch's val_acc within 1 pp (under 3 of 270 samples) and val_loss within 1e-3 relative of eager;
    measured: identical val_acc, val_loss within 1e-7."""
    args = ["run", "--quiet", "--task", "digits", "--policy", "random", "--seed", "0", "--epochs", "3", "--nproc",
            "2", *GUARDS, "--out", str(tmp_path)]
    eager = subprocess.run([*ESPER, *args, "--name", "eager"], capture_output=True, text=True, timeout=120)
    assert eager.returncode == 0, eager.stderr
    compiled = subprocess.run([*ESPER, *args, "--name", "compiled", "--compile"], capture_output=True, text=True,
                              timeout=400)
    assert compiled.returncode == 0, compiled.stderr
    header = records(tmp_path / "compiled")[0].event
    assert header.world_size == 2 and header.config["train"]["compile"] is True
    one, two = events(tmp_path / "eager", ev.EpochCompleted), events(tmp_path / "compiled", ev.EpochCompleted)
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert abs(a.val_acc - b.val_acc) <= 1.0 and b.val_loss == pytest.approx(a.val_loss, rel=1e-3)
        assert a.recompiles is None
    assert two[1].recompiles > 0  # the seed's own graphs
    germinated = [(e.epoch, e.blueprint) for e in events(tmp_path / "compiled", ev.SeedGerminated)]
    assert germinated == [(1, "conv_light")]
    assert germinated == [(e.epoch, e.blueprint) for e in events(tmp_path / "eager", ev.SeedGerminated)]
    assert re.search(r"completed: 3 epochs", compiled.stdout)
