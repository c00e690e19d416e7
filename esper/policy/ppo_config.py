"""`[ppo]` (policy §5.6): every PPO hyper-parameter, with its default and a validator, and the
length and starting point of `esper train-policy`.

Two keys default to a sentinel the trainer resolves, because their real default depends on the run:
`entropy_anneal_updates = 0` means "the planned number of rounds", and `rollout_length = 0` means
`E − 1` (whole episodes per round).
"""

import math

import attrs
from attrs import validators as v

from esper.lifecycle.blend import BLEND_KINDS


def _finite(_inst, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{attribute.name} must be a finite number, got {value!r}")


def _fraction(_inst, attribute, value) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name} must be within [0, 1], got {value!r}")


def _gamma(_inst, attribute, value) -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{attribute.name} must be within (0, 1], got {value!r}")


def _blend_kinds(_inst, attribute, value: tuple[str, ...]) -> None:
    if not value:
        raise ValueError(f"{attribute.name} must name at least one blend kind")
    unknown = [k for k in value if k not in BLEND_KINDS]
    if unknown:
        raise ValueError(f"{attribute.name} must list kinds among {', '.join(BLEND_KINDS)}, got {unknown[0]!r}")
    if len(set(value)) != len(value):
        raise ValueError(f"{attribute.name} must list distinct kinds, got {list(value)!r}")


_positive = [_finite, v.gt(0.0)]
_non_negative = [_finite, v.ge(0.0)]


@attrs.frozen
class PPOConfig:
    gamma: float = attrs.field(default=0.995, validator=[_finite, _gamma])
    gae_lambda: float = attrs.field(default=0.97, validator=[_finite, _fraction])
    clip: float = attrs.field(default=0.2, validator=_positive)  # ε of the clipped surrogate
    epochs: int = attrs.field(default=4, validator=v.ge(1))  # K
    minibatches: int = attrs.field(default=2, validator=v.ge(1))  # M
    target_kl: float = attrs.field(default=0.015, validator=_positive)  # the update stops above 1.5x
    value_coef: float = attrs.field(default=0.5, validator=_non_negative)  # c_v
    clip_value: bool = attrs.field(default=False, validator=v.instance_of(bool))
    value_clip: float = attrs.field(default=0.2, validator=_positive)  # ε_v, used when clip_value
    entropy_start: float = attrs.field(default=0.05, validator=_non_negative)
    entropy_end: float = attrs.field(default=0.01, validator=_non_negative)
    entropy_anneal_updates: int = attrs.field(default=0, validator=v.ge(0))  # U; 0 = planned rounds
    max_grad_norm: float = attrs.field(default=1.0, validator=_positive)
    lr: float = attrs.field(default=3e-4, validator=_positive)  # Adam, eps 1e-5, no decay
    feature_dim: int = attrs.field(default=128, validator=v.ge(1))
    lstm_hidden: int = attrs.field(default=128, validator=v.ge(1))
    head_hidden: int = attrs.field(default=64, validator=v.ge(1))
    reward_clip: float = attrs.field(default=10.0, validator=_positive)
    obs_clip: float = attrs.field(default=10.0, validator=_positive)
    envs: int = attrs.field(default=4, validator=v.ge(1))  # N
    rollout_length: int = attrs.field(default=0, validator=v.ge(0))  # T; 0 = E - 1
    normalise_rewards: bool = attrs.field(default=True, validator=v.instance_of(bool))
    blend_kinds: tuple[str, ...] = attrs.field(default=BLEND_KINDS, converter=tuple, validator=_blend_kinds)
    # `esper train-policy` (runtime §7.2): how long to train, what to start from, held-out checks.
    rounds: int = attrs.field(default=50, validator=v.ge(1))
    init: str = ""  # a policy checkpoint to continue from; empty: fresh weights
    eval_every: int = attrs.field(default=0, validator=v.ge(0))  # rounds; 0: no held-out episodes
    eval_episodes: int = attrs.field(default=4, validator=v.ge(1))

    def anneal_updates(self, planned_updates: int | None = None) -> int:
        """U of the entropy schedule: the configured value, else the planned number of rounds."""
        if self.entropy_anneal_updates:
            return self.entropy_anneal_updates
        if planned_updates is None or planned_updates < 1:
            raise ValueError("ppo.entropy_anneal_updates is 0 (= planned rounds) but no planned round count "
                             f"was given (got {planned_updates!r})")
        return planned_updates

    def entropy_coef(self, update: int, planned_updates: int | None = None) -> float:
        """c_e(u) = c_start + (c_end − c_start)·min(1, u/U); `update` = updates already made."""
        fraction = min(1.0, max(0, update) / self.anneal_updates(planned_updates))
        return self.entropy_start + (self.entropy_end - self.entropy_start) * fraction

    def rollout(self, max_epochs: int) -> int:
        """T: decisions per env per round (E − 1 decisions make one whole episode)."""
        return self.rollout_length or max(1, max_epochs - 1)
