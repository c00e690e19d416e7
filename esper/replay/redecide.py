"""Rebuilding the command behind each recorded batch (events §7, re-decision).

Every batch of a log is the output of one `decide(command, state)`. `command_of(batch)` rebuilds
that command from the batch's own events: a `RecordEpoch` from its `EpochCompleted`,
`SeedMeasured` and `CounterfactualMeasured` records, a `Tick` from its `EpochTicked`, a controller
command from its verdict and outcome events. Running `decide` on the prefix state must then give
the recorded payloads back, bit for bit, `state_digest` included; anything else is logic drift.
"""

from typing import Any, Sequence

from esper.events import catalogue as ev
from esper.events.codec import decode_event, encode_event
from esper.events.enums import Gate, Stage
from esper.lifecycle import commands as cmd
from esper.lifecycle.decide import decide
from esper.lifecycle.errors import DomainError
from esper.lifecycle.state import RunState


class NoCommand(ValueError):
    """No command of the decider produces a batch of this shape."""


def command_of(batch: Sequence[Any]) -> cmd.Command:
    """The command that produced `batch` (records of one batch, in order)."""
    first, last = batch[0].event, batch[-1].event
    env = batch[0].env
    if isinstance(last, ev.EpochTicked):
        return cmd.Tick(env=env, epoch=last.epoch)
    if isinstance(last, ev.GovernorRolledBack):
        return cmd.RollBack(
            env=env, epoch=last.epoch, reason=last.reason, restored_epoch=last.restored_epoch,
            loss=last.loss_at_panic, threshold=last.threshold, consecutive_panics=last.consecutive_panics,
            history_mean=last.history_mean, history_std=last.history_std, decision_epoch=last.decision_epoch,
        )
    builder = _BY_FIRST.get(type(first))
    if builder is None:
        raise NoCommand(f"no command produces a batch that starts with {type(first).__name__}")
    return builder(env, batch)


def redecide(batch: Sequence[Any], state: RunState) -> list[ev.Event]:
    """What the decider emits today for the command behind `batch`, on the state before it.
    Raises `NoCommand`, or the decider's `DomainError` when it refuses the command."""
    return decide(command_of(batch), state)


def as_stored(event: ev.Event) -> ev.Event:
    """An event as a log gives it back: encoded and decoded (an int in a float field, which a
    verdict's check may hold, reads back as a float)."""
    return decode_event(encode_event(event))


def _stored_bytes(event: ev.Event) -> bytes:
    data = encode_event(event)
    return encode_event(decode_event(data))


def first_difference(batch: Sequence[Any], events: Sequence[ev.Event]) -> int | None:
    """Index of the first record whose payload differs from `events` as stored (compared as
    msgpack bytes, so NaN equals itself and floats match bit for bit); None when reproduced."""
    for i, record in enumerate(batch):
        if i >= len(events) or _stored_bytes(record.event) != _stored_bytes(events[i]):
            return i
    return None if len(events) == len(batch) else len(batch) - 1


# -- one builder per batch shape ----------------------------------------------------------------


def _start_run(env: Any, batch: Sequence[Any]) -> cmd.Command:
    return cmd.StartRun(run=batch[0].event)


def _start_episode(env: int, batch: Sequence[Any]) -> cmd.Command:
    e = batch[0].event
    return cmd.StartEpisode(env=env, episode_seed=e.episode_seed, host_seed=e.host_seed, host_params=e.host_params,
                            slots_enabled=e.slots_enabled, max_epochs=e.max_epochs, evaluation=e.evaluation)


def _extend_episode(env: int, batch: Sequence[Any]) -> cmd.Command:
    return cmd.ExtendEpisode(env=env, max_epochs=batch[0].event.max_epochs)


def _record_epoch(env: int, batch: Sequence[Any]) -> cmd.Command:
    metrics = batch[0].event
    measured: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    for record in batch[1:]:
        e = record.event
        if isinstance(e, ev.SeedMeasured):
            order.append(e.slot)
            measured[e.slot] = dict(
                slot=e.slot, seed_id=e.seed_id, grad_ratio=e.grad_ratio, seed_grad_norm=e.seed_grad_norm,
                host_grad_norm=e.host_grad_norm, isolation_leaks=e.isolation_leaks, finite=e.finite,
                vanishing=e.vanishing, exploding=e.exploding,
            )
        elif isinstance(e, ev.CounterfactualMeasured):
            if e.slot not in measured:
                raise NoCommand(f"CounterfactualMeasured for {e.seed_id} without its SeedMeasured")
            measured[e.slot]["counterfactual"] = cmd.CounterfactualSample(
                kind=e.kind, alpha=e.alpha, real_acc=e.real_acc, ablated_acc=e.ablated_acc, real_loss=e.real_loss,
                ablated_loss=e.ablated_loss, n=e.n_examples)
        else:
            raise NoCommand(f"{type(e).__name__} inside a RecordEpoch batch")
    return cmd.RecordEpoch(env=env, epoch=metrics.epoch, metrics=metrics,
                           measurements=tuple(cmd.SlotMeasurement(**measured[s]) for s in order))


