"""`decide(command, state) -> list[Event]`: the whole of the lifecycle's logic, pure.

No clock, no randomness, no I/O. An invalid command raises a `DomainError` and emits nothing; a
valid one yields its complete batch of payloads, which the engine stamps and folds with `evolve`.
"""

from typing import Any, Callable

import attrs

from esper.events import catalogue as ev
from esper.events.catalogue import Blend, Event
from esper.events.codec import digest
from esper.events.enums import Gate, Stage
from esper.lifecycle import commands as cmd
from esper.lifecycle.blend import BLEND_KINDS, ramp_alpha
from esper.lifecycle.errors import DomainError
from esper.lifecycle.evolve import apply_env_event, lifecycle_config
from esper.lifecycle.gates import GateVerdict, evaluate_g0, evaluate_gate
from esper.lifecycle.stages import CULLABLE, LIVE, NATURAL_NEXT, gate_for_target
from esper.lifecycle.state import EnvState, RunState, SlotState, env_digest_value


def decide(command: cmd.Command, state: RunState) -> list[Event]:
    return _HANDLERS[type(command)](command, state)


def state_digest(env: EnvState) -> str:
    return digest(env_digest_value(env))


# -- guards -------------------------------------------------------------------------------------


def _running(state: RunState) -> None:
    if state.status is None:
        raise DomainError("run_not_started", "no run has started")
    if state.status != "running":
        raise DomainError("run_finished", f"the run has finished ({state.status})")


def _env(state: RunState, env: int, *, running: bool = True) -> EnvState:
    _running(state)
    if not 0 <= env < state.n_envs:
        raise DomainError("unknown_env", f"env {env} is not in this run (0..{state.n_envs - 1})")
    current = state.envs.get(env)
    if running and (current is None or current.status != "running"):
        raise DomainError("episode_not_running", f"env {env} has no running episode")
    return current


def _slot(state: RunState, env: EnvState, slot_id: str) -> SlotState:
    slot = env.slot(slot_id)
    if slot is None:
        known = ", ".join(s.slot_id for s in env.slots)
        raise DomainError("unknown_slot", f"unknown slot {slot_id!r} (choose from {known})", slot=slot_id)
    if not slot.enabled:
        raise DomainError("slot_disabled", f"slot {slot_id!r} is disabled in this episode", slot=slot_id)
    return slot


def _live_slot(state: RunState, env: EnvState, slot_id: str) -> SlotState:
    slot = _slot(state, env, slot_id)
    if slot.stage not in LIVE:
        raise DomainError("no_seed", f"slot {slot_id!r} holds no live seed ({slot.stage.name})", slot=slot_id)
    return slot


# -- building blocks ----------------------------------------------------------------------------


def _verdict_event(verdict: GateVerdict, slot: SlotState, seed_id: str, blueprint: str, epoch: int,
                   trigger: str) -> ev.GateEvaluated:
    return ev.GateEvaluated(
        epoch=epoch, slot=slot.slot_id, seed_id=seed_id, blueprint=blueprint, gate=verdict.gate,
        target_stage=verdict.target_stage, passed=verdict.passed, score=verdict.score,
        checks=verdict.checks, message=verdict.message, trigger=trigger,
    )


def _stage_change(slot: SlotState, to: Stage, reason: str, trigger: str, epoch: int) -> ev.StageChanged:
    return ev.StageChanged(
        epoch=epoch, slot=slot.slot_id, seed_id=slot.seed.seed_id, from_stage=slot.stage, to_stage=to,
        reason=reason, trigger=trigger, epochs_in_previous_stage=slot.epochs_in_stage(epoch),
    )


def _alpha(slot: SlotState, new: float, step: int, reason: str, epoch: int) -> ev.AlphaChanged:
    seed = slot.seed
    return ev.AlphaChanged(epoch=epoch, slot=slot.slot_id, seed_id=seed.seed_id, old=seed.alpha, new=new,
                           step=step, steps_total=seed.steps_total, reason=reason)


def _ramp_step(state: RunState, slot: SlotState, epoch: int) -> ev.AlphaChanged:
    seed = slot.seed
    step = seed.step + 1
    new = ramp_alpha(seed.blend_kind, step, seed.steps_total, state.config.sigmoid_steepness)
    return _alpha(slot, new, step, "ramp_complete" if step >= seed.steps_total else "ramp", epoch)


