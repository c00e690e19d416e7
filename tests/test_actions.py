"""The valid-action table (policy §3) and the baseline controllers, on states made by the real decider.

The episode driver below plays the engine's step order (policy §7.2) on the in-memory Ledger with
made-up measurements; test_heuristic and test_rewards import it.
"""

import json
import math
import random

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import SLOTS, Ledger, epoch_metrics, probe, run_started

from esper.compute.observation import CullNotice, EpochSignals, Executed, Observation
from esper.events import catalogue as ev
from esper.events.catalogue import Blend, PolicyCommand
from esper.events.enums import Stage
from esper.lifecycle import DomainError
from esper.lifecycle import commands as cmd
from esper.lifecycle.stages import CULLABLE
from esper.policy.actions import OPS, head_values, legal_summary, valid_actions
from esper.policy.baselines import NonePolicy, RandomPolicy
from esper.policy.seeding import mix64, policy_seed

HOST_PARAMS = 320
BLUEPRINTS = ("conv_light", "norm")  # the test catalogue minus noop


# -- an engine in miniature --------------------------------------------------------------------


@attrs.define
class Driver:
    """One env's episode on the Ledger: record epoch, observe, decide, execute, tick."""

    ledger: Ledger
    rng: random.Random
    blueprints: tuple[str, ...] = BLUEPRINTS
    history: list[EpochSignals] = attrs.Factory(list)
    culls: list[CullNotice] = attrs.Factory(list)
    rejected: list[tuple[PolicyCommand, str]] = attrs.Factory(list)
    rolled_back: bool = False

    @classmethod
    def start(cls, seed: int = 0, lifecycle: dict | None = None, max_epochs: int = 20,
              slots: tuple[str, ...] = SLOTS, blueprints: tuple[str, ...] = BLUEPRINTS) -> "Driver":
        ledger = Ledger()
        ledger.execute(cmd.StartRun(run=run_started(lifecycle)))
        ledger.execute(cmd.StartEpisode(env=0, episode_seed=seed, host_seed=seed, host_params=HOST_PARAMS,
                                        slots_enabled=slots, max_epochs=max_epochs))
        return cls(ledger, random.Random(seed), blueprints)

    @property
    def env(self):
        return self.ledger.state.envs[0]

    def observe(self) -> Observation:
        run = self.ledger.state
        params = {e.name: dict(e.params) for e in run.catalogue if e.name in self.blueprints}
        return Observation(
            env=0, episode=self.env.episode, epoch=self.env.epoch, max_epochs=self.env.max_epochs,
            history=tuple(self.history), state=self.env, lifecycle=run.config, topology=run.topology,
            blueprints=self.blueprints, blueprint_params=params, host_params=HOST_PARAMS, l_rand=math.log(4),
            recent_culls=tuple(self.culls), rolled_back=self.rolled_back,
        )

    def _note_culls(self, records) -> None:
        for r in records:
            if isinstance(r.event, ev.SeedCulled):
                blueprint = self.env.slot(r.event.slot).seed.blueprint  # a CULLED slot keeps its seed
                self.culls.append(CullNotice(r.event.slot, blueprint, r.event.reason, r.event.initiator))

    def record_epoch(self, val_acc: float, contribution=None, shadow=None, rollback: bool = False,
                     decision_epoch: int | None = None) -> Observation:
        """Epoch t = last + 1 with `val_acc`; `contribution`/`shadow` map slot -> value, or are
        callables of the slot for random values. Returns the observation after it."""
        t = self.env.epoch + 1
        self.rolled_back = rollback
        if rollback:
            self._note_culls(self.ledger.execute(cmd.RollBack(
                env=0, epoch=t, reason="nan_loss", restored_epoch=t - 1, loss=float("nan"), threshold=None,
                consecutive_panics=1, history_mean=None, history_std=None, decision_epoch=decision_epoch)))
        loss = math.log(4) * (1 - val_acc / 100)
        measurements = []
        for slot in self.env.slots:
            if slot.stage not in (Stage.TRAINING, Stage.BLENDING, Stage.PROBATIONARY, Stage.FOSSILIZED):
                continue
            cf = None
            if slot.stage == Stage.TRAINING:
                gain = shadow(slot) if callable(shadow) else (shadow or {}).get(slot.slot_id)
                if gain is not None:
                    cf = cmd.CounterfactualSample(kind="shadow", alpha=1.0, real_acc=val_acc,
                                                  ablated_acc=val_acc + gain, real_loss=loss, ablated_loss=loss, n=10)
            elif slot.seed.alpha > 0 and slot.stage != Stage.FOSSILIZED:
                c = contribution(slot) if callable(contribution) else (contribution or {}).get(slot.slot_id)
                if c is not None:
                    cf = cmd.CounterfactualSample(kind="ablation", alpha=0.0, real_acc=val_acc,
                                                  ablated_acc=val_acc - c, real_loss=loss, ablated_loss=loss, n=10)
            measurements.append(cmd.SlotMeasurement(slot=slot.slot_id, seed_id=slot.seed.seed_id, grad_ratio=0.2,
                                                    isolation_leaks=0, finite=True, counterfactual=cf))
        self.ledger.execute(cmd.RecordEpoch(env=0, epoch=t, metrics=epoch_metrics(t, val_acc, loss),
                                            measurements=tuple(measurements)))
        self.history.append(EpochSignals(loss, val_acc, loss, val_acc))
        return self.observe()

    def act(self, decision: ev.PolicyDecided) -> tuple[Executed, ...]:
        """Record the decision, carry out its commands as the engine does, then tick."""
        self.ledger.execute(cmd.RecordDecision(env=0, decision=decision))
        self.culls = []
        executed = []
        for c in decision.commands:
            try:
                records = self.ledger.execute(self._command(c, decision.epoch))
            except DomainError as error:
                self.rejected.append((c, error.code))
                executed.append(Executed(c.op, c.slot, c.blueprint, True, None))
                continue
            gates = [r.event for r in records if isinstance(r.event, ev.GateEvaluated)]
            executed.append(Executed(c.op, c.slot, c.blueprint, False, gates[0].passed if gates else None))
            self._note_culls(records)
        self._note_culls(self.ledger.execute(cmd.Tick(env=0, epoch=self.env.epoch)))
        return tuple(executed)

    @staticmethod
    def _command(c: PolicyCommand, epoch: int) -> cmd.Command:
        if c.op == "germinate":
            return cmd.Germinate(slot=c.slot, blueprint=c.blueprint, blend=c.blend,
                                 probe=probe(c.blueprint, c.slot), decision_epoch=epoch)
        if c.op == "advance":
            return cmd.Advance(slot=c.slot, decision_epoch=epoch)
        if c.op == "fossilize":
            return cmd.Fossilize(slot=c.slot, decision_epoch=epoch)
        return cmd.Cull(slot=c.slot, reason=c.reason, initiator="policy", decision_epoch=epoch)


