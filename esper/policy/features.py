"""PPO's observation vector (policy §5.2) and the observation contract it implies (§8).

`D = 22 + S·(22 + B)`: 22 host features, then per enabled slot (canonical order) 22 seed features and
a blueprint one-hot over the policy blueprint list. Every feature is pre-scaled to O(1). Columns are
either N (normalised by the running statistics, §5.3) or R (passed through raw: one-hots and flags).

Choices the table leaves open, made here once:
- Measurements (alpha, ramp, c, improvement, P, ρ, seed size, next gate) describe live seeds
  (GERMINATED … FOSSILIZED) only; in failure stages only the stage, its duration and the embargo
  countdown mean anything (lifecycle §4.1), so the rest is 0. The blueprint one-hot is kept while a
  seed is bound (failure stages included): which blueprint was culled is part of the state.
- "Measured" means measured at this epoch, as for the heuristic and the reward: a contribution or
  ratio left over from an earlier epoch is not shown as current.
- The cool-down is the whole pipeline from the cull to DORMANT: `1 + embargo_epochs +
  resetting_epochs` ticks (lifecycle §4.7); the feature is the number of decisions left before the
  slot is germinable again over that length (1 right after a tick cull, then falling to 0).
- The training loss and score of an epoch the governor rolled back may be non-finite (the
  validation numbers are the post-restore ones). Such a value is replaced by the last finite one of
  the episode (L_rand and 0 if none), so that the assertion below guards the remaining columns.
"""

import math
from collections.abc import Sequence

import attrs

from esper.compute.observation import Observation
from esper.events.enums import Gate, Stage
from esper.lifecycle.gates import evaluate_gate
from esper.lifecycle.stages import LIVE
from esper.lifecycle.state import SlotState
from esper.policy.signals import track

FEATURE_VERSION = 1
BASE_DIM = 22
SLOT_BASE_DIM = 22
SCORE_WINDOW = 5  # last val scores and losses in the vector

# Per-slot stage one-hot order (offsets 0–8).
STAGE_ORDER = (
    Stage.DORMANT, Stage.GERMINATED, Stage.TRAINING, Stage.BLENDING, Stage.PROBATIONARY, Stage.FOSSILIZED,
    Stage.CULLED, Stage.EMBARGOED, Stage.RESETTING,
)
_NEXT_GATE = {Stage.TRAINING: Gate.G2, Stage.BLENDING: Gate.G3, Stage.PROBATIONARY: Gate.G5}

# Raw (R) columns; every other column is normalised (N).
_BASE_RAW = frozenset({9})  # stabilisation latch
_SLOT_RAW = frozenset(range(9)) | {13, 17, 21}  # stage one-hot, measured flags, next gate ready


def feature_dim(n_slots: int, n_blueprints: int) -> int:
    return BASE_DIM + n_slots * (SLOT_BASE_DIM + n_blueprints)


def raw_columns(n_slots: int, n_blueprints: int) -> tuple[bool, ...]:
    """True for R columns (passed through), False for N columns (normalised)."""
    mask = [i in _BASE_RAW for i in range(BASE_DIM)]
    for _ in range(n_slots):
        mask += [i in _SLOT_RAW for i in range(SLOT_BASE_DIM)] + [True] * n_blueprints
    return tuple(mask)


@attrs.frozen
class ObservationContract:
    """What a policy's input and output axes mean; a checkpoint is only usable where it matches."""

    feature_version: int
    slot_ids: tuple[str, ...]
    blueprints: tuple[str, ...]
    blend_kinds: tuple[str, ...]
    dim: int

    @classmethod
    def of(cls, slot_ids: Sequence[str], blueprints: Sequence[str],
           blend_kinds: Sequence[str]) -> "ObservationContract":
        slot_ids, blueprints = tuple(slot_ids), tuple(blueprints)
        dim = feature_dim(len(slot_ids), len(blueprints))
        return cls(FEATURE_VERSION, slot_ids, blueprints, tuple(blend_kinds), dim)

    @classmethod
    def for_observation(cls, observation: Observation, blend_kinds: Sequence[str]) -> "ObservationContract":
        return cls.of(enabled_slots(observation), observation.blueprints, blend_kinds)

    def to_dict(self) -> dict:
        return {"feature_version": self.feature_version, "slot_ids": list(self.slot_ids),
                "blueprints": list(self.blueprints), "blend_kinds": list(self.blend_kinds), "dim": self.dim}

    @classmethod
    def from_dict(cls, data: dict) -> "ObservationContract":
        return cls(int(data["feature_version"]), tuple(data["slot_ids"]), tuple(data["blueprints"]),
                   tuple(data["blend_kinds"]), int(data["dim"]))

    def difference(self, other: "ObservationContract") -> str | None:
        """The first field where `other` (what is offered) differs from this (what is expected)."""
        for field in attrs.fields(ObservationContract):
            mine, theirs = getattr(self, field.name), getattr(other, field.name)
            if mine != theirs:
                return f"{field.name}: policy has {_show(mine)}, task has {_show(theirs)}"
        return None

    def check(self, other: "ObservationContract", what: str = "policy") -> None:
        difference = self.difference(other)
        if difference is not None:
            raise ValueError(f"{what} observation contract mismatch: {difference}")


def _show(value) -> str:
    return ", ".join(value) if isinstance(value, tuple) else str(value)


def enabled_slots(observation: Observation) -> tuple[str, ...]:
    return tuple(s.slot_id for s in observation.state.slots if s.enabled)


def _clip1(x: float) -> float:
    return max(-1.0, min(1.0, x))


def _window(values: Sequence[float], length: int = SCORE_WINDOW) -> list[float]:
    """The last `length` values, oldest first, left-padded with the earliest one kept."""
    last = list(values[-length:])
    if not last:
        return [0.0] * length
    return [last[0]] * (length - len(last)) + last


