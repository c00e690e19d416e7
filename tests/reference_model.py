"""A plain-Python reference model of the decider, written from the spec (lifecycle §2–§4, events §3).

It is deliberately independent of `esper.lifecycle`: it imports only the `Stage` enum and takes
plain values (no command objects, no config object). Every method predicts the `DomainError` code
a command must fail with, or returns None and applies the command's effect on the model. The
state-machine test (tests/test_decider_machine.py) runs it side by side with the real decider and
compares error codes, stages, seed ids, epochs and alphas after every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from esper.events.enums import Stage

LIVE = {Stage.GERMINATED, Stage.TRAINING, Stage.BLENDING, Stage.PROBATIONARY, Stage.FOSSILIZED}
ACTIVE = {Stage.TRAINING, Stage.BLENDING, Stage.PROBATIONARY, Stage.FOSSILIZED}
CULLABLE = {Stage.GERMINATED, Stage.TRAINING, Stage.BLENDING, Stage.PROBATIONARY}
BLEND_KINDS = ("linear", "sigmoid", "gated")
RUN_STATUSES = ("completed", "failed", "interrupted")

DEFAULTS: dict[str, Any] = {
    "g2_min_shadow_gain": 0.5, "g2_max_isolation_leaks": 0, "g2_min_training_epochs": 3,
    "g2_min_gradient_ratio": 0.05, "g3_min_blending_epochs": 3, "g3_min_alpha": 0.95,
    "g5_min_contribution": 1.0, "gradient_ratio_ema_decay": 0.9, "max_seeds": 0,
    "max_probation_epochs": 5, "embargo_epochs": 5, "resetting_epochs": 1, "gate_mode_g1": "auto",
    "gate_mode_g2": "auto", "gate_mode_g3": "auto", "default_blend": "sigmoid", "blend_steps": 5,
    "sigmoid_steepness": 12.0,
}


class Refused(Exception):
    def __init__(self, code: str):
        super().__init__(code)
        self.code = code


def ramp(kind: str, k: int, steps: int, steepness: float) -> float:
    """a_k of lifecycle §4.5, written out from the formula."""
    if k >= steps:
        return 1.0
    if k <= 0:
        return 0.0
    if kind != "sigmoid":
        return k / steps
    s = [1.0 / (1.0 + math.exp(-steepness * (j / steps - 0.5))) for j in (0, k, steps)]
    return (s[1] - s[0]) / (s[2] - s[0])


@dataclass
class RefSeed:
    seed_id: str
    kind: str
    steps: int
    step: int = 0
    alpha: float = 0.0
    ema: float | None = None
    ratio_epoch: int | None = None
    leaks: int = 0
    shadow: tuple[float, int] | None = None  # (gain, epoch)
    ablation: tuple[float, int, float] | None = None  # (contribution, epoch, seed alpha when measured)
    healthy: bool | None = None


@dataclass
class RefSlot:
    enabled: bool
    stage: Stage = Stage.DORMANT
    entered: int = 0
    seed: RefSeed | None = None


@dataclass
class RefEnv:
    episode: int
    slots: dict[str, RefSlot]
    running: bool = True
    epoch: int = 0
    ticked: bool = True
    seed_counter: int = 0
    decisions: set[int] = field(default_factory=set)
    max_epochs: int = 30

    def live(self) -> int:
        return sum(1 for s in self.slots.values() if s.stage in LIVE)


class ReferenceModel:
    def __init__(self, slot_ids: tuple[str, ...], catalogue: dict[str, tuple[bool, dict[str, int]]]):
        self.slot_ids = slot_ids
        self.catalogue = catalogue  # name -> (identity_at_birth, params per slot)
        self.status: str | None = None
        self.config: dict[str, Any] = dict(DEFAULTS)
        self.n_envs = 0
        self.envs: dict[int, RefEnv] = {}

    # -- plumbing ---------------------------------------------------------------------------

    def _predict(self, fn, *args) -> str | None:
        try:
            fn(*args)
        except Refused as exc:
            return exc.code
        return None

    def _run(self) -> None:
        if self.status is None:
            raise Refused("run_not_started")
        if self.status != "running":
            raise Refused("run_finished")

    def _env(self, env: int, running: bool = True) -> RefEnv | None:
        self._run()
        if not 0 <= env < self.n_envs:
            raise Refused("unknown_env")
        e = self.envs.get(env)
        if running and (e is None or not e.running):
            raise Refused("episode_not_running")
        return e

    def _slot(self, e: RefEnv, slot: str) -> RefSlot:
        if slot not in e.slots:
            raise Refused("unknown_slot")
        s = e.slots[slot]
        if not s.enabled:
            raise Refused("slot_disabled")
        return s

    def _live(self, e: RefEnv, slot: str) -> RefSlot:
        s = self._slot(e, slot)
        if s.stage not in LIVE:
            raise Refused("no_seed")
        return s

    def _move(self, s: RefSlot, to: Stage, epoch: int) -> None:
        s.stage, s.entered = to, epoch
        if to == Stage.BLENDING:  # entering BLENDING takes ramp step 1 at once
            self._ramp(s)
        elif to in (Stage.PROBATIONARY, Stage.FOSSILIZED):
            s.seed.alpha = 1.0
        elif to == Stage.CULLED:
            s.seed.alpha = 0.0
        elif to == Stage.DORMANT:
            s.seed = None

    def _ramp(self, s: RefSlot) -> None:
        seed = s.seed
        seed.step += 1
        seed.alpha = ramp(seed.kind, seed.step, seed.steps, self.config["sigmoid_steepness"])

    # -- gates (lifecycle §3.2) -------------------------------------------------------------

    def gate_passes(self, s: RefSlot, epoch: int) -> bool:
        c, seed, in_stage = self.config, s.seed, epoch - s.entered
        if s.stage == Stage.GERMINATED:  # G1
            return True
        if s.stage == Stage.TRAINING:  # G2: fresh shadow gain and ratio only
            gain = seed.shadow[0] if seed.shadow and seed.shadow[1] == epoch else None
            ratio = seed.ema if seed.ratio_epoch == epoch else None
            return (gain is not None and gain >= c["g2_min_shadow_gain"]
                    and seed.leaks <= c["g2_max_isolation_leaks"]
                    and in_stage >= c["g2_min_training_epochs"]
                    and ratio is not None and ratio >= c["g2_min_gradient_ratio"])
        if s.stage == Stage.BLENDING:  # G3
            return in_stage >= c["g3_min_blending_epochs"] and seed.alpha >= c["g3_min_alpha"]
        if s.stage == Stage.PROBATIONARY:  # G5
            cf = seed.ablation
            present = cf is not None and cf[2] == 1.0 and cf[1] > s.entered
            return present and cf[0] >= c["g5_min_contribution"] and seed.healthy is True
        raise AssertionError(s.stage)

    # -- commands ---------------------------------------------------------------------------

    def start_run(self, lifecycle: dict[str, Any], n_envs: int) -> str | None:
        def go():
            if self.status is not None:
                raise Refused("run_already_started")
            self.status, self.n_envs = "running", n_envs
            self.config = {**DEFAULTS, **lifecycle}
        return self._predict(go)

    def start_episode(self, env: int, slots_enabled: tuple[str, ...]) -> str | None:
        def go():
            e = self._env(env, running=False)
            if e is not None and e.running:
                raise Refused("episode_running")
            if any(s not in self.slot_ids for s in slots_enabled):
                raise Refused("unknown_slot")
            self.envs[env] = RefEnv(
                episode=0 if e is None else e.episode + 1,
                slots={sid: RefSlot(enabled=sid in slots_enabled) for sid in self.slot_ids},
            )
        return self._predict(go)

    def germinate(self, env: int, slot: str, blueprint: str, blend: tuple[str, int] | None,
                  probe: dict[str, Any]) -> str | None:
        """On success `self.last_germination` = (seed id, whether G0 passed)."""
        def go():
            e = self._env(env)
            s = self._slot(e, slot)
            if s.stage != Stage.DORMANT:
                raise Refused("slot_unavailable")
            if blueprint not in self.catalogue:
                raise Refused("unknown_blueprint")
            kind, steps = blend or (self.config["default_blend"], self.config["blend_steps"])
            if kind not in BLEND_KINDS or steps < 1:
                raise Refused("invalid_blend")
            if self.config["max_seeds"] and e.live() >= self.config["max_seeds"]:
                raise Refused("seed_limit_reached")
            identity, params = self.catalogue[blueprint]
            passed = (probe["shape_ok"] is True and probe["finite"] is True
                      and (not identity or probe["identity"] is True)
                      and params.get(slot) is not None and probe["param_count"] == params[slot])
            e.seed_counter += 1
            seed_id = f"{slot}#{e.seed_counter}"
            self.last_germination = (seed_id, passed)
            if passed:
                s.seed = RefSeed(seed_id=seed_id, kind=kind, steps=steps)
                s.stage, s.entered = Stage.GERMINATED, e.epoch
        return self._predict(go)

    def advance(self, env: int, slot: str) -> str | None:
        def go():
            e = self._env(env)
            s = self._live(e, slot)
            nxt = {Stage.GERMINATED: (1, Stage.TRAINING), Stage.TRAINING: (2, Stage.BLENDING),
                   Stage.BLENDING: (3, Stage.PROBATIONARY)}
            if s.stage not in nxt:
                raise Refused("invalid_stage")
            gate, target = nxt[s.stage]
            if self.config[f"gate_mode_g{gate}"] == "auto":
                raise Refused("gate_is_auto")
            if self.gate_passes(s, e.epoch):
                self._move(s, target, e.epoch)
        return self._predict(go)

    def fossilize(self, env: int, slot: str) -> str | None:
        def go():
            e = self._env(env)
            s = self._live(e, slot)
            if s.stage != Stage.PROBATIONARY:
                raise Refused("invalid_stage")
            if self.gate_passes(s, e.epoch):
                self._move(s, Stage.FOSSILIZED, e.epoch)
        return self._predict(go)

    def cull(self, env: int, slot: str) -> str | None:
        def go():
            e = self._env(env)
            s = self._live(e, slot)
            if s.stage == Stage.FOSSILIZED:
                raise Refused("cannot_cull_fossilized")
            self._move(s, Stage.CULLED, e.epoch)
        return self._predict(go)

    def wait(self, env: int) -> str | None:
        return self._predict(lambda: self._env(env))

    def record_epoch(self, env: int, epoch: int, metrics_epoch: int,
                     measurements: list[dict[str, Any]]) -> str | None:
        """Each measurement: slot, seed_id, grad_ratio, leaks, finite, cf (None or (kind, contribution))."""
        def go():
            e = self._env(env)
            if epoch != e.epoch + 1 or not e.ticked or metrics_epoch != epoch:
                raise Refused("epoch_out_of_order")
            by_slot = {}
            for m in measurements:
                s = e.slots.get(m["slot"])
                if s is None or s.stage not in LIVE or s.seed.seed_id != m["seed_id"]:
                    raise Refused("stale_measurement")
                by_slot[m["slot"]] = m
            e.epoch, e.ticked = epoch, False
            decay = self.config["gradient_ratio_ema_decay"]
            for sid, s in e.slots.items():
                if s.stage not in ACTIVE:
                    continue
                m = by_slot.get(sid, {})
                seed, ratio = s.seed, m.get("grad_ratio")
                if ratio is not None:
                    seed.ema = ratio if seed.ema is None else decay * seed.ema + (1 - decay) * ratio
                    seed.ratio_epoch = epoch
                if s.stage == Stage.TRAINING and m.get("leaks"):
                    seed.leaks += m["leaks"]
                seed.healthy = m.get("finite")
                cf = m.get("cf")
                if cf is not None:
                    kind, value = cf
                    if kind == "shadow":
                        seed.shadow = (value, epoch)
                    else:
                        seed.ablation = (value, epoch, seed.alpha)
        return self._predict(go)

    def tick(self, env: int, epoch: int) -> str | None:
        def go():
            e = self._env(env)
            if epoch != e.epoch or e.ticked:
                raise Refused("epoch_out_of_order")
            c = self.config
            for s in e.slots.values():
                in_stage = epoch - s.entered
                if s.stage == Stage.GERMINATED and c["gate_mode_g1"] == "auto":
                    self._move(s, Stage.TRAINING, epoch)
                elif s.stage == Stage.TRAINING and c["gate_mode_g2"] == "auto":
                    if self.gate_passes(s, epoch):
                        self._move(s, Stage.BLENDING, epoch)
                elif s.stage == Stage.BLENDING:
                    if s.seed.step < s.seed.steps:
                        self._ramp(s)
                    if s.seed.step >= s.seed.steps and c["gate_mode_g3"] == "auto" and self.gate_passes(s, epoch):
                        self._move(s, Stage.PROBATIONARY, epoch)
                elif s.stage == Stage.PROBATIONARY:
                    cf = s.seed.ablation
                    if (cf is not None and cf[1] == epoch and cf[0] <= 0) or in_stage >= c["max_probation_epochs"]:
                        self._move(s, Stage.CULLED, epoch)
                elif s.stage == Stage.CULLED:
                    self._move(s, Stage.EMBARGOED, epoch)
                elif s.stage == Stage.EMBARGOED and in_stage >= c["embargo_epochs"]:
                    self._move(s, Stage.RESETTING, epoch)
                elif s.stage == Stage.RESETTING and in_stage >= c["resetting_epochs"]:
                    self._move(s, Stage.DORMANT, epoch)
            e.ticked = True
        return self._predict(go)

    def rollback(self, env: int, epoch: int) -> str | None:
        def go():
            e = self._env(env)
            if epoch != e.epoch + 1 or not e.ticked:
                raise Refused("epoch_out_of_order")
            for s in e.slots.values():
                if s.stage in CULLABLE:
                    self._move(s, Stage.CULLED, epoch)
        return self._predict(go)

    def record_decision(self, env: int, epoch: int) -> str | None:
        def go():
            e = self._env(env)
            if epoch != e.epoch or epoch in e.decisions:
                raise Refused("epoch_out_of_order")
            e.decisions.add(epoch)
        return self._predict(go)

    def refer_to_decision(self, env: int, decision_epoch: int) -> str | None:
        """RejectAction and RecordReward: valid iff that decision exists in this env-episode."""
        def go():
            e = self._env(env)
            if decision_epoch not in e.decisions:
                raise Refused("unknown_decision")
        return self._predict(go)

    def run_scoped_record(self) -> str | None:
        """RecordCheckpoint and RecordPolicyUpdate."""
        return self._predict(self._run)

    def extend_episode(self, env: int, max_epochs: int) -> str | None:
        def go():
            e = self._env(env)
            if max_epochs <= e.max_epochs:
                raise Refused("invalid_extension")
            e.max_epochs = max_epochs
        return self._predict(go)

    def finish_episode(self, env: int) -> str | None:
        def go():
            e = self._env(env)
            e.running = False
        return self._predict(go)

    def finish_run(self, status: str) -> str | None:
        def go():
            self._run()
            if status not in RUN_STATUSES:
                raise Refused("invalid_stage")
            if status == "completed" and any(e.running for e in self.envs.values()):
                raise Refused("episode_running")
            self.status = status
        return self._predict(go)
