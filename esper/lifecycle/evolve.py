"""`evolve(state, record) -> state`: the fold. Reads a record's env, episode and payload, never its
seq or timestamp, so a buffered batch folds before rank 0 stamps it."""

from typing import Any, Callable

from esper.events import catalogue as ev
from esper.events.enums import Gate, Stage
from esper.lifecycle.config import LifecycleConfig
from esper.lifecycle.errors import ReplayError
from esper.lifecycle.stages import LIVE, is_valid_transition
from esper.lifecycle.state import Counterfactual, EnvState, RunState, SeedState, SlotState, replace as _replace


def evolve(state: RunState, record: Any) -> RunState:
    """`record` is a `Record`, or anything with `env`, `episode` and `event` (an unstamped record)."""
    event = record.event
    kind = type(event)
    if kind in _RUN_HANDLERS:
        return _RUN_HANDLERS[kind](state, event, record)
    if state.status is None:
        raise ReplayError(getattr(record, "seq", None), f"{kind.__name__} before RunStarted")
    if kind is ev.EpisodeStarted:
        return state.with_env(record.env, _episode_started(state, event, record.episode))
    env = state.envs.get(record.env)
    if env is None or env.episode != record.episode:
        raise ReplayError(getattr(record, "seq", None), f"{kind.__name__} for env {record.env} "
                          f"episode {record.episode}, which has not started")
    try:
        state = state.with_env(record.env, apply_env_event(env, event))
    except _Invalid as exc:
        raise ReplayError(getattr(record, "seq", None), str(exc)) from None
    if kind is ev.EpisodeFinished:
        state = _replace(state, episodes_completed=state.episodes_completed + 1)
    return state


class _Invalid(Exception):
    pass


def _run_started(state: RunState, event: ev.RunStarted, record: Any) -> RunState:
    if state.status is not None:
        raise ReplayError(getattr(record, "seq", None), "a second RunStarted")
    try:
        config = lifecycle_config(event.config)
    except (TypeError, ValueError) as exc:
        raise ReplayError(getattr(record, "seq", None), f"invalid lifecycle configuration: {exc}") from None
    return RunState(
        status="running",
        config=config,
        topology=event.topology,
        catalogue=event.catalogue,
        slots_info=event.slots,
        n_envs=event.n_envs,
    )


def lifecycle_config(config: dict[str, Any]) -> LifecycleConfig:
    return LifecycleConfig(**config.get("lifecycle", {}))


def _run_finished(state: RunState, event: ev.RunFinished, record: Any) -> RunState:
    return _replace(state, status=event.status)


def _run_scoped_noop(state: RunState, event: Any, record: Any) -> RunState:
    return state


_RUN_HANDLERS: dict[type, Callable[[RunState, Any, Any], RunState]] = {
    ev.RunStarted: _run_started,
    ev.RunFinished: _run_finished,
    ev.CheckpointWritten: _run_scoped_noop,
    ev.PolicyUpdated: _run_scoped_noop,
}


def _episode_started(state: RunState, event: ev.EpisodeStarted, episode: int) -> EnvState:
    slots = tuple(
        SlotState(slot_id=s.slot_id, enabled=s.slot_id in event.slots_enabled) for s in state.slots_info
    )
    return EnvState(episode=episode, status="running", epoch=0, ticked=True, slots=slots,
                    max_epochs=event.max_epochs)


def apply_env_event(env: EnvState, event: Any) -> EnvState:
    handler = _ENV_HANDLERS.get(type(event))
    if handler is None:
        raise _Invalid(f"{type(event).__name__} is not an env-scoped event")
    return handler(env, event)


def _slot_of(env: EnvState, event: Any) -> SlotState:
    slot = env.slot(event.slot)
    if slot is None:
        raise _Invalid(f"unknown slot {event.slot!r}")
    return slot


def _seed_of(env: EnvState, event: Any) -> tuple[SlotState, SeedState]:
    slot = _slot_of(env, event)
    if slot.seed is None or slot.seed.seed_id != event.seed_id:
        raise _Invalid(f"slot {event.slot!r} does not hold seed {event.seed_id!r}")
    return slot, slot.seed


def _with_seed(env: EnvState, slot: SlotState, **changes: Any) -> EnvState:
    return env.with_slot(_replace(slot, seed=_replace(slot.seed, **changes)))


def _epoch_completed(env: EnvState, event: ev.EpochCompleted) -> EnvState:
    acc = event.val_acc
    best = acc if env.best_val_acc is None or acc > env.best_val_acc else env.best_val_acc
    slots = tuple(_seed_saw_epoch(s, acc) for s in env.slots)
    return _replace(env, epoch=event.epoch, ticked=False, last_val_acc=acc, last_val_loss=event.val_loss,
                    best_val_acc=best, total_params=event.total_params, slots=slots)


def _seed_saw_epoch(slot: SlotState, acc: float) -> SlotState:
    seed = slot.seed
    if seed is None or slot.stage not in LIVE:
        return slot
    best = acc if seed.best_acc is None or acc > seed.best_acc else seed.best_acc
    return _replace(slot, seed=_replace(seed, current_acc=acc, best_acc=best, epochs_total=seed.epochs_total + 1))


