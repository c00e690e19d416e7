"""The `ddp` backend (runtime §5.3): gloo on CPU, two real processes started by torchrun.

Every multi-process test has a subprocess timeout and a short `dist.timeout_s`, so a hang fails
the test instead of blocking the suite.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from click.testing import CliRunner

from esper.cli.main import cli
from esper.compute.backend import EpochPlan
from esper.compute.data_parallel import DataParallel
from esper.compute.settings import TrainSettings
from esper.compute.streams import DATA, generator
from esper.compute.torch_backend import TorchBackend
from esper.events import catalogue as ev
from esper.events.codec import stable_payload
from esper.events.log_reader import LogReader
from esper.lifecycle.config import LifecycleConfig
from esper.lifecycle.fold import fold
from esper.tasks import eval_batches, load_task, train_batches

TESTS = Path(__file__).parent
# Gates that pass whatever the measurements, so which seeds live and die depends only on the
# random policy's own stream, and a BatchNorm-sized difference cannot change the seeds table.
PERMISSIVE = ["--set", "lifecycle.g2_min_shadow_gain=-100.0", "--set", "lifecycle.g2_min_gradient_ratio=0.0",
              "--set", "lifecycle.g5_min_contribution=-100.0"]
GUARDS = ["--set", "dist.verify_every=1", "--set", "dist.timeout_s=60"]


def records(run_dir: Path) -> list:
    return list(LogReader(run_dir / "events.elog").records())


def epochs(run_dir: Path) -> list[ev.EpochCompleted]:
    return [r.event for r in records(run_dir) if isinstance(r.event, ev.EpochCompleted)]


def esper(*args: str, env: dict | None = None, runner: list[str] | None = None) -> subprocess.CompletedProcess:
    command = runner or [sys.executable, "-m", "esper"]
    return subprocess.run([*command, "run", "--quiet", "--set", "run.threads=1", *args], capture_output=True,
                          text=True, timeout=120, env=env)


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def torchrun(fault: str, *args: str) -> subprocess.CompletedProcess:
    """Both ranks through tests/ddp_child.py, which gives rank 1 the fault."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                str(TESTS / "ddp_child.py")]
    return esper(*args, "--backend", "ddp", env=dict(os.environ, ESPER_TEST_FAULT=fault), runner=launcher)


# -- sharding ---------------------------------------------------------------------------------


def test_rank_shards_make_up_each_global_batch_and_validation_is_seen_once():
    data = load_task("digits")
    world = 3  # 64 does not split three ways, which is the launcher's business; sharding still must
    global_batches = list(train_batches(data, generator(5, DATA, 1), "cpu"))
    shards = [list(DataParallel(r, world, 0).shard_train(train_batches(data, generator(5, DATA, 1), "cpu")))
              for r in range(world)]
    assert all(len(s) == len(global_batches) for s in shards)  # every rank runs the same number of steps
    for k, (x, y) in enumerate(global_batches):
        pieces = [s[k] for s in shards]
        assert len({len(p[1]) for p in pieces}) == 1  # padded by wrap-around: equal per-rank batches
        joined = torch.stack([p[0] for p in pieces], dim=1).reshape(-1, *x.shape[1:])  # positions r, r+W, ...
        assert torch.equal(joined[:len(x)], x)
        assert torch.equal(joined[len(x):], global_batches[0][0][:len(joined) - len(x)])
    seen = torch.cat([y for r in range(world) for _, y in DataParallel(r, world, 0).shard_eval(
        eval_batches(data, "val", "cpu"))])
    assert torch.equal(seen.sort().values, data.val.labels.sort().values) and len(seen) == len(data.val)


def test_one_rank_reproduces_the_plain_backend_and_skips_non_finite_steps(tmp_path):
    """The data-parallel path in one process (a gloo group of one): the wrapper, its rebuilds as
    the seed's parameter set changes (an unused gate while incubating), the reductions."""
    data = load_task("digits")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    backends = [TorchBackend(data, TrainSettings(), LifecycleConfig(), ("early", "mid", "late"), torch.device("cpu"),
                             parallel) for parallel in (None, DataParallel(0, 1, verify_every=1))]
    try:
        for b in backends:
            b.build(episode_seed=3, max_epochs=4)
            b.germinate("mid", "conv_light", "gated", init_seed=2)
        for epoch, mode in enumerate(("incubate", "blend", "blend"), start=1):
            results = []
            for b in backends:
                b.set_slot("mid", mode, 0.3 * epoch, True, False)
                results.append(b.run_epoch(EpochPlan(epoch, ("mid",), ("mid",) if mode == "incubate" else (), ("mid",),
                                                     ablate=("mid",) if mode == "blend" else ())))
            (a, va), (b, vb) = results
            assert b.loss == pytest.approx(a.loss, rel=1e-6) and b.samples == a.samples
            assert b.seeds["mid"].grad_ratio == pytest.approx(a.seeds["mid"].grad_ratio, rel=1e-5)
            assert b.seeds["mid"].isolation_leaks == a.seeds["mid"].isolation_leaks == 0
            assert vb.main == va.main and vb.forward_passes == va.forward_passes
        assert backends[1].parallel.rebuilds == 2  # the gate joined the trained set at blending
        for b in backends:
            with torch.no_grad():
                b.model.host.head.weight.fill_(float("nan"))
            conv = b.model.host.blocks[0][0].weight.clone()
            assert b.run_epoch(EpochPlan(4))[0].non_finite
            assert torch.equal(b.model.host.blocks[0][0].weight, conv)  # no step was taken
    finally:
        backends[1].parallel.release()
        dist.destroy_process_group()


