"""`esper run --resume RUN_DIR --epochs E'` extends a run (runtime §6.4): the resumed log records
`EpisodeExtended` right after the copied prefix, and the episode runs on to its new last epoch.

Real logs from real runs (torch on digits, and the simulated backend), through the real entry
point; each log is then folded both ways, verified, loaded into DuckDB and, for one, forked.
"""

import os
import signal
from functools import reduce
from pathlib import Path

import pytest

from cli_helpers import esper
from esper.events import catalogue as ev
from esper.events.codec import stable_payload
from esper.events.envelope import SCHEMA_VERSION, Record
from esper.events.log_reader import LogReader
from esper.lifecycle import commands as cmd
from esper.lifecycle.decide import decide, state_digest
from esper.lifecycle.errors import DomainError, ReplayError
from esper.lifecycle.evolve import evolve
from esper.lifecycle.fast_evolve import Evolver
from esper.lifecycle.fold import fold
from esper.lifecycle.projections import Projector
from esper.lifecycle.state import initial_state
from esper.replay.loader import connect
from esper.replay.verify import verify_log
from support import SLOTS, Ledger, epoch_metrics, run_started

pytestmark = pytest.mark.slow

# One torch thread (the suite runs two workers on two cores); a cosine schedule with no warm-up, so
# that the stretched schedule shows in the recorded learning rates.
DIGITS = ["--quiet", "--task", "digits", "--seed", "1", "--set", "run.threads=1",
          "--set", "train.lr_schedule='cosine'", "--set", "train.warmup_steps=0"]
SIMULATED = ["--quiet", "--backend", "simulated", "--task", "digits", "--policy", "random", "--seed", "3",
             "--set", "train.lr_schedule='cosine'", "--set", "train.warmup_steps=0"]


def records(run_dir: Path) -> list:
    return list(LogReader(run_dir / "events.elog").records())


def payloads(run_dir: Path) -> list[bytes]:
    """Every record after RunStarted, less timestamps, run ids and volatile fields."""
    return [stable_payload(r) for r in records(run_dir)[1:]]


def of_type(log: list, cls: type) -> list:
    return [r for r in log if isinstance(r.event, cls)]


def resume(run_dir: Path, *args: str) -> tuple[int, str, str]:
    return esper("run", "--quiet", "--set", "run.threads=1", "--resume", str(run_dir), *args)


def assert_extended(run_dir: Path, parent_epochs: int, epochs: int) -> list:
    """The resumed log extends its episode once, from the parent's length, and ends at `epochs`;
    both fold paths agree on it, and the log verifies."""
    log = records(run_dir)
    (extended,) = of_type(log, ev.EpisodeExtended)
    start = log[0].event
    assert start.forked_from is not None and start.config["run"]["epochs"] == epochs
    assert isinstance(log[extended.seq - 1].event, ev.CheckpointWritten)  # right after the copied prefix
    assert log[extended.seq - 1].seq == start.forked_from.seq
    assert (extended.event.previous_max_epochs, extended.event.max_epochs) == (parent_epochs, epochs)
    assert extended.batch_end and (extended.env, extended.episode) == (0, 0)
    assert of_type(log, ev.EpisodeStarted)[0].event.max_epochs == parent_epochs
    finished = of_type(log, ev.EpisodeFinished)[0].event
    assert finished.epochs == finished.epoch == epochs
    assert [r.event.epoch for r in of_type(log, ev.EpochCompleted)] == list(range(1, epochs + 1))
    assert log[-1].event.status == "completed"
    fast, slow = fold(log), reduce(evolve, log, initial_state())
    assert fast.state == slow and fast.state.envs[0].max_epochs == epochs == slow.envs[0].max_epochs
    projector = Projector()
    for record in log:
        projector.apply(record)
    assert projector.snapshot() == fast.projections
    assert dict(fast.projections.run.counts)["episodes_extended"] == 1
    assert finished.state_digest == state_digest(slow.envs[0])
    report = verify_log(run_dir)
    assert report.ok, report.describe()
    return log


@pytest.fixture(scope="module")
def completed(tmp_path_factory) -> Path:
    """A completed 3-epoch digits run: checkpoints after epochs 1 and 2 (none at the last epoch)."""
    out = tmp_path_factory.mktemp("runs")
    code, _, err = esper("run", *DIGITS, "--epochs", "3", "--out", str(out), "--name", "done")
    assert code == 0, err
    return out / "done"


# -- the decider ----------------------------------------------------------------------------


def started(max_epochs: int = 6, n_envs: int = 2) -> Ledger:
    ledger = Ledger()
    ledger.execute(cmd.StartRun(run=run_started(n_envs=n_envs)))
    ledger.execute(cmd.StartEpisode(env=0, episode_seed=1, host_seed=1, host_params=320, slots_enabled=SLOTS,
                                    max_epochs=max_epochs))
    return ledger


