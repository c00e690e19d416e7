"""`evolve` in place, for folding whole logs: `Evolver.apply(record)` changes a thawed state the
way `state = evolve(state, record)` would replace it.

Each handler here first checks everything `evolve` checks for its event type and declines (returns
False) when anything is off; a declined record, and every type without a handler here, goes
through `evolve` itself on the frozen state (so it also raises `evolve`'s own `ReplayError`). The
pure `evolve` stays the reference, and tests/test_fast_fold.py holds the two equal.
"""

from typing import Any, Callable

from esper.events import catalogue as ev
from esper.events.enums import Gate, Stage
from esper.lifecycle.evolve import evolve
from esper.lifecycle.stages import LIVE, TRANSITIONS
from esper.lifecycle.state import EnvState, RunState, SlotState, initial_state
from esper.lifecycle.thawed import ThawedEnv, ThawedRun, ThawedSeed, ThawedSlot, new_seed, thaw, thaw_env


class Evolver:
    def __init__(self, state: RunState | None = None):
        self.run = thaw(initial_state() if state is None else state)

    def apply(self, record: Any) -> None:
        event = record.event
        run = self.run
        handler = _ENV_HANDLERS.get(type(event))
        if handler is not None:
            env = run.envs.get(record.env)
            if env is not None and env.episode == record.episode and run.status is not None \
                    and handler(run, env, event):
                return
        elif type(event) in _RUN_HANDLERS and _RUN_HANDLERS[type(event)](run, record, event):
            return
        self.run = thaw(evolve(run.freeze(), record))

    def state(self) -> RunState:
        return self.run.freeze()


# -- run-scoped ---------------------------------------------------------------------------------


def _run_finished(run: ThawedRun, record: Any, event: ev.RunFinished) -> bool:
    run.status = event.status
    return True


def _run_scoped_noop(run: ThawedRun, record: Any, event: Any) -> bool:
    return True


def _episode_started(run: ThawedRun, record: Any, event: ev.EpisodeStarted) -> bool:
    if run.status is None:
        return False
    slots = tuple(SlotState(slot_id=s.slot_id, enabled=s.slot_id in event.slots_enabled) for s in run.slots_info)
    run.envs[record.env] = thaw_env(EnvState(episode=record.episode, status="running", epoch=0, ticked=True,
                                             slots=slots, max_epochs=event.max_epochs))
    return True


_RUN_HANDLERS: dict[type, Callable[[ThawedRun, Any, Any], bool]] = {
    ev.RunFinished: _run_finished,
    ev.CheckpointWritten: _run_scoped_noop,
    ev.PolicyUpdated: _run_scoped_noop,
    ev.EpisodeStarted: _episode_started,
}


# -- env-scoped ---------------------------------------------------------------------------------


def _seed_of(env: ThawedEnv, event: Any) -> tuple[ThawedSlot, ThawedSeed] | None:
    slot = env.by_id.get(event.slot)
    if slot is None or slot.seed is None or slot.seed.seed_id != event.seed_id:
        return None
    return slot, slot.seed


def _epoch_completed(run: ThawedRun, env: ThawedEnv, event: ev.EpochCompleted) -> bool:
    acc = event.val_acc
    env.best_val_acc = acc if env.best_val_acc is None or acc > env.best_val_acc else env.best_val_acc
    for slot in env.by_id.values():
        seed = slot.seed
        if seed is not None and slot.stage in LIVE:
            seed.best_acc = acc if seed.best_acc is None or acc > seed.best_acc else seed.best_acc
            seed.current_acc = acc
            seed.epochs_total += 1
    env.epoch = event.epoch
    env.ticked = False
    env.last_val_acc = acc
    env.last_val_loss = event.val_loss
    env.total_params = event.total_params
    return True


def _seed_measured(run: ThawedRun, env: ThawedEnv, event: ev.SeedMeasured) -> bool:
    found = _seed_of(env, event)
    if found is None:
        return False
    slot, seed = found
    if slot.stage == Stage.TRAINING and event.isolation_leaks:
        seed.training_leaks += event.isolation_leaks
    if event.grad_ratio is not None:
        seed.ratio_epoch = event.epoch
    seed.grad_ratio_ema = event.grad_ratio_ema
    seed.healthy = event.finite
    return True


