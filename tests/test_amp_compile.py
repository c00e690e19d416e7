"""Mixed precision and torch.compile (runtime §3.5) on CPU, through the real torch backend."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from esper.cli.main import cli
from esper.compute.backend import EpochPlan
from esper.compute.compiling import Compiler
from esper.compute.settings import TrainSettings
from esper.compute.torch_backend import TorchBackend
from esper.lifecycle.config import LifecycleConfig
from esper.tasks import load_task

SLOTS = ("early", "mid", "late")


@pytest.fixture(scope="module")
def digits():
    return load_task("digits")


@pytest.fixture(autouse=True)
def one_thread():
    # The suite runs two workers on two cores; a second torch thread each makes these 10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def backend(data, compiler: Compiler | None = None, **train) -> TorchBackend:
    b = TorchBackend(data, TrainSettings(**train), LifecycleConfig(), SLOTS, torch.device("cpu"))
    if compiler is not None:
        b.compiler = compiler
    b.build(episode_seed=7, max_epochs=8)
    return b


def grow(b: TorchBackend, epochs: int):
    """Three host epochs, then a blended conv_light seed in `mid`; the last epoch's numbers."""
    for epoch in range(1, epochs + 1):
        if epoch == 4:
            b.germinate("mid", "conv_light", "linear", init_seed=3)
            b.set_slot("mid", "blend", 0.5, True, False)
        seed = ("mid",) if epoch >= 4 else ()
        train, val = b.run_epoch(EpochPlan(epoch, ratio_slots=seed, leak_slots=seed, ablate=seed))
    return train, val


def test_bf16_autocast_trains_close_to_fp32(digits):
    """Tolerance: after 8 epochs (a seed blended from epoch 4) the validation loss within 2% and
    the score within 2 pp of fp32, and the seed's gradient ratio within 5%. Measured: 0.1%, 0 pp, 0.3%."""
    train32, val32 = grow(backend(digits), 8)
    train16, val16 = grow(backend(digits, amp="bf16"), 8)
    assert val16.main.loss == pytest.approx(val32.main.loss, rel=0.02)
    assert abs(val16.main.score - val32.main.score) <= 2.0
    assert abs(val16.ablations["mid"].score - val32.ablations["mid"].score) <= 2.0
    assert train16.seeds["mid"].grad_ratio == pytest.approx(train32.seeds["mid"].grad_ratio, rel=0.05)
    assert train16.seeds["mid"].isolation_leaks == 0


def test_training_validation_and_counterfactuals_run_in_the_precision_of_the_run(digits):
    b = backend(digits, amp="bf16")
    b.germinate("mid", "conv_light", "linear", init_seed=3)
    b.set_slot("mid", "blend", 0.5, True, False)
    seen: list[torch.dtype] = []
    for conv in (b.model.host.blocks[0][0], b.model.slots["mid"].seed.branch[0]):
        conv.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    b.run_epoch(EpochPlan(1, ratio_slots=("mid",), ablate=("mid",)))
    assert seen and set(seen) == {torch.bfloat16}
    seen.clear()
    val = b.validate(("mid",), (), False)  # main and the ablation, fused into one forward
    assert set(seen) == {torch.bfloat16} and len(seen) == 2 * val.forward_passes
    assert isinstance(val.main.loss, float) and isinstance(val.ablations["mid"].loss, float)


def test_the_gradient_scaler_state_is_checkpointed_and_reset_by_rollback(digits):
    # fp16 is refused on CPU for runs (next test); the backend itself runs it, so its scaler can be checked here.
    b = backend(digits, amp="fp16")
    snapshot = b.snapshot(0)
    b.run_epoch(EpochPlan(1))
    b.scaler.update(1024.0)  # a state that differs from a fresh scaler's
    state = b.state_dict()
    assert state["scaler"]["scale"] == 1024.0
    resumed = backend(digits, amp="fp16")
    resumed.load_state_dict(state)
    assert resumed.scaler.state_dict() == b.scaler.state_dict()
    b.restore(snapshot)
    assert b.scaler.get_scale() == torch.amp.GradScaler("cpu").get_scale()