def test_an_extension_grows_a_running_episode_and_both_folds_agree():
    ledger = started()
    ledger.execute(cmd.RecordEpoch(env=0, epoch=1, metrics=epoch_metrics(1)))
    ledger.execute(cmd.Tick(env=0, epoch=1))
    (record,) = ledger.execute(cmd.ExtendEpisode(env=0, max_epochs=9))
    assert record.event == ev.EpisodeExtended(epoch=1, max_epochs=9, previous_max_epochs=6)
    assert ledger.state.envs[0].max_epochs == 9 and ledger.state.envs[0].ticked
    ledger.execute(cmd.ExtendEpisode(env=0, max_epochs=12))
    evolver = Evolver()
    for r in ledger.records:
        evolver.apply(r)
    assert evolver.state() == ledger.state == reduce(evolve, ledger.records, initial_state())


@pytest.mark.parametrize("command, code", [
    (cmd.ExtendEpisode(env=0, max_epochs=6), "invalid_extension"),
    (cmd.ExtendEpisode(env=0, max_epochs=4), "invalid_extension"),
    (cmd.ExtendEpisode(env=1, max_epochs=9), "episode_not_running"),
    (cmd.ExtendEpisode(env=2, max_epochs=9), "unknown_env"),
])
def test_an_extension_that_does_not_grow_a_running_episode_is_refused(command, code):
    ledger = started()
    with pytest.raises(DomainError) as refused:
        decide(command, ledger.state)
    assert refused.value.code == code


def test_a_finished_episode_or_run_cannot_be_extended():
    ledger = started()
    ledger.execute(cmd.FinishEpisode(env=0))
    with pytest.raises(DomainError, match="episode_not_running"):
        decide(cmd.ExtendEpisode(env=0, max_epochs=9), ledger.state)
    ledger.execute(cmd.FinishRun(status="completed"))
    with pytest.raises(DomainError, match="run_finished"):
        decide(cmd.ExtendEpisode(env=0, max_epochs=9), ledger.state)
    with pytest.raises(DomainError, match="run_not_started"):
        decide(cmd.ExtendEpisode(env=0, max_epochs=9), initial_state())


@pytest.mark.parametrize("previous, new", [(5, 9), (6, 6), (6, 3)])
def test_folding_an_extension_the_decider_would_not_write_fails_both_ways(previous, new):
    ledger = started()
    bad = Record(seq=2, run_id="test", env=0, episode=0, ts=0, schema=SCHEMA_VERSION, batch_end=True,
                 event=ev.EpisodeExtended(epoch=0, max_epochs=new, previous_max_epochs=previous))
    with pytest.raises(ReplayError, match="extension") as slow:
        reduce(evolve, ledger.records + [bad], initial_state())
    with pytest.raises(ReplayError) as fast:
        fold(ledger.records + [bad])
    assert str(fast.value) == str(slow.value)


# -- real runs ------------------------------------------------------------------------------


def test_a_completed_run_resumed_with_more_epochs_trains_to_the_new_end(completed, tmp_path):
    parent_bytes = (completed / "events.elog").read_bytes()
    runs = []
    for name in ("a", "b"):  # two identical extended resumes
        code, out, err = resume(completed, "--epochs", "5", "--out", str(tmp_path / name))
        assert code == 0, err
        assert "completed: 5 epochs" in out
        runs.append(tmp_path / name / "done.r1")
    assert (completed / "events.elog").read_bytes() == parent_bytes, "the parent is never modified"
    log = assert_extended(runs[0], 3, 5)
    assert payloads(runs[0]) == payloads(runs[1]), "the same extension twice gives the same log"
    # The copied prefix is the parent's; from the extension on, the schedule is the longer one.
    cut = log[0].event.forked_from.seq
    assert payloads(runs[0])[:cut] == payloads(completed)[:cut]
    before = {r.event.epoch: r.event.lr for r in of_type(records(completed), ev.EpochCompleted)}
    after = {r.event.epoch: r.event.lr for r in of_type(log, ev.EpochCompleted)}
    assert after[1] == before[1] and after[2] == before[2]
    assert after[3] > before[3], "the stretched cosine is higher where the shorter one was ending"
    assert after[5] < after[4] < after[3]
    # DuckDB: the episode's length as it stands, and the length it started with.
    con = connect([runs[0]])
    rows = con.execute("SELECT max_epochs, initial_max_epochs, epochs, finished FROM episodes").fetchall()
    assert rows == [(5, 3, 5, True)]
    assert con.execute("SELECT epoch, (event->>'$.max_epochs')::INTEGER FROM events WHERE type = 'EpisodeExtended'"
                       ).fetchall() == [(2, 5)]
    assert con.execute("SELECT count(*), max(epoch) FROM epochs").fetchall() == [(5, 5)]
    code, out, _ = esper("replay", str(runs[0]), "--verify")
    assert code == 0 and out.startswith("OK:"), out
    code, out, _ = esper("log", "check", str(runs[0]))
    assert code == 0 and "OK" in out