@attrs.frozen
class Step:
    before: Observation
    decision: ev.PolicyDecided
    executed: tuple[Executed, ...]
    after: Observation
    governor: bool
    terminated: bool


def play(controller, driver: Driver, rollback_rate: float = 0.0, on_observe=None) -> list[Step]:
    """A whole episode with random but plausible measurements; returns each decision's transition."""
    rng, steps = driver.rng, []
    E = driver.env.max_epochs
    controller.reset(0, driver.env.episode, E)
    pending = None
    for t in range(1, E + 1):
        acc = 60 - 50 * math.exp(-t / 4) + rng.gauss(0, 0.3)
        rollback = t > 1 and rng.random() < rollback_rate
        after = driver.record_epoch(
            acc, contribution=lambda s: rng.uniform(-3, 6), shadow=lambda s: rng.uniform(-0.5, 3),
            rollback=rollback, decision_epoch=pending[0].epoch if pending else None)
        if on_observe is not None:
            on_observe(after)
        if pending is not None:
            steps.append(Step(pending[1], pending[0], pending[2], after, rollback, t == E))
        if t == E:
            break
        decision = controller.decide(after)
        pending = (decision, after, driver.act(decision))
    return steps


# -- the table on crafted states ---------------------------------------------------------------


def _advance_to(driver: Driver, epochs: int, acc: float = 50.0, **measure) -> Observation:
    obs = None
    for _ in range(epochs):
        obs = driver.record_epoch(acc, **measure)
        driver.act(NonePolicy().decide(obs))
    return obs