def _last_finite(values: Sequence[float], fallback: float) -> float:
    for value in reversed(values):
        if math.isfinite(value):
            return value
    return fallback


def observe(observation: Observation, blueprints: Sequence[str] | None = None, *,
            plateau_threshold: float = 0.5) -> tuple[list[float], tuple[bool, ...]]:
    """The raw (un-normalised) vector of §5.2 and its R-column mask. `blueprints` is the one-hot
    axis (the policy blueprint list; default the observation's); `plateau_threshold` is the signal
    tracker's (policy §4.1, shared with the heuristic)."""
    blueprints = tuple(observation.blueprints if blueprints is None else blueprints)
    history = observation.history
    t, E = observation.epoch, max(1, observation.max_epochs)
    l_rand = observation.l_rand if observation.l_rand > 0 else 1.0
    lc = observation.lifecycle
    signals = track(history, plateau_threshold)
    host = max(1, observation.host_params)

    last = history[-1] if history else None
    train_loss = _last_finite([h.train_loss for h in history], l_rand)
    train_score = _last_finite([h.train_acc for h in history], 0.0)
    val_loss = last.val_loss if last else l_rand
    val_score = last.val_acc if last else 0.0
    best = signals.best_score if signals.best_score is not None else 0.0
    enabled = [s for s in observation.state.slots if s.enabled]
    live = sum(1 for s in observation.state.slots if s.stage in LIVE)
    added = sum(s.seed.seed_params for s in observation.state.slots if s.stage in LIVE and s.seed is not None)

    vector = [
        t / E,
        train_loss / l_rand,
        val_loss / l_rand,
        signals.loss_delta / l_rand,
        train_score / 100,
        val_score / 100,
        _clip1(signals.score_delta / 10),
        best / 100,
        min(signals.plateau, 10) / 10,
        1.0 if signals.latched else 0.0,
        *[s / 100 for s in _window(signals.scores)],
        *[x / l_rand for x in _window(signals.losses)],
        math.log1p(added / host),
        live / lc.max_seeds if lc.max_seeds else 0.0,
    ]
    for slot in enabled:
        vector += _slot_features(slot, observation, blueprints, t, E, host)

    dim = feature_dim(len(enabled), len(blueprints))
    assert len(vector) == dim, (len(vector), dim)
    bad = [i for i, x in enumerate(vector) if not math.isfinite(x)]
    assert not bad, f"non-finite observation features at columns {bad}: {[vector[i] for i in bad]}"
    return vector, raw_columns(len(enabled), len(blueprints))


def _slot_features(slot: SlotState, obs: Observation, blueprints: tuple[str, ...], t: int, E: int,
                   host: int) -> list[float]:
    lc = obs.lifecycle
    stage = slot.stage if slot.stage in STAGE_ORDER else Stage.DORMANT  # UNKNOWN reads as empty
    features = [1.0 if stage == s else 0.0 for s in STAGE_ORDER]
    in_stage = slot.epochs_in_stage(t) if stage != Stage.DORMANT else 0
    seed = slot.seed
    alive = seed is not None and stage in LIVE
    age = alpha = ramp = c_flag = c = improvement = progress = rho_flag = rho = size = ready = 0.0
    if alive:
        age = min(max(0, t - seed.germinated_epoch), E) / E
        alpha = seed.alpha
        if stage == Stage.BLENDING:
            ramp = min(1.0, seed.step / seed.steps_total) if seed.steps_total > 0 else 1.0
        elif stage in (Stage.PROBATIONARY, Stage.FOSSILIZED):
            ramp = 1.0
        cf = seed.last_counterfactual
        if cf is not None and cf.epoch == t:
            c_flag, c = 1.0, _clip1(cf.value / 10)
        if seed.current_acc is not None and seed.acc_at_stage_start is not None:
            improvement = _clip1((seed.current_acc - seed.acc_at_stage_start) / 10)
        if seed.current_acc is not None and seed.acc_at_germination is not None:
            progress = _clip1((seed.current_acc - seed.acc_at_germination) / 10)
        if seed.grad_ratio_ema is not None and seed.ratio_epoch == t:
            theta = lc.g2_min_gradient_ratio if lc.g2_min_gradient_ratio > 0 else 1e-8
            rho_flag, rho = 1.0, min(max(seed.grad_ratio_ema, 0.0) / theta, 4.0) / 4
        size = math.log1p(seed.seed_params / host)
        gate = _NEXT_GATE.get(stage)
        if gate is not None and (stage != Stage.BLENDING or seed.step >= seed.steps_total):
            ready = 1.0 if evaluate_gate(gate, slot, lc, t).passed else 0.0
    features += [min(in_stage, 20) / 20, age, alpha, ramp, c_flag, c, improvement, progress, rho_flag, rho, size,
                 _embargo_remaining(slot, t, lc.embargo_epochs, lc.resetting_epochs), ready]
    bound = seed.blueprint if seed is not None else None
    features += [1.0 if b == bound else 0.0 for b in blueprints]
    return features


def _embargo_remaining(slot: SlotState, t: int, embargo: int, resetting: int) -> float:
    """Decisions left before the slot is DORMANT again, over the pipeline's length."""
    length = 1 + embargo + resetting
    in_stage = slot.epochs_in_stage(t)
    if slot.stage == Stage.CULLED:
        remaining = length
    elif slot.stage == Stage.EMBARGOED:
        remaining = max(0, embargo - in_stage) + 1 + resetting
    elif slot.stage == Stage.RESETTING:
        remaining = max(0, resetting - in_stage) + 1
    else:
        return 0.0
    return min(remaining, length) / length