def _advance(state: RunState, slot: SlotState, verdict: GateVerdict, reason: str, trigger: str,
             epoch: int) -> list[Event]:
    """A passed gate's transition with its stage-entry effects: one hook for commands and ticks."""
    to = verdict.target_stage
    events: list[Event] = [_stage_change(slot, to, reason, trigger, epoch)]
    if to == Stage.BLENDING:
        events.append(_ramp_step(state, slot, epoch))
    elif to == Stage.PROBATIONARY and slot.seed.alpha < 1.0:
        events.append(_alpha(slot, 1.0, slot.seed.step, "pinned", epoch))
    return events


def _gated_advance(state: RunState, slot: SlotState, trigger: str, epoch: int) -> list[Event]:
    target = NATURAL_NEXT[slot.stage]
    verdict = evaluate_gate(gate_for_target(target), slot, state.config, epoch)
    seed = slot.seed
    events: list[Event] = [_verdict_event(verdict, slot, seed.seed_id, seed.blueprint, epoch, trigger)]
    if verdict.passed:
        events += _advance(state, slot, verdict, "auto" if trigger == "tick" else "advance", trigger, epoch)
    return events


def _cull(slot: SlotState, reason: str, initiator: str, trigger: str, epoch: int,
          decision_epoch: int | None) -> list[Event]:
    seed = slot.seed
    events: list[Event] = [_stage_change(slot, Stage.CULLED, reason, trigger, epoch)]
    if seed.alpha > 0:
        events.append(_alpha(slot, 0.0, seed.step, "cull", epoch))
    improvement = _improvement(seed)
    events.append(ev.SeedCulled(
        epoch=epoch, slot=slot.slot_id, seed_id=seed.seed_id, reason=reason, initiator=initiator,
        stage_at_cull=slot.stage, epochs_total=seed.epochs_total, total_improvement=improvement,
        last_counterfactual=seed.last_counterfactual.value if seed.last_counterfactual else None,
        decision_epoch=decision_epoch,
    ))
    return events


def _improvement(seed) -> float | None:
    if seed.current_acc is None or seed.acc_at_germination is None:
        return None
    return seed.current_acc - seed.acc_at_germination


# -- run and episode ----------------------------------------------------------------------------


def _start_run(c: cmd.StartRun, state: RunState) -> list[Event]:
    if state.status is not None:
        raise DomainError("run_already_started", "a run has already started")
    try:  # evolve must be able to fold whatever decide emits
        lifecycle_config(c.run.config)
    except (TypeError, ValueError) as exc:
        raise DomainError("invalid_config", f"the run's lifecycle configuration is invalid: {exc}") from None
    return [c.run]


def _start_episode(c: cmd.StartEpisode, state: RunState) -> list[Event]:
    current = _env(state, c.env, running=False)
    if current is not None and current.status == "running":
        raise DomainError("episode_running", f"env {c.env} already runs episode {current.episode}")
    known = {s.slot_id for s in state.slots_info}
    unknown = [s for s in c.slots_enabled if s not in known]
    if unknown:
        raise DomainError("unknown_slot", f"unknown slot {unknown[0]!r}", slot=unknown[0])
    return [ev.EpisodeStarted(
        epoch=0, episode_seed=c.episode_seed, host_seed=c.host_seed, host_params=c.host_params,
        slots_enabled=c.slots_enabled, max_epochs=c.max_epochs, evaluation=c.evaluation,
    )]


def _extend_episode(c: cmd.ExtendEpisode, state: RunState) -> list[Event]:
    env = _env(state, c.env)
    if c.max_epochs <= env.max_epochs:
        # Only growth: a shorter episode could already be past its end, and an equal one is no change.
        raise DomainError("invalid_extension", f"env {c.env}'s episode has {env.max_epochs} epochs; "
                          f"{c.max_epochs} does not extend it")
    return [ev.EpisodeExtended(epoch=env.epoch, max_epochs=c.max_epochs, previous_max_epochs=env.max_epochs)]


def _finish_episode(c: cmd.FinishEpisode, state: RunState) -> list[Event]:
    env = _env(state, c.env)
    finished = attrs.evolve(env, status="finished")  # what evolve makes of the event below
    return [ev.EpisodeFinished(
        epoch=env.epoch, epochs=env.epoch, final_val_acc=env.last_val_acc, best_val_acc=env.best_val_acc,
        final_val_loss=env.last_val_loss, seeds_germinated=env.seeds_germinated,
        seeds_fossilized=env.seeds_fossilized, seeds_culled=env.seeds_culled, total_params=env.total_params,
        episode_return=env.episode_return, state_digest=state_digest(finished),
    )]


