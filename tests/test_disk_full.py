"""Disk full and other write failures during `esper run` (runtime §6.2, §7.7, §8 rules 8).

ENOSPC is injected at the write call (the log's appends, the checkpoint file) or EIO at the log's
fsync, in-process through the CLI's own entry point; and, where a user namespace lets the test
mount one, on a real tmpfs of a few hundred KiB filled up by the run (tests/disk_full_child.py).
Each time: exit code 3, one line on stderr naming the failure and a fix, no traceback;
RunFinished(failed) when the log could still take it; the log readable to its last complete frame;
and, once there is space again, `esper run --resume` finishes the run as if nothing had happened.
"""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from esper.cli.main import main
from esper.events import catalogue as ev
from esper.events.codec import stable_payload
from esper.events.log_reader import LogReader

pytestmark = pytest.mark.slow

TESTS = Path(__file__).parent
ARGS = ["run", "--quiet", "--task", "synthetic", "--policy", "random", "--epochs", "6", "--seed", "2",
        "--set", "run.threads=1"]


def esper(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """`esper ARGS` through `esper.cli.main.main`, the entry point that maps errors to exit codes."""
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["esper", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def records(run_dir: Path) -> list:
    return list(LogReader(run_dir / "events.elog").records())


def payloads(run_dir: Path) -> list[bytes]:
    return [stable_payload(r) for r in records(run_dir)[1:]]


def path_of(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def is_log(fd: int) -> bool:
    # The writer's fd was opened as `events.elog.creating`, linked into place and unlinked.
    return os.path.basename(path_of(fd)).startswith("events.elog") and ".lock" not in path_of(fd)


def is_checkpoint(fd: int) -> bool:
    return "/checkpoints/.step-" in path_of(fd)


def inject(monkeypatch, name: str, target, nth: int, error: int) -> list[int]:
    """Make the `nth` call of os.NAME on a file that `target` accepts fail with `error`; a failing
    write first writes half of its bytes, as a write that fills the disk does."""
    real = getattr(os, name)
    calls: list[int] = []

    def failing(fd, *args):
        if target(fd):
            calls.append(fd)
            if len(calls) == nth:
                if name == "write" and len(args[0]) > 1:
                    real(fd, bytes(args[0][: len(args[0]) // 2]))
                raise OSError(error, os.strerror(error))
        return real(fd, *args)

    monkeypatch.setattr(os, name, failing)
    return calls


def assert_one_line_exit_3(code: int, err: str, *words: str) -> None:
    assert code == 3, err
    assert "Traceback" not in err, err
    # The run's directory was announced when it started; the error is one line after it.
    lines = [line for line in err.strip().splitlines() if not line.startswith("run directory: ")]
    assert len(lines) == 1 and lines[0].startswith("esper: error:"), err
    assert err.strip().splitlines()[-1] == lines[0], err
    for word in words:
        assert word in lines[0], err


def assert_readable(run_dir: Path) -> list:
    summary = LogReader(run_dir / "events.elog").scan()
    assert summary.tail in ("clean", "torn")
    recs = records(run_dir)
    assert [r.seq for r in recs] == list(range(len(recs))) and (not recs or recs[-1].batch_end)
    epochs = [r.event.epoch for r in recs if isinstance(r.event, ev.EpochCompleted)]
    assert epochs == list(range(1, len(epochs) + 1))
    return recs


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[bytes]:
    out = tmp_path_factory.mktemp("reference")
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(sys, "argv", ["esper", *ARGS, "--out", str(out), "--name", "whole"])
        with pytest.raises(SystemExit) as exit_:
            main()
        assert exit_.value.code == 0
    finally:
        mp.undo()
    return payloads(out / "whole")


def resume_equals(monkeypatch, capsys, run_dir: Path, reference: list[bytes]) -> None:
    monkeypatch.undo()  # there is space again
    code, _, err = esper(monkeypatch, capsys, "run", "--quiet", "--resume", str(run_dir))
    assert code == 0, err
    assert payloads(run_dir.parent / f"{run_dir.name}.r1") == reference


@pytest.mark.parametrize("nth", [2, 4, 8])
def test_disk_full_while_appending(tmp_path, monkeypatch, capsys, reference, nth):
    """The log's nth write fills the disk: the writer stops for good, so the log ends without
    RunFinished (events §5.2), torn after its last complete batch."""
    calls = inject(monkeypatch, "write", is_log, nth, errno.ENOSPC)
    code, _, err = esper(monkeypatch, capsys, *ARGS, "--out", str(tmp_path), "--name", "k")
    assert len(calls) == nth
    assert_one_line_exit_3(code, err, "No space left on device", "free some space")
    recs = assert_readable(tmp_path / "k")
    assert not any(isinstance(r.event, ev.RunFinished) for r in recs)
    assert LogReader(tmp_path / "k" / "events.elog").scan().tail == "torn"
    resume_equals(monkeypatch, capsys, tmp_path / "k", reference)


def test_an_fsync_failure_of_the_log_stops_the_run(tmp_path, monkeypatch, capsys, reference):
    inject(monkeypatch, "fsync", is_log, 4, errno.EIO)
    code, _, err = esper(monkeypatch, capsys, *ARGS, "--out", str(tmp_path), "--name", "k")
    assert_one_line_exit_3(code, err, "fsync", "Input/output error")
    recs = assert_readable(tmp_path / "k")
    assert not any(isinstance(r.event, ev.RunFinished) for r in recs)
    resume_equals(monkeypatch, capsys, tmp_path / "k", reference)


@pytest.mark.parametrize("nth", [1, 3])
def test_disk_full_while_checkpointing(tmp_path, monkeypatch, capsys, reference, nth):
    """The nth checkpoint cannot be written: its temporary directory is removed (giving the space
    back), RunFinished(failed) still goes into the log, and the previous checkpoint stays usable."""
    inject(monkeypatch, "write", is_checkpoint, nth, errno.ENOSPC)
    code, _, err = esper(monkeypatch, capsys, *ARGS, "--out", str(tmp_path), "--name", "k")
    assert_one_line_exit_3(code, err, "writing checkpoint", "No space left on device", "--resume")
    run_dir = tmp_path / "k"
    recs = assert_readable(run_dir)
    finished = recs[-1].event
    assert isinstance(finished, ev.RunFinished) and finished.status == "failed"
    assert finished.error_type == "CheckpointWriteError" and "No space left" in finished.error_message
    assert not list((run_dir / "checkpoints").glob(".step-*"))
    written = [r.event for r in recs if isinstance(r.event, ev.CheckpointWritten)]
    assert len(written) == nth - 1 and all((run_dir / w.path).is_file() for w in written)
    resume_equals(monkeypatch, capsys, run_dir, reference)


def test_a_real_full_filesystem(tmp_path):
    """A tmpfs of a few hundred KiB in a private mount namespace, filled by the run itself."""
    probe = subprocess.run(["unshare", "--mount", "--map-root-user", "sh", "-c",
                            f"mount -t tmpfs -o size=64k tmpfs {tmp_path}"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {probe.stderr.strip()}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS)]))
    done = subprocess.run(["unshare", "--mount", "--map-root-user", sys.executable, str(TESTS / "disk_full_child.py"),
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for name, result in results.items():
        assert_one_line_exit_3(result["code"], result["err"], "No space left on device")
        assert result["tail"] in ("clean", "torn"), name
        assert result["dense"] and result["epochs_dense"], name
        assert result["resumed_code"] == 0, (name, result["resumed_err"])
        assert result["resumed_equal"], name
    checkpoint, log = results["checkpoint"], results["log"]
    assert "writing checkpoint" in checkpoint["err"] and checkpoint["finished"] == "failed"
    assert checkpoint["temporaries_left"] == 0
    assert "write of" in log["err"] and log["finished"] is None


def test_no_partial_checkpoint_is_left_by_a_failed_write(tmp_path, monkeypatch):
    """write_checkpoint itself: an ENOSPC part-way through removes the temporary directory and
    raises CheckpointWriteError (an OSError, so exit 3), never torch's RuntimeError."""
    import torch

    from esper.compute.checkpoints import CheckpointWriteError, read_checkpoint, write_checkpoint

    path, _, _ = write_checkpoint(tmp_path, 1, {"w": torch.ones(1000)})
    inject(monkeypatch, "write", is_checkpoint, 1, errno.ENOSPC)
    with pytest.raises(CheckpointWriteError) as error:
        write_checkpoint(tmp_path, 2, {"w": torch.zeros(1000)})
    assert isinstance(error.value, OSError) and error.value.errno == errno.ENOSPC
    assert str(error.value) == f"writing checkpoint {tmp_path / 'checkpoints' / 'step-000002'} failed: " \
                               "No space left on device"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001"]
    assert torch.equal(read_checkpoint(tmp_path / path)["w"], torch.ones(1000))
    shutil.rmtree(tmp_path / "checkpoints")
