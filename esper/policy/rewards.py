"""Rewards (policy §6): r_t for the decision at observation t, from s_t, a_t and s_{t+1}.

Every component is computed from the real before/after observations and the commands' outcomes;
the mode (§6.3) only selects which ones enter `total_raw`. Rewards are computed for every policy
kind, so a heuristic or `none` run is audited with exactly the numbers PPO would learn from.
"""

import math
from collections.abc import Callable

import attrs
from attrs import validators as v

from esper.compute.observation import Executed, Observation
from esper.events.catalogue import PolicyDecided, RewardComputed, SeedRewardInput
from esper.events.enums import Stage
from esper.lifecycle.stages import CULLABLE, LIVE
from esper.lifecycle.state import EnvState, SeedState, SlotState

DEFAULT_GAMMA = 0.995  # ppo.gamma's default; the engine passes the configured value

COMPONENTS = (
    "contribution", "attribution_ratio_penalty", "pbrs", "rent", "intervention", "cull_assessment",
    "fossilize_assessment", "advance_assessment", "holding_warning", "budget_pressure", "terminal",
    "terminal_sparse", "governor",
)
MODES: dict[str, tuple[str, ...]] = {
    "simplified": ("contribution", "attribution_ratio_penalty", "rent", "intervention", "budget_pressure",
                   "terminal", "governor"),
    "shaped": tuple(c for c in COMPONENTS if c not in ("budget_pressure", "terminal_sparse")),
    "sparse": ("terminal_sparse", "governor"),
}

# φ(stage) of the PBRS potential; stages absent here (DORMANT, failure stages) have φ = 0.
_PHI_FIELDS = {Stage.GERMINATED: "phi_germinated", Stage.TRAINING: "phi_training",
               Stage.BLENDING: "phi_blending", Stage.PROBATIONARY: "phi_probationary",
               Stage.FOSSILIZED: "phi_fossilized"}


def _finite(_inst, attribute, value) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{attribute.name} must be finite, got {value!r}")


_non_negative = [_finite, v.ge(0.0)]
_non_positive = [_finite, v.le(0.0)]


@attrs.frozen
class RewardConfig:
    """`[reward]` (policy §6.2). γ is deliberately absent: it is `ppo.gamma`, passed separately."""

    mode: str = attrs.field(default="simplified", validator=v.in_(tuple(MODES)))
    w_contribution: float = attrs.field(default=1.0, validator=_non_negative)
    w_pbrs: float = attrs.field(default=0.3, validator=_non_negative)
    phi_germinated: float = attrs.field(default=1.0, validator=_finite)
    phi_training: float = attrs.field(default=2.0, validator=_finite)
    phi_blending: float = attrs.field(default=3.5, validator=_finite)
    phi_probationary: float = attrs.field(default=5.5, validator=_finite)
    phi_fossilized: float = attrs.field(default=6.0, validator=_finite)
    w_rent: float = attrs.field(default=0.5, validator=_non_negative)
    rent_max: float = attrs.field(default=2.0, validator=_non_negative)
    cost_germinate: float = attrs.field(default=-0.02, validator=_non_positive)
    cost_advance: float = attrs.field(default=-0.005, validator=_non_positive)
    cost_fossilize: float = attrs.field(default=-0.01, validator=_non_positive)
    cost_cull: float = attrs.field(default=-0.005, validator=_non_positive)
    advance_refused: float = attrs.field(default=-0.05, validator=_non_positive)
    fossilize_refused: float = attrs.field(default=-0.2, validator=_non_positive)
    budget_lambda: float = attrs.field(default=0.5, validator=_non_negative)
    w_terminal: float = attrs.field(default=0.05, validator=_non_negative)
    w_fossil: float = attrs.field(default=3.0, validator=_non_negative)
    fossil_min_progress: float = attrs.field(default=1.0, validator=_finite)
    w_sparse_params: float = attrs.field(default=0.1, validator=_non_negative)
    governor_penalty: float = attrs.field(default=5.0, validator=_non_negative)

    def phi(self, stage: Stage) -> float:
        name = _PHI_FIELDS.get(stage)
        return 0.0 if name is None else getattr(self, name)


# -- bounded attribution and ratio penalty (§6.2, §6.4) ---------------------------------------