def _finish_run(c: cmd.FinishRun, state: RunState) -> list[Event]:
    _running(state)
    if c.status not in ("completed", "failed", "interrupted"):
        raise DomainError("invalid_stage", f"unknown run status {c.status!r}")
    if c.status == "completed":
        busy = [e for e, s in state.envs.items() if s.status == "running"]
        if busy:
            raise DomainError("episode_running", f"env {busy[0]} still runs an episode")
    return [ev.RunFinished(status=c.status, episodes_completed=state.episodes_completed, final=c.final, error_type=c.error_type,
                           error_message=c.error_message, wall_time_s=c.wall_time_s)]


# -- controller commands ------------------------------------------------------------------------


def _germinate(c: cmd.Germinate, state: RunState) -> list[Event]:
    env = _env(state, c.env)
    slot = _slot(state, env, c.slot)
    if slot.stage != Stage.DORMANT:
        raise DomainError("slot_unavailable", f"slot {c.slot!r} is {slot.stage.name}, not DORMANT", slot=c.slot)
    entry = state.blueprint(c.blueprint)
    if entry is None:
        known = ", ".join(e.name for e in state.catalogue)
        raise DomainError("unknown_blueprint", f"unknown blueprint {c.blueprint!r} for topology "
                          f"{state.topology} (choose from {known})", blueprint=c.blueprint)
    blend = c.blend or Blend(kind=state.config.default_blend, steps=state.config.blend_steps)
    if blend.kind not in BLEND_KINDS or blend.steps < 1:
        raise DomainError("invalid_blend", f"invalid blend {blend.kind!r} x {blend.steps} "
                          f"(kinds {', '.join(BLEND_KINDS)}; steps >= 1)")
    limit = state.config.max_seeds
    if limit and env.live_seeds() >= limit:
        raise DomainError("seed_limit_reached", f"env {c.env} already holds {limit} live seeds")
    epoch = env.epoch
    seed_id = f"{c.slot}#{env.seed_counter + 1}"
    verdict = evaluate_g0(c.probe, entry, c.slot)
    events: list[Event] = [_verdict_event(verdict, slot, seed_id, c.blueprint, epoch, "command")]
    if verdict.passed:
        events.append(ev.SeedGerminated(
            epoch=epoch, slot=c.slot, seed_id=seed_id, blueprint=c.blueprint, blend=blend,
            seed_params=c.probe.param_count, blend_params=c.probe.blend_params,
            identity_at_birth=entry.identity_at_birth, decision_epoch=c.decision_epoch,
        ))
        events.append(ev.StageChanged(
            epoch=epoch, slot=c.slot, seed_id=seed_id, from_stage=Stage.DORMANT, to_stage=Stage.GERMINATED,
            reason="germinate", trigger="command", epochs_in_previous_stage=slot.epochs_in_stage(epoch),
        ))
    return events


def _advance_command(c: cmd.Advance, state: RunState) -> list[Event]:
    env = _env(state, c.env)
    slot = _live_slot(state, env, c.slot)
    if slot.stage not in (Stage.GERMINATED, Stage.TRAINING, Stage.BLENDING):
        raise DomainError("invalid_stage", f"cannot advance a {slot.stage.name} seed "
                          "(fossilization has its own command)", slot=c.slot)
    gate_number = int(gate_for_target(NATURAL_NEXT[slot.stage]))
    if state.config.gate_mode(gate_number) == "auto":
        raise DomainError("gate_is_auto", f"G{gate_number} is in auto mode: the tick advances {c.slot!r}",
                          slot=c.slot)
    return _gated_advance(state, slot, "command", env.epoch)


def _fossilize(c: cmd.Fossilize, state: RunState) -> list[Event]:
    env = _env(state, c.env)
    slot = _live_slot(state, env, c.slot)
    if slot.stage != Stage.PROBATIONARY:
        raise DomainError("invalid_stage", f"only a PROBATIONARY seed can be fossilized, "
                          f"{c.slot!r} is {slot.stage.name}", slot=c.slot)
    epoch, seed = env.epoch, slot.seed
    verdict = evaluate_gate(Gate.G5, slot, state.config, epoch)
    events: list[Event] = [_verdict_event(verdict, slot, seed.seed_id, seed.blueprint, epoch, "command")]
    if verdict.passed:
        events.append(_stage_change(slot, Stage.FOSSILIZED, "fossilize", "command", epoch))
        events.append(ev.SeedFossilized(
            epoch=epoch, slot=c.slot, seed_id=seed.seed_id, contribution=seed.last_counterfactual.value,
            total_improvement=_improvement(seed), seed_params=seed.seed_params,
            epochs_total=seed.epochs_total, decision_epoch=c.decision_epoch,
        ))
    return events


