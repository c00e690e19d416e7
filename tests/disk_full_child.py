"""Child of tests/test_disk_full.py: runs inside `unshare --mount --map-root-user`, mounts small
tmpfs filesystems under DIR (visible to this process only, gone when it exits), fills them so that
`esper run` runs out of space part-way, and prints one JSON line of what happened.

Scenarios: `checkpoint` (space for two checkpoints and a few pages more: the third checkpoint does
not fit) and `log` (`run.checkpoint_every=0`, a few pages for the log: an append does not fit).
After each failure the filler is removed and `esper run --resume` must finish the run with the
payloads of an uninterrupted run on an ordinary disk.
"""

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

from esper.cli.main import main
from esper.events import catalogue as ev
from esper.events.codec import stable_payload
from esper.events.log_reader import LogReader

ROOT = Path(sys.argv[1])
PAGE = 4096
BASE = ["run", "--quiet", "--task", "synthetic", "--policy", "random", "--seed", "2", "--set", "run.threads=1"]


def esper(*args: str) -> tuple[int, str]:
    sys.argv = ["esper", *args]
    err = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, err.getvalue()


def mount(path: Path, size: str) -> None:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)


def used(path: Path) -> int:
    s = os.statvfs(path)
    return (s.f_blocks - s.f_bfree) * s.f_frsize


def fill(path: Path, leave: int) -> Path:
    s = os.statvfs(path)
    filler = path / "filler"
    filler.write_bytes(b"\0" * (s.f_bavail * s.f_frsize - leave))
    return filler


def payloads(run_dir: Path) -> list[bytes]:
    return [stable_payload(r) for r in list(LogReader(run_dir / "events.elog").records())[1:]]


def scenario(where: Path, args: list[str], leave: int, reference: list[bytes]) -> dict:
    filler = fill(where, leave)
    code, err = esper(*args, "--out", str(where), "--name", "k")
    run_dir = where / "k"
    summary = LogReader(run_dir / "events.elog").scan()
    recs = list(LogReader(run_dir / "events.elog").records())
    epochs = [r.event.epoch for r in recs if isinstance(r.event, ev.EpochCompleted)]
    finished = [r.event.status for r in recs if isinstance(r.event, ev.RunFinished)]
    checkpoints = run_dir / "checkpoints"
    result = {
        "code": code, "err": err, "tail": summary.tail, "epochs": len(epochs),
        "dense": [r.seq for r in recs] == list(range(len(recs))) and bool(recs) and recs[-1].batch_end,
        "epochs_dense": epochs == list(range(1, len(epochs) + 1)),
        "finished": finished[-1] if finished else None,
        "temporaries_left": len(list(checkpoints.glob(".step-*"))) if checkpoints.exists() else 0,
    }
    filler.unlink()
    code, err = esper("run", "--quiet", "--resume", str(run_dir))
    result.update(resumed_code=code, resumed_err=err,
                  resumed_equal=code == 0 and payloads(where / "k.r1") == reference)
    return result


def run() -> dict:
    with_checkpoints = BASE + ["--epochs", "6"]
    without = with_checkpoints + ["--set", "run.checkpoint_every=0"]
    references = {}
    for name, args in (("checkpoint", with_checkpoints), ("log", without)):
        code, err = esper(*args, "--out", str(ROOT / "reference"), "--name", name)
        assert code == 0, err
        references[name] = payloads(ROOT / "reference" / name)
    # How much a run takes up just before its third checkpoint: three epochs write two checkpoints.
    mount(ROOT / "probe", "4m")
    code, err = esper(*BASE, "--epochs", "3", "--out", str(ROOT / "probe"), "--name", "k")
    assert code == 0, err
    before_third = used(ROOT / "probe")
    results = {}
    mount(ROOT / "ckpt", "1m")
    results["checkpoint"] = scenario(ROOT / "ckpt", with_checkpoints, before_third + 3 * PAGE,
                                     references["checkpoint"])
    mount(ROOT / "log", "1m")
    results["log"] = scenario(ROOT / "log", without, 6 * PAGE, references["log"])
    return results


if __name__ == "__main__":
    print(json.dumps(run()))
