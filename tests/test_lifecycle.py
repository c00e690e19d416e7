"""The seed lifecycle through the real decider (lifecycle §2, §3.4, §4.5, §4.7; events §2, §3)."""

import math
from typing import Any, Callable

import attrs
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from esper.events import catalogue as ev
from esper.events.enums import Gate, Stage
from esper.lifecycle import DomainError, LifecycleConfig, decide, evolve, initial_state
from esper.lifecycle import commands as cmd
from esper.lifecycle import stages
from esper.events.envelope import SCHEMA_VERSION, Record
from esper.lifecycle.errors import ReplayError
from support import SLOTS, Ledger, epoch_metrics, probe, run_started

SPEC_CODES = {
    "run_not_started", "run_already_started", "run_finished", "unknown_env", "episode_not_running",
    "episode_running", "unknown_slot", "slot_disabled", "slot_unavailable", "no_seed", "invalid_stage",
    "cannot_cull_fossilized", "unknown_blueprint", "invalid_blend", "seed_limit_reached", "epoch_out_of_order",
    "stale_measurement", "unknown_decision", "gate_is_auto",
}


# -- a small engine: steps of RecordEpoch, commands, Tick ------------------------------------------


def measurement(slot, acc: float, contribution: float | None = 2.0, ratio: float | None = 0.5, leaks: int | None = 0,
                finite: bool | None = True, kind: str | None = None) -> cmd.SlotMeasurement:
    """A measurement that passes G2 (TRAINING: shadow gain) or G5 (later: ablation) unless told otherwise."""
    kind = kind or ("shadow" if slot.stage == Stage.TRAINING else "ablation")
    cf = None
    if contribution is not None:
        other = acc + contribution if kind == "shadow" else acc - contribution
        cf = cmd.CounterfactualSample(kind=kind, alpha=1.0 if kind == "shadow" else 0.0, real_acc=acc,
                                      ablated_acc=other, real_loss=1.0, ablated_loss=1.0, n=10)
    return cmd.SlotMeasurement(slot=slot.slot_id, seed_id=slot.seed.seed_id, grad_ratio=ratio,
                               isolation_leaks=leaks, finite=finite, counterfactual=cf)


def germinate(slot: str = "mid", blueprint: str = "conv_light", env: int = 0, **probe_changes) -> cmd.Germinate:
    return cmd.Germinate(env=env, slot=slot, blueprint=blueprint, probe=probe(blueprint, slot, **probe_changes))


def start_episode(env: int = 0, slots: tuple[str, ...] = SLOTS) -> cmd.StartEpisode:
    return cmd.StartEpisode(env=env, episode_seed=env, host_seed=env, host_params=320, slots_enabled=slots,
                            max_epochs=30)


def decision(epoch: int) -> ev.PolicyDecided:
    return ev.PolicyDecided(epoch=epoch, policy="none", policy_id="test", commands=(), action={},
                            action_index={}, legal={}, rationale="")


def reward(epoch: int, decision_epoch: int) -> ev.RewardComputed:
    return ev.RewardComputed(
        epoch=epoch, decision_epoch=decision_epoch, mode="shaped", components={"accuracy": 0.5}, total_raw=0.5,
        governor=False, terminated=False, truncated=False, score_before=0.0, score_after=0.0,
        potential_before=0.0, potential_after=0.0, seed_params_total=0, host_params=320, seeds=(),
    )


Measure = dict[str, Any] | Callable[[Any, int], dict[str, Any] | None]


class Run:
    """A Ledger plus the engine's step. `trace` records every command's outcome, for comparisons."""

    def __init__(self, lifecycle: dict[str, Any] | None = None, n_envs: int = 1, slots=SLOTS, start: bool = True):
        self.ledger = Ledger()
        self.trace: list[tuple] = []
        self.results: list = []
        if start:
            self.must(cmd.StartRun(run=run_started(lifecycle, n_envs=n_envs)))
            for env in range(n_envs):
                self.must(start_episode(env, slots))

    @property
    def state(self):
        return self.ledger.state

    def env(self, env: int = 0):
        return self.state.envs[env]

    def slot(self, name: str = "mid", env: int = 0):
        return self.env(env).slot(name)

    def attempt(self, command: cmd.Command):
        """The records of the batch, or the DomainError's code."""
        try:
            records = self.ledger.execute(command)
        except DomainError as exc:
            self.trace.append(("rejected", type(command).__name__, exc.code))
            return exc.code
        self.trace.append(("ok", tuple(signature(r.event) for r in records)))
        return records

    def must(self, command: cmd.Command) -> list[Record]:
        result = self.attempt(command)
        assert not isinstance(result, str), f"{command!r} refused: {result}"
        return result

    def refuse(self, command: cmd.Command) -> str:
        before, n = self.state, len(self.ledger.records)
        with pytest.raises(DomainError) as info:
            self.ledger.execute(command)
        assert self.state is before and len(self.ledger.records) == n, "a refused command changed something"
        return info.value.code

    def step(self, decide_: Callable[["Run"], list] | None = None, *, acc: float | None = None,
             measure: Measure | None = None, env: int = 0) -> list[Record]:
        """One engine step: RecordEpoch(next), the commands `decide_(run)` returns (each attempted, the
        outcomes in `self.results`), then Tick. Every active seed is measured with `measurement()`,
        with keyword overrides from `measure` (per slot id, or a callable of (slot, epoch));
        None for a slot means "not measured"."""
        epoch = self.env(env).epoch + 1
        acc = 40.0 + epoch if acc is None else acc
        ms = []
        for slot in self.env(env).slots:
            if not slot.active:
                continue
            kw = measure(slot, epoch) if callable(measure) else (measure or {}).get(slot.slot_id, {})
            if kw is not None:
                ms.append(measurement(slot, acc, **kw))
        start = len(self.ledger.records)
        self.must(cmd.RecordEpoch(env=env, epoch=epoch, metrics=epoch_metrics(epoch, acc), measurements=tuple(ms)))
        self.results = [self.attempt(c) for c in (decide_(self) if decide_ else ())]
        self.must(cmd.Tick(env=env, epoch=epoch))
        return self.ledger.records[start:]

    def steps(self, n: int, decide_=None, **kw) -> list[Record]:
        out = []
        for _ in range(n):
            out += self.step(decide_, **kw)
        return out

    def events(self, event_type: type, /, **match) -> list:
        return [r.event for r in self.ledger.records if isinstance(r.event, event_type)
                and all(getattr(r.event, k) == v for k, v in match.items())]


