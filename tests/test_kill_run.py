"""kill -9 harness for `esper run` (runtime §6.2, §8 rule 5).

A `synthetic` run is killed with SIGKILL at 20 moments drawn from a seeded RNG (set ESPER_KILL_SEED to
replay a failure): spread in time from start to end of the run, mid-append (part of a write to
events.elog done), between a log write and its fsync, mid-checkpoint (part of a checkpoint file
written, or around the rename of its `.step-*.tmp` directory), when a `.step-*.tmp` directory is
seen by polling, and once in a plain `python -m esper run` process. After each kill:

  - the log scans without error, its seqs are dense and it ends on a complete batch;
  - every seq the child acknowledged as committed (the writer's `commit` had returned) is there;
  - the epochs in it are dense, and its payloads equal an uninterrupted run's prefix;
  - the newest checkpoint named by a `CheckpointWritten` record exists, matches its recorded
    sha256 and size, and loads;
  - `esper run --resume` exits 0 in the sibling `<name>.r1`, leaves the killed directory untouched
    and writes payloads equal to the uninterrupted run's.

Children are forked from a process that has already imported esper and torch (tests/run_zygote.py),
so a round costs about a second; one round starts a real `python -m esper run`.
"""

import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from esper.compute.checkpoints import read_checkpoint
from esper.events import catalogue as ev
from esper.events.codec import stable_payload
from esper.events.log_reader import LogReader
from run_zygote import ENV, Zygote

pytestmark = pytest.mark.slow

TESTS = Path(__file__).parent
ROOT = TESTS.parent
EPOCHS = 10
# The random policy with seed 2 germinates three seeds and takes them to BLENDING within 10 epochs,
# so the checkpoints hold seeds, gates and alpha ramps.
RUN_ARGS = ["run", "--quiet", "--task", "synthetic", "--policy", "random", "--epochs", str(EPOCHS), "--seed", "2",
            "--set", "run.threads=1"]
# 20 kill points: (kind, how many)
PLAN = [("exec", 1), ("timed", 7), ("tmp-poll", 2), ("log-write", 3), ("log-fsync", 2), ("ckpt-write", 3),
        ("ckpt-rename", 2)]
TALLY: dict[str, int] = {}


def records(log: Path) -> list:
    return list(LogReader(log).records())


def payloads(run_dir: Path) -> list[bytes]:
    return [stable_payload(r) for r in records(run_dir / "events.elog")[1:]]


def acknowledged(ack: Path) -> int | None:
    """The highest seq the child reported as committed; a line cut short by the kill does not count."""
    if not ack.exists():
        return None
    lines = ack.read_text().split("\n")[:-1]
    seqs = [int(line.split()[1]) for line in lines if line.startswith("commit ")]
    return max(seqs, default=None)


def tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)  # the child is a zombie at worst until we reap it: never another process