def test_resuming_a_completed_run_with_its_own_epochs_runs_its_last_epoch_again(completed, tmp_path):
    code, out, err = resume(completed, "--epochs", "3", "--out", str(tmp_path))
    assert code == 0, err
    log = records(tmp_path / "done.r1")
    assert not of_type(log, ev.EpisodeExtended)
    assert payloads(tmp_path / "done.r1") == payloads(completed)


def test_shortening_is_refused_with_one_line(completed, tmp_path):
    code, _, err = resume(completed, "--epochs", "2", "--out", str(tmp_path))
    assert code == 2 and "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith("esper: error: ") and "--epochs 2 would shorten the run" in line
    assert "run.epochs = 3 recorded" in line
    assert not any(tmp_path.iterdir()), "a refused resume creates nothing"


def test_an_interrupted_run_resumed_with_more_epochs(tmp_path):
    """Interrupted (SIGINT) during epoch 2 of 4: it ends that epoch and its checkpoint; the resume
    extends the episode to 6 epochs after that checkpoint."""
    from esper.policy.run_config import resolve
    from esper.policy.runner import Run, execute, load_data

    config = resolve({"run": {"task": "digits", "epochs": 4, "seed": 1, "threads": 1},
                      "train": {"lr_schedule": "cosine", "warmup_steps": 0}})

    def interrupt_at_2(engine, metrics):
        if metrics.epoch == 2:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: the epoch finishes, then the run stops

    (tmp_path / "cut").mkdir()
    assert execute(Run(config, tmp_path / "cut", load_data(config), interrupt_at_2)).status == "interrupted"
    assert records(tmp_path / "cut")[-1].event.status == "interrupted"
    code, out, err = resume(tmp_path / "cut", "--epochs", "6")
    assert code == 0, err
    log = assert_extended(tmp_path / "cut.r1", 4, 6)
    assert log[0].event.forked_from.seq == of_type(records(tmp_path / "cut"), ev.CheckpointWritten)[-1].seq
    assert of_type(log, ev.EpisodeExtended)[0].event.epoch == 2


def test_the_simulated_backend_extends_and_forks(tmp_path):
    code, _, err = esper("run", *SIMULATED, "--epochs", "6", "--out", str(tmp_path), "--name", "sim")
    assert code == 0, err
    code, _, err = resume(tmp_path / "sim", "--epochs", "10")
    assert code == 0, err
    log = assert_extended(tmp_path / "sim.r1", 6, 10)
    lrs = [r.event.lr for r in of_type(log, ev.EpochCompleted)]
    assert lrs[6] > lrs[4] and lrs[9] < lrs[6]
    # A fork reproduces the extension: from the start (the resumed run's only checkpoint files come
    # after it), the recorded length first, then the same EpisodeExtended where the parent has it.
    extended = of_type(log, ev.EpisodeExtended)[0].seq
    at = next(r.seq for r in log if r.seq > extended and isinstance(r.event, ev.EpochTicked))
    code, out, err = esper("fork", str(tmp_path / "sim.r1"), "--at", str(at), "--policy", "random",
                           "--out", str(tmp_path / "fork"))
    assert code == 0, err
    forked = records(tmp_path / "fork")
    assert payloads(tmp_path / "fork")[:at] == payloads(tmp_path / "sim.r1")[:at]
    assert of_type(forked, ev.EpisodeExtended)[0].seq == extended and forked[-1].event.status == "completed"
    assert verify_log(tmp_path / "fork").ok


def test_with_no_usable_checkpoint_the_run_starts_again_with_the_new_length(tmp_path):
    no_checkpoints = [*SIMULATED, "--set", "run.checkpoint_every=0"]
    code, _, err = esper("run", *no_checkpoints, "--epochs", "4", "--out", str(tmp_path), "--name", "bare")
    assert code == 0, err
    code, _, err = resume(tmp_path / "bare", "--epochs", "7")
    assert code == 0, err
    log = records(tmp_path / "bare.r1")
    assert log[0].event.forked_from.seq == 0  # nothing copied past the parent's RunStarted
    assert not of_type(log, ev.EpisodeExtended)
    assert of_type(log, ev.EpisodeStarted)[0].event.max_epochs == 7
    assert of_type(log, ev.EpisodeFinished)[0].event.epochs == 7
    assert verify_log(tmp_path / "bare.r1").ok