def _counterfactual(run: ThawedRun, env: ThawedEnv, event: ev.CounterfactualMeasured) -> bool:
    found = _seed_of(env, event)
    if found is None:
        return False
    seed = found[1]
    sample = (event.contribution, event.epoch, seed.alpha)  # a Counterfactual once frozen
    if event.kind == "shadow":
        seed.last_shadow = sample
    else:
        seed.last_counterfactual = sample
    return True


def _gate_evaluated(run: ThawedRun, env: ThawedEnv, event: ev.GateEvaluated) -> bool:
    if event.gate == Gate.G0:
        env.seed_counter += 1
    return True


def _seed_germinated(run: ThawedRun, env: ThawedEnv, event: ev.SeedGerminated) -> bool:
    slot = env.by_id.get(event.slot)
    if slot is None or slot.stage != Stage.DORMANT:
        return False
    acc = env.last_val_acc
    slot.seed = new_seed(
        seed_id=event.seed_id, blueprint=event.blueprint, blend_kind=event.blend.kind,
        steps_total=event.blend.steps, seed_params=event.seed_params, blend_params=event.blend_params,
        identity_at_birth=event.identity_at_birth, germinated_epoch=event.epoch,
        acc_at_germination=acc, acc_at_stage_start=acc, current_acc=acc, best_acc=acc,
    )
    env.seeds_germinated += 1
    return True


def _stage_changed(run: ThawedRun, env: ThawedEnv, event: ev.StageChanged) -> bool:
    found = _seed_of(env, event)
    if found is None:
        return False
    slot, seed = found
    if slot.stage != event.from_stage or event.to_stage not in TRANSITIONS.get(event.from_stage, ()):
        return False
    if event.to_stage == Stage.DORMANT:
        slot.seed = None
    else:
        seed.acc_at_stage_start = seed.current_acc
    slot.stage = event.to_stage
    slot.entered_epoch = event.epoch
    slot.previous_stage = event.from_stage
    slot.epochs_in_previous_stage = event.epochs_in_previous_stage
    return True


def _alpha_changed(run: ThawedRun, env: ThawedEnv, event: ev.AlphaChanged) -> bool:
    found = _seed_of(env, event)
    if found is None:
        return False
    found[1].alpha = event.new
    found[1].step = event.step
    return True


def _seed_culled(run: ThawedRun, env: ThawedEnv, event: ev.SeedCulled) -> bool:
    found = _seed_of(env, event)
    if found is None:
        return False
    found[1].cull_reason = event.reason
    env.seeds_culled += 1
    return True


def _seed_fossilized(run: ThawedRun, env: ThawedEnv, event: ev.SeedFossilized) -> bool:
    if _seed_of(env, event) is None:
        return False
    env.seeds_fossilized += 1
    return True


def _policy_decided(run: ThawedRun, env: ThawedEnv, event: ev.PolicyDecided) -> bool:
    env.decisions.append(event.epoch)
    return True


def _unchanged(run: ThawedRun, env: ThawedEnv, event: Any) -> bool:
    return True


def _reward(run: ThawedRun, env: ThawedEnv, event: ev.RewardComputed) -> bool:
    env.episode_return = (env.episode_return or 0.0) + event.total_raw
    return True


def _rolled_back(run: ThawedRun, env: ThawedEnv, event: ev.GovernorRolledBack) -> bool:
    env.rollbacks += 1
    return True


def _ticked(run: ThawedRun, env: ThawedEnv, event: ev.EpochTicked) -> bool:
    env.ticked = True
    return True


def _episode_extended(run: ThawedRun, env: ThawedEnv, event: ev.EpisodeExtended) -> bool:
    if event.previous_max_epochs != env.max_epochs or event.max_epochs <= env.max_epochs:
        return False
    env.max_epochs = event.max_epochs
    return True


def _episode_finished(run: ThawedRun, env: ThawedEnv, event: ev.EpisodeFinished) -> bool:
    env.status = "finished"
    run.episodes_completed += 1
    return True


_ENV_HANDLERS: dict[type, Callable[[ThawedRun, ThawedEnv, Any], bool]] = {
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
