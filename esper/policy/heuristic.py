"""The heuristic controller (policy §4): fixed rules over the shared signals and seed measurements.

It is deterministic (no RNG). Everything it remembers between decisions (penalties, pointers,
harm counters, the epochs of its last germination and of the last cull) is plain data kept per
env, so one instance may serve several envs and a checkpoint restores it exactly. It only emits
commands of the valid-action table (§3), and ADVANCE/FOSSILIZE only when the gate's dry run passes.
"""

import math
from typing import Any

import attrs
from attrs import validators as v

from esper.compute.observation import Observation
from esper.events.catalogue import Blend, PolicyCommand, PolicyDecided
from esper.events.enums import Gate, Stage
from esper.lifecycle.blend import BLEND_KINDS
from esper.lifecycle.gates import evaluate_gate
from esper.lifecycle.stages import LIVE
from esper.lifecycle.state import SlotState
from esper.policy.actions import ADVANCE, CULL, FOSSILIZE, GERMINATE, ActionTable, head_values, legal_summary, \
    valid_actions
from esper.policy.signals import STABLE_EPOCHS, Signals, track

POLICY_ID = "heuristic-v1"  # the rule-set version; bump it when a rule changes

DEFAULT_ROTATION = {
    "cnn": ("conv_light", "depthwise", "attention", "norm", "conv_heavy"),
    "transformer": ("lora", "mlp", "attention", "norm"),
}

# When `max_commands_per_epoch` binds, lower rank wins (§4.2); ties go by slot order.
_PRIORITY = {CULL: 0, FOSSILIZE: 1, ADVANCE: 2, GERMINATE: 3}
_INCUBATING = (Stage.GERMINATED, Stage.TRAINING, Stage.BLENDING)
_PENALTY_FLOOR = 0.1  # decayed penalties below this are dropped


def _finite(_inst, attribute, value) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{attribute.name} must be finite, got {value!r}")


def _rotation(_inst, attribute, value: tuple[str, ...]) -> None:
    if any(not name for name in value) or len(set(value)) != len(value):
        raise ValueError(f"{attribute.name} must list distinct blueprint names, got {value!r}")


@attrs.frozen
class HeuristicConfig:
    """`[heuristic]` (policy §4.2). Sentinels: `min_runway` 0 derives g2_min_training_epochs +
    blend_steps + 2 from the lifecycle; an empty `blueprint_rotation` takes the topology default;
    an empty `blend` takes the lifecycle's default schedule; `max_commands_per_epoch` 0 = one per slot."""

    plateau_threshold: float = attrs.field(default=0.5, validator=[_finite, v.ge(0.0)])
    plateau_epochs_to_germinate: int = attrs.field(default=3, validator=v.ge(1))
    min_epochs_before_germinate: int = attrs.field(default=5, validator=v.ge(1))
    max_incubating: int = attrs.field(default=1, validator=v.ge(1))
    min_runway: int = attrs.field(default=0, validator=v.ge(0))
    training_regression_epochs: int = attrs.field(default=5, validator=v.ge(1))
    training_regression_drop: float = attrs.field(default=2.0, validator=[_finite, v.gt(0.0)])
    training_timeout: int = attrs.field(default=12, validator=v.ge(1))
    blending_harm: float = attrs.field(default=-1.0, validator=[_finite, v.le(0.0)])
    keep_threshold: float = attrs.field(default=0.0, validator=_finite)
    probation_patience: int = attrs.field(default=4, validator=v.ge(1))
    blueprint_rotation: tuple[str, ...] = attrs.field(default=(), converter=tuple, validator=_rotation)
    penalty_on_cull: float = attrs.field(default=2.0, validator=[_finite, v.ge(0.0)])
    penalty_decay: float = attrs.field(default=0.9, validator=[v.ge(0.0), v.le(1.0)])
    penalty_threshold: float = attrs.field(default=3.0, validator=[_finite, v.gt(0.0)])
    blend: str = attrs.field(default="", validator=v.in_(("",) + BLEND_KINDS))
    global_cooldown_after_cull: int = attrs.field(default=0, validator=v.ge(0))
    max_commands_per_epoch: int = attrs.field(default=0, validator=v.ge(0))

    def runway(self, observation: Observation) -> int:
        lc = observation.lifecycle
        return self.min_runway or lc.g2_min_training_epochs + lc.blend_steps + 2

    def rotation(self, topology: str) -> tuple[str, ...]:
        if self.blueprint_rotation:
            return self.blueprint_rotation
        try:
            return DEFAULT_ROTATION[topology]
        except KeyError:
            raise ValueError(f"no default blueprint rotation for topology {topology!r}; "
                             "set heuristic.blueprint_rotation") from None


