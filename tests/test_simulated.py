"""The `simulated` backend (policy §7.5, runtime §5.4): its curves, its determinism, its state
round trips, and whole runs through the real engine and CLI."""

import math
import statistics
import time
from pathlib import Path

import attrs
import pytest
import torch
from click.testing import CliRunner

from esper.cli.main import cli
from esper.compute.blueprints import catalogue, get_blueprint
from esper.compute.settings import SIMULATED_BLUEPRINTS, SimulatedSettings, TrainSettings
from esper.compute.simulated import SCORE_CAP, SimulatedBackend, normal, uniform
from esper.compute.streams import SEED_INIT, episode_seed, mix64
from esper.events import catalogue as ev
from esper.events.log_reader import LogReader
from esper.lifecycle.config import LifecycleConfig
from esper.lifecycle.fold import fold
from esper.policy.run_config import ConfigError, resolve
from esper.policy.runner import Run, execute, load_data
from esper.tasks import get_task

SLOTS = ("early", "mid", "late")


def backend(task: str = "digits", seed: int = 1, epochs: int = 40, slots=SLOTS, **settings) -> SimulatedBackend:
    b = SimulatedBackend(get_task(task), SimulatedSettings(**settings), TrainSettings(), LifecycleConfig(), slots)
    b.build(episode_seed(seed, 0, 0), epochs)
    return b


def grow(b: SimulatedBackend, slot: str, blueprint: str, alpha: float = 1.0, ordinal: int = 1,
         blend: str = "linear") -> None:
    """Germinate and put the seed straight in the forward at `alpha` (mode blend)."""
    b.germinate(slot, blueprint, blend, mix64(b.episode_seed, SEED_INIT, ordinal))
    b.set_slot(slot, "blend", alpha, True, False)


def epoch(b: SimulatedBackend, e: int, ablate=(), shadow=(), ratio=()):
    train = b.train_epoch(e, tuple(ratio), (), ())
    return train, b.validate(tuple(ablate), tuple(shadow), False)


def contribution(val, slot: str) -> float:
    return val.main.score - val.ablations[slot].score


# -- the curves -------------------------------------------------------------------------------


def test_the_host_converges_to_a_inf_from_a0():
    b = backend()
    assert b.true_score() == pytest.approx(10.0)
    scores = [epoch(b, e)[1].main.score for e in range(1, 61)]
    assert b.host_score() == pytest.approx(60.0 - 50.0 * math.exp(-60 / 4))
    assert statistics.fmean(scores[-20:]) == pytest.approx(60.0, abs=0.2)
    assert scores[0] < 25 and scores[4] < scores[9] < scores[19]
    early = [b.settings.a_inf - (b.settings.a_inf - b.settings.a0) * math.exp(-t / 4) for t in (1, 2)]
    assert scores[0] == pytest.approx(early[0], abs=1.5) and scores[1] == pytest.approx(early[1], abs=1.5)


def test_observation_noise_has_the_configured_sigma_and_the_loss_follows_the_score():
    residuals = []
    for seed in range(40):
        b = backend(seed=seed)
        for e in range(1, 51):
            _, val = epoch(b, e)
            residuals.append(val.main.score - b.true_score())
            l_rand = math.log(10)
            assert val.main.loss == pytest.approx(l_rand * (1 - val.main.score / 100))
    assert abs(statistics.fmean(residuals)) < 0.03
    assert statistics.pstdev(residuals) == pytest.approx(0.3, rel=0.06)
    quiet = backend(noise=0.0)
    _, val = epoch(quiet, 1)
    assert val.main.score == quiet.true_score()


def test_the_noise_primitives_are_pure_functions_of_their_key():
    assert uniform(1, 2, 3) == uniform(1, 2, 3) != uniform(1, 2, 4)
    draws = [normal(7, k) for k in range(20_000)]
    assert abs(statistics.fmean(draws)) < 0.03 and statistics.pstdev(draws) == pytest.approx(1.0, abs=0.03)
    assert all(0.0 < uniform(9, k) <= 1.0 for k in range(1000))