def _seed_measured(env: EnvState, event: ev.SeedMeasured) -> EnvState:
    slot, seed = _seed_of(env, event)
    leaks = seed.training_leaks
    if slot.stage == Stage.TRAINING and event.isolation_leaks:
        leaks += event.isolation_leaks
    ratio_epoch = event.epoch if event.grad_ratio is not None else seed.ratio_epoch
    return _with_seed(env, slot, grad_ratio_ema=event.grad_ratio_ema, ratio_epoch=ratio_epoch,
                      training_leaks=leaks, healthy=event.finite)


def _counterfactual(env: EnvState, event: ev.CounterfactualMeasured) -> EnvState:
    slot, seed = _seed_of(env, event)
    sample = Counterfactual(value=event.contribution, epoch=event.epoch, alpha=seed.alpha)
    if event.kind == "shadow":
        return _with_seed(env, slot, last_shadow=sample)
    return _with_seed(env, slot, last_counterfactual=sample)


def _gate_evaluated(env: EnvState, event: ev.GateEvaluated) -> EnvState:
    if event.gate == Gate.G0:  # a germination attempt consumes its seed id, passed or not
        return _replace(env, seed_counter=env.seed_counter + 1)
    return env


def _seed_germinated(env: EnvState, event: ev.SeedGerminated) -> EnvState:
    slot = _slot_of(env, event)
    if slot.stage != Stage.DORMANT:
        raise _Invalid(f"germination into slot {event.slot!r} in {slot.stage.name}")
    seed = SeedState(
        seed_id=event.seed_id, blueprint=event.blueprint, blend_kind=event.blend.kind,
        steps_total=event.blend.steps, seed_params=event.seed_params, blend_params=event.blend_params,
        identity_at_birth=event.identity_at_birth, germinated_epoch=event.epoch,
        acc_at_germination=env.last_val_acc, acc_at_stage_start=env.last_val_acc,
        current_acc=env.last_val_acc, best_acc=env.last_val_acc,
    )
    return _replace(env.with_slot(_replace(slot, seed=seed)), seeds_germinated=env.seeds_germinated + 1)


def _stage_changed(env: EnvState, event: ev.StageChanged) -> EnvState:
    slot, seed = _seed_of(env, event)
    if slot.stage != event.from_stage or not is_valid_transition(event.from_stage, event.to_stage):
        raise _Invalid(f"{event.seed_id}: {event.from_stage.name} -> {event.to_stage.name} "
                       f"while the slot is {slot.stage.name}")
    new_seed = None if event.to_stage == Stage.DORMANT else _replace(seed, acc_at_stage_start=seed.current_acc)
    return env.with_slot(_replace(
        slot, stage=event.to_stage, entered_epoch=event.epoch, previous_stage=event.from_stage,
        epochs_in_previous_stage=event.epochs_in_previous_stage, seed=new_seed,
    ))


def _alpha_changed(env: EnvState, event: ev.AlphaChanged) -> EnvState:
    slot, _ = _seed_of(env, event)
    return _with_seed(env, slot, alpha=event.new, step=event.step)


def _seed_culled(env: EnvState, event: ev.SeedCulled) -> EnvState:
    slot, _ = _seed_of(env, event)
    return _replace(_with_seed(env, slot, cull_reason=event.reason), seeds_culled=env.seeds_culled + 1)


def _seed_fossilized(env: EnvState, event: ev.SeedFossilized) -> EnvState:
    _seed_of(env, event)
    return _replace(env, seeds_fossilized=env.seeds_fossilized + 1)


def _policy_decided(env: EnvState, event: ev.PolicyDecided) -> EnvState:
    return _replace(env, decisions=env.decisions + (event.epoch,))


def _reward(env: EnvState, event: ev.RewardComputed) -> EnvState:
    return _replace(env, episode_return=(env.episode_return or 0.0) + event.total_raw)


def _rolled_back(env: EnvState, event: ev.GovernorRolledBack) -> EnvState:
    return _replace(env, rollbacks=env.rollbacks + 1)


def _ticked(env: EnvState, event: ev.EpochTicked) -> EnvState:
    return _replace(env, ticked=True)


def _episode_extended(env: EnvState, event: ev.EpisodeExtended) -> EnvState:
    if event.previous_max_epochs != env.max_epochs or event.max_epochs <= env.max_epochs:
        raise _Invalid(f"an extension from {event.previous_max_epochs} to {event.max_epochs} epochs "
                       f"of an episode of {env.max_epochs}")
    return _replace(env, max_epochs=event.max_epochs)


def _episode_finished(env: EnvState, event: ev.EpisodeFinished) -> EnvState:
    return _replace(env, status="finished")


def _unchanged(env: EnvState, event: Any) -> EnvState:
    return env


_ENV_HANDLERS: dict[type, Callable[[EnvState, Any], EnvState]] = {
    ev.EpochCompleted: _epoch_completed,
    ev.SeedMeasured: _seed_measured,
    ev.CounterfactualMeasured: _counterfactual,
    ev.GateEvaluated: _gate_evaluated,
    ev.SeedGerminated: _seed_germinated,
    ev.StageChanged: _stage_changed,
    ev.AlphaChanged: _alpha_changed,
    ev.SeedCulled: _seed_culled,
    ev.SeedFossilized: _seed_fossilized,
    ev.PolicyDecided: _policy_decided,
    ev.ActionRejected: _unchanged,
    ev.RewardComputed: _reward,
    ev.GovernorRolledBack: _rolled_back,
    ev.EpochTicked: _ticked,
    ev.EpisodeExtended: _episode_extended,
    ev.EpisodeFinished: _episode_finished,
}