def signature(event: ev.Event) -> tuple:
    """An event minus its volatile fields and minus gate thresholds: what the lifecycle *did*."""
    data = msgspec.to_builtins(event)
    for f in type(event).VOLATILE:
        data.pop(f, None)
    if isinstance(event, ev.GateEvaluated):
        data["checks"] = [{k: v for k, v in c.items() if k != "threshold"} for c in data["checks"]]
    return tuple(sorted((k, repr(v)) for k, v in data.items()))


def fossilize_when_ready(slot: str = "mid"):
    def decide_(run: Run) -> list:
        return [cmd.Fossilize(slot=slot)] if run.slot(slot).stage == Stage.PROBATIONARY else []
    return decide_


def grow(run: Run, slot: str, target: Stage, env: int = 0, limit: int = 30) -> None:
    """Germinate (now, at the current epoch) and step with passing measurements until `target`."""
    if run.slot(slot, env).stage == Stage.DORMANT:
        run.must(germinate(slot, env=env))
    for _ in range(limit):
        if run.slot(slot, env).stage == target:
            return
        run.step(fossilize_when_ready(slot) if target == Stage.FOSSILIZED else None, env=env)
    raise AssertionError(f"{slot} never reached {target!r}; it is {run.slot(slot, env).stage!r}")


def stage_changes(run: Run, slot: str = "mid") -> list[tuple]:
    return [(e.epoch, e.to_stage, e.reason, e.trigger) for e in run.events(ev.StageChanged, slot=slot)]


# -- stage sets and transitions (lifecycle §2.1, §2.2) --------------------------------------------


def test_stage_and_gate_values_are_the_contract():
    assert {s.name: s.value for s in Stage} == {
        "UNKNOWN": 0, "DORMANT": 1, "GERMINATED": 2, "TRAINING": 3, "BLENDING": 4, "PROBATIONARY": 6,
        "FOSSILIZED": 7, "CULLED": 8, "EMBARGOED": 9, "RESETTING": 10,
    }
    assert {g.name: g.value for g in Gate} == {"G0": 0, "G1": 1, "G2": 2, "G3": 3, "G5": 5}


def test_stage_sets_and_transition_table():
    S = Stage
    assert stages.TERMINAL == {S.FOSSILIZED}
    assert stages.ACTIVE == {S.TRAINING, S.BLENDING, S.PROBATIONARY, S.FOSSILIZED}
    assert stages.LIVE == {S.GERMINATED, S.TRAINING, S.BLENDING, S.PROBATIONARY, S.FOSSILIZED}
    assert stages.CULLABLE == {S.GERMINATED, S.TRAINING, S.BLENDING, S.PROBATIONARY}
    assert stages.FAILURE == {S.CULLED, S.EMBARGOED, S.RESETTING}
    assert stages.AVAILABLE == {S.DORMANT}
    valid = {
        (S.UNKNOWN, S.DORMANT), (S.DORMANT, S.GERMINATED), (S.GERMINATED, S.TRAINING), (S.GERMINATED, S.CULLED),
        (S.TRAINING, S.BLENDING), (S.TRAINING, S.CULLED), (S.BLENDING, S.PROBATIONARY), (S.BLENDING, S.CULLED),
        (S.PROBATIONARY, S.FOSSILIZED), (S.PROBATIONARY, S.CULLED), (S.CULLED, S.EMBARGOED),
        (S.EMBARGOED, S.RESETTING), (S.RESETTING, S.DORMANT),
    }
    for a in S:
        for b in S:
            assert stages.is_valid_transition(a, b) == ((a, b) in valid), (a, b)
    assert stages.NATURAL_NEXT == {S.DORMANT: S.GERMINATED, S.GERMINATED: S.TRAINING, S.TRAINING: S.BLENDING,
                                   S.BLENDING: S.PROBATIONARY, S.PROBATIONARY: S.FOSSILIZED}


# -- the worked timeline (lifecycle §2.5) -----------------------------------------------------------

RAMPS = {
    "sigmoid": [0.0242, 0.2301, 0.7699, 0.9758, 1.0],
    "linear": [0.2, 0.4, 0.6, 0.8, 1.0],
    "gated": [0.2, 0.4, 0.6, 0.8, 1.0],  # the recorded scalar is the value at a neutral gate
}


@pytest.mark.parametrize("blend", ["sigmoid", "linear", "gated"])
def test_worked_timeline(blend):
    run = Run({"default_blend": blend})
    e = 3
    run.steps(e - 1)
    run.step(lambda r: [germinate("mid")], acc=61.5)
    assert run.slot().stage == Stage.TRAINING
    assert run.slot().seed.acc_at_stage_start == 61.5  # accuracy baseline := val acc of e
    # a fossilize before PROBATIONARY is refused, up to and including the decision of e+7
    run.steps(7, lambda r: [cmd.Fossilize(slot="mid")])
    assert [t for t in run.trace if t[0] == "rejected"] == [("rejected", "Fossilize", "invalid_stage")] * 7
    run.step(fossilize_when_ready())  # e+8

    assert stage_changes(run) == [
        (e, Stage.GERMINATED, "germinate", "command"),
        (e, Stage.TRAINING, "auto", "tick"),
        (e + 3, Stage.BLENDING, "auto", "tick"),
        (e + 7, Stage.PROBATIONARY, "auto", "tick"),
        (e + 8, Stage.FOSSILIZED, "fossilize", "command"),
    ]
    g2 = run.events(ev.GateEvaluated, gate=Gate.G2)
    assert [(v.epoch, v.passed) for v in g2] == [(e + 1, False), (e + 2, False), (e + 3, True)]
    assert [_check(v, "min_epochs").value for v in g2] == [1, 2, 3]
    assert [tuple(c.tag for c in v.checks if not c.passed) for v in g2] == [("min_epochs",), ("min_epochs",), ()]
    alphas = run.events(ev.AlphaChanged, slot="mid")
    assert [(a.epoch, a.step, a.steps_total) for a in alphas] == [(e + 3 + k, k + 1, 5) for k in range(5)]
    assert [round(a.new, 4) for a in alphas] == RAMPS[blend]
    assert alphas[-1].new == 1.0 and [a.reason for a in alphas] == ["ramp"] * 4 + ["ramp_complete"]
    assert [a.old for a in alphas[1:]] == [a.new for a in alphas[:-1]] and alphas[0].old == 0.0
    (g3,) = run.events(ev.GateEvaluated, gate=Gate.G3)
    assert (g3.epoch, g3.passed, _check(g3, "min_epochs").value, _check(g3, "alpha_complete").value) == (
        e + 7, True, 4, 1.0)
    assert [c.epoch for c in run.events(ev.CounterfactualMeasured, kind="ablation")] == list(range(e + 4, e + 9))
    (g5,) = run.events(ev.GateEvaluated, gate=Gate.G5)
    assert g5.epoch == e + 8 and g5.passed and g5.trigger == "command"
    (fossil,) = run.events(ev.SeedFossilized)
    assert fossil.epoch - e == 8  # fossilization comes >= 8 epochs after germination
    assert math.isclose(fossil.contribution, 2.0)
    assert run.slot().seed.alpha == 1.0


