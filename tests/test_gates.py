"""Gates G0–G5 (lifecycle §3): every check on both sides of its threshold, complete verdicts,
freshness of G2's inputs, G5's counterfactual at alpha 1 during the PROBATIONARY stay."""

import attrs
import pytest

from esper.events import catalogue as ev
from esper.events.catalogue import CatalogueEntry
from esper.events.enums import Gate, Stage
from esper.lifecycle import LifecycleConfig, evaluate_gate
from esper.lifecycle import commands as cmd
from esper.lifecycle.gates import evaluate_g0
from esper.lifecycle.stages import gate_for_target, target_of_gate
from esper.lifecycle.state import Counterfactual, SeedState, SlotState
from test_lifecycle import Run, germinate, grow, measurement

CONFIG = LifecycleConfig()
EPOCH = 10
TAGS = {
    Gate.G0: ("probe_shape", "probe_finite", "identity_at_birth", "param_count"),
    Gate.G1: ("stage_is_germinated",),
    Gate.G2: ("shadow_gain", "isolation_leaks", "min_epochs", "gradient_ratio"),
    Gate.G3: ("min_epochs", "alpha_complete"),
    Gate.G5: ("counterfactual_present", "contribution", "healthy"),
}


def check(verdict, tag):
    (c,) = [c for c in verdict.checks if c.tag == tag]
    return c


# -- G0 -------------------------------------------------------------------------------------------------

ENTRY = CatalogueEntry(name="conv_light", identity_at_birth=True, params={"mid": 600, "late": 2352})
NO_IDENTITY = CatalogueEntry(name="future", identity_at_birth=False, params={"mid": 10})


def report(**changes):
    return cmd.ProbeReport(**{"shape_ok": True, "finite": True, "identity": True, "param_count": 600, **changes})


def test_g0_passes_a_good_probe():
    v = evaluate_g0(report(), ENTRY, "mid")
    assert v.passed and v.score == 1.0 and v.gate == Gate.G0 and v.target_stage == Stage.GERMINATED
    assert tuple(c.tag for c in v.checks) == TAGS[Gate.G0]
    assert [(c.value, c.threshold, c.comparator) for c in v.checks] == [
        (1.0, 1.0, "=="), (1.0, 1.0, "=="), (1.0, 1.0, "=="), (600.0, 600.0, "==")]


@pytest.mark.parametrize("changes, failed", [
    ({"shape_ok": False}, "probe_shape"),
    ({"finite": False}, "probe_finite"),
    ({"identity": False}, "identity_at_birth"),
    ({"identity": None}, "identity_at_birth"),
    ({"param_count": 599}, "param_count"),
    ({"param_count": 601}, "param_count"),
])
def test_g0_each_check_fails_alone(changes, failed):
    v = evaluate_g0(report(**changes), ENTRY, "mid")
    assert not v.passed and v.score == 0.0
    assert v.failed_tags == (failed,)
    assert tuple(c.tag for c in v.checks) == TAGS[Gate.G0]  # the others are still recorded
    assert failed in v.message


def test_g0_param_count_is_per_slot():
    assert evaluate_g0(report(param_count=2352), ENTRY, "late").passed
    assert not evaluate_g0(report(param_count=600), ENTRY, "late").passed
    v = evaluate_g0(report(), ENTRY, "early")  # no formula for that slot: fails, threshold null
    assert v.failed_tags == ("param_count",) and check(v, "param_count").threshold is None


def test_g0_skips_identity_for_blueprints_without_it():
    v = evaluate_g0(report(identity=None, param_count=10), NO_IDENTITY, "mid")
    assert v.passed and "identity_at_birth" not in [c.tag for c in v.checks]
    assert evaluate_g0(report(identity=False, param_count=10), NO_IDENTITY, "mid").passed


def test_g0_records_every_check_when_all_fail():
    v = evaluate_g0(report(shape_ok=False, finite=False, identity=False, param_count=1), ENTRY, "mid")
    assert v.failed_tags == TAGS[Gate.G0]


