"""`esper replay --rerun` and `esper fork` (events §7, §10) on real runs."""

from pathlib import Path

import msgspec
import pytest
from click.testing import CliRunner

from esper.cli.main import cli
from esper.events import catalogue as ev
from esper.events.codec import stable_payload
from esper.events.log import LogWriter, prefix_sha256
from esper.replay import timetravel

pytestmark = pytest.mark.slow


def invoke(*args: str):
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


def rewrite(source: Path, dest: Path, change) -> None:
    """Copy a log record by record, `change(record)` replacing each one's payload."""
    records = timetravel.load(source).records
    with LogWriter.create(dest, fsync="never") as writer:
        batch = []
        for record in records:
            batch.append(change(record))
            if record.batch_end:
                writer.append_batch(record.run_id, record.env, record.episode, [r.event for r in batch])
                batch = []


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    from test_replay import shared_run

    return shared_run(tmp_path_factory, "digits-6", "--task", "digits", "--epochs", "6")


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Path:
    """A heuristic synthetic run with seeds, checkpoints every epoch (the last two kept)."""
    from test_replay import shared_run

    return shared_run(tmp_path_factory, "synthetic-heuristic-30-s0", "--task", "synthetic", "--epochs", "30",
                      "--seed", "0", "--policy", "heuristic")


# -- rerun --------------------------------------------------------------------------------------


def test_rerun_reproduces_a_digits_run(digits, tmp_path):
    code, stdout, stderr = invoke("replay", str(digits), "--rerun", "--json", "--out", str(tmp_path / "again"))
    out = msgspec.json.decode(stdout)
    assert code == 0, stdout + stderr
    assert out["ok"] and out["divergence"] is None
    assert out["compared"] == len(timetravel.load(digits).records) == out["new_records"]
    assert (tmp_path / "again" / "events.elog").is_file()


def test_rerun_reports_a_tampered_config(digits, tmp_path):
    def change(record):
        if isinstance(record.event, ev.RunStarted):
            config = {**record.event.config, "train": {**record.event.config["train"], "grad_clip": 0.5}}
            return msgspec.structs.replace(record, event=msgspec.structs.replace(record.event, config=config))
        return record

    tampered = tmp_path / "tampered.elog"
    rewrite(digits, tampered, change)
    code, stdout, _ = invoke("replay", str(tampered), "--rerun")
    assert code == 1
    lines = stdout.splitlines()
    assert lines[0].startswith("divergence at seq 0 (RunStarted; new RunStarted): event.config_hash: recorded ")
    assert lines[1].startswith("  recorded: {") and lines[2].startswith("  new:      {")


def test_rerun_reports_the_first_divergent_record(digits, tmp_path):
    """A config changed with its hash: the run itself diverges at its first epoch's numbers."""
    from esper.policy.run_config import config_hash, structure

    def change(record):
        if isinstance(record.event, ev.RunStarted):
            config = {**record.event.config, "train": {**record.event.config["train"], "grad_clip": 0.5}}
            event = msgspec.structs.replace(record.event, config=config, config_hash=config_hash(structure(config)))
            return msgspec.structs.replace(record, event=event)
        return record

    tampered = tmp_path / "tampered.elog"
    rewrite(digits, tampered, change)
    code, stdout, _ = invoke("replay", str(tampered), "--rerun", "--json")
    out = msgspec.json.decode(stdout)
    d = out["divergence"]
    records = timetravel.load(digits).records
    first_epoch = next(r.seq for r in records if isinstance(r.event, ev.EpochCompleted))
    assert code == 1 and not out["ok"]
    assert (d["seq"], d["type"]) == (first_epoch, "EpochCompleted") and d["path"].startswith("event.")
    assert d["recorded_value"] != d["new_value"]
    assert [p["seq"] for p in d["preceding"]] == [first_epoch - 3, first_epoch - 2, first_epoch - 1][-first_epoch:]


def test_rerun_refuses_a_non_deterministic_run_unless_forced(digits, tmp_path):
    def change(record):
        if isinstance(record.event, ev.RunStarted):
            return msgspec.structs.replace(record, event=msgspec.structs.replace(record.event, deterministic=False))
        return record

    loose = tmp_path / "loose.elog"
    rewrite(digits, loose, change)
    code, _, stderr = invoke("replay", str(loose), "--rerun")
    assert code == 2 and "--force" in stderr
    code, stdout, _ = invoke("replay", str(loose), "--rerun", "--force")
    assert code == 1 and "event.deterministic" in stdout  # the rerun itself is deterministic


# -- fork ---------------------------------------------------------------------------------------


def quiescent(run_dir: Path) -> list[dict]:
    code, stdout, _ = invoke("fork", str(run_dir), "--list", "--json")
    assert code == 0
    return msgspec.json.decode(stdout)