def attribution(c: float, progress: float) -> float:
    """b: harm in full; nothing while P ≤ 0; c up to P; the geometric mean above P."""
    if c < 0:
        return c
    if progress <= 0:
        return 0.0
    if c <= progress:
        return c
    return math.sqrt(c * progress)


def ratio_penalty(c: float, progress: float) -> float:
    """q ≤ 0 for a contribution out of proportion to the progress it brought (c > 1 only)."""
    if c <= 1:
        return 0.0
    if progress <= 0.1:
        return -0.3 * min(1.0, c / 10)
    if c / progress > 5:
        return -min(0.3, 0.02 * (c / progress - 5))
    return 0.0


# -- state readings ---------------------------------------------------------------------------


def potential(state: EnvState, config: RewardConfig) -> float:
    """Φ(s) = Σ over all slots of φ(stage)."""
    return sum(config.phi(slot.stage) for slot in state.slots)


def progress(seed: SeedState) -> float | None:
    """P: score now minus score when the seed germinated; None if either is unknown."""
    if seed.current_acc is None or seed.acc_at_germination is None:
        return None
    return seed.current_acc - seed.acc_at_germination


def measured(slot: SlotState, epoch: int) -> float | None:
    """This epoch's ablation contribution c, or None (never 0) when not measured this epoch."""
    cf = slot.seed.last_counterfactual if slot.seed is not None else None
    return cf.value if cf is not None and cf.epoch == epoch else None


def seed_params(state: EnvState) -> int:
    """A: parameters of the seeds in slots, GERMINATED through FOSSILIZED."""
    return sum(s.seed.seed_params for s in state.slots if s.stage in LIVE)


def param_ratio(state: EnvState, host_params: int) -> float:
    """ln(1 + A/H), the parameter cost shared by `rent` and `terminal_sparse`."""
    added = seed_params(state)
    if added == 0:
        return 0.0
    return math.log1p(added / host_params) if host_params > 0 else math.inf


def _score(obs: Observation) -> float:
    if obs.history:
        return obs.history[-1].val_acc
    return obs.state.last_val_acc if obs.state.last_val_acc is not None else 0.0


# -- the reward -------------------------------------------------------------------------------