def test_g0_verdict_through_the_decider():
    run = Run()
    records = run.must(germinate("mid", finite=False, identity=False))
    (verdict,) = [r.event for r in records]
    assert isinstance(verdict, ev.GateEvaluated) and verdict.trigger == "command" and not verdict.passed
    assert [c.tag for c in verdict.checks if not c.passed] == ["probe_finite", "identity_at_birth"]
    assert run.slot().stage == Stage.DORMANT


# -- slot fixtures for G1–G5 ----------------------------------------------------------------------------------


def slot(stage: Stage, entered: int = EPOCH - 3, **seed) -> SlotState:
    defaults = dict(seed_id="mid#1", blueprint="conv_light", blend_kind="sigmoid", steps_total=5)
    return SlotState(slot_id="mid", enabled=True, stage=stage, entered_epoch=entered,
                     seed=SeedState(**{**defaults, **seed}))


def training(gain=1.0, gain_epoch=EPOCH, ratio=0.5, ratio_epoch=EPOCH, leaks=0, entered=EPOCH - 3) -> SlotState:
    shadow = None if gain is None else Counterfactual(value=gain, epoch=gain_epoch, alpha=0.0)
    return slot(Stage.TRAINING, entered, last_shadow=shadow, grad_ratio_ema=ratio, ratio_epoch=ratio_epoch,
                training_leaks=leaks)


def probationary(value=2.0, cf_epoch=EPOCH, cf_alpha=1.0, healthy=True, entered=EPOCH - 2) -> SlotState:
    cf = None if value is None else Counterfactual(value=value, epoch=cf_epoch, alpha=cf_alpha)
    return slot(Stage.PROBATIONARY, entered, alpha=1.0, step=5, last_counterfactual=cf, healthy=healthy)


# -- G1 -----------------------------------------------------------------------------------------------------


def test_g1():
    v = evaluate_gate(Gate.G1, slot(Stage.GERMINATED), CONFIG, EPOCH)
    assert v.passed and v.score == 1.0 and v.target_stage == Stage.TRAINING
    assert tuple(c.tag for c in v.checks) == TAGS[Gate.G1]
    v = evaluate_gate(Gate.G1, slot(Stage.TRAINING), CONFIG, EPOCH)
    assert not v.passed and v.score == 0.0 and v.failed_tags == ("stage_is_germinated",)


# -- G2 -----------------------------------------------------------------------------------------------------


def test_g2_passes():
    v = evaluate_gate(Gate.G2, training(), CONFIG, EPOCH)
    assert v.passed and v.target_stage == Stage.BLENDING
    assert tuple(c.tag for c in v.checks) == TAGS[Gate.G2]
    assert [(c.value, c.threshold, c.comparator) for c in v.checks] == [
        (1.0, 0.5, ">="), (0, 0, "<="), (3, 3, ">="), (0.5, 0.05, ">=")]