def _check(verdict, tag):
    (c,) = [c for c in verdict.checks if c.tag == tag]
    return c


def test_sigmoid_ramp_values():
    from esper.lifecycle.blend import ramp_alpha

    values = [ramp_alpha("sigmoid", k, 5, 12.0) for k in range(6)]
    assert values[0] == 0.0 and values[5] == 1.0
    assert [round(v, 4) for v in values] == [0.0, 0.0242, 0.2301, 0.7699, 0.9758, 1.0]
    assert all(a < b for a, b in zip(values, values[1:]))
    for kind in ("linear", "gated", "sigmoid"):
        for steps in range(1, 8):
            assert ramp_alpha(kind, 0, steps, 12.0) == 0.0 and ramp_alpha(kind, steps, steps, 12.0) == 1.0


def test_probationary_pin_when_g3_passes_below_one():
    """G3 with alpha < 1 (explicit, g3_min_alpha 0.5): entering PROBATIONARY pins alpha to 1.0."""
    run = Run({"gate_mode_g3": "explicit", "g3_min_alpha": 0.5, "g3_min_blending_epochs": 0})
    grow(run, "mid", Stage.BLENDING)
    run.steps(2)  # steps 2 and 3 of the sigmoid ramp: 0.7699
    run.step(lambda r: [cmd.Advance(slot="mid")])
    records = run.results[0]
    assert [type(r.event).__name__ for r in records] == ["GateEvaluated", "StageChanged", "AlphaChanged"]
    pin = records[2].event
    assert (pin.new, pin.reason, round(pin.old, 4)) == (1.0, "pinned", 0.7699)
    assert run.slot().stage == Stage.PROBATIONARY and run.slot().seed.alpha == 1.0


def test_advance_to_blending_by_command_takes_ramp_step_one():
    """Commands and ticks share one entry hook: no alpha jump 0 -> 1 (reference defect 4)."""
    run = Run({"gate_mode_g2": "explicit", "default_blend": "linear"})
    grow(run, "mid", Stage.TRAINING)
    run.steps(2)
    run.step(lambda r: [cmd.Advance(slot="mid")])
    gate, change, alpha = (r.event for r in run.results[0])
    assert gate.passed and change.to_stage == Stage.BLENDING and change.reason == "advance"
    assert (alpha.new, alpha.step) == (0.2, 1)


def test_gradient_ratio_ema():
    """First value as is, then ema <- d*ema + (1-d)*r; an unmeasured epoch keeps the EMA (lifecycle §4.4)."""
    ratios = {2: 1.0, 3: 0.5, 4: None, 5: 0.0}
    run = Run({"gradient_ratio_ema_decay": 0.8, "gate_mode_g2": "explicit"})
    run.step(lambda r: [germinate("mid")])
    run.steps(4, measure=lambda slot, epoch: {"ratio": ratios[epoch]})
    measured = run.events(ev.SeedMeasured, slot="mid")
    assert [(m.epoch, m.grad_ratio) for m in measured] == list(ratios.items())
    expected = [1.0, 0.8 * 1.0 + 0.2 * 0.5, 0.9, 0.8 * 0.9]
    assert [m.grad_ratio_ema for m in measured] == pytest.approx(expected, rel=1e-12)
    assert run.slot().seed.grad_ratio_ema == pytest.approx(0.72) and run.slot().seed.ratio_epoch == 5


def test_tick_digest_is_the_folded_env_state():
    from esper.lifecycle import state_digest

    run = Run()
    digests = []
    for epoch in range(1, 12):
        records = run.step(fossilize_when_ready() if epoch > 1 else (lambda r: [germinate("mid")]))
        assert isinstance(records[-1].event, ev.EpochTicked) and records[-1].batch_end
        digests.append(records[-1].event.state_digest)
        assert digests[-1] == state_digest(run.env())
    assert len(set(digests)) == len(digests)  # the state moves every step (epoch at least)
    folded = initial_state()
    for record in run.ledger.records:
        folded = evolve(folded, record)
    assert folded == run.state


# -- probation auto-cull ------------------------------------------------------------------------------


def reach_probation(lifecycle=None) -> tuple[Run, int]:
    run = Run(lifecycle)
    grow(run, "mid", Stage.PROBATIONARY)
    return run, run.slot().entered_epoch


@pytest.mark.parametrize("contribution", [-0.5, 0.0])
def test_probation_auto_cull_by_negative_counterfactual(contribution):
    run, entered = reach_probation()
    run.step(measure={"mid": {"contribution": contribution}})
    assert stage_changes(run)[-1] == (entered + 1, Stage.CULLED, "negative_counterfactual", "tick")
    (culled,) = run.events(ev.SeedCulled)
    assert (culled.initiator, culled.stage_at_cull, culled.epoch) == ("lifecycle", Stage.PROBATIONARY, entered + 1)
    (alpha,) = run.events(ev.AlphaChanged, reason="cull")
    assert (alpha.old, alpha.new) == (1.0, 0.0)


def test_positive_counterfactual_keeps_probation():
    run, entered = reach_probation()
    run.steps(4, measure={"mid": {"contribution": 0.1}})
    assert run.slot().stage == Stage.PROBATIONARY


def test_auto_cull_reads_only_this_steps_counterfactual():
    """A non-positive contribution from an earlier epoch does not cull."""
    run = Run()
    grow(run, "mid", Stage.BLENDING)  # BLENDING from the tick of epoch 4
    run.steps(3)
    run.step(measure={"mid": {"contribution": -1.0}})  # 8: ramp complete, G3 -> PROBATIONARY (G3 ignores it)
    assert run.slot().stage == Stage.PROBATIONARY and run.slot().seed.last_counterfactual.value < 0
    run.step(measure={"mid": None})  # 9: unmeasured; the -1.0 of epoch 8 is not this step's
    assert run.slot().stage == Stage.PROBATIONARY
    run.step(measure={"mid": {"contribution": 0.0}})  # 10: zero is not positive
    assert stage_changes(run)[-1] == (10, Stage.CULLED, "negative_counterfactual", "tick")