def test_an_epoch_reduces_its_measurements_once_after_one_broadcast(tmp_path, monkeypatch):
    """The fixed schedule of runtime §5.3, counted on a one-rank group in this process: per epoch
    rank 0's one broadcast opening it, one all-reduce of the running statistics and one of every
    measurement (training, gradients, validation, counterfactuals); then the test pass (one
    broadcast, one all-reduce) and the broadcast that stops the other ranks. The wrapper's gradient
    all-reduces run inside DistributedDataParallel, not through these calls."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "localhost"),
                        ("MASTER_PORT", str(port))):
        monkeypatch.setenv(name, value)
    calls: list[tuple[str, int]] = []
    for name in ("all_reduce", "broadcast_object_list", "all_gather_object"):
        original = getattr(dist, name)

        def counted(first, *args, _name=name, _original=original, **kwargs):
            calls.append((_name, first.numel() if _name == "all_reduce" else len(first)))
            return _original(first, *args, **kwargs)

        monkeypatch.setattr(dist, name, counted)
    epochs_run = 4
    result = CliRunner().invoke(cli, ["run", "--quiet", "--task", "digits", "--policy", "none", "--epochs",
                                      str(epochs_run), "--backend", "ddp", "--out", str(tmp_path), "--name", "c",
                                      "--set", "run.threads=1", "--set", "dist.verify_every=2"])
    assert result.exit_code == 0, result.output
    kinds = [name for name, _ in calls]
    assert kinds.count("broadcast_object_list") == epochs_run + 2
    assert kinds.count("all_reduce") == 2 * epochs_run + 1
    assert kinds.count("all_gather_object") == epochs_run // 2
    epoch = ["broadcast_object_list", "all_reduce", "all_reduce"]
    assert kinds[:7] == epoch + epoch + ["all_gather_object"]  # epochs 1 and 2, then the verification
    measurements = calls[2][1]
    assert measurements == calls[5][1]  # the same packed layout every epoch with the same slots


# -- user errors ------------------------------------------------------------------------------


def test_ddp_outside_torchrun_is_a_one_line_error(tmp_path, monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(cli, ["run", "--quiet", "--task", "synthetic", "--backend", "ddp",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "torchrun" in result.stderr and "RANK" in result.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("args, message", [
    (["--backend", "torch"], "--nproc runs the ddp backend, not torch (omit --backend)"),
    (["--set", "run.backend='simulated'"], "--nproc runs the ddp backend, not simulated (drop --set run.backend)"),
])
def test_nproc_with_another_backend_is_refused_before_any_process_starts(tmp_path, args, message):
    result = CliRunner().invoke(cli, ["run", "--quiet", "--task", "digits", "--nproc", "2", "--out", str(tmp_path),
                                      *args])
    assert result.exit_code == 2 and result.stderr == f"esper: error: {message}\n", result.stderr
    assert not any(tmp_path.iterdir())


def test_a_batch_that_does_not_split_over_the_processes_is_refused_before_any_starts(tmp_path):
    result = CliRunner().invoke(cli, ["run", "--quiet", "--task", "digits", "--nproc", "3", "--out", str(tmp_path)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "64" in result.stderr
    assert not any(tmp_path.iterdir())


# -- two processes ----------------------------------------------------------------------------


@pytest.mark.slow
def test_two_ranks_stay_identical_and_log_what_one_process_logs(tmp_path):
    """`esper run --nproc 2` against one process on the same global batch. Checksums of every
    parameter and buffer are compared after every epoch (dist.verify_every=1: a mismatch fails the
    run). Tolerance: identical seeds table apart from contributions, which, like every epoch's
    validation score, stay within 3 pp (measured: 2.6 pp at most); the ranks normalise with
    BatchNorm statistics of their own 32 samples where one process uses all 64."""
    args = ["--task", "digits", "--policy", "random", "--seed", "1", "--epochs", "13", "--out", str(tmp_path),
            *PERMISSIVE]
    single = esper(*args, "--name", "one")
    assert single.returncode == 0, single.stderr
    double = esper(*args, "--name", "two", "--nproc", "2", *GUARDS)
    assert double.returncode == 0, double.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # rank 1 created nothing
    header = records(tmp_path / "two")[0].event
    assert header.world_size == 2 and header.config["run"]["backend"] == "ddp"
    one, two = fold(records(tmp_path / "one")), fold(records(tmp_path / "two"))
    assert two.state.status == "completed"
    def key(s):
        return s.seed_id, s.slot, s.blueprint, s.stage, s.outcome, s.germinated_epoch, s.ended_epoch

    assert [key(s) for s in two.projections.seeds] == [key(s) for s in one.projections.seeds]
    assert len(one.projections.seeds) >= 3 and {s.outcome for s in one.projections.seeds} == {"culled", "episode_ended"}
    for a, b in zip(one.projections.seeds, two.projections.seeds):
        assert (a.last_contribution is None) == (b.last_contribution is None)
        assert a.last_contribution is None or abs(a.last_contribution - b.last_contribution) <= 3.0
    for a, b in zip(epochs(tmp_path / "one"), epochs(tmp_path / "two"), strict=True):
        assert abs(a.val_acc - b.val_acc) <= 3.0 and a.n_val == b.n_val


@pytest.mark.slow
def test_a_killed_two_rank_run_resumes_under_two_ranks_to_the_same_log(tmp_path):
    """kill -9 of every process once a few epochs are in, then `--resume --nproc 2`: rank 0 forks the
    log, its checkpoint reaches rank 1 with the first epoch, and the payloads equal those of an
    uninterrupted two-rank run (runtime §6.4)."""
    args = ["--task", "digits", "--policy", "random", "--seed", "1", "--epochs", "8", "--nproc", "2",
            "--out", str(tmp_path), *PERMISSIVE, *GUARDS]
    whole = esper(*args, "--name", "whole")
    assert whole.returncode == 0, whole.stderr
    command = [sys.executable, "-m", "esper", "run", "--quiet", "--set", "run.threads=1", *args, "--name", "killed"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and process.poll() is None:
            log = tmp_path / "killed" / "events.elog"
            if log.exists() and len([e for e in epochs(tmp_path / "killed")]) >= 3:
                break
            time.sleep(0.05)
    finally:
        workers = children(process.pid)  # torch's agent starts each in a session of its own
        os.killpg(process.pid, signal.SIGKILL)
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        process.wait(timeout=30)
    killed = records(tmp_path / "killed")
    assert 3 <= len([r for r in killed if isinstance(r.event, ev.EpochCompleted)]) < 8
    assert not any(isinstance(r.event, ev.RunFinished) for r in killed)
    resumed = esper("--resume", str(tmp_path / "killed"), "--nproc", "2", "--set", "dist.timeout_s=60")
    assert resumed.returncode == 0, resumed.stderr
    log = records(tmp_path / "killed.r1")
    assert log[0].event.forked_from is not None and log[0].event.world_size == 2
    assert [stable_payload(r) for r in log[1:]] == [stable_payload(r) for r in records(tmp_path / "whole")[1:]]


@pytest.mark.slow
def test_ranks_measuring_different_gradient_ratios_take_one_gate_decision(tmp_path):
    """Rank 1 measures its seed's gradient norm 100 times too large. Ranks reduce the measurement
    once, rank 0 alone evaluates G2 on the reduced ratio, and both apply the verdict: the run ends,
    and the replicas stay identical after every epoch. Alone, rank 0's ratio (about 0.13) would fail
    G2's minimum of 0.5; the reduced one (about 6.3) passes it."""
    result = torchrun("ratio", "--task", "digits", "--policy", "random", "--seed", "3", "--epochs", "9",
                      "--slots", "mid", "--blueprints", "conv_light", "--out", str(tmp_path), "--name", "r",
                      "--set", "lifecycle.g2_min_shadow_gain=-100.0", "--set", "lifecycle.g2_min_gradient_ratio=0.5",
                      "--set", "lifecycle.g2_min_training_epochs=1", *GUARDS)
    assert result.returncode == 0, result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["r"]
    log = records(tmp_path / "r")
    g2 = [r.event for r in log if isinstance(r.event, ev.GateEvaluated) and r.event.gate.name == "G2"]
    assert len(g2) == 1 and g2[0].passed
    measured = [r.event for r in log if isinstance(r.event, ev.SeedMeasured)]
    assert measured[0].grad_ratio > 2.0  # the mean of the ranks' ratios, not rank 0's own
    assert measured[1].stage.name == "BLENDING"
    assert fold(log).state.status == "completed"


@pytest.mark.slow
def test_a_replica_that_diverges_stops_every_rank_naming_the_tensor(tmp_path):
    result = torchrun("diverge", "--task", "synthetic", "--epochs", "3", "--out", str(tmp_path), "--name", "d",
                      *GUARDS)
    assert result.returncode != 0
    line = "esper: error: after epoch 1 rank 1 differs from rank 0 in 'host.head.bias'"
    assert result.stderr.count(line) == 2  # both ranks stop, each with one line
    assert "esper/" not in result.stderr  # no worker traceback (torchrun prints its own report)
    status = fold(records(tmp_path / "d")).state.status
    assert status == "failed"