def one_round(zygote: Zygote, kind: str, slot: int, rng: random.Random, out: Path, reference: dict) -> dict:
    """Start a run, kill it at the moment `kind` asks for; returns what happened."""
    files = out / "child"
    argv = RUN_ARGS + ["--out", str(out), "--name", "k"]
    run_dir = out / "k"
    ckpt_dir = run_dir / "checkpoints"
    # Writes (and fsyncs) of the log: the header (1), one per commit (the episode start and epochs 1 to
    # EPOCHS - 1), then the last epoch with RunFinished on close. The header's is left to the timed kills.
    log_writes = EPOCHS + 2
    if kind == "exec":
        child = subprocess.Popen([sys.executable, "-m", "esper", *argv], env=ENV, cwd=ROOT,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while not (run_dir / "events.elog").exists() and child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(rng.uniform(0, reference["seconds"]))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
        return {"code": child.returncode, "acked": None, "moment": "python -m esper, random delay"}
    pause = None
    if kind == "log-write":
        pause = ["log-write", rng.randint(2, log_writes), rng.uniform(0.02, 0.98)]
    elif kind == "log-fsync":
        pause = ["log-fsync", rng.randint(2, log_writes), 0.0]
    elif kind == "ckpt-write":
        pause = ["ckpt-write", rng.randint(1, EPOCHS - 1), rng.uniform(0.02, 0.98)]
    elif kind == "ckpt-rename":
        pause = ["ckpt-rename", rng.randint(1, EPOCHS - 1), rng.random()]
    pid = zygote.start(argv, files, pause)
    started = time.monotonic()
    code, moment = None, kind
    if kind == "timed":
        n = dict(PLAN)["timed"]
        delay = reference["seconds"] * (slot + rng.random()) / n
        moment = f"{delay:.3f} s after start"
        code = zygote.ended(delay)
    elif kind == "tmp-poll":
        step = rng.randint(1, EPOCHS - 1)
        target = ckpt_dir / f".step-{step:06d}.tmp"
        moment = f"{target.name} seen"
        # Busy: the temporary directory lives for milliseconds. Bounded, so a child that is never
        # reported as ended fails the test instead of hanging it.
        while code is None and not target.exists() and time.monotonic() - started < 60:
            code = zygote.ended(0)
        if code is None and not target.exists():
            os.kill(pid, signal.SIGUSR1)  # the child's stacks, to see where it stands
            time.sleep(1)
            pytest.fail(f"round never reached {target}; the child's stacks:\n"
                        f"{files.with_suffix('.err').read_text() if files.with_suffix('.err').exists() else ''}")
    else:
        moment = f"paused at {pause}"
        zygote.wait_paused(files)
    if code is None:
        kill(pid)
        code = zygote.ended(30)
    zygote.reap()
    return {"code": code, "acked": acknowledged(files.with_suffix(".ack")), "moment": moment}


def check_killed(run_dir: Path, acked: int | None, reference: dict, where: str) -> dict:
    """What a kill must leave behind; returns the numbers for the tally."""
    log = run_dir / "events.elog"
    summary = LogReader(log).scan()
    assert summary.tail in ("clean", "torn"), where
    recs = records(log)
    seqs = [r.seq for r in recs]
    assert seqs == list(range(len(seqs))), where
    assert not recs or recs[-1].batch_end, where
    last = seqs[-1] if seqs else -1
    lost = 0 if acked is None else max(0, acked - last)
    assert lost == 0, f"acknowledged seq {acked} lost: the log reads through {last} ({where})"
    if recs:
        assert isinstance(recs[0].event, ev.RunStarted), where
        assert [stable_payload(r) for r in recs[1:]] == reference["payloads"][:len(recs) - 1], where
    epochs = [r.event.epoch for r in recs if isinstance(r.event, ev.EpochCompleted)]
    assert epochs == list(range(1, len(epochs) + 1)), where
    written = [r.event for r in recs if isinstance(r.event, ev.CheckpointWritten)]
    if written:
        newest = run_dir / written[-1].path
        data = newest.read_bytes()
        assert hashlib.sha256(data).hexdigest() == written[-1].sha256 and len(data) == written[-1].size_bytes, where
        state = read_checkpoint(newest)
        assert state["covers_seq"] == written[-1].covers_seq, where
    return {"records": len(recs), "epochs": len(epochs), "checkpoints": len(written), "lost": lost,
            "tail": summary.tail}


def resume_and_compare(zygote: Zygote, run_dir: Path, reference: dict, where: str) -> None:
    before = tree(run_dir)
    code, stdout, stderr = zygote.run(["run", "--quiet", "--resume", str(run_dir)], run_dir.parent / "resume")
    assert code == 0, f"resume failed ({where}): {stderr}"
    assert "Traceback" not in stderr, where
    resumed = Path(re.search(r"run directory: (\S+)", stdout).group(1))
    assert resumed == run_dir.parent / f"{run_dir.name}.r1", where
    assert tree(run_dir) == before, f"resume modified the killed run directory ({where})"
    first = records(resumed / "events.elog")[0].event
    assert first.forked_from is not None, where
    assert payloads(resumed) == reference["payloads"], f"resumed payloads differ from the uninterrupted run ({where})"
    assert records(resumed / "events.elog")[-1].event.status == "completed", where


@pytest.fixture(scope="module")
def zygote():
    server = Zygote()
    yield server
    server.close()


def test_kill_9_at_20_moments_then_resume(tmp_path, zygote):
    seed = int(os.environ.get("ESPER_KILL_SEED") or random.randrange(2**32))
    rng = random.Random(seed)
    began = time.monotonic()
    ref_dir = tmp_path / "reference"
    started = time.monotonic()
    code, _, stderr = zygote.run(RUN_ARGS + ["--out", str(ref_dir), "--name", "k"], tmp_path / "reference")
    assert code == 0, stderr
    reference = {"seconds": time.monotonic() - started, "payloads": payloads(ref_dir / "k")}
    rounds = [kind for kind, n in PLAN for _ in range(n)]
    assert len(rounds) == 20
    slots: dict[str, int] = {}
    tally = {"faults": 0, "killed": 0, "survived": 0, "not_started": 0, "acked_events": 0, "acked_lost": 0,
             "torn": 0}
    for i, kind in enumerate(rounds):
        slot = slots.get(kind, 0)
        slots[kind] = slot + 1
        out = tmp_path / f"round{i:02d}"
        out.mkdir()
        happened = one_round(zygote, kind, slot, rng, out, reference)
        where = f"round {i} ({kind}: {happened['moment']}), ESPER_KILL_SEED={seed}"
        tally["faults"] += 1
        tally["killed"] += happened["code"] == -signal.SIGKILL
        run_dir = out / "k"
        if not (run_dir / "events.elog").exists():
            # Killed before the run had a log: nothing was recorded, and resume says so in one line.
            code, _, stderr = zygote.run(["run", "--quiet", "--resume", str(run_dir)], out / "resume")
            assert code == 2 and stderr.startswith("esper: error:") and len(stderr.splitlines()) == 1, where
            tally["not_started"] += 1
            print(f"{where}: exit {happened['code']}, killed before the run had a log")
            continue
        found = check_killed(run_dir, happened["acked"], reference, where)
        print(f"{where}: exit {happened['code']}, acknowledged through seq {happened['acked']}, {found}")
        tally["acked_lost"] += found["lost"]
        tally["acked_events"] += 0 if happened["acked"] is None else happened["acked"] + 1
        tally["torn"] += found["tail"] == "torn"
        resume_and_compare(zygote, run_dir, reference, where)
        tally["survived"] += 1
    tally["seconds"] = round(time.monotonic() - began, 1)
    TALLY.update(tally)
    print(f"\nkill harness (ESPER_KILL_SEED={seed}): {tally}")
    assert tally["acked_lost"] == 0
    assert tally["killed"] >= 17, tally  # a late timed kill may find the run already finished


def test_a_log_without_a_complete_batch_resumes_from_config_toml(tmp_path, zygote):
    """Killed in the middle of the first commit's write: the log has its header and part of a frame,
    no complete batch; resume starts the run again with the configuration of config.toml."""
    code, _, stderr = zygote.run(RUN_ARGS + ["--out", str(tmp_path / "whole"), "--name", "k"], tmp_path / "whole")
    assert code == 0, stderr
    files = tmp_path / "cut"
    pid = zygote.start(RUN_ARGS + ["--out", str(tmp_path), "--name", "k"], files, ["log-write", 2, 0.5])
    zygote.wait_paused(files)
    kill(pid)
    assert zygote.ended(30) == -signal.SIGKILL
    zygote.reap()
    run_dir = tmp_path / "k"
    summary = LogReader(run_dir / "events.elog").scan()
    assert summary.last_seq is None and summary.tail == "torn"
    assert (run_dir / "config.toml").is_file()
    resume_and_compare(zygote, run_dir, {"payloads": payloads(tmp_path / "whole" / "k")}, "no complete batch")
    origin = records(tmp_path / "k.r1" / "events.elog")[0].event.forked_from
    assert origin.run_id == "k" and origin.seq == -1


def test_an_interrupt_in_the_middle_of_a_log_write_leaves_a_resumable_log(tmp_path, monkeypatch):
    """A second SIGINT raises KeyboardInterrupt wherever Python is, here half-way through a write to
    the log: the writer must not write that buffer again (it would repeat frames mid-file), so the
    log ends with a torn tail, reads to its last complete batch, and resumes."""
    from esper.policy.run_config import resolve
    from esper.policy.runner import Run, execute, load_data, resume

    config = resolve({"run": {"task": "synthetic", "epochs": 6, "policy": "random", "seed": 2, "threads": 1}})
    (tmp_path / "whole").mkdir()
    execute(Run(config, tmp_path / "whole", load_data(config)))
    (tmp_path / "cut").mkdir()
    run = Run(config, tmp_path / "cut", load_data(config))
    real_write, writes = os.write, []

    def write(fd, data):
        if fd == run.writer._fd:
            writes.append(len(data))
            if len(writes) == 4:
                real_write(fd, bytes(data[: len(data) // 2]))
                raise KeyboardInterrupt
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(KeyboardInterrupt):
        execute(run)
    monkeypatch.undo()
    log = tmp_path / "cut" / "events.elog"
    assert LogReader(log).scan().tail == "torn"
    recs = records(log)
    assert [r.seq for r in recs] == list(range(len(recs))) and recs[-1].batch_end
    resumed = resume(tmp_path / "cut", None, {})
    execute(resumed, resume=True)
    assert payloads(resumed.run_dir) == payloads(tmp_path / "whole")
