"""Alpha ramps (lifecycle §4.5). The decider records a_k; the gated blend's gate lives in torch."""

import math

BLEND_KINDS = ("linear", "sigmoid", "gated")


def ramp_alpha(kind: str, step: int, steps: int, steepness: float) -> float:
    """a_k for step k of T: exactly 0 at k = 0 and exactly 1 at k = T for every kind."""
    if step <= 0:
        return 0.0
    if step >= steps:
        return 1.0
    if kind == "sigmoid":
        def sigma(k: int) -> float:
            return 1.0 / (1.0 + math.exp(-steepness * (k / steps - 0.5)))

        return (sigma(step) - sigma(0)) / (sigma(steps) - sigma(0))
    # linear, and gated (whose recorded scalar is the value at a neutral gate)
    return step / steps