def _cull_command(c: cmd.Cull, state: RunState) -> list[Event]:
    env = _env(state, c.env)
    slot = _live_slot(state, env, c.slot)
    if slot.stage == Stage.FOSSILIZED:
        raise DomainError("cannot_cull_fossilized", f"{slot.seed.seed_id} is fossilized", slot=c.slot)
    return _cull(slot, c.reason, c.initiator, "command", env.epoch, c.decision_epoch)


def _wait(c: cmd.Wait, state: RunState) -> list[Event]:
    _env(state, c.env)
    return []


# -- the epoch boundary -------------------------------------------------------------------------


def _record_epoch(c: cmd.RecordEpoch, state: RunState) -> list[Event]:
    env = _env(state, c.env)
    if c.epoch != env.epoch + 1 or not env.ticked or c.metrics.epoch != c.epoch:
        raise DomainError("epoch_out_of_order", f"cannot record epoch {c.epoch} after epoch {env.epoch}"
                          f"{'' if env.ticked else ' (not ticked)'}")
    by_slot: dict[str, cmd.SlotMeasurement] = {}
    for m in c.measurements:
        slot = env.slot(m.slot)
        if slot is None or slot.seed is None or slot.stage not in LIVE or slot.seed.seed_id != m.seed_id:
            raise DomainError("stale_measurement", f"slot {m.slot!r} holds no live seed {m.seed_id!r}")
        by_slot[m.slot] = m
    events: list[Event] = [c.metrics]
    decay = state.config.gradient_ratio_ema_decay
    for slot in env.slots:
        if not slot.active:
            continue
        seed, m = slot.seed, by_slot.get(slot.slot_id, cmd.SlotMeasurement(slot=slot.slot_id, seed_id=""))
        ema = seed.grad_ratio_ema
        if m.grad_ratio is not None:
            ema = m.grad_ratio if ema is None else decay * ema + (1.0 - decay) * m.grad_ratio
        events.append(ev.SeedMeasured(
            epoch=c.epoch, slot=slot.slot_id, seed_id=seed.seed_id, stage=slot.stage, grad_ratio=m.grad_ratio,
            grad_ratio_ema=ema, seed_grad_norm=m.seed_grad_norm, host_grad_norm=m.host_grad_norm,
            isolation_leaks=m.isolation_leaks, finite=m.finite, vanishing=m.vanishing, exploding=m.exploding,
        ))
        cf = m.counterfactual
        if cf is not None:
            sign = 1.0 if cf.kind == "shadow" else -1.0
            events.append(ev.CounterfactualMeasured(
                epoch=c.epoch, slot=slot.slot_id, seed_id=seed.seed_id, kind=cf.kind, alpha=cf.alpha,
                real_acc=cf.real_acc, ablated_acc=cf.ablated_acc,
                contribution=sign * (cf.ablated_acc - cf.real_acc), real_loss=cf.real_loss,
                ablated_loss=cf.ablated_loss, n_examples=cf.n,
            ))
    return events


def _tick(c: cmd.Tick, state: RunState) -> list[Event]:
    env = _env(state, c.env)
    if c.epoch != env.epoch or env.ticked:
        raise DomainError("epoch_out_of_order", f"cannot tick epoch {c.epoch}: last recorded is {env.epoch}"
                          f"{' (already ticked)' if env.ticked else ''}")
    events: list[Event] = []
    for slot_id in [s.slot_id for s in env.slots]:
        for event in _tick_slot(state, env.slot(slot_id), c.epoch):
            events.append(event)
            env = apply_env_event(env, event)
    ticked = attrs.evolve(env, ticked=True)  # what evolve makes of the EpochTicked below
    events.append(ev.EpochTicked(epoch=c.epoch, state_digest=state_digest(ticked)))
    return events