def _check_value(verdict: ev.GateEvaluated, tag: str) -> float | None:
    for check in verdict.checks:
        if check.tag == tag:
            return check.value
    return None


def _gated_command(env: int, batch: Sequence[Any]) -> cmd.Command:
    verdict = batch[0].event
    if verdict.trigger != "command":
        raise NoCommand("a tick's verdict outside a Tick batch")
    outcome = next((r.event for r in batch[1:] if isinstance(r.event, (ev.SeedGerminated, ev.SeedFossilized))),
                   None)
    decision_epoch = getattr(outcome, "decision_epoch", None)
    if verdict.gate == Gate.G0:
        identity = _check_value(verdict, "identity_at_birth")
        probe = cmd.ProbeReport(
            shape_ok=bool(_check_value(verdict, "probe_shape")), finite=bool(_check_value(verdict, "probe_finite")),
            identity=None if identity is None else bool(identity),
            param_count=int(_check_value(verdict, "param_count") or 0),
            blend_params=outcome.blend_params if outcome is not None else 0,
        )
        blend = outcome.blend if outcome is not None else None
        return cmd.Germinate(env=env, slot=verdict.slot, blueprint=verdict.blueprint, blend=blend, probe=probe,
                             decision_epoch=decision_epoch)
    if verdict.gate == Gate.G5:
        return cmd.Fossilize(env=env, slot=verdict.slot, decision_epoch=decision_epoch)
    return cmd.Advance(env=env, slot=verdict.slot)


def _cull(env: int, batch: Sequence[Any]) -> cmd.Command:
    change = batch[0].event
    culled = next((r.event for r in batch if isinstance(r.event, ev.SeedCulled)), None)
    if change.to_stage != Stage.CULLED or change.trigger != "command" or culled is None:
        raise NoCommand("a StageChanged batch that is not a Cull command's")
    return cmd.Cull(env=env, slot=change.slot, reason=culled.reason, initiator=culled.initiator,
                    decision_epoch=culled.decision_epoch)


def _record_decision(env: int, batch: Sequence[Any]) -> cmd.Command:
    return cmd.RecordDecision(env=env, decision=batch[0].event)


def _reject_action(env: int, batch: Sequence[Any]) -> cmd.Command:
    e = batch[0].event
    return cmd.RejectAction(env=env, decision_epoch=e.decision_epoch, command=e.command, code=e.code,
                            message=e.message)


def _record_reward(env: int, batch: Sequence[Any]) -> cmd.Command:
    return cmd.RecordReward(env=env, reward=batch[0].event)


def _record_checkpoint(env: Any, batch: Sequence[Any]) -> cmd.Command:
    e = batch[0].event
    return cmd.RecordCheckpoint(path=e.path, sha256=e.sha256, size=e.size_bytes, covers_seq=e.covers_seq,
                                kind=e.kind)


def _record_policy_update(env: Any, batch: Sequence[Any]) -> cmd.Command:
    return cmd.RecordPolicyUpdate(update=batch[0].event)


def _finish_episode(env: int, batch: Sequence[Any]) -> cmd.Command:
    return cmd.FinishEpisode(env=env)


def _finish_run(env: Any, batch: Sequence[Any]) -> cmd.Command:
    e = batch[0].event
    return cmd.FinishRun(status=e.status, final=dict(e.final), error_type=e.error_type,
                         error_message=e.error_message, wall_time_s=e.wall_time_s)


_BY_FIRST = {
    ev.RunStarted: _start_run,
    ev.EpisodeStarted: _start_episode,
    ev.EpisodeExtended: _extend_episode,
    ev.EpochCompleted: _record_epoch,
    ev.GateEvaluated: _gated_command,
    ev.StageChanged: _cull,
    ev.PolicyDecided: _record_decision,
    ev.ActionRejected: _reject_action,
    ev.RewardComputed: _record_reward,
    ev.CheckpointWritten: _record_checkpoint,
    ev.PolicyUpdated: _record_policy_update,
    ev.EpisodeFinished: _finish_episode,
    ev.RunFinished: _finish_run,
}


def lifecycle_command(env: int, decision_epoch: int, command: ev.PolicyCommand) -> cmd.Command:
    """A controller's command as the engine turns it into a lifecycle command (a placeholder probe
    for germinate: whatever refuses it does so before G0 reads the probe)."""
    if command.op == "germinate":
        probe = cmd.ProbeReport(shape_ok=True, finite=True, identity=True, param_count=0)
        return cmd.Germinate(env=env, slot=command.slot, blueprint=command.blueprint or "", blend=command.blend,
                             probe=probe, decision_epoch=decision_epoch)
    if command.op == "advance":
        return cmd.Advance(env=env, slot=command.slot, decision_epoch=decision_epoch)
    if command.op == "fossilize":
        return cmd.Fossilize(env=env, slot=command.slot, decision_epoch=decision_epoch)
    if command.op == "cull":
        return cmd.Cull(env=env, slot=command.slot, reason=command.reason, initiator="policy",
                        decision_epoch=decision_epoch)
    raise DomainError("invalid_stage", f"unknown op {command.op!r}")