@pytest.mark.parametrize("kwargs, config, failed", [
    ({"gain": 0.5}, {}, None),
    ({"gain": 0.4999}, {}, "shadow_gain"),
    ({"gain": -2.0}, {}, "shadow_gain"),
    ({"gain": None}, {}, "shadow_gain"),
    ({"gain": 0.1}, {"g2_min_shadow_gain": 0.1}, None),
    ({"gain": 0.09}, {"g2_min_shadow_gain": 0.1}, "shadow_gain"),
    ({"leaks": 0}, {}, None),
    ({"leaks": 1}, {}, "isolation_leaks"),
    ({"leaks": 2}, {"g2_max_isolation_leaks": 2}, None),
    ({"leaks": 3}, {"g2_max_isolation_leaks": 2}, "isolation_leaks"),
    ({"entered": EPOCH - 3}, {}, None),
    ({"entered": EPOCH - 2}, {}, "min_epochs"),
    ({"entered": EPOCH - 1}, {"g2_min_training_epochs": 1}, None),
    ({"entered": EPOCH}, {"g2_min_training_epochs": 1}, "min_epochs"),
    ({"entered": EPOCH}, {"g2_min_training_epochs": 0}, None),
    ({"ratio": 0.05}, {}, None),
    ({"ratio": 0.0499}, {}, "gradient_ratio"),
    ({"ratio": None, "ratio_epoch": None}, {}, "gradient_ratio"),
    ({"ratio": 0.2}, {"g2_min_gradient_ratio": 0.3}, "gradient_ratio"),
    ({"ratio": 0.3}, {"g2_min_gradient_ratio": 0.3}, None),
])
def test_g2_thresholds(kwargs, config, failed):
    v = evaluate_gate(Gate.G2, training(**kwargs), LifecycleConfig(**config), EPOCH)
    assert v.failed_tags == (() if failed is None else (failed,))
    assert v.passed == (failed is None)
    assert tuple(c.tag for c in v.checks) == TAGS[Gate.G2]


def test_g2_reads_only_this_epochs_shadow_gain_and_ratio():
    v = evaluate_gate(Gate.G2, training(gain_epoch=EPOCH - 1), CONFIG, EPOCH)
    assert v.failed_tags == ("shadow_gain",) and check(v, "shadow_gain").value is None
    v = evaluate_gate(Gate.G2, training(ratio_epoch=EPOCH - 1), CONFIG, EPOCH)
    assert v.failed_tags == ("gradient_ratio",) and check(v, "gradient_ratio").value is None
    v = evaluate_gate(Gate.G2, training(gain_epoch=EPOCH - 1, ratio_epoch=EPOCH - 1, leaks=5, entered=EPOCH),
                      CONFIG, EPOCH)
    assert v.failed_tags == TAGS[Gate.G2]  # every check is recorded, all four failing
    assert v.score == 0.0


@pytest.mark.parametrize("gain, score", [(2.5, 0.5), (5.0, 1.0), (10.0, 1.0), (0.0, 0.0), (-1.0, 0.0), (None, 0.0)])
def test_g2_score(gain, score):
    assert evaluate_gate(Gate.G2, training(gain=gain), CONFIG, EPOCH).score == score


def test_g2_freshness_through_the_decider():
    """Tick of epoch 4 (min_epochs met): a gain or ratio measured only at epoch 3 does not count."""
    for missing in ("contribution", "ratio"):
        run = Run()
        grow(run, "mid", Stage.TRAINING)  # TRAINING from the tick of epoch 1
        run.steps(2)
        run.step(measure={"mid": {missing: None}})
        verdict = run.events(ev.GateEvaluated, gate=Gate.G2)[-1]
        tag = "shadow_gain" if missing == "contribution" else "gradient_ratio"
        assert verdict.epoch == 4 and [c.tag for c in verdict.checks if not c.passed] == [tag]
        assert check(verdict, tag).value is None and run.slot().stage == Stage.TRAINING
        if missing == "ratio":  # the EMA itself is kept, only unread
            assert run.slot().seed.grad_ratio_ema == 0.5
        run.step()
        assert run.slot().stage == Stage.BLENDING


def test_g2_counts_only_leaks_measured_in_training():
    run = Run({"g2_max_isolation_leaks": 1})
    grow(run, "mid", Stage.TRAINING)
    run.step(measure={"mid": {"leaks": 1}})
    run.steps(2)
    assert run.slot().stage == Stage.BLENDING and run.slot().seed.training_leaks == 1
    run.step(measure={"mid": {"leaks": 7}})  # BLENDING: not a training leak
    assert run.slot().seed.training_leaks == 1
    run2 = Run({"g2_max_isolation_leaks": 1})
    grow(run2, "mid", Stage.TRAINING)
    run2.steps(2, measure={"mid": {"leaks": 1}})  # cumulative: 2 > 1
    run2.step()
    verdict = run2.events(ev.GateEvaluated, gate=Gate.G2)[-1]
    assert [c.tag for c in verdict.checks if not c.passed] == ["isolation_leaks"]
    assert check(verdict, "isolation_leaks").value == 2