@pytest.mark.parametrize("max_probation", [5, 2, 1])
def test_probation_timeout(max_probation):
    run, entered = reach_probation({"max_probation_epochs": max_probation})
    run.steps(max_probation - 1)
    assert run.slot().stage == Stage.PROBATIONARY
    run.step()
    assert stage_changes(run)[-1] == (entered + max_probation, Stage.CULLED, "probation_timeout", "tick")
    (culled,) = run.events(ev.StageChanged, to_stage=Stage.CULLED)
    assert culled.epochs_in_previous_stage == max_probation


def test_last_decision_window_of_probation_can_still_fossilize():
    """Worked timeline e+12: fossilize is judged before the tick that would time the seed out."""
    run, entered = reach_probation()
    run.steps(4)
    run.step(fossilize_when_ready())
    assert run.slot().stage == Stage.FOSSILIZED and run.slot().entered_epoch == entered + 5


# -- cull, embargo, reset, reuse (lifecycle §4.7) -----------------------------------------------------


def germinable_from(run: Run, first: int, last: int) -> list[int]:
    """Step through epochs first..last, trying Germinate(mid) at each decision; the epochs it worked."""
    ok = []
    for epoch in range(first, last + 1):
        assert run.env().epoch + 1 == epoch
        run.step(lambda r: [germinate("mid")] if not ok else [])
        if not ok:
            if isinstance(run.results[0], str):
                assert run.results[0] == "slot_unavailable"
            else:
                ok.append(epoch)
    return ok


@pytest.mark.parametrize("embargo, resetting", [(5, 1), (1, 1), (2, 3)])
def test_embargo_after_a_command_cull(embargo, resetting):
    run = Run({"embargo_epochs": embargo, "resetting_epochs": resetting})
    run.step(lambda r: [germinate("mid")])
    e = 2
    run.step(lambda r: [cmd.Cull(slot="mid", reason="policy_cull"), germinate("mid")])
    assert run.results[1] == "slot_unavailable"
    ok = germinable_from(run, e + 1, e + 12)
    assert ok == [e + 1 + embargo + resetting]  # defaults: e + 7
    changes = stage_changes(run)
    assert changes[2:6] == [
        (e, Stage.CULLED, "policy_cull", "command"), (e, Stage.EMBARGOED, "embargo", "tick"),
        (e + embargo, Stage.RESETTING, "reset", "tick"), (e + embargo + resetting, Stage.DORMANT, "released", "tick"),
    ]


@pytest.mark.parametrize("embargo, resetting", [(5, 1), (1, 2)])
def test_embargo_after_an_auto_cull(embargo, resetting):
    run, entered = reach_probation({"embargo_epochs": embargo, "resetting_epochs": resetting})
    e = entered + 1
    run.step(measure={"mid": {"contribution": -1.0}})  # auto-cull in the tick of e
    assert run.slot().stage == Stage.CULLED
    assert germinable_from(run, e + 1, e + 12) == [e + 2 + embargo + resetting]  # defaults: e + 8


def test_embargo_countdown_is_visible_in_state():
    run = Run()
    run.step(lambda r: [germinate("mid")])
    run.step(lambda r: [cmd.Cull(slot="mid", reason="x")])
    remaining = []
    while run.slot().stage == Stage.EMBARGOED:
        remaining.append(5 - run.slot().epochs_in_stage(run.env().epoch))
        run.step()
    assert remaining == [5, 4, 3, 2, 1]


def test_reuse_after_release_starts_fresh():
    run = Run()
    run.step(lambda r: [germinate("mid")], measure=None)
    run.step(measure={"mid": {"ratio": 0.9, "leaks": 2}})
    run.step(lambda r: [cmd.Cull(slot="mid", reason="x")])
    run.steps(6)
    assert run.slot().stage == Stage.DORMANT and run.slot().seed is None
    run.step(lambda r: [germinate("mid")])
    seed = run.slot().seed
    assert seed.seed_id == "mid#2" and seed.grad_ratio_ema is None and seed.training_leaks == 0
    assert seed.last_counterfactual is None and seed.last_shadow is None


# -- seed ids ---------------------------------------------------------------------------------------------


def test_seed_ids_count_germinations_per_env_episode():
    run = Run(n_envs=2)
    run.step(lambda r: [germinate("mid"), germinate("early", shape_ok=False), germinate("early")])
    assert [v.seed_id for v in run.events(ev.GateEvaluated, gate=Gate.G0)] == ["mid#1", "early#2", "early#3"]
    assert [v.passed for v in run.events(ev.GateEvaluated, gate=Gate.G0)] == [True, False, True]
    assert [g.seed_id for g in run.events(ev.SeedGerminated)] == ["mid#1", "early#3"]
    failed = run.results[1]
    assert len(failed) == 1 and isinstance(failed[0].event, ev.GateEvaluated)  # nothing but the verdict
    assert run.slot("early").seed.seed_id == "early#3" and run.env().seed_counter == 3
    run.must(germinate("late", env=1))  # env 1 counts on its own
    assert run.slot("late", env=1).seed.seed_id == "late#1"
    run.must(cmd.FinishEpisode(env=0))
    run.must(start_episode(0))  # and a new episode starts again from 1
    run.must(germinate("late"))
    assert run.slot("late").seed.seed_id == "late#1" and run.env().episode == 1


# -- every DomainError code ---------------------------------------------------------------------------------


def _bare():
    return Run(start=False)


def _started(**kw):
    def make():
        run = Run(start=False)
        run.must(cmd.StartRun(run=run_started(kw.get("lifecycle"), n_envs=kw.get("n_envs", 1))))
        return run
    return make


def _episode(lifecycle=None, slots=SLOTS):
    return lambda: Run(lifecycle, slots=slots)


def _with_seed(stage: Stage, lifecycle=None, slot="mid"):
    def make():
        run = Run(lifecycle)
        grow(run, slot, stage)
        return run
    return make


def _finished_run():
    run = Run()
    run.must(cmd.FinishRun(status="failed"))
    return run


def _finished_episode():
    run = Run()
    run.step()
    run.must(cmd.FinishEpisode())
    return run


def _germinated_then_ticked_not():
    run = Run()
    run.must(cmd.RecordEpoch(epoch=1, metrics=epoch_metrics(1)))
    return run


def _decided():
    run = Run()
    run.must(cmd.RecordEpoch(epoch=1, metrics=epoch_metrics(1)))
    run.must(cmd.RecordDecision(decision=decision(1)))
    return run


def _stale_seed():
    run = Run()
    run.step(lambda r: [germinate("mid")])
    return run


def _stepped():
    run = Run()
    run.step()
    return run


def _culled_run():
    run = Run()
    run.step(lambda r: [germinate("mid")])
    run.step(lambda r: [cmd.Cull(slot="mid", reason="x")])
    return run


def _germinated_only():
    run = Run()
    run.must(germinate("mid"))  # at epoch 0, before the tick that would train it
    return run