def compute_reward(
    before: Observation,
    decision: PolicyDecided,
    executed: tuple[Executed, ...],
    after: Observation,
    *,
    terminated: bool,
    governor: bool,
    config: RewardConfig,
    gamma: float = DEFAULT_GAMMA,
) -> RewardComputed:
    s0, s1 = before.state, after.state
    t0, t1 = before.epoch, after.epoch
    parts = dict.fromkeys(COMPONENTS, 0.0)
    done = [e for e in executed if not e.rejected]  # a refused command had no effect and costs nothing

    # contribution and ratio penalty, per seed at s_{t+1}; every live seed gets an audit row
    rows = []
    for slot in s1.slots:
        if slot.stage not in LIVE:
            continue
        c, p = measured(slot, t1), progress(slot.seed)
        b = q = 0.0
        if c is not None and slot.stage in CULLABLE:  # fossils are part of the host: never paid
            p_used = 0.0 if p is None else p  # unknown progress earns nothing, as P ≤ 0 would
            b, q = attribution(c, p_used), ratio_penalty(c, p_used)
            parts["contribution"] += config.w_contribution * b
            parts["attribution_ratio_penalty"] += q
        rows.append(SeedRewardInput(seed_id=slot.seed.seed_id, slot=slot.slot_id, stage=slot.stage,
                                    contribution=c, progress=p, attribution=b, ratio_penalty=q))

    # PBRS on the real states; Φ(s_E) := 0 on termination so the episode sum telescopes to 0
    phi0 = potential(s0, config)
    phi1 = 0.0 if terminated else potential(s1, config)
    parts["pbrs"] = config.w_pbrs * (gamma * phi1 - phi0)

    ratio1 = param_ratio(s1, after.host_params)
    parts["rent"] = -min(config.w_rent * ratio1, config.rent_max)

    costs = {"germinate": config.cost_germinate, "advance": config.cost_advance,
             "fossilize": config.cost_fossilize, "cull": config.cost_cull}
    parts["intervention"] = sum(costs[e.op] for e in done)

    live = s0.live_seeds()
    max_seeds = before.lifecycle.max_seeds
    for e in done:
        slot = s0.slot(e.slot)
        if e.op == "cull":
            parts["cull_assessment"] += _cull_assessment(measured(slot, t0))
        elif e.op == "fossilize":
            parts["fossilize_assessment"] += _fossilize_assessment(slot, t0, e.gate_passed, config)
        elif e.op == "advance" and e.gate_passed is False:
            parts["advance_assessment"] += config.advance_refused
        elif e.op == "germinate":
            live += 1 if e.gate_passed else 0  # a seed that failed G0 takes no budget
            u = live / max_seeds if max_seeds else 0.0
            parts["budget_pressure"] -= config.budget_lambda * u * u

    acted = {c.slot for c in decision.commands if c.op in ("fossilize", "cull")}
    for slot in s0.slots:
        if slot.stage != Stage.PROBATIONARY or slot.slot_id in acted:
            continue
        e_prob, c = slot.epochs_in_stage(t0), measured(slot, t0)
        if e_prob >= 2 and c is not None and c >= before.lifecycle.g5_min_contribution:
            parts["holding_warning"] -= min(0.1 + 0.05 * (e_prob - 2), 0.3)

    if terminated:
        final = _score(after)
        fossils = sum(1 for s in s1.slots if s.stage == Stage.FOSSILIZED
                      and _progress_at_fossilization(s.seed) >= config.fossil_min_progress)
        parts["terminal"] = config.w_terminal * final + config.w_fossil * fossils
        parts["terminal_sparse"] = max(-1.0, min(1.0, final / 100 - config.w_sparse_params * ratio1))
    if governor:
        parts["governor"] = -config.governor_penalty  # fixed, normalised units: bypasses normalisation

    components = {name: float(parts[name]) + 0.0 for name in MODES[config.mode]}  # + 0.0: no -0.0
    return RewardComputed(
        epoch=t1, decision_epoch=t0, mode=config.mode, components=components,
        total_raw=float(sum(components.values())), governor=governor, terminated=terminated, truncated=False,
        score_before=_score(before), score_after=_score(after), potential_before=phi0, potential_after=phi1,
        seed_params_total=seed_params(s1), host_params=after.host_params, seeds=tuple(rows),
    )


def _cull_assessment(c: float | None) -> float:
    """Culling a harmful seed is good, culling a helpful one is not; unmeasured is neutral."""
    if c is None:
        return 0.0
    if c < -0.5:
        return 0.3
    if c < 0:
        return 0.1
    return -(0.3 + 0.05 * min(c, 10.0))


def _fossilize_assessment(slot: SlotState, epoch: int, passed: bool | None, config: RewardConfig) -> float:
    """Values at s_t. c is the latest ablation of the seed (the one G5 judges), 0 if none."""
    seed = slot.seed
    p = progress(seed)
    c = seed.last_counterfactual.value if seed.last_counterfactual is not None else 0.0
    if p is not None and p < 0:
        value = -0.5 - min(0.2 * abs(p), 1.0)
        if c > 0.1 and p < -0.2:
            value -= 0.3
        return value
    if not passed:
        return config.fossilize_refused
    return (0.5 + 0.1 * min(c, 10.0)) * min(1.0, slot.epochs_in_stage(epoch) / 3)


def _progress_at_fossilization(seed: SeedState) -> float:
    # Entering FOSSILIZED set acc_at_stage_start to the score of that moment (lifecycle §4.1).
    if seed.acc_at_stage_start is None or seed.acc_at_germination is None:
        return -math.inf
    return seed.acc_at_stage_start - seed.acc_at_germination


RewardFn = Callable[..., RewardComputed]


def make_reward_function(config: RewardConfig, gamma: float = DEFAULT_GAMMA) -> RewardFn:
    """The engine's `RewardFunction`: `config` bound, with γ = `ppo.gamma` (the one γ of the run)."""
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be within (0, 1], got {gamma!r}")

    def reward(before: Observation, decision: PolicyDecided, executed: tuple[Executed, ...],
               after: Observation, *, terminated: bool, governor: bool) -> RewardComputed:
        return compute_reward(before, decision, executed, after, terminated=terminated, governor=governor,
                              config=config, gamma=gamma)

    return reward