# -- G3 -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entered, alpha, config, failed", [
    (EPOCH - 3, 1.0, {}, ()),
    (EPOCH - 2, 1.0, {}, ("min_epochs",)),
    (EPOCH - 3, 0.95, {}, ()),
    (EPOCH - 3, 0.9499, {}, ("alpha_complete",)),
    (EPOCH - 1, 0.5, {}, ("min_epochs", "alpha_complete")),
    (EPOCH, 0.5, {"g3_min_blending_epochs": 0, "g3_min_alpha": 0.5}, ()),
    (EPOCH, 0.49, {"g3_min_blending_epochs": 0, "g3_min_alpha": 0.5}, ("alpha_complete",)),
    (EPOCH - 4, 1.0, {"g3_min_blending_epochs": 5}, ("min_epochs",)),
])
def test_g3_thresholds(entered, alpha, config, failed):
    v = evaluate_gate(Gate.G3, slot(Stage.BLENDING, entered, alpha=alpha), LifecycleConfig(**config), EPOCH)
    assert v.failed_tags == failed and v.passed == (failed == ())
    assert tuple(c.tag for c in v.checks) == TAGS[Gate.G3]
    assert v.score == alpha and v.target_stage == Stage.PROBATIONARY
    assert check(v, "alpha_complete").threshold == LifecycleConfig(**config).g3_min_alpha


# -- G5 -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, config, failed", [
    ({}, {}, ()),
    ({"value": 1.0}, {}, ()),
    ({"value": 0.99}, {}, ("contribution",)),
    ({"value": -3.0}, {}, ("contribution",)),
    ({"value": 2.0}, {"g5_min_contribution": 2.5}, ("contribution",)),
    ({"value": 0.2}, {"g5_min_contribution": 0.2}, ()),
    ({"healthy": False}, {}, ("healthy",)),
    ({"healthy": None}, {}, ("healthy",)),
    ({"value": None}, {}, ("counterfactual_present", "contribution")),
    ({"cf_alpha": 0.9758}, {}, ("counterfactual_present", "contribution")),  # not measured at alpha 1
    ({"cf_epoch": EPOCH - 2}, {}, ("counterfactual_present", "contribution")),  # before this stay
    ({"cf_epoch": EPOCH - 1}, {}, ()),
    ({"value": None, "healthy": False}, {}, ("counterfactual_present", "contribution", "healthy")),
])
def test_g5_thresholds(kwargs, config, failed):
    v = evaluate_gate(Gate.G5, probationary(**kwargs), LifecycleConfig(**config), EPOCH)
    assert v.failed_tags == failed and v.passed == (failed == ())
    assert tuple(c.tag for c in v.checks) == TAGS[Gate.G5]
    assert v.target_stage == Stage.FOSSILIZED
    present = check(v, "counterfactual_present")
    assert present.comparator == "present" and present.value == (0.0 if "counterfactual_present" in failed else 1.0)
    if "counterfactual_present" in failed:
        assert check(v, "contribution").value is None  # null and failing when absent


@pytest.mark.parametrize("value, score", [(5.0, 0.5), (10.0, 1.0), (20.0, 1.0), (0.0, 0.0), (-2.0, 0.0)])
def test_g5_score(value, score):
    assert evaluate_gate(Gate.G5, probationary(value=value), CONFIG, EPOCH).score == score