ERROR_CASES = [
    ("run_not_started", "wait", _bare, cmd.Wait()),
    ("run_not_started", "start_episode", _bare, start_episode()),
    ("run_already_started", "start_run", _started(), cmd.StartRun(run=run_started())),
    ("run_finished", "wait", _finished_run, cmd.Wait()),
    ("run_finished", "start_episode", _finished_run, start_episode(0)),
    ("run_finished", "checkpoint", _finished_run,
     cmd.RecordCheckpoint(path="p", sha256="0" * 64, size=1, covers_seq=0, kind="model")),
    ("unknown_env", "start_episode", _started(n_envs=1), start_episode(1)),
    ("unknown_env", "negative", _episode(), cmd.Wait(env=-1)),
    ("episode_not_running", "never_started", _started(), cmd.Wait()),
    ("episode_not_running", "finished", _finished_episode, germinate("mid")),
    ("episode_running", "start_twice", _episode(), start_episode(0)),
    ("episode_running", "finish_run", _episode(), cmd.FinishRun(status="completed")),
    ("unknown_slot", "germinate", _episode(), cmd.Germinate(slot="bogus", blueprint="noop", probe=probe("noop"))),
    ("unknown_slot", "cull", _episode(), cmd.Cull(slot="bogus", reason="x")),
    ("unknown_slot", "start_episode", _started(), start_episode(0, ("mid", "bogus"))),
    ("slot_disabled", "germinate", _episode(slots=("mid",)), germinate("early")),
    ("slot_unavailable", "occupied", _with_seed(Stage.TRAINING), germinate("mid")),
    ("slot_unavailable", "embargoed", _culled_run, germinate("mid")),
    ("no_seed", "cull_empty", _episode(), cmd.Cull(slot="mid", reason="x")),
    ("no_seed", "advance_empty", _episode({"gate_mode_g1": "explicit"}), cmd.Advance(slot="mid")),
    ("no_seed", "fossilize_empty", _episode(), cmd.Fossilize(slot="mid")),
    ("no_seed", "cull_culled", _culled_run, cmd.Cull(slot="mid", reason="x")),
    ("invalid_stage", "fossilize_training", _with_seed(Stage.TRAINING), cmd.Fossilize(slot="mid")),
    ("invalid_stage", "advance_probationary", _with_seed(Stage.PROBATIONARY), cmd.Advance(slot="mid")),
    ("invalid_stage", "advance_fossil", _with_seed(Stage.FOSSILIZED), cmd.Advance(slot="mid")),
    ("cannot_cull_fossilized", "cull", _with_seed(Stage.FOSSILIZED), cmd.Cull(slot="mid", reason="x")),
    ("unknown_blueprint", "germinate", _episode(), cmd.Germinate(slot="mid", blueprint="mlp_giant", probe=probe("conv_light"))),
    ("invalid_blend", "zero_steps", _episode(),
     cmd.Germinate(slot="mid", blueprint="norm", blend=ev.Blend(kind="linear", steps=0), probe=probe("norm"))),
    ("invalid_blend", "unknown_kind", _episode(),
     cmd.Germinate(slot="mid", blueprint="norm", blend=ev.Blend(kind="cubic", steps=5), probe=probe("norm"))),
    ("seed_limit_reached", "second", _with_seed(Stage.TRAINING, {"max_seeds": 1}), germinate("early")),
    ("seed_limit_reached", "fossil_counts", _with_seed(Stage.FOSSILIZED, {"max_seeds": 1}), germinate("early")),
    ("epoch_out_of_order", "record_skips", _episode(), cmd.RecordEpoch(epoch=2, metrics=epoch_metrics(2))),
    ("epoch_out_of_order", "metrics_epoch", _episode(), cmd.RecordEpoch(epoch=1, metrics=epoch_metrics(2))),
    ("epoch_out_of_order", "record_before_tick", _germinated_then_ticked_not,
     cmd.RecordEpoch(epoch=2, metrics=epoch_metrics(2))),
    ("epoch_out_of_order", "tick_unrecorded", _episode(), cmd.Tick(epoch=1)),
    ("epoch_out_of_order", "tick_zero", _episode(), cmd.Tick(epoch=0)),
    ("epoch_out_of_order", "tick_twice", _stepped, cmd.Tick(epoch=1)),
    ("epoch_out_of_order", "rollback_epoch", _episode(),
     cmd.RollBack(epoch=0, reason="nan_loss", restored_epoch=0, loss=math.nan, threshold=None,
                  consecutive_panics=1, history_mean=None, history_std=None)),
    ("epoch_out_of_order", "decision_twice", _decided, cmd.RecordDecision(decision=decision(1))),
    ("epoch_out_of_order", "decision_epoch", _germinated_then_ticked_not, cmd.RecordDecision(decision=decision(2))),
    ("stale_measurement", "wrong_seed", _stale_seed,
     cmd.RecordEpoch(epoch=2, metrics=epoch_metrics(2),
                     measurements=(cmd.SlotMeasurement(slot="mid", seed_id="mid#2", grad_ratio=0.5),))),
    ("stale_measurement", "empty_slot", _stale_seed,
     cmd.RecordEpoch(epoch=2, metrics=epoch_metrics(2),
                     measurements=(cmd.SlotMeasurement(slot="early", seed_id="mid#1"),))),
    ("stale_measurement", "culled_seed", _culled_run,
     cmd.RecordEpoch(epoch=3, metrics=epoch_metrics(3), measurements=(cmd.SlotMeasurement(slot="mid", seed_id="mid#1"),))),
    ("unknown_decision", "reward", _germinated_then_ticked_not, cmd.RecordReward(reward=reward(1, 1))),
    ("unknown_decision", "reject", _decided,
     cmd.RejectAction(decision_epoch=0, command=ev.PolicyCommand(op="cull", slot="mid"), code="no_seed", message="")),
    ("gate_is_auto", "g1", _germinated_only, cmd.Advance(slot="mid")),
    ("gate_is_auto", "g2", _with_seed(Stage.TRAINING), cmd.Advance(slot="mid")),
    ("gate_is_auto", "g3", _with_seed(Stage.BLENDING), cmd.Advance(slot="mid")),
]


@pytest.mark.parametrize("code, _name, setup, command", ERROR_CASES, ids=[f"{c[0]}-{c[1]}" for c in ERROR_CASES])
def test_domain_error(code, _name, setup, command):
    run = setup()
    assert run.refuse(command) == code


def test_every_domain_error_code_has_a_case():
    assert {c[0] for c in ERROR_CASES} == SPEC_CODES