def _germinate(driver: Driver, slot: str, blueprint: str = "norm") -> Observation:
    obs = driver.record_epoch(50.0)
    g = PolicyCommand(op="germinate", slot=slot, blueprint=blueprint, blend=Blend(kind="linear", steps=2))
    driver.act(ev.PolicyDecided(epoch=obs.epoch, policy="test", policy_id="t", commands=(g,), action={},
                                action_index={}, legal={}, rationale=""))
    return driver.observe()


def test_fresh_episode_allows_wait_and_germinate_everywhere():
    driver = Driver.start()
    table = valid_actions(driver.record_epoch(40.0))
    assert table.ops == ("wait", "germinate")
    assert table.slots["germinate"] == SLOTS
    assert all(table.blueprints[s] == BLUEPRINTS for s in SLOTS)
    assert table.blend_kinds == ("linear", "sigmoid", "gated")
    assert table.slots["cull"] == table.slots["advance"] == table.slots["fossilize"] == ()
    assert table.op_mask() == (True, True, False, False, False)


def test_blueprint_must_fit_the_slot_and_be_in_the_policy_list():
    driver = Driver.start()
    obs = driver.record_epoch(40.0)
    params = {"conv_light": {"early": 1, "mid": 1}, "norm": {"early": 1}}
    table = valid_actions(attrs.evolve(obs, blueprint_params=params))
    assert table.slots["germinate"] == ("early", "mid")  # late: nothing fits
    assert table.blueprints == {"early": ("conv_light", "norm"), "mid": ("conv_light",)}
    assert table.blueprint_mask("mid") == (True, False)
    narrowed = valid_actions(attrs.evolve(obs, blueprints=("norm",)))
    assert narrowed.blueprints["late"] == ("norm",)


def test_disabled_slots_are_not_on_the_slot_axis():
    driver = Driver.start(slots=("mid",))
    table = valid_actions(driver.record_epoch(40.0))
    assert table.slot_ids == ("mid",)
    assert table.slots["germinate"] == ("mid",)


def test_live_seeds_are_cullable_not_germinable_and_budget_limits_germination():
    driver = Driver.start(lifecycle={"max_seeds": 1})
    obs = _germinate(driver, "mid")  # tick: G1 auto -> TRAINING
    assert obs.state.slot("mid").stage == Stage.TRAINING
    table = valid_actions(driver.record_epoch(50.0))
    assert table.slots["cull"] == ("mid",)
    assert table.slots["germinate"] == ()  # budget of one seed spent
    assert table.ops == ("wait", "cull")
    assert table.slots["advance"] == ()  # auto gates: ADVANCE is never valid


def test_explicit_gates_make_advance_valid_only_when_ready():
    driver = Driver.start(lifecycle={"gate_mode_g1": "explicit", "gate_mode_g2": "explicit",
                                     "gate_mode_g3": "explicit"})
    obs = _germinate(driver, "early")
    assert obs.state.slot("early").stage == Stage.GERMINATED
    assert valid_actions(driver.record_epoch(50.0)).slots["advance"] == ("early",)
    driver.act(ev.PolicyDecided(epoch=driver.env.epoch, policy="test", policy_id="t",
                                commands=(PolicyCommand(op="advance", slot="early"),), action={},
                                action_index={}, legal={}, rationale=""))
    assert driver.env.slot("early").stage == Stage.TRAINING
    # TRAINING: valid once epochs_in_stage >= g2_min_training_epochs (3)
    for k in (1, 2):
        table = valid_actions(driver.record_epoch(50.0))
        assert table.slots["advance"] == (), k
        driver.act(NonePolicy().decide(driver.observe()))
    assert valid_actions(driver.record_epoch(50.0)).slots["advance"] == ("early",)