def test_a_useful_seed_contributes_more_as_it_matures():
    b = backend(noise=0.0)
    grow(b, "mid", "conv_light")
    q = b.sim["mid"].quality
    contributions = [contribution(epoch(b, e, ablate=["mid"])[1], "mid") for e in range(1, 16)]
    assert q > 2.5  # conv_light: N(6, 1)
    for e, c in enumerate(contributions, start=1):
        assert c == pytest.approx(q * (1 - math.exp(-e / 3)), abs=1e-9)
    assert all(a < b_ for a, b_ in zip(contributions, contributions[1:]))
    # With noise, the measured contribution is the effect plus noise of about 0.3 pp.
    noisy = backend()
    grow(noisy, "mid", "conv_light")
    errors = []
    for e in range(1, 31):
        _, val = epoch(noisy, e, ablate=["mid"])
        seed = noisy.sim["mid"]
        errors.append(contribution(val, "mid") - seed.quality * seed.maturity(3.0))
    assert statistics.pstdev(errors) < 0.6 and max(map(abs, errors)) < 1.5


def test_alpha_scales_the_effect_and_a_shadow_pass_reads_the_seed_fully_in():
    b = backend(noise=0.0)
    grow(b, "mid", "conv_light", alpha=0.5)
    _, val = epoch(b, 1, ablate=["mid"])
    seed = b.sim["mid"]
    assert contribution(val, "mid") == pytest.approx(0.5 * seed.quality * seed.maturity(3.0))
    b.set_slot("mid", "incubate", 0.0, False, False)  # TRAINING: straight-through, alpha 0 in the forward
    _, val = epoch(b, 2, shadow=["mid"])
    assert val.main.score == pytest.approx(b.host_score())
    assert val.shadows["mid"].score - val.main.score == pytest.approx(seed.quality * seed.maturity(3.0))
    b.set_slot("mid", "inert", 0.0, False, False)  # GERMINATED: out of the forward, no maturing
    trained = seed.trained
    _, val = epoch(b, 3, shadow=["mid"])
    assert seed.trained == trained and val.shadows["mid"].score == val.main.score


def test_a_useless_seed_is_near_zero_and_a_harmful_one_is_negative():
    useless, harmful = [], []
    for seed in range(30):
        b = backend(seed=seed, noise=0.0)
        grow(b, "early", "norm")
        grow(b, "late", "attention", ordinal=2)
        for e in range(1, 13):
            _, val = epoch(b, e, ablate=["early", "late"])
        useless.append(contribution(val, "early"))
        harmful.append(contribution(val, "late"))
    assert abs(statistics.fmean(useless)) < 0.3 and max(map(abs, useless)) < 2.0
    assert statistics.fmean(harmful) == pytest.approx(-4.0 * (1 - math.exp(-4)), abs=0.6)
    assert sum(c < 0 for c in harmful) >= 28


def test_a_dependent_seed_measures_a_positive_contribution_while_the_score_falls():
    table = {"conv_heavy": (1.0, 0.0, 1.0, 3.0)}  # q = 1, delta = 3
    with_seed = backend(noise=0.0, blueprints=table)
    without = backend(noise=0.0, blueprints=table)
    grow(with_seed, "mid", "conv_heavy")
    for e in range(1, 21):
        _, val = epoch(with_seed, e, ablate=["mid"])
        _, base = epoch(without, e)
    seed = with_seed.sim["mid"]
    qm = seed.quality * seed.maturity(3.0)
    measured, moved = contribution(val, "mid"), val.main.score - base.main.score
    assert measured == pytest.approx(qm + 3.0) and measured > 0
    assert moved == pytest.approx(qm - 3.0) and moved < 0  # P < 0: ransomware
    assert val.ablations["mid"].score == pytest.approx(base.main.score - 2 * 3.0)  # removal loses both


def test_scores_are_capped_below_100():
    b = backend(noise=0.0, a0=90.0, a_inf=95.0, blueprints={"conv_light": (30.0, 0.0, 1.0, 0.0)})
    grow(b, "mid", "conv_light")
    for e in range(1, 20):
        train, val = epoch(b, e)
    assert val.main.score == SCORE_CAP and train.score == SCORE_CAP < 100.0