def test_the_same_commands_succeed_in_the_right_state():
    """The error cases are not vacuous: their commands are accepted where the spec allows them."""
    run = Run({"gate_mode_g1": "explicit", "max_seeds": 2})
    run.must(germinate("mid"))
    run.must(cmd.Advance(slot="mid"))
    run.must(germinate("early"))
    run.must(cmd.RecordEpoch(epoch=1, metrics=epoch_metrics(1)))
    run.must(cmd.RecordDecision(decision=decision(1)))
    run.must(cmd.RecordReward(reward=reward(2, 1)))
    run.must(cmd.RejectAction(decision_epoch=1, command=ev.PolicyCommand(op="cull", slot="mid"), code="x", message=""))
    run.must(cmd.Tick(epoch=1))
    run.must(cmd.RollBack(epoch=2, reason="nan_loss", restored_epoch=1, loss=math.nan, threshold=None,
                          consecutive_panics=1, history_mean=None, history_std=None))
    run.must(cmd.FinishEpisode())
    run.must(cmd.FinishRun(status="completed"))


def test_a_failed_gate_is_not_an_error():
    run = Run({"gate_mode_g2": "explicit"})
    grow(run, "mid", Stage.TRAINING)
    records = run.must(cmd.Advance(slot="mid"))  # min_epochs 0 < 3
    assert len(records) == 1 and not records[0].event.passed and run.slot().stage == Stage.TRAINING


# -- rollback ------------------------------------------------------------------------------------------------


def test_rollback_culls_every_cullable_seed_but_not_a_fossil():
    run = Run({"gate_mode_g1": "explicit"})
    run.must(germinate("early"))
    run.must(cmd.Advance(slot="early"))
    for _ in range(12):
        run.step(fossilize_when_ready("early"))
    assert run.slot("early").stage == Stage.FOSSILIZED
    run.must(germinate("mid"))
    run.must(cmd.Advance(slot="mid"))
    run.steps(4)
    assert run.slot("mid").stage == Stage.BLENDING
    run.must(germinate("late"))  # held GERMINATED by the explicit G1
    epoch = run.env().epoch + 1
    records = run.must(cmd.RollBack(epoch=epoch, reason="divergence", restored_epoch=epoch - 2, loss=9.0,
                                    threshold=4.0, consecutive_panics=1, history_mean=1.0, history_std=0.5))
    assert [type(r.event).__name__ for r in records] == [
        "StageChanged", "AlphaChanged", "SeedCulled", "StageChanged", "SeedCulled", "GovernorRolledBack"]
    assert all(r.event.epoch == epoch for r in records)
    culls = [r.event for r in records if isinstance(r.event, ev.SeedCulled)]
    assert [(c.slot, c.stage_at_cull, c.reason, c.initiator) for c in culls] == [
        ("mid", Stage.BLENDING, "governor_rollback", "governor"), ("late", Stage.GERMINATED, "governor_rollback", "governor")]
    assert all(r.event.trigger == "rollback" for r in records if isinstance(r.event, ev.StageChanged))
    assert records[-1].event.culled == ("mid#2", "late#3") and records[-1].event.rollback_index == 1
    assert run.slot("early").stage == Stage.FOSSILIZED and run.slot("early").seed.alpha == 1.0
    assert run.slot("mid").stage == Stage.CULLED and run.slot("late").stage == Stage.CULLED
    again = run.must(cmd.RollBack(epoch=epoch, reason="nan_loss", restored_epoch=epoch - 2, loss=math.nan,
                                  threshold=None, consecutive_panics=2, history_mean=None, history_std=None))
    assert [type(r.event).__name__ for r in again] == ["GovernorRolledBack"]
    assert again[0].event.culled == () and again[0].event.rollback_index == 2
    # the rollback's culls enter the embargo pipeline at the tick of the epoch being trained
    run.step()
    assert run.slot("mid").stage == Stage.EMBARGOED and run.slot("mid").entered_epoch == epoch


def test_cull_by_command_records_initiator_and_alpha():
    run = Run()
    grow(run, "mid", Stage.BLENDING)
    records = run.must(cmd.Cull(slot="mid", reason="bad_seed", initiator="policy", decision_epoch=None))
    change, alpha, culled = (r.event for r in records)
    assert (change.to_stage, change.reason, change.trigger) == (Stage.CULLED, "bad_seed", "command")
    assert alpha.new == 0.0 and alpha.reason == "cull"
    assert (culled.initiator, culled.stage_at_cull, culled.reason) == ("policy", Stage.BLENDING, "bad_seed")
    assert run.slot().seed.alpha == 0.0
    run2 = Run()
    grow(run2, "mid", Stage.TRAINING)
    assert [type(r.event).__name__ for r in run2.must(cmd.Cull(slot="mid", reason="x"))] == [
        "StageChanged", "SeedCulled"]  # no AlphaChanged when alpha is already 0


# -- decode_command -----------------------------------------------------------------------------------------

COMMAND_EXAMPLES = [
    cmd.StartRun(run=run_started({"embargo_epochs": 2})),
    start_episode(1, ("mid",)),
    cmd.Germinate(env=1, slot="mid", blueprint="norm", blend=ev.Blend(kind="gated", steps=3),
                  probe=cmd.ProbeReport(shape_ok=True, finite=False, identity=None, param_count=17, blend_params=4),
                  decision_epoch=3),
    cmd.Advance(env=0, slot="late", decision_epoch=2),
    cmd.Fossilize(slot="mid"),
    cmd.Cull(slot="early", reason="policy_cull", initiator="policy", decision_epoch=7),
    cmd.Wait(env=1, decision_epoch=1),
    cmd.RecordEpoch(epoch=4, metrics=epoch_metrics(4, 71.25), measurements=(
        cmd.SlotMeasurement(slot="mid", seed_id="mid#1", grad_ratio=0.3, seed_grad_norm=1.0, host_grad_norm=2.0,
                            isolation_leaks=0, finite=True, vanishing=False, exploding=False,
                            counterfactual=cmd.CounterfactualSample(kind="ablation", alpha=0.0, real_acc=71.25,
                                                                    ablated_acc=70.0, real_loss=1.0,
                                                                    ablated_loss=1.2, n=100)),
        cmd.SlotMeasurement(slot="late", seed_id="late#2"),
    )),
    cmd.Tick(env=1, epoch=4),
    cmd.RollBack(epoch=5, reason="lobotomy", restored_epoch=3, loss=12.0, threshold=None, consecutive_panics=2,
                 history_mean=1.0, history_std=None, decision_epoch=4),
    cmd.RecordDecision(decision=decision(3)),
    cmd.RejectAction(decision_epoch=3, command=ev.PolicyCommand(op="germinate", slot="mid", blueprint="norm"),
                     code="slot_unavailable", message="busy"),
    cmd.RecordReward(reward=reward(4, 3)),
    cmd.RecordCheckpoint(path="ckpt/e3.pt", sha256="ab" * 32, size=10, covers_seq=99, kind="full"),
    cmd.RecordPolicyUpdate(update=ev.PolicyUpdated(
        update=1, round=1, episodes_completed=1, steps=10, segments=1, ppo_epochs=1, epochs_run=1,
        early_stopped=False, stop_epoch=None, stop_minibatch=None, approx_kl=0.0, kl={"op": 0.1}, clip_fraction={},
        entropy={}, applicable={}, policy_loss=0.0, value_loss=0.0, explained_variance=None, grad_norm_mean=0.0,
        grad_norm_max=0.0, lr=3e-4, entropy_coef=0.01, reward_std=1.0, observations=1, logprob_drift=0.0,
        advantage_mean=0.0, advantage_std=1.0, return_mean=0.0, return_std=0.0, op_counts={}, rollbacks=0,
        wall_time_s=0.0)),
    cmd.FinishEpisode(env=1),
    cmd.FinishRun(status="failed", final={"val_acc": 50.0, "test_acc": None}, error_type="X", error_message="boom"),
    cmd.ExtendEpisode(env=1, max_epochs=45),
]