@attrs.define
class EnvMemory:
    """What the heuristic carries between decisions of one env's episode."""

    episode: int = 0
    max_epochs: int = 0
    slot_pointer: int = 0
    blueprint_pointer: int = 0
    slot_penalty: dict[str, float] = attrs.Factory(dict)
    blueprint_penalty: dict[str, float] = attrs.Factory(dict)
    harm: dict[str, list[Any]] = attrs.Factory(dict)  # slot -> [seed id, consecutive harmful, last epoch counted]
    last_germination: int | None = None
    last_cull: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EnvMemory":
        return cls(**{**data, "harm": {k: list(x) for k, x in data["harm"].items()},
                      "slot_penalty": dict(data["slot_penalty"]),
                      "blueprint_penalty": dict(data["blueprint_penalty"])})


class HeuristicPolicy:
    name = "heuristic"
    policy_id = POLICY_ID

    def __init__(self, config: HeuristicConfig = HeuristicConfig()):
        self.config = config
        self.memory: dict[int, EnvMemory] = {}

    # -- Controller protocol --------------------------------------------------------------------

    def reset(self, env: int, episode: int, max_epochs: int) -> None:
        self.memory[env] = EnvMemory(episode=episode, max_epochs=max_epochs)

    def state_dict(self) -> dict:
        return {"kind": self.name, "policy_id": self.policy_id,
                "envs": [[env, mem.to_dict()] for env, mem in sorted(self.memory.items())]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.name:
            raise ValueError(f"not a {self.name} policy state: {state.get('kind')!r}")
        self.memory = {int(env): EnvMemory.from_dict(data) for env, data in state["envs"]}

    def decide(self, observation: Observation) -> PolicyDecided:
        cfg, t = self.config, observation.epoch
        if cfg.probation_patience >= observation.lifecycle.max_probation_epochs:
            raise ValueError(f"heuristic.probation_patience ({cfg.probation_patience}) must be below "
                             f"lifecycle.max_probation_epochs ({observation.lifecycle.max_probation_epochs})")
        mem = self.memory.get(observation.env)
        if mem is None or mem.episode != observation.episode:  # no reset seen: start the episode fresh
            mem = self.memory[observation.env] = EnvMemory(observation.episode, observation.max_epochs)
        table = valid_actions(observation)
        signals = track(observation.history, cfg.plateau_threshold)

        self._bookkeeping(mem, observation)
        commands, notes = [], []
        for slot in observation.state.slots:
            if slot.enabled:
                found = self._slot_rule(mem, slot, observation, table)
                if found is not None:
                    commands.append(found[0])
                    notes.append(found[1])
        commands, notes = self._cap(commands, notes)
        if any(c.op == CULL for c in commands):
            mem.last_cull = t  # our own culls start the cooldown now
        room = cfg.max_commands_per_epoch == 0 or len(commands) < cfg.max_commands_per_epoch
        germination, why = self._germination(mem, observation, table, signals) if room else (None, "command cap")
        if germination is not None:
            commands.append(germination)
            notes.append(why)
        latch = f"latch epoch {signals.latch_epoch}" if signals.latched else "latch unset"
        rationale = "; ".join(notes + ([] if germination else [f"no germination: {why}"]) + [latch])
        action, index = head_values(table, commands[0] if commands else None)
        return PolicyDecided(
            epoch=t, policy=self.name, policy_id=self.policy_id, commands=tuple(commands), action=action,
            action_index=index, legal=legal_summary(table), rationale=rationale,
        )

    # -- rule 1: penalties ------------------------------------------------------------------------

    def _bookkeeping(self, mem: EnvMemory, obs: Observation) -> None:
        cfg = self.config
        for penalties in (mem.slot_penalty, mem.blueprint_penalty):
            for key in list(penalties):
                penalties[key] *= cfg.penalty_decay
                if penalties[key] < _PENALTY_FLOOR:
                    del penalties[key]
        for notice in obs.recent_culls:
            # A governor rollback culls every seed for the host's sake, not for the seeds' failings.
            if notice.initiator != "governor":
                mem.slot_penalty[notice.slot] = mem.slot_penalty.get(notice.slot, 0.0) + cfg.penalty_on_cull
                mem.blueprint_penalty[notice.blueprint] = (
                    mem.blueprint_penalty.get(notice.blueprint, 0.0) + cfg.penalty_on_cull)
            # Rollbacks cull during this epoch; every other cull was made at the previous step.
            when = obs.epoch if notice.initiator == "governor" else obs.epoch - 1
            mem.last_cull = when if mem.last_cull is None else max(mem.last_cull, when)

    # -- rule 2: live seeds -----------------------------------------------------------------------

    def _slot_rule(self, mem: EnvMemory, slot: SlotState, obs: Observation,
                   table: ActionTable) -> tuple[PolicyCommand, str] | None:
        cfg, lc, t = self.config, obs.lifecycle, obs.epoch
        seed, stage, sid = slot.seed, slot.stage, slot.slot_id
        in_stage = slot.epochs_in_stage(t)
        if stage != Stage.BLENDING:
            mem.harm.pop(sid, None)

        def command(op: str, reason: str, detail: str) -> tuple[PolicyCommand, str]:
            return PolicyCommand(op=op, slot=sid, reason=reason), f"{op} {sid} {reason} ({detail})"

        if stage == Stage.GERMINATED and sid in table.slots[ADVANCE]:
            return command(ADVANCE, "g1_ready", "G1 explicit")
        if stage == Stage.TRAINING:
            improvement = _difference(seed.current_acc, seed.acc_at_stage_start)
            if (in_stage >= cfg.training_regression_epochs and improvement is not None
                    and improvement <= -cfg.training_regression_drop):
                return command(CULL, "training_regression", f"{improvement:+.2f} pp after {in_stage} epochs")
            if in_stage >= cfg.training_timeout:
                return command(CULL, "training_timeout", f"{in_stage} epochs in TRAINING")
            if sid in table.slots[ADVANCE] and evaluate_gate(Gate.G2, slot, lc, t).passed:
                return command(ADVANCE, "g2_ready", "G2 dry run passed")
            return None
        if stage == Stage.BLENDING:
            harmful = self._count_harm(mem, slot, t)
            if harmful >= 2:
                return command(CULL, "blending_harm", f"{harmful} measured contributions < {cfg.blending_harm}")
            if sid in table.slots[ADVANCE] and evaluate_gate(Gate.G3, slot, lc, t).passed:
                return command(ADVANCE, "g3_ready", "ramp complete, G3 dry run passed")
            return None
        if stage == Stage.PROBATIONARY:
            cf = seed.last_counterfactual
            if cf is None or cf.epoch != t:
                return None  # decisions here rest on this epoch's contribution only
            c, progress = cf.value, _difference(seed.current_acc, seed.acc_at_germination)
            if c <= cfg.keep_threshold:
                return command(CULL, "no_contribution", f"c {c:+.2f} pp")
            if c > 0 and progress is not None and progress < 0:
                return command(CULL, "dependency_without_progress", f"c {c:+.2f}, P {progress:+.2f} pp")
            if progress is not None and progress >= 0 and evaluate_gate(Gate.G5, slot, lc, t).passed:
                return command(FOSSILIZE, "g5_ready", f"c {c:+.2f}, P {progress:+.2f} pp")
            if in_stage >= cfg.probation_patience:
                return command(CULL, "probation_patience", f"{in_stage} epochs in PROBATIONARY")
        return None

    def _count_harm(self, mem: EnvMemory, slot: SlotState, t: int) -> int:
        """Consecutive measured contributions below `blending_harm`; epochs without a measurement
        neither count nor break the run, and an epoch is counted once however often we decide."""
        seed = slot.seed
        entry = mem.harm.get(slot.slot_id)
        if entry is None or entry[0] != seed.seed_id:
            entry = mem.harm[slot.slot_id] = [seed.seed_id, 0, None]
        cf = seed.last_counterfactual
        if cf is not None and cf.epoch == t and entry[2] != t:
            entry[1] = entry[1] + 1 if cf.value < self.config.blending_harm else 0
            entry[2] = t
        return entry[1]

    def _cap(self, commands: list[PolicyCommand], notes: list[str]) -> tuple[list, list]:
        cap = self.config.max_commands_per_epoch
        if cap == 0 or len(commands) <= cap:
            return commands, notes
        order = sorted(range(len(commands)), key=lambda i: (_PRIORITY[commands[i].op], i))
        keep = sorted(order[:cap])  # priority picks; slot order is kept among the picked
        return [commands[i] for i in keep], [notes[i] for i in keep]

    # -- rule 3: germination ----------------------------------------------------------------------

    def _germination(self, mem: EnvMemory, obs: Observation, table: ActionTable,
                     signals: Signals) -> tuple[PolicyCommand | None, str]:
        cfg, t, lc = self.config, obs.epoch, obs.lifecycle
        plateau = signals.plateau
        if mem.last_germination is not None:  # plateau epochs count only after our last germination
            plateau = min(plateau, t - mem.last_germination)
        incubating = sum(1 for s in obs.state.slots if s.stage in _INCUBATING)
        live = sum(1 for s in obs.state.slots if s.stage in LIVE)
        rotation = cfg.rotation(obs.topology)
        options = {s: [i for i, b in enumerate(rotation) if b in table.blueprints.get(s, ())]
                   for s in table.slots[GERMINATE]}
        options = {s: idx for s, idx in options.items() if idx}
        if not signals.latched:
            return None, f"loss not stabilised ({signals.stable_count} of {STABLE_EPOCHS} stable epochs)"
        if t < cfg.min_epochs_before_germinate:
            return None, f"epoch {t} < {cfg.min_epochs_before_germinate}"
        if plateau < cfg.plateau_epochs_to_germinate:
            return None, f"plateau {plateau} < {cfg.plateau_epochs_to_germinate}"
        if incubating >= cfg.max_incubating:
            return None, f"{incubating} incubating"
        if lc.max_seeds and live >= lc.max_seeds:
            return None, f"seed budget spent ({live}/{lc.max_seeds})"
        if obs.max_epochs - t < cfg.runway(obs):
            return None, f"runway {obs.max_epochs - t} < {cfg.runway(obs)}"
        if cfg.global_cooldown_after_cull and mem.last_cull is not None \
                and t - mem.last_cull < cfg.global_cooldown_after_cull:
            return None, f"cooldown after the cull of epoch {mem.last_cull}"
        if not options:
            return None, "no DORMANT slot with a valid blueprint"

        n_slots = len(table.slot_ids)
        slot = min(options, key=lambda s: (mem.slot_penalty.get(s, 0.0),
                                           (table.slot_ids.index(s) - mem.slot_pointer) % n_slots))
        mem.slot_pointer = (table.slot_ids.index(slot) + 1) % n_slots
        valid = options[slot]
        below = [i for i in valid if mem.blueprint_penalty.get(rotation[i], 0.0) < cfg.penalty_threshold]
        pick = min(below or valid, key=lambda i: (mem.blueprint_penalty.get(rotation[i], 0.0),
                                                  (i - mem.blueprint_pointer) % len(rotation)))
        mem.blueprint_pointer = (pick + 1) % len(rotation)
        mem.last_germination = t
        blueprint = rotation[pick]
        blend = Blend(kind=cfg.blend or lc.default_blend, steps=lc.blend_steps)
        confidence = min(1.0, plateau / 5)
        note = (f"germinate {slot} {blueprint} plateau_germinate (plateau {plateau}, "
                f"confidence {confidence:.2f})")
        return PolicyCommand(op=GERMINATE, slot=slot, blueprint=blueprint, blend=blend,
                             reason="plateau_germinate"), note


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b
