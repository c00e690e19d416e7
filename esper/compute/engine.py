"""The engine's step loop (policy §7.2, lifecycle §2.4): one env, one epoch per step.

Every fact goes through the decider and into the log before anything acts on it: the engine asks
`decide`, appends the batch, folds it with `evolve`, then brings the backend's torch model in line
with the folded state (the torch side is itself a projection of the log).
"""

import time
from typing import Any, Callable

import attrs

from esper.compute.backend import Backend, EpochPlan, TrainStats, ValStats
from esper.compute.governor import Governor
from esper.compute.observation import (
    Controller,
    CullNotice,
    EpochSignals,
    Executed,
    Observation,
    RewardFunction,
)
from esper.compute.streams import SEED_INIT, mix64
from esper.events import catalogue as ev
from esper.events.enums import Stage
from esper.events.envelope import Record
from esper.lifecycle import commands as cmd
from esper.lifecycle.decide import decide
from esper.lifecycle.errors import DomainError
from esper.lifecycle.evolve import evolve
from esper.lifecycle.projections import Projector
from esper.lifecycle.stages import LIVE, isolated
from esper.lifecycle.state import EnvState, RunState, initial_state

_MODES = {
    Stage.GERMINATED: "inert",
    Stage.TRAINING: "incubate",
    Stage.BLENDING: "blend",
    Stage.PROBATIONARY: "blend",
    Stage.FOSSILIZED: "fused",
}
_PROBE_PLACEHOLDER = cmd.ProbeReport(shape_ok=True, finite=True, identity=True, param_count=0)


class GovernorExhausted(Exception):
    """More rollbacks than the episode allows: the run fails (exit code 3)."""


@attrs.define
class EpisodeMemory:
    """What the engine derives from the log for its controller; rebuilt from records on resume."""

    history: list[EpochSignals] = attrs.Factory(list)
    recent_culls: list[CullNotice] = attrs.Factory(list)
    decision: ev.PolicyDecided | None = None
    executed: list[Executed] = attrs.Factory(list)
    before: Observation | None = None
    rolled_back: bool = False
    snapshot_due: bool = False  # a fossilization refreshes the governor snapshot