def test_every_command_type_has_an_example():
    assert {type(c) for c in COMMAND_EXAMPLES} == set(cmd.AnyCommand.__args__)


@pytest.mark.parametrize("command", COMMAND_EXAMPLES, ids=lambda c: type(c).__name__)
def test_decode_command_round_trips(command):
    data = cmd.encode_command(command)
    assert cmd.decode_command(data) == command
    assert cmd.decode_command(bytes(data)) == command


def _tamper(command, path, key, value) -> bytes:
    raw = msgspec.msgpack.decode(cmd.encode_command(command))
    node = raw
    for p in path:
        node = node[p]
    node[key] = value
    return msgspec.msgpack.encode(raw)


@pytest.mark.parametrize("command", COMMAND_EXAMPLES, ids=lambda c: type(c).__name__)
def test_decode_command_rejects_unknown_fields(command):
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        cmd.decode_command(_tamper(command, (), "surprise", 1))


@pytest.mark.parametrize("path", [("probe",), ("measurements", 0), ("measurements", 0, "counterfactual")])
def test_decode_command_rejects_unknown_nested_command_fields(path):
    source = COMMAND_EXAMPLES[2] if path == ("probe",) else COMMAND_EXAMPLES[7]
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        cmd.decode_command(_tamper(source, path, "surprise", 1))


def test_decode_command_rejects_unknown_tags_and_bad_types():
    for data in (
        msgspec.msgpack.encode({"type": "Explode", "env": 0}),
        msgspec.msgpack.encode({"env": 0, "slot": "mid"}),  # no tag
        _tamper(cmd.Tick(epoch=1), (), "epoch", "one"),
        _tamper(cmd.Tick(epoch=1), (), "epoch", None),
        msgspec.msgpack.encode({"type": "Advance", "env": 0}),  # missing slot
        msgspec.msgpack.encode([1, 2, 3]),
    ):
        with pytest.raises(msgspec.ValidationError):
            cmd.decode_command(data)
    with pytest.raises(msgspec.DecodeError):
        cmd.decode_command(b"\xc1")


@settings(max_examples=200, deadline=None)
@given(index=st.integers(0, len(COMMAND_EXAMPLES) - 1), flips=st.lists(st.tuples(st.integers(0), st.integers(0, 255)),
                                                                       min_size=1, max_size=3))
def test_decode_command_fails_only_with_msgspec_errors(index, flips):
    data = bytearray(cmd.encode_command(COMMAND_EXAMPLES[index]))
    for pos, byte in flips:
        data[pos % len(data)] = byte
    try:
        decoded = cmd.decode_command(bytes(data))
    except msgspec.DecodeError:  # ValidationError is a DecodeError
        return
    assert isinstance(decoded, cmd.Command)


@pytest.mark.parametrize("where", [b"Tick", b"mid"])
def test_decode_command_invalid_utf8(where):
    command = cmd.Tick(epoch=1) if where == b"Tick" else cmd.Cull(slot="mid", reason="x")
    data = bytearray(cmd.encode_command(command))
    data[data.index(where)] = 0x80
    with pytest.raises(msgspec.DecodeError):
        cmd.decode_command(bytes(data))


@given(st.binary(max_size=64))
@settings(max_examples=200, deadline=None)
def test_decode_command_on_garbage(data):
    try:
        cmd.decode_command(data)
    except msgspec.DecodeError:
        pass


# -- LifecycleConfig: every field changes behaviour ------------------------------------------------------

# Consumed by the torch side (isolation, gradient statistics, leak checks, fossil training and ablation),
# not by the decider. A field belongs here only if the decider's event stream ignores it, which
# `test_torch_side_fields_do_not_change_the_decider` checks.
TORCH_SIDE_FIELDS = {
    "isolate_cnn_after_training", "isolate_transformer_after_training", "fossilized_trainable",
    "counterfactual_fossilized", "grad_stats_stride", "gradient_ratio_eps", "leak_check_stride",
}


def lifecycle_script(run: Run) -> None:
    """Germinate mid, pass every gate, fossilize when possible."""
    run.step(lambda r: [germinate("mid")])
    run.steps(13, fossilize_when_ready())


def leaky_script(run: Run) -> None:
    run.step(lambda r: [germinate("mid")])
    run.steps(6, measure={"mid": {"leaks": 1}})


def ema_script(run: Run) -> None:
    run.step(lambda r: [germinate("mid")])
    run.steps(6, measure=lambda slot, epoch: {"ratio": 1.0 if epoch == 2 else 0.01})


def two_seeds_script(run: Run) -> None:
    run.step(lambda r: [germinate("mid"), germinate("early")])
    run.steps(2)


def probation_script(run: Run) -> None:
    run.step(lambda r: [germinate("mid")])
    run.steps(14)


def cull_script(run: Run) -> None:
    run.step(lambda r: [germinate("mid")])
    run.step(lambda r: [cmd.Cull(slot="mid", reason="x")])
    for _ in range(9):
        run.step(lambda r: [germinate("mid")] if r.slot().stage == Stage.DORMANT else [])


def early_advance_script(run: Run) -> None:
    run.step(lambda r: [germinate("mid")])
    run.steps(10, lambda r: [cmd.Advance(slot="mid")] if r.slot().stage == Stage.BLENDING else [])


