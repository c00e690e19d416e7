"""Gates G0–G5 (lifecycle §3): pure functions from measured state to a verdict with tagged checks.

Every check is evaluated and recorded even after another has failed, so a verdict always shows the
whole picture. Policies call `evaluate_gate` as a dry run for their masks.
"""

import attrs

from esper.events.catalogue import CatalogueEntry, Check
from esper.events.enums import Gate, Stage
from esper.lifecycle.commands import ProbeReport
from esper.lifecycle.config import LifecycleConfig
from esper.lifecycle.stages import target_of_gate
from esper.lifecycle.state import SlotState


@attrs.frozen
class GateVerdict:
    gate: Gate
    target_stage: Stage
    passed: bool
    score: float
    checks: tuple[Check, ...]
    message: str

    @property
    def failed_tags(self) -> tuple[str, ...]:
        return tuple(c.tag for c in self.checks if not c.passed)


def _number(value: float | None) -> float | None:
    # Floats even for counts: the log stores them as floats, and a record must equal its read-back.
    return None if value is None else float(value)


def _at_least(tag: str, value: float | None, threshold: float) -> Check:
    passed = value is not None and value >= threshold
    return Check(tag=tag, passed=passed, value=_number(value), threshold=_number(threshold), comparator=">=")


def _at_most(tag: str, value: float | None, threshold: float) -> Check:
    passed = value is not None and value <= threshold
    return Check(tag=tag, passed=passed, value=_number(value), threshold=_number(threshold), comparator="<=")


def _flag(tag: str, ok: bool | None, comparator: str = "==") -> Check:
    value = None if ok is None else float(ok)
    return Check(tag=tag, passed=bool(ok), value=value, threshold=1.0, comparator=comparator)


def _verdict(gate: Gate, checks: list[Check], score: float) -> GateVerdict:
    passed = all(c.passed for c in checks)
    failed = [c.tag for c in checks if not c.passed]
    message = f"{gate.name} passed" if passed else f"{gate.name} failed: {', '.join(failed)}"
    return GateVerdict(gate, target_of_gate(gate), passed, score, tuple(checks), message)


def evaluate_g0(probe: ProbeReport, entry: CatalogueEntry, slot_id: str) -> GateVerdict:
    checks = [_flag("probe_shape", probe.shape_ok), _flag("probe_finite", probe.finite)]
    if entry.identity_at_birth:
        checks.append(_flag("identity_at_birth", probe.identity))
    expected = entry.params.get(slot_id)
    checks.append(
        Check(
            tag="param_count",
            passed=expected is not None and probe.param_count == expected,
            value=float(probe.param_count),
            threshold=None if expected is None else float(expected),
            comparator="==",
        )
    )
    verdict = _verdict(Gate.G0, checks, 0.0)
    return attrs.evolve(verdict, score=1.0 if verdict.passed else 0.0)


def evaluate_gate(gate: Gate, slot: SlotState, config: LifecycleConfig, epoch: int) -> GateVerdict:
    """G1, G2, G3 or G5 on the slot's state as measured earlier in step `epoch`."""
    seed = slot.seed
    in_stage = slot.epochs_in_stage(epoch)
    if gate == Gate.G1:
        ok = slot.stage == Stage.GERMINATED
        return _verdict(gate, [_flag("stage_is_germinated", ok)], 1.0 if ok else 0.0)
    if gate == Gate.G2:
        shadow = seed.last_shadow if seed else None
        gain = shadow.value if shadow is not None and shadow.epoch == epoch else None
        fresh_ratio = seed is not None and seed.ratio_epoch == epoch
        checks = [
            _at_least("shadow_gain", gain, config.g2_min_shadow_gain),
            _at_most("isolation_leaks", seed.training_leaks if seed else None, config.g2_max_isolation_leaks),
            _at_least("min_epochs", in_stage, config.g2_min_training_epochs),
            _at_least("gradient_ratio", seed.grad_ratio_ema if fresh_ratio else None, config.g2_min_gradient_ratio),
        ]
        score = min(1.0, gain / 5.0) if gain is not None and gain > 0 else 0.0
        return _verdict(gate, checks, score)
    if gate == Gate.G3:
        alpha = seed.alpha if seed else 0.0
        checks = [
            _at_least("min_epochs", in_stage, config.g3_min_blending_epochs),
            _at_least("alpha_complete", alpha, config.g3_min_alpha),
        ]
        return _verdict(gate, checks, alpha)
    if gate == Gate.G5:
        cf = seed.last_counterfactual if seed else None
        present = (
            cf is not None and cf.alpha == 1.0 and cf.epoch > slot.entered_epoch
        )
        contribution = cf.value if present else None
        checks = [
            Check(tag="counterfactual_present", passed=present, value=float(present), threshold=None,
                  comparator="present"),
            _at_least("contribution", contribution, config.g5_min_contribution),
            _flag("healthy", seed.healthy if seed else None),
        ]
        score = min(1.0, contribution / 10.0) if contribution is not None and contribution > 0 else 0.0
        return _verdict(gate, checks, score)
    raise ValueError(f"{gate!r} is not evaluated on slot state")