def test_blending_advance_needs_a_complete_ramp_and_probation_allows_fossilize():
    driver = Driver.start(lifecycle={"gate_mode_g3": "explicit"})
    _germinate(driver, "late")
    _advance_to(driver, 3, shadow={"late": 2.0})  # G2 passes on the third tick: BLENDING, step 1 of 2
    assert driver.env.slot("late").stage == Stage.BLENDING
    assert valid_actions(driver.record_epoch(50.0, contribution={"late": 1.0})).slots["advance"] == ()
    driver.act(NonePolicy().decide(driver.observe()))  # ramp step 2: complete
    table = valid_actions(driver.record_epoch(50.0, contribution={"late": 1.0}))
    assert table.slots["advance"] == ("late",)
    assert table.slots["cull"] == ("late",)
    for _ in range(3):  # until G3 (3 epochs) passes on ADVANCE
        driver.act(ev.PolicyDecided(epoch=driver.env.epoch, policy="test", policy_id="t",
                                    commands=(PolicyCommand(op="advance", slot="late"),), action={},
                                    action_index={}, legal={}, rationale=""))
        if driver.env.slot("late").stage == Stage.PROBATIONARY:
            break
        driver.record_epoch(50.0, contribution={"late": 1.0})
    assert driver.env.slot("late").stage == Stage.PROBATIONARY
    table = valid_actions(driver.record_epoch(50.0, contribution={"late": 2.0}))
    assert table.slots["fossilize"] == ("late",)
    assert table.ops == ("wait", "germinate", "cull", "fossilize")


def test_failure_stages_and_fossils_take_no_command():
    driver = Driver.start()
    _germinate(driver, "mid")
    obs = driver.record_epoch(50.0)
    driver.act(ev.PolicyDecided(epoch=obs.epoch, policy="test", policy_id="t",
                                commands=(PolicyCommand(op="cull", slot="mid", reason="x"),), action={},
                                action_index={}, legal={}, rationale=""))
    assert driver.env.slot("mid").stage == Stage.EMBARGOED
    table = valid_actions(driver.record_epoch(50.0))
    assert "mid" not in table.slots["germinate"] + table.slots["cull"] + table.slots["advance"]


def test_legal_summary_and_head_values():
    driver = Driver.start()
    _germinate(driver, "mid")
    table = valid_actions(driver.record_epoch(50.0))
    legal = legal_summary(table)
    assert legal["op"] == ("wait", "germinate", "cull")
    assert legal["slot"] == SLOTS
    assert legal["slot:germinate"] == ("early", "late") and legal["slot:cull"] == ("mid",)
    assert legal["blueprint"] == BLUEPRINTS and legal["blend"] == table.blend_kinds
    assert legal["blueprint:late"] == BLUEPRINTS
    g = PolicyCommand(op="germinate", slot="late", blueprint="norm", blend=Blend(kind="gated", steps=5))
    action, index = head_values(table, g)
    assert action == {"op": "germinate", "slot": "late", "blueprint": "norm", "blend": "gated"}
    assert index == {"op": 1, "slot": 2, "blueprint": 1, "blend": 2}
    assert head_values(table, None) == ({"op": "wait", "slot": None, "blueprint": None, "blend": None},
                                        {"op": 0, "slot": 0, "blueprint": 0, "blend": 0})
    assert table.is_valid(g)
    assert not table.is_valid(PolicyCommand(op="germinate", slot="mid", blueprint="norm"))
    assert not table.is_valid(PolicyCommand(op="fossilize", slot="mid"))


# -- properties on random lifecycle states -----------------------------------------------------


def _check_table(obs: Observation) -> None:
    table = valid_actions(obs)
    assert "wait" in table.ops
    for op in table.ops[1:]:
        assert table.slots[op], op
    for slot in table.slots["germinate"]:
        assert table.blueprints[slot]
        assert obs.state.slot(slot).stage == Stage.DORMANT
    for slot in table.slots["cull"]:
        assert obs.state.slot(slot).stage in CULLABLE
    assert set(table.ops) == {op for op in OPS if op == "wait" or table.slots[op]}
    assert sum(table.op_mask()) == len(table.ops)


_lifecycles = st.fixed_dictionaries({
    "gate_mode_g1": st.sampled_from(["auto", "explicit"]),
    "gate_mode_g2": st.sampled_from(["auto", "explicit"]),
    "gate_mode_g3": st.sampled_from(["auto", "explicit"]),
    "max_seeds": st.integers(0, 3),
    "blend_steps": st.integers(1, 4),
    "embargo_epochs": st.integers(1, 3),
    "g5_min_contribution": st.sampled_from([0.5, 1.0, 3.0]),
})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), lifecycle=_lifecycles, rollback_rate=st.sampled_from([0.0, 0.1]),
       slots=st.sampled_from([SLOTS, ("mid",), ("early", "late")]))
