"""A hypothesis state machine over the real torch side: a `synthetic` run's engine, its TorchBackend
(the tiny CNN host with its SeedSlots) and the real decider, driven by random germinate, advance,
cull, fossilize, alpha-override, record-epoch, tick and checkpoint-reload steps.

After every step the torch model must be the projection of the folded log (lifecycle state):
  - a slot holds a seed module iff its stage is live, and its mode, alpha buffer, isolation, blend
    kind (gate presence) and fossil status are those the stage and the folded seed say;
  - the optimizer has the host group first and exactly one group per seed that trains, holding
    exactly that seed's parameters (a fossil keeps its group with the host's learning rate when
    fossils train, else it has none and its parameters are frozen); no state for parameters
    outside the groups;
  - the projector's seed views agree with the folded stages;
  - whenever no seed has alpha > 0, the model's output equals the bare host's, bit for bit;
  - an alpha override is per call: it leaves every buffer and mode, and the next plain output,
    as they were;
  - a backend rebuilt from `state_dict()` (what a checkpoint holds) is the same projection, with
    the same output.
"""

import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from esper.compute import optimizer as opt
from esper.compute.engine import _MODES
from esper.compute.torch_backend import TorchBackend
from esper.events import catalogue as ev
from esper.events.enums import Stage
from esper.lifecycle import commands as cmd
from esper.lifecycle.stages import LIVE, isolated
from esper.policy.run_config import resolve
from esper.policy.runner import Run, load_data

SLOTS = ("early", "mid", "late")
BLUEPRINTS = ("norm", "attention", "depthwise", "conv_light", "conv_heavy", "noop", "bogus")
BLENDS = st.one_of(st.none(), st.builds(ev.Blend, kind=st.sampled_from(["linear", "sigmoid", "gated"]),
                                        steps=st.integers(1, 3)))
COMMAND = st.builds(ev.PolicyCommand, op=st.sampled_from(["germinate", "advance", "advance", "fossilize", "fossilize",
                                                           "cull"]),
                    slot=st.sampled_from(SLOTS), blueprint=st.sampled_from(BLUEPRINTS), blend=BLENDS,
                    reason=st.just("test"))
# Per slot: shadow gain or contribution, gradient ratio, isolation leaks.
MEASURES = st.lists(st.tuples(st.floats(-1, 5), st.floats(0, 2), st.integers(0, 2)), min_size=3, max_size=3)
_DATA = {}


def synthetic_data(config):
    if "data" not in _DATA:
        _DATA["data"] = load_data(config)
    return _DATA["data"]


def metrics(epoch: int) -> ev.EpochCompleted:
    return ev.EpochCompleted(
        epoch=epoch, train_loss=1.0, train_acc=50.0, val_loss=1.0, val_acc=50.0, n_train=10, n_val=10,
        total_params=0, lr=0.01, forward_passes=1, non_finite=False, rolled_back=False, train_time_s=0.0,
        val_time_s=0.0, counterfactual_time_s=0.0, samples_per_s=0.0, wall_time_s=0.0,
    )


class SlotMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.run: Run | None = None
        self.directory = tempfile.TemporaryDirectory(prefix="esper-slots-")

    @initialize(
        gate_modes=st.tuples(*[st.sampled_from(["auto", "explicit"])] * 3),
        trainable=st.booleans(),
        lenient=st.sampled_from([True, True, False]),
        blend_steps=st.integers(1, 3),
        default_blend=st.sampled_from(["linear", "sigmoid", "gated"]),
    )
    def start(self, gate_modes, trainable, lenient, blend_steps, default_blend):
        lifecycle = {
            "gate_mode_g1": gate_modes[0], "gate_mode_g2": gate_modes[1], "gate_mode_g3": gate_modes[2],
            "fossilized_trainable": trainable, "blend_steps": blend_steps, "default_blend": default_blend,
            "embargo_epochs": 1, "resetting_epochs": 1, "max_probation_epochs": 5,
        }
        if lenient:  # gates that pass on any measurement, so seeds reach the late stages often
            lifecycle.update(g2_min_shadow_gain=-1e9, g2_min_training_epochs=0, g2_min_gradient_ratio=0.0,
                             g2_max_isolation_leaks=100, g3_min_blending_epochs=0, g3_min_alpha=0.0,
                             g5_min_contribution=-1e9)
        config = resolve({"run": {"task": "synthetic", "policy": "none", "epochs": 1000, "threads": 1,
                                  "fsync": "never", "checkpoint_every": 0}, "lifecycle": lifecycle})
        self.config = config
        self.run = Run(config, Path(self.directory.name), synthetic_data(config))
        engine = self.run.engine
        engine.start_run(self.run.header(), 0)
        host_params, _ = self.run.backend.param_counts()
        engine.start_episode(0, self.run.backend.episode_seed, 1000, SLOTS, host_params)
        self.run.writer.commit()
        shape = tuple(self.run.data.train.inputs.shape[1:])
        self.x = torch.randn(16, *shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            self.bare = self.backend.model.host(self.x, lambda slot, h: h)

    def teardown(self):
        if self.run is not None:
            self.run.writer.close()
        self.directory.cleanup()

    # -- helpers ------------------------------------------------------------------------------

    @property
    def engine(self):
        return self.run.engine

    @property
    def backend(self) -> TorchBackend:
        return self.run.engine.backend

    @property
    def env(self):
        return self.engine.state.envs[0]

    def output(self) -> torch.Tensor:
        with torch.no_grad():
            return self.backend.model(self.x)

    # -- rules --------------------------------------------------------------------------------

    def decide(self, *commands: ev.PolicyCommand) -> None:
        """The engine's own decision step: record the decision, carry out each command, record a
        refusal as ActionRejected (engine.carry_out)."""
        decision = ev.PolicyDecided(epoch=self.env.epoch, policy="none", policy_id="test", commands=commands,
                                    action={}, action_index={}, legal={}, rationale="")
        self.engine.carry_out(0, decision)

    def can_decide(self) -> bool:
        return self.run is not None and not self.env.ticked and self.env.epoch not in self.env.decisions

    @precondition(can_decide)
    @rule(slot=st.sampled_from(SLOTS + ("bogus",)), blueprint=st.sampled_from(BLUEPRINTS), blend=BLENDS)
    def germinate(self, slot, blueprint, blend):
        self.decide(ev.PolicyCommand(op="germinate", slot=slot, blueprint=blueprint, blend=blend))

    @precondition(can_decide)
    @rule(slot=st.sampled_from(SLOTS))
    def advance(self, slot):
        self.decide(ev.PolicyCommand(op="advance", slot=slot))

    @precondition(can_decide)
    @rule(slot=st.sampled_from(SLOTS))
    def cull(self, slot):
        self.decide(ev.PolicyCommand(op="cull", slot=slot, reason="test"))

    @precondition(can_decide)
    @rule(slot=st.sampled_from(SLOTS))
    def fossilize(self, slot):
        self.decide(ev.PolicyCommand(op="fossilize", slot=slot))

    @precondition(can_decide)
    @rule(commands=st.lists(COMMAND, max_size=4))
    def several(self, commands):
        self.decide(*commands)

    @precondition(lambda self: self.run is not None and self.env.ticked)
    @rule(epochs=st.lists(st.tuples(MEASURES, st.lists(COMMAND, max_size=2)), min_size=1, max_size=4))
    def whole_epochs(self, epochs):
        """The engine's step without the training, a few times: record the epoch, decide, tick."""
        for values, commands in epochs:
            self.record_epoch(values)
            if commands:
                self.decide(*commands)
            self.tick()
            self.check()

    @precondition(lambda self: self.run is not None and self.env.ticked)
    @rule(slot=st.sampled_from(SLOTS), blueprint=st.sampled_from(BLUEPRINTS[:-1]), blend=BLENDS,
          epochs=st.lists(MEASURES, min_size=1, max_size=8))
    def push(self, slot, blueprint, blend, epochs):
        """Whole epochs whose decision is the slot's natural next command, so seeds get far."""
        for values in epochs:
            self.record_epoch(values)
            stage = self.env.slot(slot).stage
            op = {Stage.DORMANT: "germinate", Stage.PROBATIONARY: "fossilize"}.get(stage, "advance")
            if stage in (Stage.DORMANT, Stage.GERMINATED, Stage.TRAINING, Stage.BLENDING, Stage.PROBATIONARY):
                self.decide(ev.PolicyCommand(op=op, slot=slot, blueprint=blueprint, blend=blend))
            self.tick()
            self.check()

    @precondition(lambda self: self.run is not None and self.env.ticked)
    @rule(values=MEASURES)
    def record_epoch(self, values):
        epoch = self.env.epoch + 1
        measurements = []
        for slot, (gain, ratio, leaks) in zip(self.env.slots, values):
            if slot.stage not in LIVE or slot.stage == Stage.GERMINATED:
                continue
            kind = "shadow" if slot.stage == Stage.TRAINING else "ablation"
            cf = cmd.CounterfactualSample(kind=kind, alpha=1.0 if kind == "shadow" else 0.0, real_acc=50.0,
                                          ablated_acc=50.0 + (gain if kind == "shadow" else -gain), real_loss=1.0,
                                          ablated_loss=1.0, n=10)
            measurements.append(cmd.SlotMeasurement(
                slot=slot.slot_id, seed_id=slot.seed.seed_id, grad_ratio=ratio, seed_grad_norm=0.1,
                host_grad_norm=1.0, isolation_leaks=leaks, finite=True, vanishing=False, exploding=False,
                counterfactual=cf))
        self.engine.execute(cmd.RecordEpoch(env=0, epoch=epoch, metrics=metrics(epoch),
                                            measurements=tuple(measurements)), 0)

    @precondition(lambda self: self.run is not None and not self.env.ticked)
    @rule()
    def tick(self):
        self.engine.execute(cmd.Tick(env=0, epoch=self.env.epoch), 0)

    @rule(slot=st.sampled_from(SLOTS), alpha=st.floats(0, 1))
    def alpha_override(self, slot, alpha):
        """A counterfactual pass with a forced alpha changes nothing in the model."""
        before = self.output()
        state = {s: (m.mode, float(m.alpha), m.isolated, m.blend_kind) for s, m in self.backend.model.slots.items()}
        with torch.no_grad():
            self.backend.model(self.x, alpha_override={slot: torch.tensor(alpha)})
        after = {s: (m.mode, float(m.alpha), m.isolated, m.blend_kind) for s, m in self.backend.model.slots.items()}
        assert after == state
        assert torch.equal(self.output(), before)

    @rule()
    def reload_from_checkpoint_state(self):
        """What resume does: a fresh backend, built for the episode, then `load_state_dict`."""
        state = self.backend.state_dict()
        before = self.output()
        fresh = TorchBackend(self.run.data, self.config.train, self.config.lifecycle, SLOTS, torch.device("cpu"))
        fresh.build(self.backend.episode_seed, 1000)
        fresh.load_state_dict(state)
        self.engine.backend = self.run.backend = fresh
        assert torch.equal(self.output(), before)

    # -- invariants ---------------------------------------------------------------------------

    def check(self) -> None:
        self.modules_match_the_folded_state()
        self.optimizer_groups_match_the_seeds()
        self.projections_agree()
        self.host_output_unchanged_without_alpha()

    @invariant()
    def modules_match_the_folded_state(self):
        if self.run is None:
            return
        state, backend, lc = self.engine.state, self.backend, self.config.lifecycle
        for slot in self.env.slots:
            module = backend.model.slots[slot.slot_id]
            where = f"{slot.slot_id} {slot.stage.name}"
            if slot.stage in LIVE:
                seed = slot.seed
                event(f"reached {slot.stage.name}" + (" (gated)" if module.gate is not None else ""))
                assert module.seed is not None, where
                assert module.mode == _MODES[slot.stage], (where, module.mode)
                assert float(module.alpha) == torch.tensor(seed.alpha, dtype=torch.float32).item(), \
                    (where, float(module.alpha), seed.alpha)
                assert module.isolated == isolated(slot.stage, state.topology, lc.isolate_cnn_after_training,
                                                   lc.isolate_transformer_after_training), where
                gated = seed.blend_kind == "gated" and seed.alpha < 1.0
                assert (module.gate is not None) == gated, (where, seed.blend_kind, seed.alpha)
                assert backend.seeds[slot.slot_id][0] == seed.blueprint, where
                assert (slot.slot_id in backend.fossils) == (slot.stage == Stage.FOSSILIZED), where
            else:
                assert module.seed is None and module.gate is None, where
                assert module.mode == "inert" and float(module.alpha) == 0.0, where
                assert slot.slot_id not in backend.seeds and slot.slot_id not in backend.fossils, where

    @invariant()
    def optimizer_groups_match_the_seeds(self):
        if self.run is None:
            return
        backend, lc = self.backend, self.config.lifecycle
        groups = backend.optimizer.param_groups
        names = opt.slot_groups(backend.optimizer)
        assert names[0] == "host" and names.count("host") == len([g for g in groups if g["slot"] == "host"])
        expected = set()
        for slot in self.env.slots:
            if slot.stage not in LIVE:
                continue
            params = backend.model.slots[slot.slot_id].seed_parameters()
            frozen = slot.stage == Stage.FOSSILIZED and not lc.fossilized_trainable
            if params and not frozen:
                expected.add(slot.slot_id)
                group = next(g for g in groups if g["slot"] == slot.slot_id)
                assert {id(p) for p in group["params"]} == {id(p) for p in params}, slot.slot_id
                if slot.stage == Stage.FOSSILIZED:
                    assert group["base_lr"] == groups[0]["base_lr"], "a fossil trains at the host's rate"
            if frozen:
                assert not any(p.requires_grad for p in params), slot.slot_id
        seed_groups = [n for n in names if n != "host"]
        assert sorted(seed_groups) == sorted(expected), (names, expected)
        held = {id(p) for g in groups for p in g["params"]}
        assert all(id(p) in held for p in backend.optimizer.state), "optimizer state for a dropped parameter"

    @invariant()
    def projections_agree(self):
        if self.run is None:
            return
        views = {v.seed_id: v for v in self.engine.projector.snapshot().seeds}
        for slot in self.env.slots:
            if slot.stage in LIVE:
                assert views[slot.seed.seed_id].stage == slot.stage, slot.slot_id
            elif slot.seed is not None:  # the slot serves its embargo; the seed's view ends at its cull
                assert views[slot.seed.seed_id].stage == Stage.CULLED, slot.slot_id

    @invariant()
    def host_output_unchanged_without_alpha(self):
        if self.run is None:
            return
        if all(s.seed is None or s.seed.alpha == 0.0 for s in self.env.slots):
            assert torch.equal(self.output(), self.bare), [(s.slot_id, s.stage.name) for s in self.env.slots]


SlotMachine.TestCase.settings = settings(max_examples=50, stateful_step_count=50, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])
TestSlotMachine = SlotMachine.TestCase
