"""The decider state-machine test (events §11): random command sequences through the real decider,
side by side with the plain-Python reference model in tests/reference_model.py.

Every rule calls `decide`. A `DomainError` must carry the code the model predicts and leave state
and log untouched; otherwise the batch is stamped, appended, folded, and checked:
  - seq is dense and `batch_end` closes every batch;
  - each `StageChanged` starts from the slot's current stage and is in the transition table of
    lifecycle §2.2 (so FOSSILIZED is never left); a gated target has a passing verdict of its gate
    earlier in the same batch; a seed is only germinated into a DORMANT slot (one live seed per slot);
  - a Tick batch ends with `EpochTicked`, whose digest is `state_digest` of the folded env state;
  - after a cull the slot is EMBARGOED for `embargo_epochs` ticks (embargo_remaining falling by one
    per tick), RESETTING for `resetting_epochs` ticks, and DORMANT exactly 1 + embargo + resetting
    ticks after the cull;
  - alpha matches the stage; the model's stages, seed ids, entry epochs, ramp steps and alphas equal
    the decider's;
  - the log, encoded to bytes, decoded and folded from `initial_state()`, equals the ledger's state
    (incrementally after every batch, and from scratch at every batch boundary in `teardown`).
"""

import math

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from esper.events import catalogue as ev
from esper.events.codec import decode_record, encode_record
from esper.events.enums import Gate, Stage
from esper.lifecycle import DomainError, LifecycleConfig, evolve, initial_state, state_digest
from esper.lifecycle import commands as cmd
from reference_model import ReferenceModel, ramp
from support import CATALOGUE, SLOTS, Ledger, epoch_metrics, probe, run_started

SLOT_CHOICES = SLOTS + ("bogus",)
BLUEPRINTS = ("conv_light", "norm", "noop", "bogus")

# lifecycle §2.2, written out here rather than imported, so the test checks the code's table too
TRANSITIONS = {
    (Stage.DORMANT, Stage.GERMINATED),
    (Stage.GERMINATED, Stage.TRAINING), (Stage.GERMINATED, Stage.CULLED),
    (Stage.TRAINING, Stage.BLENDING), (Stage.TRAINING, Stage.CULLED),
    (Stage.BLENDING, Stage.PROBATIONARY), (Stage.BLENDING, Stage.CULLED),
    (Stage.PROBATIONARY, Stage.FOSSILIZED), (Stage.PROBATIONARY, Stage.CULLED),
    (Stage.CULLED, Stage.EMBARGOED), (Stage.EMBARGOED, Stage.RESETTING), (Stage.RESETTING, Stage.DORMANT),
}
GATE_OF = {Stage.GERMINATED: Gate.G0, Stage.TRAINING: Gate.G1, Stage.BLENDING: Gate.G2,
           Stage.PROBATIONARY: Gate.G3, Stage.FOSSILIZED: Gate.G5}
LIVE = {Stage.GERMINATED, Stage.TRAINING, Stage.BLENDING, Stage.PROBATIONARY, Stage.FOSSILIZED}
ZERO_ALPHA = {Stage.GERMINATED, Stage.TRAINING, Stage.CULLED, Stage.EMBARGOED, Stage.RESETTING}

