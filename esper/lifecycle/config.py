"""Every lifecycle threshold and timing in one frozen object (lifecycle §3.4)."""

import math

import attrs
from attrs import validators as v

from esper.lifecycle.blend import BLEND_KINDS

_GATE_MODES = ("auto", "explicit")
_non_negative = v.ge(0)


def _finite(_inst, attribute, value) -> None:
    # NaN passes every comparison-based validator and would silently disable a gate.
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{attribute.name} must be a finite number, got {value!r}")


def _probability(_inst, attribute, value) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name} must be within [0, 1], got {value!r}")


@attrs.frozen
class LifecycleConfig:
    g2_min_shadow_gain: float = attrs.field(default=0.5, validator=_finite)
    g2_max_isolation_leaks: int = attrs.field(default=0, validator=_non_negative)
    g2_min_training_epochs: int = attrs.field(default=3, validator=_non_negative)
    g2_min_gradient_ratio: float = attrs.field(default=0.05, validator=[_finite, _non_negative])
    g3_min_blending_epochs: int = attrs.field(default=3, validator=_non_negative)
    g3_min_alpha: float = attrs.field(default=0.95, validator=_probability)
    g5_min_contribution: float = attrs.field(default=1.0, validator=_finite)
    gradient_ratio_ema_decay: float = attrs.field(default=0.9, validator=_probability)
    gradient_ratio_eps: float = attrs.field(default=1e-8, validator=[_finite, v.gt(0)])
    grad_stats_stride: int = attrs.field(default=1, validator=v.ge(1))
    max_seeds: int = attrs.field(default=0, validator=_non_negative)
    max_probation_epochs: int = attrs.field(default=5, validator=v.ge(1))
    embargo_epochs: int = attrs.field(default=5, validator=v.ge(1))
    resetting_epochs: int = attrs.field(default=1, validator=v.ge(1))
    gate_mode_g1: str = attrs.field(default="auto", validator=v.in_(_GATE_MODES))
    gate_mode_g2: str = attrs.field(default="auto", validator=v.in_(_GATE_MODES))
    gate_mode_g3: str = attrs.field(default="auto", validator=v.in_(_GATE_MODES))
    default_blend: str = attrs.field(default="sigmoid", validator=v.in_(BLEND_KINDS))
    blend_steps: int = attrs.field(default=5, validator=v.ge(1))
    # Bounded: exp() in the renormalised sigmoid overflows past ~1400, and 100 is already a step.
    sigmoid_steepness: float = attrs.field(default=12.0, validator=[v.gt(0), v.le(100.0)])
    isolate_cnn_after_training: bool = True
    isolate_transformer_after_training: bool = False
    fossilized_trainable: bool = True
    counterfactual_fossilized: bool = False
    leak_check_stride: int = attrs.field(default=1, validator=v.ge(1))

    def gate_mode(self, gate_number: int) -> str:
        return {1: self.gate_mode_g1, 2: self.gate_mode_g2, 3: self.gate_mode_g3}[gate_number]