def test_the_gradient_ratio_rises_to_rho_max_and_noop_measures_zero():
    b = backend(noise=0.0)
    grow(b, "mid", "conv_light")
    grow(b, "late", "noop", ordinal=2)
    ratios = []
    for e in range(1, 16):
        train, _ = epoch(b, e, ratio=["mid", "late"])
        ratios.append(train.seeds["mid"].grad_ratio)
        assert train.seeds["late"].grad_ratio == 0.0 and train.seeds["late"].seed_grad_norm == 0.0
        stats = train.seeds["mid"]
        n_seed, n_host = b.sim["mid"].params, b.host_params
        expected = stats.grad_ratio * stats.host_grad_norm * math.sqrt(n_seed / n_host)
        assert stats.seed_grad_norm == pytest.approx(expected)
    assert statistics.fmean(ratios[:2]) < statistics.fmean(ratios[-5:])
    assert statistics.fmean(ratios[-5:]) == pytest.approx(1.0, abs=0.1)
    assert ratios[0] == pytest.approx(1 - math.exp(-0.5), abs=0.35)
    # Slots the engine does not ask about are not measured.
    train, _ = epoch(b, 16)
    assert train.seeds["mid"].grad_ratio is None and train.seeds["mid"].isolation_leaks is None
    assert b.train_epoch(17, (), (), ("mid",)).seeds["mid"].isolation_leaks == 0


# -- the interface --------------------------------------------------------------------------


def test_the_host_summary_and_parameter_counts_match_the_torch_backend():
    from esper.compute.torch_backend import TorchBackend
    from esper.tasks import load_task

    data = load_task("digits")
    real = TorchBackend(data, TrainSettings(), LifecycleConfig(), SLOTS, torch.device("cpu"))
    sim = backend(slots=SLOTS)
    assert sim.summary() == real.build(episode_seed(1, 0, 0), 40)
    for blend in ("linear", "gated"):
        init = mix64(9, SEED_INIT, 1)
        assert sim.germinate("mid", "conv_light", blend, init) == real.germinate("mid", "conv_light", blend, init)
        assert sim.param_counts() == real.param_counts()
        assert sim.seeds == real.seeds
        sim.drop("mid"), real.drop("mid")
    assert sim.param_counts() == real.param_counts()