def test_fp16_on_cpu_is_a_one_line_config_error(tmp_path):
    result = CliRunner().invoke(cli, ["run", "--quiet", "--task", "synthetic", "--device", "cpu", "--amp", "fp16",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "fp16" in result.stderr and "CUDA" in result.stderr
    assert not any(tmp_path.iterdir())  # refused before a run directory exists


def test_compiled_pieces_do_not_recompile_for_alpha_or_stage_changes(digits):
    """Host blocks and seeds compile; the slot logic stays eager. `aot_eager` traces exactly what
    Inductor would be given, without code generation, so this is fast."""
    counter = Compiler("aot_eager")
    b = backend(digits, compiler=counter)
    eager = backend(digits)
    for model in (b, eager):
        model.germinate("mid", "conv_light", "linear", init_seed=3)
    schedule = [("incubate", 0.0, True)] + [("blend", a, True) for a in (0.2, 0.4, 0.6, 0.8)] + [("fused", 1.0, False)]
    counts, reported = [], []
    for epoch, (mode, alpha, isolated) in enumerate(schedule, start=1):
        for model in (b, eager):
            model.set_slot("mid", mode, alpha, isolated, mode == "fused")
        incubating = ("mid",) if mode == "incubate" else ()
        shadow = ("mid",) if mode == "incubate" else ()
        ablate = () if mode == "incubate" else ("mid",)
        results = []
        for model in (b, eager):
            results.append(model.run_epoch(EpochPlan(epoch, ("mid",), incubating, ("mid",), ablate, shadow)))
        (train_c, val_c), (train_e, val_e) = results
        assert train_c.loss == pytest.approx(train_e.loss, rel=1e-4)
        assert val_c.main.loss == pytest.approx(val_e.main.loss, rel=1e-4)
        leaks = train_c.seeds["mid"].isolation_leaks
        assert leaks == train_e.seeds["mid"].isolation_leaks and (leaks == 0) == isolated
        counts.append(counter.graphs)
        reported.append(train_c.recompiles + val_c.recompiles)  # what EpochCompleted.recompiles records
        assert train_e.recompiles is None and val_e.recompiles is None
    # Graphs appear while the pieces meet new batch shapes and train/eval; the ramp adds none.
    assert counts[1] == counts[-2], counts
    assert sum(reported) == counts[-1] and reported[2:-1] == [0, 0, 0], reported
    assert counts[-1] <= counts[-2] + 2, counts  # fusing un-isolates the seed: its input now needs gradients


def test_compile_gives_the_same_predictions_as_eager(digits):
    """Inductor itself, evaluation only (compiling on a CPU costs seconds per graph)."""
    compiled, eager = backend(digits, compile=True), backend(digits)
    for b in (compiled, eager):
        b.germinate("mid", "conv_light", "linear", init_seed=3)
        b.set_slot("mid", "blend", 0.5, True, False)
    a, e = compiled.validate(("mid",), (), False), eager.validate(("mid",), (), False)
    assert compiled.compiler.graphs >= 4  # three host blocks and the seed
    for x, y in ((a.main, e.main), (a.ablations["mid"], e.ablations["mid"])):
        assert x.loss == pytest.approx(y.loss, rel=1e-4) and x.score == pytest.approx(y.score, abs=0.2)


def test_a_compile_failure_is_one_line_and_fails_the_run(tmp_path):
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"),
               TORCHINDUCTOR_FX_GRAPH_CACHE="0")
    result = subprocess.run(
        [sys.executable, "-m", "esper", "run", "--quiet", "--task", "synthetic", "--epochs", "2", "--compile",
         "--set", "run.threads=1", "--out", str(tmp_path / "runs"), "--name", "c"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 3, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("esper: error: torch.compile failed") and "Traceback" not in result.stderr
    log = Path(tmp_path / "runs" / "c" / "events.elog")
    assert log.is_file()  # RunFinished(failed) went to the log


def test_deterministic_cuda_runs_get_a_fixed_cublas_workspace(monkeypatch):
    """Without CUBLAS_WORKSPACE_CONFIG, deterministic mode refuses every CUDA matrix multiply."""
    from esper.policy import run_config
    from esper.policy.runner import configure_torch

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    threads = torch.get_num_threads()
    try:
        configure_torch(run_config.resolve({"run": {"threads": 1}}), torch.device("cpu"))
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
        configure_torch(run_config.resolve({"run": {"threads": 1}}), torch.device("cuda", 0))
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)
