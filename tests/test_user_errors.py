"""Every user-facing error path of `esper run` (and of the commands that read a run's log) prints one
line, `esper: error: ...`, exits 2 and shows no traceback (runtime §7.7, §8 rule 1).

Each case goes through `esper.cli.main.main`, the entry point `python -m esper` runs, so the error to
exit-code mapping is the real one; a few run as real subprocesses too, and a second process trying to
write a run directory that a live run holds is refused at once.
"""

import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch

from cli_helpers import esper
from esper.events.log_format import HEADER_SIZE
from log_helpers import frames, future_event_frame

pytestmark = pytest.mark.slow

TESTS = Path(__file__).parent
BASE = ["run", "--quiet", "--set", "run.threads=1"]
SYNTHETIC = BASE + ["--task", "synthetic", "--policy", "random", "--seed", "2"]
TRIED: list[str] = []


def assert_user_error(result: tuple[int, str, str], *words: str) -> str:
    code, _, err = result
    assert "Traceback" not in err, err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("esper: error: "), err
    for word in words:
        assert word in lines[0], err
    TRIED.append(lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A completed 4-epoch synthetic run: the source of every damaged log and checkpoint below."""
    out = tmp_path_factory.mktemp("runs")
    code, _, err = esper(*SYNTHETIC, "--epochs", "4", "--out", str(out), "--name", "done")
    assert code == 0, err
    return out / "done"


def copy_of(run_dir: Path, tmp_path: Path, name: str = "copy") -> Path:
    target = tmp_path / name
    shutil.copytree(run_dir, target)
    return target


# -- data -----------------------------------------------------------------------------------


def cifar_dir(tmp_path: Path, first: bytes) -> Path:
    """A CIFAR-10 directory whose first batch is `first`; the loader parses it before the others."""
    directory = tmp_path / "cifar"
    directory.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (directory / name).write_bytes(first if name == "data_batch_1" else b"x")
    return directory


def test_missing_data(tmp_path):
    assert_user_error(esper(*BASE, "--task", "cifar10", "--data", str(tmp_path / "nowhere")),
                      "CIFAR-10 data not found", "does not exist", "--data")
    assert_user_error(esper(*BASE, "--task", "cifar10"), "CIFAR-10 data not given")
    (tmp_path / "empty").mkdir()
    assert_user_error(esper(*BASE, "--task", "cifar10", "--data", str(tmp_path / "empty")),
                      "has no data_batch_1")
    (tmp_path / "file").write_text("x")
    assert_user_error(esper(*BASE, "--task", "cifar10", "--data", str(tmp_path / "file")), "is not a directory")
    assert_user_error(esper(*BASE, "--task", "text", "--data", str(tmp_path / "nowhere.txt")),
                      "text data not found")
    assert_user_error(esper(*BASE, "--task", "text", "--data", str(tmp_path)), "is not a file")


@pytest.mark.parametrize("content, message", [
    (b"not a pickle at all", "unreadable pickle"),
    (pickle.dumps([1, 2]), "it holds a list, not a dict"),
    (pickle.dumps({b"labels": [0] * 10}), "it has no 'data'"),
])
def test_malformed_data(tmp_path, content, message):
    assert_user_error(esper(*BASE, "--task", "cifar10", "--data", str(cifar_dir(tmp_path, content))),
                      "data_batch_1", message)


def test_text_data_too_small(tmp_path):
    (tmp_path / "tiny.txt").write_bytes(b"hello")
    assert_user_error(esper(*BASE, "--task", "text", "--data", str(tmp_path / "tiny.txt")), "text data too small")


def test_data_for_a_task_with_built_in_data(tmp_path):
    assert_user_error(esper(*BASE, "--task", "synthetic", "--data", str(tmp_path)), "takes no data path")


# -- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, words", [
    (["--task", "nope"], ["unknown task 'nope'", "choose from"]),
    (["--task", "synthetic", "--blueprints", "convx"], ["unknown blueprint 'convx'", "choose from"]),
    (["--task", "synthetic", "--slots", "top"], ["unknown slot 'top'"]),
    (["--task", "synthetic", "--slots", ","], ["no slot enabled"]),
    (["--task", "synthetic", "--policy", "genius"], ["unknown policy 'genius'"]),
    (["--task", "synthetic", "--policy", "ppo:/nowhere.pt"], ["policy checkpoint not found: '/nowhere.pt'"]),
    (["--task", "synthetic", "--policy", "ppo:"], ["unknown policy 'ppo:'"]),
    (["--task", "synthetic", "--device", "tpu"], ["unknown device 'tpu'"]),
    (["--task", "synthetic", "--set", "task.host=giant"], ["unknown host preset 'giant'"]),
    (["--backend", "simulated", "--task", "synthetic", "--amp", "bf16"], ["no meaning for the simulated backend"]),
])
def test_unknown_names(tmp_path, args, words):
    assert_user_error(esper(*BASE, "--out", str(tmp_path), *args), *words)
    assert not list(tmp_path.iterdir()), "nothing is created before the input is validated"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_missing_gpu_is_an_error_not_a_fallback(tmp_path):
    assert_user_error(esper(*SYNTHETIC, "--device", "cuda", "--out", str(tmp_path)), "CUDA is not available")


# -- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize("assignment, words", [
    ("lifecycle.g2_min_shadow_gian=1", ["unknown config key 'lifecycle.g2_min_shadow_gian'",
                                        "did you mean 'lifecycle.g2_min_shadow_gain'"]),
    ("ppo.clp=0.2", ["unknown config key 'ppo.clp'", "did you mean 'ppo.clip'"]),
    ("ppo.clip=-1", ["ppo.clip"]),
    ("run.epochs='many'", ["run.epochs"]),
    ("run.epochs=2.5", ["run.epochs", "2.5"]),
    ("run.seed=true", ["run.seed"]),
    ("run.slots='early'", ["run.slots", "list"]),
    ("run.slots=[1, 2]", ["run.slots"]),
    ("run=3", ["'run' must be a table"]),
    ("run.epochs.x=1", ["run.epochs"]),
    ("lifecycle.g3_min_alpha=2.0", ["g3_min_alpha"]),
    ("lifecycle.g2_min_shadow_gain=nan", ["g2_min_shadow_gain", "finite"]),
    ("lifecycle.blend_steps=0", ["blend_steps"]),
    ("lifecycle.default_blend='cubic'", ["default_blend"]),
    ("run.task=7", ["run.task"]),
    ("noequals", ["--set needs KEY=VALUE"]),
    ("=3", ["--set needs KEY=VALUE"]),
])
def test_bad_config_values(tmp_path, assignment, words):
    assert_user_error(esper(*SYNTHETIC, "--out", str(tmp_path), "--set", assignment), *words)


@pytest.mark.parametrize("content, words", [
    (b"[run]\nepochs = \"x\"\n", ["run.epochs"]),
    (b"[run]\nepoch = 3\n", ["unknown config key 'run.epoch'", "did you mean 'run.epochs'"]),
    (b"[frobnicate]\nx = 1\n", ["unknown config key 'frobnicate'"]),
    (b"[run\nepochs = 3\n", ["is not valid TOML"]),
    (b"\xff\xfe\x00garbage", ["cannot read config file"]),
])
def test_bad_config_files(tmp_path, content, words):
    path = tmp_path / "config.toml"
    path.write_bytes(content)
    assert_user_error(esper(*SYNTHETIC, "--out", str(tmp_path / "out"), "--config", str(path)), *words)


def test_a_missing_or_unreadable_config_file(tmp_path):
    assert_user_error(esper(*SYNTHETIC, "--config", str(tmp_path / "nowhere.toml")), "config file not found")
    assert_user_error(esper(*SYNTHETIC, "--config", str(tmp_path)), "cannot read config file")


# -- command-line values ----------------------------------------------------------------------


@pytest.mark.parametrize("args, words", [
    (["--epochs", "0"], ["--epochs", "0"]),
    (["--epochs", "abc"], ["--epochs", "abc"]),
    (["--seed", "-1"], ["--seed"]),
    (["--max-seeds", "-1"], ["--max-seeds"]),
    (["--amp", "fp8"], ["--amp", "fp8"]),
    (["--backend", "gpu"], ["--backend", "gpu"]),
    (["--fsync", "sometimes"], ["--fsync"]),
    (["--frobnicate"], ["--frobnicate"]),
    (["--epochs"], ["--epochs"]),
])
def test_bad_command_line_values(tmp_path, args, words):
    assert_user_error(esper(*BASE, "--task", "synthetic", "--out", str(tmp_path), *args), *words)


def test_usage_errors_point_at_the_right_help():
    assert_user_error(esper("frobnicate"), "No such command 'frobnicate'", "(see 'esper --help')")
    assert_user_error(esper("log", "check"), "Missing argument 'PATH'", "(see 'esper log check --help')")
    assert_user_error(esper("run", "--epochs", "x"), "(see 'esper run --help')")


def test_an_existing_run_directory_is_refused(tmp_path):
    (tmp_path / "k").mkdir()
    (tmp_path / "k" / "keep.txt").write_text("mine")
    assert_user_error(esper(*SYNTHETIC, "--out", str(tmp_path), "--name", "k"), "already exists and is not empty")
    assert (tmp_path / "k" / "keep.txt").read_text() == "mine"


# -- logs -----------------------------------------------------------------------------------


def newer_format(log: Path) -> None:
    data = bytearray(log.read_bytes())
    struct.pack_into("<H", data, 8, 2)
    struct.pack_into("<I", data, 12, zlib.crc32(bytes(data[:12])))
    log.write_bytes(bytes(data))


def corrupt_middle(log: Path) -> None:
    data = bytearray(log.read_bytes())
    offset, end = frames(bytes(data))[len(frames(bytes(data))) // 2]
    data[end - 3] ^= 0xFF
    log.write_bytes(bytes(data))


def unknown_event(log: Path) -> None:
    n = len(frames(log.read_bytes()))
    with open(log, "ab") as f:
        f.write(future_event_frame(n))


def not_a_log(log: Path) -> None:
    log.write_bytes(b"this is not an esper log, just text\n" * 3)


def truncated_header(log: Path) -> None:
    log.write_bytes(log.read_bytes()[: HEADER_SIZE - 5])


DAMAGE = {
    "newer format version": (newer_format, ["format version 2", "upgrade esper"]),
    "corrupt": (corrupt_middle, ["is corrupt at offset"]),
    "unknown event type": (unknown_event, ["event type FutureEvent", "upgrade esper"]),
    "not a log": (not_a_log, ["is not a readable esper log", "bad magic"]),
    "truncated header": (truncated_header, ["is not a readable esper log", "shorter than"]),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("command", ["run --resume", "log check", "replay", "export --jsonl", "report"])
def test_a_log_this_version_cannot_read(finished_run, tmp_path, damage, command):
    spoil, words = DAMAGE[damage]
    run_dir = copy_of(finished_run, tmp_path)
    spoil(run_dir / "events.elog")
    before = (run_dir / "events.elog").read_bytes()
    args = {
        "run --resume": ["run", "--quiet", "--resume", str(run_dir)],
        "log check": ["log", "check", str(run_dir)],
        "replay": ["replay", str(run_dir)],
        "export --jsonl": ["export", str(run_dir), "--jsonl", str(tmp_path / "out.jsonl")],
        "report": ["report", str(run_dir), "-o", str(tmp_path / "report.html")],
    }[command]
    assert_user_error(esper(*args), *words)
    assert (run_dir / "events.elog").read_bytes() == before, "no command but `log repair` writes to a log"
    assert not (tmp_path / "copy.r1").exists(), "a refused resume creates nothing"


def test_resuming_a_directory_without_a_run(tmp_path):
    assert_user_error(esper("run", "--resume", str(tmp_path / "nowhere")), "holds no run log to resume")
    (tmp_path / "empty").mkdir()
    assert_user_error(esper("run", "--resume", str(tmp_path / "empty")), "holds no run log to resume")


def test_resuming_a_log_with_no_batch_and_no_config(finished_run, tmp_path):
    run_dir = copy_of(finished_run, tmp_path)
    log = run_dir / "events.elog"
    log.write_bytes(log.read_bytes()[:HEADER_SIZE])
    (run_dir / "config.toml").unlink()
    assert_user_error(esper("run", "--resume", str(run_dir)), "holds no recorded run to resume", "config.toml")


# -- resume options and checkpoints -----------------------------------------------------------


@pytest.mark.parametrize("args, words", [
    (["--seed", "5"], ["config key 'run.seed' differs", "only --epochs and --device may change"]),
    (["--epochs", "2"], ["--epochs 2 would shorten the run", "run.epochs = 4 recorded"]),
    (["--task", "digits"], ["config key 'run.task' differs"]),
    (["--max-seeds", "1"], ["config key 'lifecycle.max_seeds' differs"]),
    (["--amp", "bf16"], ["config key 'train.amp' differs"]),
    (["--fsync", "always"], ["config key 'run.fsync' differs"]),
    (["--set", "lifecycle.blend_steps=2"], ["config key 'lifecycle.blend_steps' differs"]),
    (["--set", "run.bogus=1"], ["unknown config key 'run.bogus'"]),
    (["--set", "run.epochs='x'"], ["run.epochs"]),
    (["--name", "again"], ["--name has no meaning with --resume"]),
])
def test_resume_refuses_a_changed_option(finished_run, tmp_path, args, words):
    run_dir = copy_of(finished_run, tmp_path)
    assert_user_error(esper("run", "--quiet", "--resume", str(run_dir), *args), *words)
    assert not (tmp_path / "copy.r1").exists()


def test_resume_accepts_the_recorded_options(finished_run, tmp_path):
    """Options equal to the recorded ones (the run's own config.toml among them) are no change."""
    run_dir = copy_of(finished_run, tmp_path)
    code, _, err = esper("run", "--quiet", "--resume", str(run_dir), "--config", str(run_dir / "config.toml"),
                         "--seed", "2", "--task", "synthetic", "--slots", "early,mid,late", "--epochs", "4")
    assert code == 0, err


def test_a_checkpoint_that_does_not_match_the_config(finished_run, tmp_path):
    """A checkpoint whose digest matches the log but whose tensors do not fit the run's host."""
    from esper.events import catalogue as ev
    from esper.events.log_reader import LogReader

    run_dir = copy_of(finished_run, tmp_path)
    written = [r.event for r in LogReader(run_dir / "events.elog").records()
               if isinstance(r.event, ev.CheckpointWritten)]
    path = run_dir / written[-1].path
    state = torch.load(path, weights_only=True)
    model = state["backend"]["model"]
    key = next(k for k in model if k.endswith("weight"))
    model[key] = torch.zeros(*(s + 1 for s in model[key].shape))
    torch.save(state, path)
    line = assert_user_error(esper("run", "--quiet", "--resume", str(run_dir)),
                             "does not match the run's configuration", written[-1].path)
    assert "size mismatch" in line or key in line


# -- a second process -------------------------------------------------------------------------


def test_a_second_process_is_refused_at_once_while_a_run_is_live(tmp_path):
    """A run paused in the middle of its work holds its directory: another `esper run` into it, or
    `esper log repair` of its log, fails at once with one line naming the holder."""
    from esper.events.log_errors import LogLockedError
    from esper.events.log_writer import LogWriter
    from run_zygote import Zygote

    zygote = Zygote()
    try:
        files = tmp_path / "live"
        pid = zygote.start(SYNTHETIC + ["--epochs", "6", "--out", str(tmp_path), "--name", "k"], files,
                           ["log-fsync", 4, 0.0])
        zygote.wait_paused(files)
        log = tmp_path / "k" / "events.elog"
        started = time.monotonic()
        code, _, err = zygote.run(SYNTHETIC + ["--epochs", "6", "--out", str(tmp_path), "--name", "k"],
                                  tmp_path / "second")
        assert_user_error((code, "", err), "already exists and is not empty")
        code, _, err = zygote.run(["log", "repair", str(log), "--truncate-at", str(HEADER_SIZE)], tmp_path / "repair")
        assert_user_error((code, "", err), "is being written by another process", f"held by pid {pid}")
        with pytest.raises(LogLockedError, match=f"held by pid {pid}"):
            LogWriter.open_append(log)
        assert time.monotonic() - started < 30
        assert zygote.ended(0, pid) is None, "the live run was left alone"
        os.kill(pid, signal.SIGKILL)
        assert zygote.ended(30, pid) == -signal.SIGKILL
        zygote.reap(pid)
    finally:
        zygote.close()


def test_a_real_process_prints_one_line_and_exits_2(tmp_path, finished_run):
    """The same through `python -m esper`, for one error of each kind."""
    run_dir = copy_of(finished_run, tmp_path)
    newer_format(run_dir / "events.elog")
    env = dict(os.environ, PYTHONPATH=str(TESTS.parent))
    for args, word in [(["run", "--task", "synthetic", "--set", "run.epochs=-1"], "run.epochs"),
                       (["run", "--resume", str(run_dir)], "format version 2")]:
        done = subprocess.run([sys.executable, "-m", "esper", *args], capture_output=True, text=True, env=env,
                              timeout=120, cwd=tmp_path)
        assert_user_error((done.returncode, done.stdout, done.stderr), word)