def test_g5_needs_a_counterfactual_at_alpha_one_during_probation():
    """Explicit G3: the counterfactual measured in the step of the Advance (while still BLENDING, at
    alpha 1.0) does not count; the next epoch's, measured in PROBATIONARY, does."""
    run = Run({"gate_mode_g3": "explicit"})
    grow(run, "mid", Stage.BLENDING)
    run.steps(4)
    assert run.slot().seed.alpha == 1.0  # ramp complete, still BLENDING
    run.step(lambda r: [cmd.Advance(slot="mid"), cmd.Fossilize(slot="mid")], measure={"mid": {"contribution": 4.0}})
    assert run.slot().stage == Stage.PROBATIONARY
    g5 = run.results[1][0].event
    assert g5.gate == Gate.G5 and not g5.passed
    assert [c.tag for c in g5.checks if not c.passed] == ["counterfactual_present", "contribution"]
    run.step(lambda r: [cmd.Fossilize(slot="mid")], measure={"mid": None})  # nothing measured in the stay yet
    assert not run.results[0][0].event.passed
    run.step(lambda r: [cmd.Fossilize(slot="mid")], measure={"mid": {"contribution": 1.5}})
    g5 = run.results[0][0].event
    assert g5.passed and check(g5, "contribution").value == pytest.approx(1.5)
    assert run.slot().stage == Stage.FOSSILIZED


def test_g5_reads_the_latest_measurement_for_health():
    run = Run()
    grow(run, "mid", Stage.PROBATIONARY)
    run.step(lambda r: [cmd.Fossilize(slot="mid")], measure={"mid": {"finite": False}})
    assert [c.tag for c in run.results[0][0].event.checks if not c.passed] == ["healthy"]
    run.step(lambda r: [cmd.Fossilize(slot="mid")])
    assert run.slot().stage == Stage.FOSSILIZED


def test_a_failed_verdict_is_recorded_and_the_stage_stays():
    run = Run({"g5_min_contribution": 5.0})
    grow(run, "mid", Stage.PROBATIONARY)
    run.step(lambda r: [cmd.Fossilize(slot="mid")])
    (verdict,) = [r.event for r in run.results[0]]
    assert not verdict.passed and verdict.trigger == "command" and run.slot().stage == Stage.PROBATIONARY
    assert check(verdict, "contribution").threshold == 5.0


# -- the gate map --------------------------------------------------------------------------------------------


def test_gate_for_target():
    assert {s: gate_for_target(s) for s in (Stage.GERMINATED, Stage.TRAINING, Stage.BLENDING, Stage.PROBATIONARY,
                                            Stage.FOSSILIZED)} == {
        Stage.GERMINATED: Gate.G0, Stage.TRAINING: Gate.G1, Stage.BLENDING: Gate.G2, Stage.PROBATIONARY: Gate.G3,
        Stage.FOSSILIZED: Gate.G5}
    for g in Gate:
        assert gate_for_target(target_of_gate(g)) == g


@pytest.mark.parametrize("stage", [Stage.CULLED, Stage.EMBARGOED, Stage.RESETTING, Stage.DORMANT, Stage.UNKNOWN])
def test_gate_for_target_raises_for_ungated_targets(stage):
    with pytest.raises(ValueError):
        gate_for_target(stage)


def test_gate_4_and_stage_5_do_not_exist():
    assert 4 not in {g.value for g in Gate} and 5 not in {s.value for s in Stage}
    with pytest.raises(ValueError):
        Gate(4)
    with pytest.raises(ValueError):
        Stage(5)
    assert not hasattr(Gate, "G4") and not hasattr(Stage, "SHADOWING")


def test_evaluate_gate_refuses_g0():
    with pytest.raises(ValueError):
        evaluate_gate(Gate.G0, slot(Stage.DORMANT), CONFIG, EPOCH)


def test_verdicts_are_immutable():
    v = evaluate_gate(Gate.G1, slot(Stage.GERMINATED), CONFIG, EPOCH)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        v.passed = False
    assert isinstance(v.checks, tuple)


def test_measurement_helper_is_sane():
    """The helper the decider tests use: shadow in TRAINING, ablation later."""
    s = training()
    assert measurement(s, 50.0).counterfactual.kind == "shadow"
    assert measurement(probationary(), 50.0).counterfactual.kind == "ablation"