CONFIGS = st.fixed_dictionaries(
    {
        "gate_mode_g1": st.sampled_from(["auto", "explicit"]),
        "gate_mode_g2": st.sampled_from(["auto", "explicit"]),
        "gate_mode_g3": st.sampled_from(["auto", "explicit"]),
    },
    optional={
        "g2_min_training_epochs": st.integers(0, 3),
        "g2_max_isolation_leaks": st.integers(0, 2),
        "g3_min_blending_epochs": st.integers(0, 3),
        "g3_min_alpha": st.sampled_from([0.5, 0.95, 1.0]),
        "blend_steps": st.integers(1, 5),
        "default_blend": st.sampled_from(["linear", "sigmoid", "gated"]),
        "embargo_epochs": st.integers(1, 5),
        "resetting_epochs": st.integers(1, 3),
        "max_probation_epochs": st.integers(1, 5),
        "max_seeds": st.integers(0, 3),
    },
)
ENVS = st.sampled_from([0, 0, 0, 0, 1, 1, 2])  # n_envs is 1 or 2, so 2 (and sometimes 1) is an unknown env
BLENDS = st.one_of(
    st.none(),
    st.builds(ev.Blend, kind=st.sampled_from(["linear", "sigmoid", "gated", "cubic"]), steps=st.integers(0, 5)),
)
PROBES = st.sampled_from(["ok", "ok", "ok", "shape", "finite", "identity_false", "identity_none", "params"])
ACCURACY = st.floats(0.0, 100.0, allow_nan=False)


def decision(epoch: int) -> ev.PolicyDecided:
    return ev.PolicyDecided(epoch=epoch, policy="none", policy_id="test", commands=(), action={},
                            action_index={}, legal={}, rationale="")


def reward(epoch: int, decision_epoch: int, total: float) -> ev.RewardComputed:
    return ev.RewardComputed(
        epoch=epoch, decision_epoch=decision_epoch, mode="shaped", components={"accuracy": total},
        total_raw=total, governor=False, terminated=False, truncated=False, score_before=0.0,
        score_after=0.0, potential_before=0.0, potential_after=0.0, seed_params_total=0, host_params=320,
        seeds=(),
    )


POLICY_UPDATE = ev.PolicyUpdated(
    update=1, round=1, episodes_completed=1, steps=10, segments=1, ppo_epochs=1, epochs_run=1,
    early_stopped=False, stop_epoch=None, stop_minibatch=None, approx_kl=0.0, kl={}, clip_fraction={},
    entropy={}, applicable={}, policy_loss=0.0, value_loss=0.0, explained_variance=None, grad_norm_mean=0.0,
    grad_norm_max=0.0, lr=3e-4, entropy_coef=0.01, reward_std=1.0, observations=1, logprob_drift=0.0,
    advantage_mean=0.0, advantage_std=1.0, return_mean=0.0, return_std=0.0, op_counts={}, rollbacks=0,
    wall_time_s=0.0,
)


def probe_report(kind: str, blueprint: str, slot: str) -> cmd.ProbeReport:
    name = blueprint if blueprint in {e.name for e in CATALOGUE} else "noop"
    if kind == "ok":
        return probe(name, slot if slot in SLOTS else "mid")
    changes = {"shape": {"shape_ok": False}, "finite": {"finite": False}, "identity_false": {"identity": False},
               "identity_none": {"identity": None}, "params": {"param_count": 123_457}}[kind]
    return probe(name, slot if slot in SLOTS else "mid", **changes)


def probe_fields(report: cmd.ProbeReport) -> dict:
    return {f: getattr(report, f) for f in report.__struct_fields__}


class DeciderMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.ledger = Ledger()
        self.model = ReferenceModel(SLOTS, {e.name: (e.identity_at_birth, dict(e.params)) for e in CATALOGUE})
        self.refold = initial_state()
        self.stage: dict[tuple[int, str], Stage] = {}  # from the StageChanged stream only
        self.since_cull: dict[tuple[int, str], int] = {}  # ticks since the slot's seed was culled
        self.verdict_ids: dict[int, set[str]] = {}  # seed ids named by G0 verdicts, this episode
        self.fossils: set[tuple[int, str]] = set()
        self.boundaries: list[tuple[int, object]] = []  # (records so far, state) after each batch
        self.config = LifecycleConfig()
        self.steps = 0

    # -- the engine step, checked -------------------------------------------------------------

    def do(self, command: cmd.Command, predicted: str | None) -> list | None:
        state, n = self.ledger.state, len(self.ledger.records)
        envs = dict(state.envs)
        try:
            records = self.ledger.execute(command)
        except DomainError as exc:
            assert predicted is not None, f"decider refused {command!r} with {exc.code}; model accepts it"
            assert exc.code == predicted, f"{type(command).__name__}: decider says {exc.code}, model {predicted}"
            assert self.ledger.state is state and len(self.ledger.records) == n
            assert state.envs.keys() == envs.keys() and all(state.envs[k] is v for k, v in envs.items())
            self.compare_model()
            return None
        assert predicted is None, f"model predicts {predicted} for {command!r}; decider accepted it"
        self.check_batch(command, records, n)
        self.compare_model()
        return records

    def check_batch(self, command: cmd.Command, records: list, n: int) -> None:
        assert [r.seq for r in records] == list(range(n, n + len(records)))
        assert [r.batch_end for r in records] == [i == len(records) - 1 for i in range(len(records))]
        if isinstance(command, cmd.Tick):
            assert records and isinstance(records[-1].event, ev.EpochTicked)
        passed: set[tuple] = set()
        culled_here: set[tuple[int, str]] = set()
        state = self.ledger.state
        for r in records:
            self.refold = evolve(self.refold, decode_record(encode_record(r)))
            e = r.event
            if isinstance(e, ev.EpisodeStarted):
                for s in SLOTS:
                    self.stage[(r.env, s)] = Stage.DORMANT
                    self.since_cull.pop((r.env, s), None)
                    self.fossils.discard((r.env, s))
                self.verdict_ids[r.env] = set()
            elif isinstance(e, ev.GateEvaluated):
                assert e.gate in set(Gate) and int(e.gate) != 4 and e.target_stage == _target(e.gate)
                assert e.passed == all(c.passed for c in e.checks)
                if e.gate == Gate.G0:  # every germination attempt names a new seed id
                    assert e.seed_id.startswith(f"{e.slot}#") and e.seed_id not in self.verdict_ids[r.env]
                    self.verdict_ids[r.env].add(e.seed_id)
                if e.passed:
                    passed.add((e.gate, e.slot, e.seed_id))
            elif isinstance(e, ev.SeedGerminated):
                assert self.stage[(r.env, e.slot)] == Stage.DORMANT, "a second live seed in one slot"
            elif isinstance(e, ev.StageChanged):
                key = (r.env, e.slot)
                assert e.from_stage == self.stage[key], f"{e.seed_id}: from {e.from_stage!r}, slot is {self.stage[key]!r}"
                assert (e.from_stage, e.to_stage) in TRANSITIONS, f"invalid {e.from_stage!r} -> {e.to_stage!r}"
                if e.to_stage in GATE_OF:
                    assert (GATE_OF[e.to_stage], e.slot, e.seed_id) in passed, f"ungated move to {e.to_stage!r}"
                self.stage[key] = e.to_stage
                if e.to_stage == Stage.CULLED:
                    self.since_cull[key] = 0
                    culled_here.add(key)
                if e.to_stage == Stage.FOSSILIZED:
                    self.fossils.add(key)
            elif isinstance(e, ev.EpochTicked):
                assert r is records[-1]
                assert e.state_digest == state_digest(state.envs[r.env])
                self.count_down(r.env, e.epoch, culled_here)
            elif isinstance(e, ev.EpisodeFinished):
                assert e.state_digest == state_digest(state.envs[r.env])
        assert self.refold == state, "folding the decoded log differs from the live state"
        if records:
            self.boundaries.append((len(self.ledger.records), state))

    def count_down(self, env: int, epoch: int, culled_here: set) -> None:
        emb, res = self.config.embargo_epochs, self.config.resetting_epochs
        env_state = self.ledger.state.envs[env]
        for key in [k for k in self.since_cull if k[0] == env]:
            slot = env_state.slot(key[1])
            if key in culled_here:  # culled by this very tick
                assert slot.stage == Stage.CULLED
                continue
            self.since_cull[key] += 1
            k = self.since_cull[key]
            if k <= emb:
                assert slot.stage == Stage.EMBARGOED, f"{key} is {slot.stage!r} {k} ticks after its cull"
                assert emb - slot.epochs_in_stage(epoch) == emb - (k - 1)  # embargo_remaining falls by 1
            elif k <= emb + res:
                assert slot.stage == Stage.RESETTING, f"{key} is {slot.stage!r} {k} ticks after its cull"
            else:
                assert k == 1 + emb + res and slot.stage == Stage.DORMANT, f"{key}: {slot.stage!r} after {k} ticks"
                del self.since_cull[key]

    def compare_model(self) -> None:
        state, model = self.ledger.state, self.model
        assert state.status == model.status
        assert state.envs.keys() == model.envs.keys()
        for env_id, me in model.envs.items():
            re = state.envs[env_id]
            assert (re.episode, re.status, re.epoch, re.ticked, re.seed_counter, re.max_epochs) == (
                me.episode, "running" if me.running else "finished", me.epoch, me.ticked, me.seed_counter,
                me.max_epochs)
            assert set(re.decisions) == me.decisions
            for slot in re.slots:
                ms = me.slots[slot.slot_id]
                where = f"env {env_id} {slot.slot_id}"
                assert (slot.enabled, slot.stage) == (ms.enabled, ms.stage), f"{where}: {slot.stage!r}, model {ms.stage!r}"
                if slot.stage == Stage.DORMANT:
                    assert slot.seed is None and ms.seed is None
                    continue
                assert slot.entered_epoch == ms.entered, where
                assert (slot.seed.seed_id, slot.seed.step) == (ms.seed.seed_id, ms.seed.step), where
                assert math.isclose(slot.seed.alpha, ms.seed.alpha, rel_tol=1e-12, abs_tol=1e-12), where
                if slot.stage in LIVE:  # measurements: the EMA, its freshness, training leaks, health
                    seed, ref = slot.seed, ms.seed
                    assert (seed.ratio_epoch, seed.training_leaks, seed.healthy) == (
                        ref.ratio_epoch, ref.leaks, ref.healthy), where
                    assert (seed.grad_ratio_ema is None) == (ref.ema is None), where
                    assert ref.ema is None or math.isclose(seed.grad_ratio_ema, ref.ema, rel_tol=1e-9), where

    # -- rules ---------------------------------------------------------------------------------

    @initialize(lifecycle=CONFIGS, n_envs=st.integers(1, 2))
    def start(self, lifecycle, n_envs):
        self.config = LifecycleConfig(**lifecycle)
        self.do(cmd.StartRun(run=run_started(lifecycle, n_envs=n_envs)), self.model.start_run(lifecycle, n_envs))
        self.do(self.start_episode_command(0, SLOTS), self.model.start_episode(0, SLOTS))

    def start_episode_command(self, env, slots_enabled):
        return cmd.StartEpisode(env=env, episode_seed=env, host_seed=env, host_params=320,
                                slots_enabled=slots_enabled, max_epochs=30)

    def env_state(self, env):
        return self.ledger.state.envs.get(env)

    def epoch_of(self, env) -> int:
        e = self.env_state(env)
        return 0 if e is None else e.epoch

    @rule()
    def start_run_again(self):
        self.do(cmd.StartRun(run=run_started()), self.model.start_run({}, 1))

    @rule(env=ENVS, slots_enabled=st.sampled_from(
        [SLOTS, SLOTS, ("early", "mid"), ("mid",), ("late", "early"), (), ("mid", "bogus")]))
    def start_episode(self, env, slots_enabled):
        self.do(self.start_episode_command(env, slots_enabled), self.model.start_episode(env, slots_enabled))

    @rule(env=ENVS, slot=st.sampled_from(SLOT_CHOICES), blueprint=st.sampled_from(BLUEPRINTS), blend=BLENDS,
          probe_kind=PROBES)
    def germinate(self, env, slot, blueprint, blend, probe_kind):
        self.germinate_now(env, slot, blueprint, blend, probe_kind)

    def germinate_now(self, env, slot, blueprint, blend, probe_kind):
        report = probe_report(probe_kind, blueprint, slot)
        predicted = self.model.germinate(env, slot, blueprint, None if blend is None else (blend.kind, blend.steps),
                                         probe_fields(report))
        records = self.do(cmd.Germinate(env=env, slot=slot, blueprint=blueprint, blend=blend, probe=report),
                          predicted)
        if records is not None:
            seed_id, passed = self.model.last_germination
            assert records[0].event.seed_id == seed_id and records[0].event.passed == passed
            assert len(records) == (3 if passed else 1)

    @rule(env=ENVS, slot=st.sampled_from(SLOT_CHOICES))
    def advance(self, env, slot):
        self.do(cmd.Advance(env=env, slot=slot), self.model.advance(env, slot))

    @rule(env=ENVS, slot=st.sampled_from(SLOT_CHOICES))
    def fossilize(self, env, slot):
        self.do(cmd.Fossilize(env=env, slot=slot), self.model.fossilize(env, slot))

    @rule(env=ENVS, slot=st.sampled_from(SLOT_CHOICES),
          reason=st.sampled_from(["policy_cull", "negative_counterfactual", "operator_says", ""]),
          initiator=st.sampled_from(["policy", "operator"]))
    def cull(self, env, slot, reason, initiator):
        self.do(cmd.Cull(env=env, slot=slot, reason=reason, initiator=initiator), self.model.cull(env, slot))

    @rule(env=ENVS)
    def wait(self, env):
        records = self.do(cmd.Wait(env=env), self.model.wait(env))
        assert records in (None, [])

    def measurements(self, data, env: int, epoch: int, val_acc: float) -> tuple:
        """Random measurements for the env's live seeds; now and then a stale one."""
        env_state = self.env_state(env)
        out = []
        for slot in env_state.slots if env_state is not None else ():
            if slot.stage not in LIVE:
                continue
            if not data.draw(st.sampled_from([True, True, True, False]), label="measured"):
                continue
            match = "shadow" if slot.stage == Stage.TRAINING else "ablation"
            # each input is mostly one that passes its gate check (G2 in TRAINING, G5 later), so seeds
            # get far, and sometimes missing or failing on its own, so each check gets to decide
            what = data.draw(st.sampled_from(["good"] * 6 + ["none", "ablation", "shadow", "bad"]), label="cf")
            kind = {"good": match, "bad": match}.get(what, what)
            good = what == "good" and slot.stage != Stage.BLENDING  # no gate reads a BLENDING sample
            gain = data.draw(st.floats(0.5, 5.0) if good else st.floats(-5.0, 5.0), label="contribution")
            ratio = data.draw(st.sampled_from(["good"] * 6 + ["none", "bad"]), label="ratio kind")
            ratio = {"none": None}.get(ratio, data.draw(st.floats(0.05, 1.0) if ratio == "good" else st.floats(0.0, 0.05),
                                                        label="ratio"))
            leaks = data.draw(st.sampled_from([0] * 8 + [1, 2, None]), label="leaks")
            finite = data.draw(st.sampled_from([True] * 8 + [False, None]), label="finite")
            cf = None
            if kind != "none":
                other = min(100.0, max(0.0, val_acc + gain if kind == "shadow" else val_acc - gain))
                cf = cmd.CounterfactualSample(kind=kind, alpha=1.0 if kind == "shadow" else 0.0, real_acc=val_acc,
                                              ablated_acc=other, real_loss=1.0, ablated_loss=1.1, n=10)
            out.append(cmd.SlotMeasurement(
                slot=slot.slot_id, seed_id=slot.seed.seed_id, grad_ratio=ratio,
                seed_grad_norm=data.draw(st.sampled_from([0.1, 0.0, 1e9, math.inf, math.nan]), label="norm"),
                host_grad_norm=0.2, isolation_leaks=leaks, finite=finite, counterfactual=cf,
            ))
        if env_state is not None and data.draw(st.integers(0, 9), label="stale") == 0:
            # a wrong id for a live seed, the id of a culled one, an empty slot, or an unknown slot
            options = [(s.slot_id, s.seed.seed_id + ("0" if s.stage in LIVE else "")) if s.seed is not None
                       else (s.slot_id, f"{s.slot_id}#1") for s in env_state.slots] + [("bogus", "bogus#1")]
            slot_id, seed_id = data.draw(st.sampled_from(options), label="stale")
            out.append(cmd.SlotMeasurement(slot=slot_id, seed_id=seed_id, grad_ratio=0.5, finite=True))
        return tuple(out)

    def record_epoch_now(self, data, env: int, epoch: int, metrics_epoch: int) -> bool:
        val_acc = data.draw(ACCURACY, label="val_acc")
        ms = self.measurements(data, env, epoch, val_acc)
        plain = []
        for m in ms:
            cf = m.counterfactual
            value = None
            if cf is not None:
                value = (cf.kind, cf.ablated_acc - cf.real_acc if cf.kind == "shadow" else cf.real_acc - cf.ablated_acc)
            plain.append({"slot": m.slot, "seed_id": m.seed_id, "grad_ratio": m.grad_ratio,
                          "leaks": m.isolation_leaks, "finite": m.finite, "cf": value})
        predicted = self.model.record_epoch(env, epoch, metrics_epoch, plain)
        command = cmd.RecordEpoch(env=env, epoch=epoch, metrics=epoch_metrics(metrics_epoch, val_acc), measurements=ms)
        records = self.do(command, predicted)
        if records is not None:
            real = [r for r in records if isinstance(r.event, ev.CounterfactualMeasured)]
            for r in real:  # a counterfactual's real_acc is the epoch's val_acc
                assert r.event.real_acc == records[0].event.val_acc
        return records is not None

    @rule(data=st.data(), env=ENVS, offset=st.sampled_from([1, 1, 1, 0, 2, -1]), metrics_off=st.sampled_from([0, 0, 0, 1]))
    def record_epoch(self, data, env, offset, metrics_off):
        epoch = self.epoch_of(env) + offset
        self.record_epoch_now(data, env, epoch, epoch + metrics_off)

    @rule(env=ENVS, offset=st.sampled_from([0, 0, 0, 1, -1]))
    def tick(self, env, offset):
        epoch = self.epoch_of(env) + offset
        self.do(cmd.Tick(env=env, epoch=epoch), self.model.tick(env, epoch))

    @rule(data=st.data(), n=st.integers(1, 8))
    def engine_steps(self, data, n):
        """n engine steps with a random controller: RecordEpoch, maybe one command per slot, Tick."""
        self.run_engine_steps(data, n)

    # the same rule three more times: hypothesis picks rules uniformly, and the lifecycle needs epochs
    engine_steps_2 = rule(data=st.data(), n=st.integers(1, 8))(lambda self, data, n: self.run_engine_steps(data, n))
    engine_steps_3 = rule(data=st.data(), n=st.integers(1, 8))(lambda self, data, n: self.run_engine_steps(data, n))
    engine_steps_4 = rule(data=st.data(), n=st.integers(1, 8))(lambda self, data, n: self.run_engine_steps(data, n))

    def run_engine_steps(self, data, n):
        running = sorted(k for k, e in self.model.envs.items() if e.running)
        env = data.draw(st.sampled_from(running * 4 + [0, 1]), label="env")
        for _ in range(n):
            epoch = self.epoch_of(env) + 1
            if not self.record_epoch_now(data, env, epoch, epoch):
                return
            for slot in self.env_state(env).slots:
                culls = 1 if slot.stage in (Stage.GERMINATED, Stage.TRAINING, Stage.BLENDING, Stage.PROBATIONARY) else 4
                op = data.draw(st.sampled_from(["none"] * 8 + ["natural"] * 10 + ["cull"] * culls), label="controller")
                if op == "cull":  # whatever the stage: fossils, empty and embargoed slots refuse it
                    self.do(cmd.Cull(env=env, slot=slot.slot_id, reason="policy_cull", initiator="policy"),
                            self.model.cull(env, slot.slot_id))
                elif op == "natural" and slot.stage == Stage.DORMANT:
                    self.germinate_now(env, slot.slot_id, data.draw(st.sampled_from(BLUEPRINTS[:3])), None,
                                       data.draw(st.sampled_from(["ok"] * 4 + ["finite", "params"])))
                elif op == "natural" and slot.stage == Stage.PROBATIONARY:
                    self.do(cmd.Fossilize(env=env, slot=slot.slot_id), self.model.fossilize(env, slot.slot_id))
                elif op == "natural" and slot.stage in (Stage.GERMINATED, Stage.TRAINING, Stage.BLENDING):
                    self.do(cmd.Advance(env=env, slot=slot.slot_id), self.model.advance(env, slot.slot_id))
                    if self.env_state(env).slot(slot.slot_id).stage == Stage.PROBATIONARY and data.draw(
                            st.booleans(), label="fossilize at once"):  # G5 must not read the BLENDING-time sample
                        self.do(cmd.Fossilize(env=env, slot=slot.slot_id), self.model.fossilize(env, slot.slot_id))
            self.do(cmd.Tick(env=env, epoch=epoch), self.model.tick(env, epoch))

    @rule(env=ENVS, offset=st.sampled_from([1, 1, 0, 2]), reason=st.sampled_from(["nan_loss", "lobotomy", "divergence"]),
          loss=st.sampled_from([math.nan, math.inf, 12.5]))
    def rollback(self, env, offset, reason, loss):
        epoch = self.epoch_of(env) + offset
        command = cmd.RollBack(env=env, epoch=epoch, reason=reason, restored_epoch=max(0, epoch - 1), loss=loss,
                               threshold=5.0, consecutive_panics=1, history_mean=1.0, history_std=0.1)
        records = self.do(command, self.model.rollback(env, epoch))
        if records is not None:
            last = records[-1].event
            assert isinstance(last, ev.GovernorRolledBack)
            culled = [r.event.seed_id for r in records if isinstance(r.event, ev.SeedCulled)]
            assert list(last.culled) == culled
            assert all(r.event.reason == "governor_rollback" for r in records if isinstance(r.event, ev.SeedCulled))

    @rule(env=ENVS, offset=st.sampled_from([0, 0, 0, -1, 1]))
    def record_decision(self, env, offset):
        epoch = self.epoch_of(env) + offset
        self.do(cmd.RecordDecision(env=env, decision=decision(epoch)), self.model.record_decision(env, epoch))

    def some_decision_epoch(self, data, env) -> int:
        known = sorted(self.env_state(env).decisions) if self.env_state(env) is not None else []
        if known and data.draw(st.booleans(), label="known decision"):
            return data.draw(st.sampled_from(known), label="decision epoch")
        return data.draw(st.integers(0, 12), label="decision epoch")

    @rule(data=st.data(), env=ENVS)
    def reject_action(self, data, env):
        d = self.some_decision_epoch(data, env)
        command = cmd.RejectAction(env=env, decision_epoch=d, command=ev.PolicyCommand(op="germinate", slot="mid"),
                                   code="slot_unavailable", message="occupied")
        self.do(command, self.model.refer_to_decision(env, d))

    @rule(data=st.data(), env=ENVS, total=st.floats(-1.0, 1.0))
    def record_reward(self, data, env, total):
        d = self.some_decision_epoch(data, env)
        command = cmd.RecordReward(env=env, reward=reward(self.epoch_of(env), d, total))
        self.do(command, self.model.refer_to_decision(env, d))

    @rule()
    def checkpoint(self):
        command = cmd.RecordCheckpoint(path="c.pt", sha256="0" * 64, size=1, covers_seq=len(self.ledger.records),
                                       kind="model")
        self.do(command, self.model.run_scoped_record())

    @rule()
    def policy_update(self):
        self.do(cmd.RecordPolicyUpdate(update=POLICY_UPDATE), self.model.run_scoped_record())

    @rule(env=ENVS, more=st.sampled_from([1, 5, 0, -3]))
    def extend_episode(self, env, more):
        """A resume's extension: only growth of a running episode; shorter or equal is refused."""
        current = self.env_state(env)
        max_epochs = (current.max_epochs if current is not None else 30) + more
        records = self.do(cmd.ExtendEpisode(env=env, max_epochs=max_epochs),
                          self.model.extend_episode(env, max_epochs))
        if records is not None:
            assert [type(r.event) for r in records] == [ev.EpisodeExtended]
            assert records[0].event.previous_max_epochs == current.max_epochs
            assert self.env_state(env).max_epochs == max_epochs

    @precondition(lambda self: self.steps >= 20)  # earlier, it would mostly cut exploration short
    @rule(env=ENVS)
    def finish_episode(self, env):
        self.do(cmd.FinishEpisode(env=env), self.model.finish_episode(env))

    @rule(status=st.sampled_from(["completed", "failed", "interrupted", "exploded"]))
    def finish_run(self, status):
        running = any(e.running for e in self.model.envs.values())
        if self.steps < 40 and status != "exploded" and (status != "completed" or not running):
            status = "exploded"  # ending the run early would leave little to explore
        self.do(cmd.FinishRun(status=status), self.model.finish_run(status))

    # -- invariants ------------------------------------------------------------------------------

    @invariant()
    def slots_agree_with_their_stage(self):
        self.steps += 1
        for env_id, env in self.ledger.state.envs.items():
            for slot in env.slots:
                key = (env_id, slot.slot_id)
                if slot.stage == Stage.DORMANT:
                    assert slot.seed is None
                    continue
                seed = slot.seed
                assert seed is not None  # one seed per slot: the slot's own record
                if slot.stage in ZERO_ALPHA:
                    assert seed.alpha == 0.0, f"{slot.stage!r} with alpha {seed.alpha}"
                elif slot.stage == Stage.BLENDING:
                    assert 0.0 < seed.alpha <= 1.0
                    assert math.isclose(seed.alpha, ramp(seed.blend_kind, seed.step, seed.steps_total,
                                                         self.config.sigmoid_steepness), abs_tol=1e-12)
                else:
                    assert seed.alpha == 1.0, f"{slot.stage!r} with alpha {seed.alpha}"
                if key in self.fossils:
                    assert slot.stage == Stage.FOSSILIZED
        records = self.ledger.records
        assert not records or records[-1].batch_end

    def teardown(self):
        """Fold the whole log from scratch; at every batch boundary it equals the live state then."""
        state, boundaries, i = initial_state(), iter(self.boundaries), 0
        expected = next(boundaries, None)
        for i, record in enumerate(self.ledger.records, 1):
            state = evolve(state, decode_record(encode_record(record)))
            if expected is not None and expected[0] == i:
                assert state == expected[1], f"fold through seq {i - 1} differs from the live state"
                expected = next(boundaries, None)
        assert expected is None


def _target(gate: Gate) -> Stage:
    return {g: s for s, g in GATE_OF.items()}[gate]


TestDeciderMachine = DeciderMachine.TestCase
TestDeciderMachine.settings = settings(
    max_examples=200, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