class Engine:
    def __init__(
        self,
        *,
        writer: Any,
        run_id: str,
        backend: Backend,
        controller: Controller,
        reward: RewardFunction,
        governor: Governor,
        blueprints: tuple[str, ...],
        l_rand: float,
        snapshot_every: int,
        counterfactual_all_off: bool,
        checkpoint: Callable[["Engine", int], None] | None = None,
        on_epoch: Callable[["Engine", ev.EpochCompleted], None] | None = None,
    ):
        self.writer, self.run_id, self.backend = writer, run_id, backend
        self.controller, self.reward, self.governor = controller, reward, governor
        self.blueprints, self.l_rand = blueprints, l_rand
        self.snapshot_every, self.counterfactual_all_off = snapshot_every, counterfactual_all_off
        self.checkpoint, self.on_epoch = checkpoint, on_epoch
        self.state: RunState = initial_state()
        self.projector = Projector()
        self.memory = EpisodeMemory()
        self.snapshot: Any = None
        self.seed = 0

    # -- the log --------------------------------------------------------------------------------

    def execute(self, command: cmd.Command, env: int | None = None) -> list[Record]:
        """decide, append, fold, remember, reconcile. A DomainError leaves everything unchanged."""
        events = decide(command, self.state)
        if not events:
            return []
        episode = None
        if isinstance(command, cmd.StartEpisode):
            episode = self.state.envs[env].episode + 1 if env in self.state.envs else 0
        elif env is not None:
            episode = self.state.envs[env].episode
        before = self.state
        records = self.writer.append_batch(self.run_id, env, episode, events)
        for record in records:
            self.absorb(record, before)
        if env is not None:
            self._reconcile(env)
        return records

    def absorb(self, record: Record, before: RunState | None = None) -> None:
        """Fold one record into the state, the projections and the engine's episode memory."""
        previous = self.state if before is None else before
        event, memory = record.event, self.memory
        if isinstance(event, ev.PolicyDecided):
            # What the controller saw: the state just before its decision was recorded.
            memory.before, memory.decision, memory.executed = self.observe(record.env), event, []
            memory.recent_culls, memory.rolled_back = [], False
        self.state = evolve(self.state, record)
        self.projector.apply(record)
        if isinstance(event, ev.EpisodeStarted):
            self.memory = EpisodeMemory()
        elif isinstance(event, ev.ActionRejected):
            c = event.command
            memory.executed.append(Executed(c.op, c.slot, c.blueprint, True, None))
        elif isinstance(event, ev.GateEvaluated) and event.trigger == "command":
            c = memory.decision.commands[len(memory.executed)]
            memory.executed.append(Executed(c.op, c.slot, c.blueprint, False, event.passed))
        elif isinstance(event, ev.EpochCompleted):
            memory.history.append(EpochSignals(event.train_loss, event.train_acc, event.val_loss, event.val_acc))
        elif isinstance(event, ev.SeedCulled):
            slot = previous.envs[record.env].slot(event.slot)
            memory.recent_culls.append(CullNotice(event.slot, slot.seed.blueprint, event.reason, event.initiator))
            if event.initiator == "policy":
                c = memory.decision.commands[len(memory.executed)]
                memory.executed.append(Executed(c.op, c.slot, c.blueprint, False, None))
        elif isinstance(event, ev.SeedFossilized):
            memory.snapshot_due = True
        elif isinstance(event, ev.GovernorRolledBack):
            memory.rolled_back = True

    def _reconcile(self, env: int) -> None:
        """Bring every slot of the torch model in line with the folded lifecycle state."""
        env_state = self.state.envs[env]
        config = self.state.config
        for slot in env_state.slots:
            held = getattr(self.backend, "seeds", {})
            if slot.stage in LIVE:
                iso = isolated(slot.stage, self.state.topology, config.isolate_cnn_after_training,
                               config.isolate_transformer_after_training)
                self.backend.set_slot(slot.slot_id, _MODES[slot.stage], slot.seed.alpha, iso,
                                      slot.stage == Stage.FOSSILIZED)
            elif slot.slot_id in held:
                self.backend.drop(slot.slot_id)

    # -- a run ----------------------------------------------------------------------------------

    def start_run(self, header: ev.RunStarted, seed: int) -> None:
        self.seed = seed
        self.execute(cmd.StartRun(run=header))

    def start_episode(self, env: int, episode_seed: int, max_epochs: int, slots: tuple[str, ...],
                      host_params: int, evaluation: bool = False) -> None:
        """Record the episode's start (the caller commits) and take the governor's first snapshot."""
        self.execute(cmd.StartEpisode(env=env, episode_seed=episode_seed, host_seed=episode_seed,
                                      host_params=host_params, slots_enabled=slots, max_epochs=max_epochs,
                                      evaluation=evaluation), env)
        self.snapshot = self.backend.snapshot(0)
        env_state = self.state.envs[env]
        self.controller.reset(env, env_state.episode, max_epochs)

    def step(self, env: int, epoch: int) -> bool:
        """One whole step of one env (policy §7.2). True when the episode finished."""
        after, _ = self.measure(env, epoch)
        if after is None:
            return True
        self.act(env, epoch, self.controller.decide(after))
        if self.checkpoint is not None:
            self.checkpoint(self, epoch)
        self.writer.commit()
        return False

    def measure(self, env: int, epoch: int) -> tuple[Observation | None, ev.RewardComputed | None]:
        """Steps (1)–(6): train, validate, govern, record, reward the previous decision; then the
        observation to decide on, or None when the episode just finished. Split from `act` so a
        trainer can decide for all its envs in one batched forward."""
        started = time.perf_counter()
        env_state = self.state.envs[env]
        config = self.state.config
        ratio_slots = tuple(s.slot_id for s in env_state.slots if s.stage in (Stage.TRAINING, Stage.BLENDING))
        leak_slots = ()
        if epoch % config.leak_check_stride == 0:
            leak_slots = tuple(
                s.slot_id for s in env_state.slots if s.stage in LIVE and s.stage != Stage.GERMINATED
                and isolated(s.stage, self.state.topology, config.isolate_cnn_after_training,
                             config.isolate_transformer_after_training))
        incubating = tuple(s.slot_id for s in env_state.slots if s.stage == Stage.TRAINING)
        plan = EpochPlan(epoch, ratio_slots, incubating, leak_slots, *self._counterfactuals(env_state))
        train, val = self.backend.run_epoch(plan)
        panic = self.governor.check(train.loss, val.main.loss, train.non_finite)
        if panic is not None:
            val = self._roll_back(env, epoch, panic)
        self._record_epoch(env, epoch, train, val, time.perf_counter() - started)
        after = self.observe(env)
        max_epochs = env_state.max_epochs
        memory = self.memory
        reward = None
        if memory.decision is not None:
            reward = self.reward(memory.before, memory.decision, tuple(memory.executed), after,
                                 terminated=epoch == max_epochs, governor=memory.rolled_back)
            self.execute(cmd.RecordReward(env=env, reward=reward), env)
        if epoch == max_epochs:
            self.execute(cmd.FinishEpisode(env=env), env)
            return None, reward
        return after, reward

    def act(self, env: int, epoch: int, decision: ev.PolicyDecided) -> None:
        """Steps (7)–(10): record the decision, carry out its commands, tick, snapshot if due."""
        rolled_back = self.memory.rolled_back  # this step's; recording the decision clears it
        self.carry_out(env, decision)
        self.execute(cmd.Tick(env=env, epoch=epoch), env)
        # A step that rolled back keeps the snapshot it restored.
        if not rolled_back and (epoch % self.snapshot_every == 0 or self.memory.snapshot_due):
            self.snapshot = self.backend.snapshot(epoch)
            self.memory.snapshot_due = False

    def carry_out(self, env: int, decision: ev.PolicyDecided) -> None:
        """Record the decision, then execute its commands; a refusal becomes ActionRejected."""
        self.execute(cmd.RecordDecision(env=env, decision=decision), env)
        for command in decision.commands:
            try:
                self.execute(self._lifecycle_command(env, decision.epoch, command), env)
            except DomainError as error:
                self.execute(cmd.RejectAction(env=env, decision_epoch=decision.epoch, command=command,
                                              code=error.code, message=error.message), env)

    def _counterfactuals(self, env_state: EnvState) -> tuple[tuple[str, ...], tuple[str, ...], bool]:
        """(ablated slots, shadowed slots, all off) for validation."""
        config = self.state.config
        ablate = tuple(
            s.slot_id for s in env_state.slots
            if s.stage in LIVE and s.seed.alpha > 0
            and (s.stage != Stage.FOSSILIZED or config.counterfactual_fossilized))
        shadow = tuple(s.slot_id for s in env_state.slots if s.stage == Stage.TRAINING)
        return ablate, shadow, self.counterfactual_all_off and len(ablate) >= 2

    def _roll_back(self, env: int, epoch: int, panic: Any) -> ValStats:
        if self.governor.rollbacks >= self.governor.settings.max_rollbacks:
            raise GovernorExhausted(f"governor exhausted: {panic.reason} after "
                                    f"{self.governor.rollbacks} rollbacks")
        decision_epoch = self.memory.decision.epoch if self.memory.decision is not None else None
        self.execute(cmd.RollBack(
            env=env, epoch=epoch, reason=panic.reason, restored_epoch=self.snapshot["epoch"], loss=panic.loss,
            threshold=panic.threshold, consecutive_panics=panic.consecutive, history_mean=panic.history_mean,
            history_std=panic.history_std, decision_epoch=decision_epoch,
        ), env)
        self.backend.restore(self.snapshot)
        self.governor.rolled_back()
        return self.backend.validate(*self._counterfactuals(self.state.envs[env]))

    def _record_epoch(self, env: int, epoch: int, train: TrainStats, val: ValStats, seconds: float) -> None:
        host_params, seed_params = self.backend.param_counts()
        metrics = ev.EpochCompleted(
            epoch=epoch, train_loss=train.loss, train_acc=train.score, val_loss=val.main.loss,
            val_acc=val.main.score, n_train=train.samples, n_val=val.main.examples,
            total_params=host_params + seed_params, lr=train.lr,
            all_off_loss=val.all_off.loss if val.all_off else None,
            all_off_acc=val.all_off.score if val.all_off else None,
            next_token_acc=val.main.next_token_acc, forward_passes=val.forward_passes,
            non_finite=train.non_finite, rolled_back=self.memory.rolled_back,
            train_time_s=train.seconds, val_time_s=val.seconds, counterfactual_time_s=val.counterfactual_seconds,
            samples_per_s=train.samples / train.seconds if train.seconds > 0 else 0.0, wall_time_s=seconds,
            amp_scale=train.amp_scale, peak_memory_bytes=train.peak_memory_bytes,
            recompiles=None if train.recompiles is None else train.recompiles + (val.recompiles or 0),
        )
        measurements = []
        for slot in self.state.envs[env].slots:
            if slot.stage not in LIVE or slot.stage == Stage.GERMINATED:
                continue
            grads = train.seeds.get(slot.slot_id)
            cf = None
            if slot.slot_id in val.ablations:
                cf = self._counterfactual("ablation", 0.0, val, val.ablations[slot.slot_id])
            elif slot.slot_id in val.shadows:
                cf = self._counterfactual("shadow", 1.0, val, val.shadows[slot.slot_id])
            measurements.append(cmd.SlotMeasurement(
                slot=slot.slot_id, seed_id=slot.seed.seed_id,
                grad_ratio=grads.grad_ratio if grads else None,
                seed_grad_norm=grads.seed_grad_norm if grads else None,
                host_grad_norm=grads.host_grad_norm if grads else None,
                isolation_leaks=grads.isolation_leaks if grads else None,
                finite=grads.finite if grads else None,
                vanishing=grads.seed_grad_norm < 1e-7 if grads and grads.seed_grad_norm is not None else None,
                exploding=grads.seed_grad_norm > 100 if grads and grads.seed_grad_norm is not None else None,
                counterfactual=cf,
            ))
        self.execute(cmd.RecordEpoch(env=env, epoch=epoch, metrics=metrics, measurements=tuple(measurements)), env)
        if self.on_epoch is not None:
            self.on_epoch(self, metrics)

    @staticmethod
    def _counterfactual(kind: str, alpha: float, val: ValStats, other: Any) -> cmd.CounterfactualSample:
        return cmd.CounterfactualSample(kind=kind, alpha=alpha, real_acc=val.main.score, ablated_acc=other.score,
                                        real_loss=val.main.loss, ablated_loss=other.loss, n=other.examples)

    # -- the controller -------------------------------------------------------------------------

    def observe(self, env: int) -> Observation:
        env_state = self.state.envs[env]
        params = {e.name: dict(e.params) for e in self.state.catalogue if e.name in self.blueprints}
        host_params, _ = self.backend.param_counts()
        return Observation(
            env=env, episode=env_state.episode, epoch=env_state.epoch, max_epochs=env_state.max_epochs,
            history=tuple(self.memory.history), state=env_state, lifecycle=self.state.config,
            topology=self.state.topology, blueprints=self.blueprints, blueprint_params=params,
            host_params=host_params, l_rand=self.l_rand, recent_culls=tuple(self.memory.recent_culls),
            rolled_back=self.memory.rolled_back,
        )

    def _lifecycle_command(self, env: int, epoch: int, c: ev.PolicyCommand) -> cmd.Command:
        if c.op == "germinate":
            dry = cmd.Germinate(env=env, slot=c.slot, blueprint=c.blueprint, blend=c.blend,
                                probe=_PROBE_PLACEHOLDER, decision_epoch=epoch)
            decide(dry, self.state)  # validate before building anything: a refusal builds no module
            env_state = self.state.envs[env]
            ordinal = env_state.seed_counter + 1
            blend = c.blend.kind if c.blend else self.state.config.default_blend
            built = self.backend.germinate(c.slot, c.blueprint, blend,
                                           mix64(self.backend.episode_seed, SEED_INIT, ordinal))
            probe = cmd.ProbeReport(shape_ok=built.shape_ok, finite=built.finite, identity=built.identity,
                                    param_count=built.param_count, blend_params=built.blend_params)
            return cmd.Germinate(env=env, slot=c.slot, blueprint=c.blueprint, blend=c.blend, probe=probe,
                                 decision_epoch=epoch)
        if c.op == "advance":
            return cmd.Advance(env=env, slot=c.slot, decision_epoch=epoch)
        if c.op == "fossilize":
            return cmd.Fossilize(env=env, slot=c.slot, decision_epoch=epoch)
        if c.op == "cull":
            return cmd.Cull(env=env, slot=c.slot, reason=c.reason, initiator="policy", decision_epoch=epoch)
        raise DomainError("invalid_stage", f"unknown op {c.op!r}")
