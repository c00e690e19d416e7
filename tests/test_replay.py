"""`esper replay` (events §7): the fold of a real run, time travel to every step, JSON and exit codes."""

from pathlib import Path

import msgspec
import pytest
from click.testing import CliRunner

from esper.cli.main import cli
from esper.events import catalogue as ev
from esper.events.log import LogWriter
from esper.lifecycle.decide import state_digest
from esper.replay import timetravel

pytestmark = pytest.mark.slow


def shared_run(tmp_path_factory, name: str, *args: str) -> Path:
    """`esper run ARGS` once per test session, whichever xdist worker asks first; the others wait
    for it and share the directory (tests only read it, or fork it into their own --out)."""
    import fcntl
    import os
    import shutil

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's directory, shared by the workers
    root = base / "shared-runs"
    root.mkdir(exist_ok=True)
    run_dir, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(run_dir, ignore_errors=True)
            result = CliRunner().invoke(cli, ["run", "--quiet", "--set", "run.threads=1", *args, "--out", str(root),
                                              "--name", name])
            assert result.exit_code == 0, result.stderr
            done.touch()
    return run_dir


class Capture:
    """The engine's log writer, remembering the engine's live state at every commit (step end)."""

    def __init__(self, writer, engine):
        self._writer, self._engine, self.states = writer, engine, []

    def commit(self) -> None:
        self._writer.commit()
        self.states.append((self._writer.next_seq - 1, self._engine.state))

    def __getattr__(self, name):
        return getattr(self._writer, name)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A synthetic run whose heuristic germinates, blends and fossilizes, with the live states."""
    from esper.policy.run_config import resolve
    from esper.policy.runner import Run, execute, load_data

    config = resolve({"run": {"task": "synthetic", "epochs": 30, "policy": "heuristic", "seed": 0, "threads": 1}})
    run_dir = tmp_path_factory.mktemp("replay") / "run"
    run_dir.mkdir()
    run = Run(config, run_dir, load_data(config))
    capture = Capture(run.writer, run.engine)
    run.engine.writer = capture
    outcome = execute(run)
    return run_dir, capture.states, outcome


def invoke(*args: str):
    result = CliRunner().invoke(cli, ["replay", *args])
    return result.exit_code, result.stdout, result.stderr


def test_the_run_grows_seeds(live):
    run_dir, _, outcome = live
    assert {s.stage.name for s in outcome.seeds} & {"FOSSILIZED", "PROBATIONARY", "BLENDING"}, outcome.seeds


def test_until_every_step_equals_the_live_state(live):
    run_dir, states, _ = live
    records = timetravel.load(run_dir).records
    assert len(states) >= 30
    for last_seq, state in states:
        assert timetravel.until(records, last_seq).state == state


def test_epoch_at_every_epoch_equals_the_live_state(live):
    run_dir, states, outcome = live
    records = timetravel.load(run_dir).records
    live_by_epoch = {state.envs[0].epoch: state.envs[0] for _, state in states if 0 in state.envs}
    for epoch in range(1, outcome.epochs + 1):
        replayed = timetravel.at_epoch(records, epoch)
        recorded = records[replayed.last_seq].event
        assert isinstance(recorded, ev.EpisodeFinished if epoch == outcome.epochs else ev.EpochTicked)
        assert replayed.digest.ok and replayed.digest.recorded == recorded.state_digest
        if epoch in live_by_epoch:  # the last epoch ends the episode, after the last commit
            assert replayed.state.envs[0] == live_by_epoch[epoch]
            assert state_digest(live_by_epoch[epoch]) == recorded.state_digest
        code, stdout, _ = invoke(str(run_dir), "--epoch", str(epoch), "--json")
        out = msgspec.json.decode(stdout)
        assert code == 0 and out["at"]["digest"]["ok"] and out["at"]["epoch"] == epoch
        assert out["at"]["digest"]["recorded"] == recorded.state_digest


def test_until_folds_through_the_end_of_the_batch(live):
    run_dir, _, _ = live
    records = timetravel.load(run_dir).records
    inside = next(i for i, r in enumerate(records) if not r.batch_end and i > 5)
    end = next(j for j in range(inside, len(records)) if records[j].batch_end)
    replayed = timetravel.until(records, inside)
    assert replayed.last_seq == end and replayed.records == end + 1


def test_replay_prints_the_header_and_the_seeds_table(live):
    run_dir, _, outcome = live
    code, stdout, _ = invoke(str(run_dir))
    assert code == 0
    lines = stdout.splitlines()
    assert lines[0].startswith("run run ") and "task synthetic" in lines[0] and "policy heuristic" in lines[0]
    assert "status completed; 1 episode, 30 epochs" in lines[1] and "tail clean" in lines[1]
    for seed in outcome.seeds:
        row = next(line for line in lines if f" {seed.seed_id} " in line)
        assert seed.slot in row and seed.blueprint in row and seed.stage.name in row and seed.outcome in row


def test_replay_json(live):
    run_dir, _, outcome = live
    code, stdout, _ = invoke(str(run_dir / "events.elog"), "--json")
    out = msgspec.json.decode(stdout)
    records = timetravel.load(run_dir).records
    assert code == 0
    assert out["run"]["status"] == "completed" and out["run"]["events"] == len(records)
    assert out["run"]["episodes"] == [{"env": 0, "episode": 0, "epochs": 30}] and out["at"] is None
    assert [s["seed_id"] for s in out["seeds"]] == [s.seed_id for s in outcome.seeds]
    assert {"env", "episode", "seed_id", "slot", "blueprint", "stage", "alpha", "germinated_epoch", "ended_epoch",
            "outcome", "last_contribution"} <= set(out["seeds"][0])
    code, stdout, _ = invoke(str(run_dir), "--json", "--env", "1")
    assert code == 0 and msgspec.json.decode(stdout)["seeds"] == []
    code, stdout, _ = invoke(str(run_dir), "--json", "--until", "1")
    out = msgspec.json.decode(stdout)
    assert out["run"]["status"] == "running" and out["run"]["events"] == 2 and out["seeds"] == []


def test_exit_codes(live, tmp_path):
    run_dir, _, _ = live
    assert invoke(str(tmp_path / "missing"))[0] == 2
    code, _, stderr = invoke(str(run_dir), "--until", "100000")
    assert code == 2 and stderr.startswith("esper: error: seq 100000 is not in the log")
    code, _, stderr = invoke(str(run_dir), "--epoch", "99")
    assert code == 2 and "no end of epoch 99" in stderr
    assert invoke(str(run_dir), "--epoch", "3", "--until", "5")[0] == 2
    assert invoke(str(run_dir), "--strict")[0] == 2

    # A state digest that the fold does not reproduce: exit code 1.
    records = list(timetravel.load(run_dir).records)
    i = next(i for i, r in enumerate(records) if isinstance(r.event, ev.EpochTicked) and r.event.epoch == 3)
    records[i] = msgspec.structs.replace(records[i], event=msgspec.structs.replace(records[i].event,
                                                                                   state_digest="0" * 64))
    tampered = tmp_path / "tampered.elog"
    with LogWriter.create(tampered, fsync="never") as writer:
        batch = []
        for record in records:
            batch.append(record)
            if record.batch_end:
                writer.append_batch(record.run_id, batch[0].env, batch[0].episode, [r.event for r in batch])
                batch = []
    code, stdout, stderr = invoke(str(tampered), "--epoch", "3")
    assert code == 1 and "MISMATCH" in stdout and "state_digest" in stderr
    assert invoke(str(tampered), "--epoch", "4")[0] == 0


def test_a_torn_tail_is_reported_and_the_rest_replays(live, tmp_path):
    run_dir, _, _ = live
    data = (run_dir / "events.elog").read_bytes()
    torn = tmp_path / "torn.elog"
    torn.write_bytes(data[:-7])
    code, stdout, stderr = invoke(str(torn))
    assert code == 0 and "tail torn at offset" in stdout and "torn tail" in stderr
    assert "status unterminated" in stdout