def _tick_slot(state: RunState, slot: SlotState, epoch: int) -> list[Event]:
    config, stage = state.config, slot.stage
    in_stage = slot.epochs_in_stage(epoch)
    if stage == Stage.GERMINATED and config.gate_mode_g1 == "auto":
        return _gated_advance(state, slot, "tick", epoch)
    if stage == Stage.TRAINING and config.gate_mode_g2 == "auto":
        return _gated_advance(state, slot, "tick", epoch)
    if stage == Stage.BLENDING:
        events: list[Event] = []
        if slot.seed.step < slot.seed.steps_total:
            step = _ramp_step(state, slot, epoch)
            events.append(step)
            slot = attrs.evolve(slot, seed=attrs.evolve(slot.seed, alpha=step.new, step=step.step))
        if slot.seed.step >= slot.seed.steps_total and config.gate_mode_g3 == "auto":
            events += _gated_advance(state, slot, "tick", epoch)
        return events
    if stage == Stage.PROBATIONARY:
        cf = slot.seed.last_counterfactual
        if cf is not None and cf.epoch == epoch and cf.value <= 0:
            return _cull(slot, "negative_counterfactual", "lifecycle", "tick", epoch, None)
        if in_stage >= config.max_probation_epochs:
            return _cull(slot, "probation_timeout", "lifecycle", "tick", epoch, None)
        return []
    if stage == Stage.CULLED:
        return [_stage_change(slot, Stage.EMBARGOED, "embargo", "tick", epoch)]
    if stage == Stage.EMBARGOED and in_stage >= config.embargo_epochs:
        return [_stage_change(slot, Stage.RESETTING, "reset", "tick", epoch)]
    if stage == Stage.RESETTING and in_stage >= config.resetting_epochs:
        return [_stage_change(slot, Stage.DORMANT, "released", "tick", epoch)]
    return []


def _roll_back(c: cmd.RollBack, state: RunState) -> list[Event]:
    env = _env(state, c.env)
    if c.epoch != env.epoch + 1 or not env.ticked:
        raise DomainError("epoch_out_of_order", f"a rollback belongs to the epoch being trained "
                          f"({env.epoch + 1}), not {c.epoch}")
    events: list[Event] = []
    culled: list[str] = []
    for slot in env.slots:
        if slot.stage in CULLABLE:
            culled.append(slot.seed.seed_id)
            events += _cull(slot, "governor_rollback", "governor", "rollback", c.epoch, c.decision_epoch)
    events.append(ev.GovernorRolledBack(
        epoch=c.epoch, reason=c.reason, restored_epoch=c.restored_epoch, loss_at_panic=c.loss,
        threshold=c.threshold, consecutive_panics=c.consecutive_panics, culled=tuple(culled),
        history_mean=c.history_mean, history_std=c.history_std, decision_epoch=c.decision_epoch,
        rollback_index=env.rollbacks + 1,
    ))
    return events


# -- records of the controller and the run ------------------------------------------------------


def _record_decision(c: cmd.RecordDecision, state: RunState) -> list[Event]:
    env = _env(state, c.env)
    if c.decision.epoch != env.epoch or c.decision.epoch in env.decisions:
        raise DomainError("epoch_out_of_order", f"a decision for epoch {c.decision.epoch} cannot be "
                          f"recorded at epoch {env.epoch}")
    return [c.decision]


def _known_decision(env: EnvState, decision_epoch: int) -> None:
    if decision_epoch not in env.decisions:
        raise DomainError("unknown_decision", f"no decision was recorded at epoch {decision_epoch}")


def _reject_action(c: cmd.RejectAction, state: RunState) -> list[Event]:
    env = _env(state, c.env)
    _known_decision(env, c.decision_epoch)
    return [ev.ActionRejected(epoch=env.epoch, decision_epoch=c.decision_epoch, command=c.command,
                              code=c.code, message=c.message)]


def _record_reward(c: cmd.RecordReward, state: RunState) -> list[Event]:
    env = _env(state, c.env)
    _known_decision(env, c.reward.decision_epoch)
    return [c.reward]


def _record_checkpoint(c: cmd.RecordCheckpoint, state: RunState) -> list[Event]:
    _running(state)
    return [ev.CheckpointWritten(path=c.path, sha256=c.sha256, size_bytes=c.size, covers_seq=c.covers_seq,
                                 kind=c.kind)]


def _record_policy_update(c: cmd.RecordPolicyUpdate, state: RunState) -> list[Event]:
    _running(state)
    return [c.update]


_HANDLERS: dict[type, Callable[[Any, RunState], list[Event]]] = {
    cmd.StartRun: _start_run,
    cmd.StartEpisode: _start_episode,
    cmd.ExtendEpisode: _extend_episode,
    cmd.Germinate: _germinate,
    cmd.Advance: _advance_command,
    cmd.Fossilize: _fossilize,
    cmd.Cull: _cull_command,
    cmd.Wait: _wait,
    cmd.RecordEpoch: _record_epoch,
    cmd.Tick: _tick,
    cmd.RollBack: _roll_back,
    cmd.RecordDecision: _record_decision,
    cmd.RejectAction: _reject_action,
    cmd.RecordReward: _record_reward,
    cmd.RecordCheckpoint: _record_checkpoint,
    cmd.RecordPolicyUpdate: _record_policy_update,
    cmd.FinishEpisode: _finish_episode,
    cmd.FinishRun: _finish_run,
}
