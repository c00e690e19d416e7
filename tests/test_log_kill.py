"""kill -9 harness (events spec §11): a child appends under fsync=always and is killed at 20 random
moments; every batch it acknowledged must survive, and the log must read back to a complete batch."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from esper.events.log import LogReader

TESTS = Path(__file__).parent
CHILD = TESTS / "log_kill_child.py"
ROUNDS = 20


def _kill_child_at_random(path: Path, rng: random.Random) -> list[int]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS)]))
    child = subprocess.Popen(
        [sys.executable, str(CHILD), str(path)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env
    )
    try:
        # Most kills land mid-append; some land at start-up, while it may be recovering a torn tail.
        if rng.random() < 0.75:
            child.stdout.readline()
        time.sleep(rng.uniform(0, 0.05))
    finally:
        child.send_signal(signal.SIGKILL)
        out, _ = child.communicate(timeout=10)
    lines = out.decode().split("\n")[:-1]  # a line cut short by the kill was never acknowledged
    return [int(line) for line in lines if line]


def test_acknowledged_batches_survive_kill_9(tmp_path):
    seed = int(os.environ.get("ESPER_KILL_SEED") or random.randrange(2**32))
    rng = random.Random(seed)
    path = tmp_path / "events.elog"
    acknowledged = -1
    for round_ in range(ROUNDS):
        acknowledged = max([acknowledged, *_kill_child_at_random(path, rng)])
        if not path.exists():
            continue
        stream = LogReader(path).records()
        seqs = [r.seq for r in stream]
        where = f"round {round_}, ESPER_KILL_SEED={seed}"
        assert seqs == list(range(len(seqs))), where
        assert stream.summary.tail in ("clean", "torn"), where
        assert len(seqs) - 1 >= acknowledged, f"acknowledged seq {acknowledged} lost ({where})"
    assert acknowledged > 0