def test_germination_uses_the_catalogue_and_a_gate_is_discarded_at_alpha_one():
    b = backend()
    width = dict((s, c) for s, c, _ in b.slot_specs)["late"]
    for bp in catalogue("cnn"):
        built = b.germinate("late", bp.name, "linear", 5)
        assert built.param_count == get_blueprint("cnn", bp.name).param_count(width)
        assert built.identity is True and built.shape_ok and built.finite and built.blend_params == 0
        b.drop("late")
    built = b.germinate("late", "conv_light", "gated", 5)
    r = max(1, width // 4)
    assert built.blend_params == r * (width + 2) + 1
    b.set_slot("late", "blend", 0.6, True, False)
    assert b.seeds["late"] == ("conv_light", "gated")
    b.set_slot("late", "blend", 1.0, True, False)
    assert b.seeds["late"] == ("conv_light", "linear") and b.param_counts()[1] == built.param_count
    with pytest.raises(RuntimeError):
        b.germinate("late", "norm", "linear", 6)
    with pytest.raises(KeyError):
        backend(slots=("mid",)).germinate("early", "norm", "linear", 6)


def test_a_seeds_quality_comes_from_its_own_init_seed():
    a, b = backend(seed=1), backend(seed=2)
    grow(a, "mid", "conv_light")
    a.germinate("late", "conv_light", "linear", 1234)
    epoch(b, 1), epoch(b, 2)  # a different episode and history
    b.germinate("early", "conv_light", "linear", 1234)
    assert a.sim["late"].quality == b.sim["early"].quality
    assert a.sim["late"].quality != a.sim["mid"].quality


def drive(b: SimulatedBackend, epochs: int = 12) -> list:
    """A fixed command sequence: germinate, incubate, blend, fossilize, a second seed, a drop."""
    out = []
    grow(b, "mid", "conv_light", alpha=0.0)
    b.set_slot("mid", "incubate", 0.0, False, False)
    for e in range(1, epochs + 1):
        if e == 4:
            b.set_slot("mid", "blend", 0.5, True, False)
        if e == 5:
            b.set_slot("mid", "fused", 1.0, True, True)
            grow(b, "late", "attention", alpha=0.3, ordinal=2)
        if e == 9:
            b.drop("late")
        ablate = [s for s, seed in b.sim.items() if seed.real_alpha > 0]
        shadow = [s for s, seed in b.sim.items() if seed.mode == "incubate"]
        train = b.train_epoch(e, tuple(b.sim), tuple(shadow), tuple(b.sim))
        val = b.validate(tuple(ablate), tuple(shadow), len(ablate) >= 2)
        out.append((attrs.evolve(train, seconds=0.0), attrs.evolve(val, seconds=0.0, counterfactual_seconds=0.0)))
    return out


def test_the_same_seeds_and_commands_give_identical_measurements():
    first, second = drive(backend(seed=3)), drive(backend(seed=3))
    assert first == second
    assert drive(backend(seed=4)) != first


def test_snapshot_and_restore_bring_back_host_progress_and_fossils():
    b = backend(noise=0.0)
    grow(b, "mid", "conv_light")
    for e in range(1, 4):
        epoch(b, e)
    b.set_slot("mid", "fused", 1.0, True, True)
    snap = b.snapshot(3)
    score, trained = b.true_score(), b.sim["mid"].trained
    grow(b, "late", "conv_light", ordinal=2)
    for e in range(4, 9):
        epoch(b, e)
    assert b.host_t == 8 and b.true_score() != score
    b.drop("late")  # the engine culls every cullable seed before it restores
    b.restore(snap)
    assert b.host_t == 3 and b.sim["mid"].trained == trained and b.true_score() == pytest.approx(score)
    assert snap["epoch"] == 3
    with pytest.raises(RuntimeError):
        b.drop("mid")
        b.restore(snap)


def test_state_dict_round_trips_through_a_weights_only_checkpoint(tmp_path):
    a = backend(seed=5)
    drive(a, epochs=6)
    a.germinate("early", "depthwise", "gated", 77)
    a.set_slot("early", "blend", 0.2, True, False)
    path = tmp_path / "state.pt"
    torch.save({"backend": a.state_dict(), "snapshot": a.snapshot(6)}, path)
    loaded = torch.load(path, weights_only=True)
    b = SimulatedBackend(get_task("digits"), SimulatedSettings(), TrainSettings(), LifecycleConfig(), SLOTS)
    b.build(episode_seed(99, 0, 0), 40)  # resume builds first, then loads
    b.load_state_dict(loaded["backend"])
    assert b.state_dict() == a.state_dict() and b.seeds == a.seeds and b.episode_seed == a.episode_seed
    assert b.param_counts() == a.param_counts()
    for e in range(7, 12):
        ta, va = epoch(a, e, ablate=["mid", "early"], ratio=["early"])
        tb, vb = epoch(b, e, ablate=["mid", "early"], ratio=["early"])
        assert attrs.evolve(ta, seconds=0) == attrs.evolve(tb, seconds=0)
        assert va.main == vb.main and va.ablations == vb.ablations
    b.drop("early")
    b.restore(loaded["snapshot"])
    assert b.host_t == 6


def test_non_finite_epochs_follow_the_configured_probability():
    b = backend(nan_probability=0.2)
    flags = [b.train_epoch(e, (), (), ()).non_finite for e in range(1, 1001)]
    assert 150 < sum(flags) < 250
    assert not any(backend().train_epoch(e, (), (), ()).non_finite for e in range(1, 200))
    grow(b, "mid", "conv_light")
    bad = next(e for e in range(1001, 2000) if uniform(b.base, 9, e) <= 0.2)
    train = b.train_epoch(bad, ("mid",), (), ())
    assert train.non_finite and train.seeds["mid"].finite is False and math.isfinite(train.loss)


# -- whole runs -------------------------------------------------------------------------------


def run_cli(*args: str):
    result = CliRunner().invoke(cli, ["run", "--quiet", "--set", "run.threads=1", *args])
    return result.exit_code, result.stdout, result.stderr


def records(run_dir: Path) -> list:
    return list(LogReader(run_dir / "events.elog").records())


def test_a_simulated_heuristic_run_fossilizes_and_culls_through_the_cli(tmp_path):
    started = time.perf_counter()
    code, stdout, stderr = run_cli("--backend", "simulated", "--task", "digits", "--policy", "heuristic",
                                   "--epochs", "40", "--out", str(tmp_path), "--name", "sim")
    elapsed = time.perf_counter() - started
    print(f"\nsimulated 40-epoch heuristic run through the CLI: {elapsed:.2f} s")
    assert code == 0, stderr
    log = records(tmp_path / "sim")
    start = log[0].event
    assert start.device == "cpu" and start.config["run"]["backend"] == "simulated" and start.data_digest is None
    assert start.host.param_count == 422 and [s.channels for s in start.slots] == [4, 8, 16]
    folded = fold(log)
    assert folded.state.status == "completed" and folded.state.envs[0].epoch == 40
    outcomes = {s.outcome for s in folded.projections.seeds}
    assert {"fossilized", "culled"} <= outcomes, [(s.seed_id, s.outcome) for s in folded.projections.seeds]
    assert any(isinstance(r.event, ev.SeedFossilized) for r in log)
    assert any(isinstance(r.event, ev.SeedCulled) for r in log)
    assert CliRunner().invoke(cli, ["log", "check", str(tmp_path / "sim")]).exit_code == 0
    # Deterministic: a second run with the same seed writes the same payloads.
    from esper.events.codec import stable_payload

    code, _, stderr = run_cli("--backend", "simulated", "--task", "digits", "--policy", "heuristic",
                              "--epochs", "40", "--out", str(tmp_path), "--name", "again")
    assert code == 0, stderr
    assert [stable_payload(r) for r in log[1:]] == [stable_payload(r) for r in records(tmp_path / "again")[1:]]


def throughput(tmp_path: Path, name: str, epochs: int, **run) -> float:
    config = resolve({"run": {"backend": "simulated", "task": "digits", "policy": "heuristic", "epochs": epochs,
                              "threads": 1, **run}})
    (tmp_path / name).mkdir()
    the_run = Run(config, tmp_path / name, load_data(config))
    started = time.perf_counter()
    outcome = execute(the_run)
    seconds = time.perf_counter() - started
    assert outcome.status == "completed" and outcome.epochs == epochs
    return epochs / seconds


def test_engine_throughput_of_one_simulated_env(tmp_path):
    """Env-epochs per second through the full engine (printed; nothing asserted about speed)."""
    throughput(tmp_path, "warm", 10)
    full = throughput(tmp_path, "full", 200)
    lean = throughput(tmp_path, "lean", 200, checkpoint_every=0, fsync="never")
    print(f"\nsimulated env-epochs/s, one env, full engine: {full:.0f} with a checkpoint and fsync per epoch; "
          f"{lean:.0f} without checkpoints or fsync")


def test_a_non_finite_loss_makes_the_governor_roll_back_in_a_simulated_run(tmp_path):
    code, _, stderr = run_cli("--backend", "simulated", "--task", "digits", "--policy", "heuristic",
                              "--epochs", "40", "--set", "simulated.nan_probability=0.1",
                              "--set", "governor.max_rollbacks=20", "--out", str(tmp_path), "--name", "nan")
    assert code == 0, stderr
    log = records(tmp_path / "nan")
    rollbacks = [r.event for r in log if isinstance(r.event, ev.GovernorRolledBack)]
    assert rollbacks and all(r.reason == "nan_loss" for r in rollbacks)
    epochs = {r.event.epoch: r.event for r in log if isinstance(r.event, ev.EpochCompleted)}
    for rb in rollbacks:
        assert epochs[rb.epoch].non_finite and epochs[rb.epoch].rolled_back
    # Beyond max_rollbacks the run fails with exit code 3.
    code, _, stderr = run_cli("--backend", "simulated", "--task", "digits", "--epochs", "30",
                              "--set", "simulated.nan_probability=0.5", "--out", str(tmp_path), "--name", "exhausted")
    assert code == 3 and "governor exhausted" in stderr


def test_a_rollback_returns_the_host_to_the_snapshots_progress(tmp_path):
    """Noise off, no seeds: every recorded score is exactly H(t), so the host's progress t can be
    followed through the log, and after each rollback it is the restored epoch's."""
    config = resolve({"run": {"backend": "simulated", "task": "digits", "policy": "none", "epochs": 30,
                              "threads": 1, "checkpoint_every": 0},
                      "simulated": {"nan_probability": 0.15, "noise": 0.0},
                      "governor": {"max_rollbacks": 20}})
    (tmp_path / "r").mkdir()
    execute(Run(config, tmp_path / "r", load_data(config)))
    s = config.simulated

    def host(t: int) -> float:
        return s.a_inf - (s.a_inf - s.a0) * math.exp(-t / s.tau)

    t, progress, restored, rollbacks = 0, {0: 0}, None, 0
    for r in records(tmp_path / "r"):
        if isinstance(r.event, ev.GovernorRolledBack):
            restored, rollbacks = r.event.restored_epoch, rollbacks + 1
        elif isinstance(r.event, ev.EpochCompleted):
            t = progress[restored] if r.event.rolled_back else t + 1
            assert r.event.val_acc == pytest.approx(host(t), abs=1e-9), r.event.epoch
            progress[r.event.epoch] = t
    assert rollbacks >= 2 and t < 30


def test_an_interrupted_simulated_run_resumes_to_the_same_log(tmp_path):
    """Every simulated draw is keyed, and the backend's state dict holds the host's progress and the
    seeds, so a resume reproduces the uninterrupted run, rollbacks included."""
    from esper.events.codec import stable_payload
    from esper.policy.runner import resume

    config = resolve({"run": {"backend": "simulated", "task": "digits", "policy": "heuristic", "epochs": 40,
                              "threads": 1, "seed": 3},
                      "simulated": {"nan_probability": 0.05}, "governor": {"max_rollbacks": 20}})
    (tmp_path / "whole").mkdir()
    execute(Run(config, tmp_path / "whole", load_data(config)))

    def stop(engine, metrics):
        if metrics.epoch == 23:
            raise KeyboardInterrupt

    (tmp_path / "cut").mkdir()
    with pytest.raises(KeyboardInterrupt):
        execute(Run(config, tmp_path / "cut", load_data(config), stop))
    resumed = resume(tmp_path / "cut", None, {})
    execute(resumed, resume=True)
    whole = records(tmp_path / "whole")
    assert any(isinstance(r.event, ev.GovernorRolledBack) for r in whole)
    assert [stable_payload(r) for r in records(resumed.run_dir)[1:]] == [stable_payload(r) for r in whole[1:]]


@pytest.mark.parametrize("task", ["cifar10", "text", "synthetic"])
def test_every_task_runs_simulated_without_its_data(tmp_path, task):
    code, _, stderr = run_cli("--backend", "simulated", "--task", task, "--policy", "random", "--epochs", "6",
                              "--out", str(tmp_path), "--name", task)
    assert code == 0, stderr
    log = records(tmp_path / task)
    start = log[0].event
    assert start.data_digest is None and start.task == task
    if task == "text":
        assert start.host.input_shape == (64,) and start.score_kind == "loss"
        metrics = [r.event for r in log if isinstance(r.event, ev.EpochCompleted)]
        assert all(m.val_acc == pytest.approx(100 * (1 - m.val_loss / math.log(256))) for m in metrics)


@pytest.mark.parametrize("args, message", [
    (["--amp", "bf16"], "train.amp"),
    (["--device", "cuda"], "device 'cuda'"),
    (["--device", "cuda:1"], "device 'cuda:1'"),
    (["--set", "train.compile=true"], "train.compile"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--task", "cifar10", "--data", "/nonexistent"], "reads no data"),
    (["--set", "simulated.blueprints.bogus=[1, 1, 1, 0]"], "simulated"),
    (["--set", "simulated.nan_probability=2"], "simulated"),
])
def test_options_without_meaning_are_one_line_config_errors(tmp_path, args, message):
    code, stdout, stderr = run_cli("--backend", "simulated", "--epochs", "3", "--out", str(tmp_path), *args)
    assert code == 2, (stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], stderr
    assert not any(tmp_path.iterdir()), "no run directory is created for a config error"


def test_the_simulated_section_round_trips_and_one_entry_can_be_overridden():
    import tomllib

    from esper.policy.run_config import dump_toml, parse_set, structure, unstructure

    config = resolve(parse_set("simulated.blueprints.norm=[1, 0.25, 0.5, 2]"), parse_set("simulated.tau=6"))
    table = config.simulated.blueprints
    assert table["norm"] == (1.0, 0.25, 0.5, 2.0) and table["conv_light"] == SIMULATED_BLUEPRINTS["conv_light"]
    assert list(table) == list(SIMULATED_BLUEPRINTS)
    assert structure(tomllib.loads(dump_toml(unstructure(config)))) == config
    with pytest.raises(ConfigError):
        resolve(parse_set("simulated.blueprints.norm=[1, 2]"))
    with pytest.raises(ConfigError):
        resolve(parse_set("simulated.blueprints.norm=[1, -2, 0, 0]"))


def test_the_default_table_covers_both_catalogues_with_a_useful_a_useless_and_a_harmful_entry():
    names = {bp.name for topology in ("cnn", "transformer") for bp in catalogue(topology)}
    assert names == set(SIMULATED_BLUEPRINTS)
    assert SIMULATED_BLUEPRINTS["conv_light"][:2] == (6.0, 1.0)
    assert SIMULATED_BLUEPRINTS["norm"][:2] == (0.0, 0.5)
    assert SIMULATED_BLUEPRINTS["attention"][:2] == (-4.0, 1.0)