def test_fork_list(parent):
    points = quiescent(parent)
    records = timetravel.load(parent).records
    ticks = [r.seq for r in records if isinstance(r.event, ev.EpochTicked)]
    listed = {p["seq"] for p in points}
    assert set(ticks) <= listed and 0 in listed
    for p in points:
        assert records[p["seq"]].batch_end
        assert type(records[p["seq"]].event).__name__ == p["type"]
    code, stdout, _ = invoke("fork", str(parent), "--list")
    assert code == 0 and "EpochTicked" in stdout


def test_fork_with_another_policy(parent, tmp_path):
    records = timetravel.load(parent).records
    at = next(r.seq for r in records if isinstance(r.event, ev.EpochTicked) and r.event.epoch == 12)
    out = tmp_path / "fork"
    code, stdout, stderr = invoke("fork", str(parent), "--at", str(at), "--policy", "random", "--out", str(out),
                                  "--json")
    assert code == 0, stdout + stderr
    result = msgspec.json.decode(stdout)
    assert result["checkpoint_seq"] is None and result["reproduced"] == at  # pruned checkpoints: from the start
    forked = timetravel.load(out).records
    start = forked[0].event
    assert start.forked_from == ev.ForkOrigin(run_id=parent.name, seq=at, prefix_sha256=prefix_sha256(parent, at))
    assert start.config["run"]["policy"] == "random"
    assert {k: v for k, v in start.config.items() if k != "run"} == \
        {k: v for k, v in records[0].event.config.items() if k != "run"}
    assert [stable_payload(r) for r in forked[1:at + 1]] == [stable_payload(r) for r in records[1:at + 1]]
    decided = [r.event for r in forked[at + 1:] if isinstance(r.event, ev.PolicyDecided)]
    assert decided and {d.policy for d in decided} == {"random"}
    assert forked[-1].event.status == "completed"
    # It folds without its parent, and verifies.
    code, stdout, _ = invoke("replay", str(out), "--verify")
    assert code == 0 and stdout.startswith("OK:")
    code, stdout, _ = invoke("replay", str(out))
    assert code == 0 and f"forked from {parent.name} at seq {at}" in stdout


def test_fork_from_a_checkpoint(parent, tmp_path):
    points = quiescent(parent)
    point = next(p for p in reversed(points) if p["type"] == "EpochTicked" and p["checkpoint_seq"] is not None)
    out = tmp_path / "fork"
    code, stdout, stderr = invoke("fork", str(parent), "--at", str(point["seq"]), "--policy", "none", "--out",
                                  str(out), "--json")
    assert code == 0, stdout + stderr
    result = msgspec.json.decode(stdout)
    assert result["checkpoint_seq"] == point["checkpoint_seq"] and result["copied"] == point["checkpoint_seq"]
    records, forked = timetravel.load(parent).records, timetravel.load(out).records
    at = point["seq"]
    assert [stable_payload(r) for r in forked[1:at + 1]] == [stable_payload(r) for r in records[1:at + 1]]


def test_fork_refuses_a_busy_seq_and_reports_a_divergent_prefix(parent, tmp_path):
    records = timetravel.load(parent).records
    busy = next(r.seq for r in records if isinstance(r.event, ev.EpochCompleted) and r.event.epoch == 3)
    code, _, stderr = invoke("fork", str(parent), "--at", str(busy), "--policy", "none", "--out",
                             str(tmp_path / "a"))
    assert code == 2 and "not a quiescent point" in stderr
    assert invoke("fork", str(parent), "--at", "0", "--policy", "genius", "--out", str(tmp_path / "b"))[0] == 2

    # A parent whose recorded numbers the fork cannot reproduce (no checkpoint files beside it).
    def change(record):
        e = record.event
        if isinstance(e, ev.EpochCompleted) and e.epoch == 2:
            return msgspec.structs.replace(record, event=msgspec.structs.replace(e, train_loss=e.train_loss + 1.0))
        return record

    (tmp_path / "damaged").mkdir()
    rewrite(parent, tmp_path / "damaged" / "events.elog", change)
    at = next(r.seq for r in records if isinstance(r.event, ev.EpochTicked) and r.event.epoch == 4)
    code, stdout, stderr = invoke("fork", str(tmp_path / "damaged"), "--at", str(at), "--policy", "none", "--out",
                                  str(tmp_path / "c"))
    epoch_2 = next(r.seq for r in records if isinstance(r.event, ev.EpochCompleted) and r.event.epoch == 2)
    assert code == 1 and stdout.startswith(f"divergence at seq {epoch_2} (EpochCompleted")
    assert "event.train_loss" in stdout.splitlines()[0]