# field -> (changed value, base config of the scenario, scenario)
SCENARIOS: dict[str, tuple[Any, dict, Callable[[Run], None]]] = {
    "g2_min_shadow_gain": (2.5, {}, lifecycle_script),  # the measured shadow gain is 2.0 pp
    "g2_max_isolation_leaks": (3, {}, leaky_script),
    "g2_min_training_epochs": (1, {}, lifecycle_script),
    "g2_min_gradient_ratio": (0.6, {}, lifecycle_script),
    "g3_min_blending_epochs": (6, {}, lifecycle_script),
    "g3_min_alpha": (0.5, {"gate_mode_g3": "explicit", "g3_min_blending_epochs": 0}, early_advance_script),
    "g5_min_contribution": (3.0, {}, lifecycle_script),
    "gradient_ratio_ema_decay": (0.0, {}, ema_script),
    "max_seeds": (1, {}, two_seeds_script),
    "max_probation_epochs": (2, {}, probation_script),
    "embargo_epochs": (2, {}, cull_script),
    "resetting_epochs": (3, {}, cull_script),
    "gate_mode_g1": ("explicit", {}, lifecycle_script),
    "gate_mode_g2": ("explicit", {}, lifecycle_script),
    "gate_mode_g3": ("explicit", {}, lifecycle_script),
    "default_blend": ("linear", {}, lifecycle_script),
    "blend_steps": (2, {}, lifecycle_script),
    "sigmoid_steepness": (4.0, {}, lifecycle_script),
}


def behaviour(lifecycle: dict, script: Callable[[Run], None]) -> list[tuple]:
    run = Run(lifecycle)
    script(run)
    return run.trace[2:]  # past StartRun (whose config differs by construction) and StartEpisode


def test_every_config_field_has_a_scenario_or_is_torch_side():
    fields = {f.name for f in attrs.fields(LifecycleConfig)}
    assert not set(SCENARIOS) & TORCH_SIDE_FIELDS
    assert set(SCENARIOS) | TORCH_SIDE_FIELDS == fields
    assert fields - set(SCENARIOS) == TORCH_SIDE_FIELDS


@pytest.mark.parametrize("field", sorted(SCENARIOS))
def test_config_field_changes_behaviour(field):
    changed, base, script = SCENARIOS[field]
    default = attrs.fields_dict(LifecycleConfig)[field].default
    assert base.get(field, default) != changed
    LifecycleConfig(**{**base, field: changed})  # a valid value
    assert behaviour(base, script) != behaviour({**base, field: changed}, script)


TORCH_SIDE_CHANGES = {
    "isolate_cnn_after_training": False, "isolate_transformer_after_training": True, "fossilized_trainable": False,
    "counterfactual_fossilized": True, "grad_stats_stride": 4, "gradient_ratio_eps": 1e-3, "leak_check_stride": 3,
}


def test_torch_side_fields_do_not_change_the_decider():
    assert set(TORCH_SIDE_CHANGES) == TORCH_SIDE_FIELDS
    for script in (lifecycle_script, cull_script, leaky_script):
        assert behaviour(TORCH_SIDE_CHANGES, script) == behaviour({}, script)


def test_isolation_flags_drive_isolated():
    for stage in (Stage.BLENDING, Stage.PROBATIONARY):
        assert stages.isolated(stage, "cnn", True, False) and not stages.isolated(stage, "cnn", False, False)
        assert stages.isolated(stage, "transformer", False, True)
        assert not stages.isolated(stage, "transformer", True, False)
    for flags in ((True, True), (False, False)):
        assert stages.isolated(Stage.TRAINING, "cnn", *flags) and stages.isolated(Stage.TRAINING, "transformer", *flags)
        assert not stages.isolated(Stage.FOSSILIZED, "cnn", *flags)
        assert not stages.isolated(Stage.FOSSILIZED, "transformer", *flags)
        assert not stages.isolated(Stage.GERMINATED, "cnn", *flags)


OUT_OF_RANGE = [
    ("g2_max_isolation_leaks", -1), ("g2_min_training_epochs", -1), ("g2_min_gradient_ratio", -0.01),
    ("g3_min_blending_epochs", -1), ("g3_min_alpha", 1.01), ("g3_min_alpha", -0.1), ("g3_min_alpha", math.nan),
    ("gradient_ratio_ema_decay", 1.5), ("gradient_ratio_ema_decay", -0.1), ("gradient_ratio_eps", 0.0),
    ("grad_stats_stride", 0), ("max_seeds", -1), ("max_probation_epochs", 0), ("embargo_epochs", 0),
    ("resetting_epochs", 0), ("gate_mode_g1", "sometimes"), ("gate_mode_g2", "Auto"), ("gate_mode_g3", ""),
    ("default_blend", "cubic"), ("blend_steps", 0), ("sigmoid_steepness", 0.0), ("sigmoid_steepness", -1.0),
    ("leak_check_stride", 0),
]


@pytest.mark.parametrize("field, value", OUT_OF_RANGE)
def test_out_of_range_config_is_rejected(field, value):
    with pytest.raises((ValueError, TypeError)):
        LifecycleConfig(**{field: value})


@pytest.mark.parametrize("field", ["g2_min_shadow_gain", "g5_min_contribution"])
def test_nan_thresholds_are_rejected(field):
    with pytest.raises(ValueError):
        LifecycleConfig(**{field: math.nan})


@pytest.mark.parametrize("steepness", [1500.0, math.inf])
def test_every_accepted_steepness_gives_a_valid_ramp(steepness):
    try:
        LifecycleConfig(sigmoid_steepness=steepness)
    except ValueError:
        return  # rejecting it is fine too
    run = Run({"sigmoid_steepness": steepness, "blend_steps": 2})
    grow(run, "mid", Stage.PROBATIONARY)
    alphas = [a.new for a in run.events(ev.AlphaChanged)]
    assert all(0.0 < a <= 1.0 for a in alphas) and alphas[-1] == 1.0


@pytest.mark.parametrize("lifecycle", [{"embargo_epochs": 0}, {"no_such_knob": 1}], ids=["out_of_range", "unknown"])
def test_start_run_with_an_invalid_config_is_refused(lifecycle):
    """evolve is total for every record decide can produce (events §2): so decide must refuse, and a
    foreign log holding such a RunStarted is a ReplayError."""
    with pytest.raises(DomainError) as refused:
        decide(cmd.StartRun(run=run_started(lifecycle)), initial_state())
    assert refused.value.code == "invalid_config"
    record = Record(seq=0, run_id="r", env=None, episode=None, ts=0, schema=SCHEMA_VERSION, batch_end=True,
                    event=run_started(lifecycle))
    with pytest.raises(ReplayError):
        evolve(initial_state(), record)