def test_random_policy_on_random_lifecycles_is_never_rejected(seed, lifecycle, rollback_rate, slots):
    driver = Driver.start(seed, lifecycle, max_epochs=30, slots=slots)
    policy = RandomPolicy(seed, 0)
    steps = play(policy, driver, rollback_rate, on_observe=_check_table)
    assert driver.rejected == []
    for step in steps:
        table = valid_actions(step.before)
        assert all(table.is_valid(c) for c in step.decision.commands)
        assert step.decision.legal == legal_summary(table)


def test_random_policy_reaches_every_op_over_many_steps():
    seen = set()
    for seed in range(12):
        driver = Driver.start(seed, {"gate_mode_g2": "explicit", "gate_mode_g3": "explicit"}, max_epochs=40)
        for step in play(RandomPolicy(seed, 0), driver):
            seen.update(c.op for c in step.decision.commands)
        assert driver.rejected == []
    assert seen == {"germinate", "advance", "cull", "fossilize"}


# -- the baselines -----------------------------------------------------------------------------


def test_none_policy_always_waits_with_a_complete_record():
    driver = Driver.start()
    for step in play(NonePolicy(), driver):
        d = step.decision
        assert d.commands == () and d.policy == "none" and d.epoch == step.before.epoch
        assert d.action["op"] == "wait" and d.legal["op"] == ("wait", "germinate")
        assert d.log_prob is None and d.value is None and d.entropy is None


def test_random_policy_record_has_uniform_log_probs():
    driver = Driver.start(3)
    steps = play(RandomPolicy(3, 0), driver)
    germinations = [s for s in steps if s.decision.commands and s.decision.commands[0].op == "germinate"]
    assert germinations
    for s in steps:
        d = s.decision
        table = valid_actions(s.before)
        assert d.value is None
        assert d.log_prob["op"] == pytest.approx(-math.log(len(table.ops)))
        assert d.log_prob_total == pytest.approx(sum(d.log_prob.values()))
        assert d.entropy["op"] == pytest.approx(math.log(len(table.ops)))
        if d.commands:
            c = d.commands[0]
            assert d.action["op"] == c.op and d.action_index["op"] == OPS.index(c.op)
            assert d.log_prob["slot"] == pytest.approx(-math.log(len(table.slots[c.op])))
            if c.op == "germinate":
                assert d.log_prob["blend"] == pytest.approx(-math.log(3))
                assert c.blend.steps == s.before.lifecycle.blend_steps
        else:
            assert d.log_prob["slot"] == 0.0 and d.entropy["blueprint"] == 0.0


def _decisions(policy, seed: int):
    return [s.decision for s in play(policy, Driver.start(seed, max_epochs=25))]


def test_random_policy_is_seeded_per_env_and_resumes_identically():
    assert _decisions(RandomPolicy(5, 0), 1) == _decisions(RandomPolicy(5, 0), 1)
    assert _decisions(RandomPolicy(5, 0), 1) != _decisions(RandomPolicy(6, 0), 1)
    # Resume: a policy rebuilt from a state_dict (through JSON-like plain data) continues the stream.
    a = RandomPolicy(5, 0)
    _decisions(a, 1)
    b = RandomPolicy(5, 0)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert _decisions(a, 2) == _decisions(b, 2)
    with pytest.raises(ValueError):
        RandomPolicy(5, 1).load_state_dict(a.state_dict())
    with pytest.raises(ValueError):
        a.reset(1, 0, 10)


def test_mix64_is_splitmix64_and_policy_streams_are_tagged():
    # Folding one 0 into the initial state (the golden-ratio increment) is one more splitmix64 step:
    # the second output of Vigna's reference generator seeded with 0.
    assert mix64(0) == 0x6E789E6AA1B965F4
    assert policy_seed(1, 0) != policy_seed(1, 1) != policy_seed(2, 0)
    assert policy_seed(7, 2) == mix64(0x706F6C696379, 7, 2)
