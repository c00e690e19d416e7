"""The projections of `Projector`, built in place for folding whole logs.

`Projector` keeps frozen views and replaces one per record, which suits the engine, whose
snapshots must be cheap. A fold takes one snapshot at its end, so here every seed and slot view is
a mutable record changed in place and frozen only by `snapshot()`. Each handler does what its
`Projector` twin does, in the same order and over the same keyed dicts, so the snapshots are equal
(tests/test_fast_fold.py checks them on generated and synthetic logs).
"""

from typing import Any

import attrs

from esper.events import catalogue as ev
from esper.events.enums import Gate, Stage
from esper.lifecycle.projections import EpochPoint, Projections, RunView, SeedView, SlotView
from esper.lifecycle.state import replace as _replace


def _names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in attrs.fields(cls))


class _Seed:
    __slots__ = _names(SeedView)  # `history` and `verdicts` are lists here

    def freeze(self) -> SeedView:
        values = {name: getattr(self, name) for name in self.__slots__}
        values["history"], values["verdicts"] = tuple(self.history), tuple(self.verdicts)
        return SeedView(**values)


class _Slot:
    __slots__ = _names(SlotView)

    def freeze(self) -> SlotView:
        return SlotView(**{name: getattr(self, name) for name in self.__slots__})


def _defaults(cls: type) -> dict[str, Any]:
    return {f.name: f.default for f in attrs.fields(cls) if f.default is not attrs.NOTHING}


# The views have no validators or converters: their defaults plus the given fields are what their
# constructors would hold.
_SEED_DEFAULTS, _SLOT_DEFAULTS = _defaults(SeedView), _defaults(SlotView)


def _new(mutable: _Seed | _Slot, defaults: dict[str, Any], **fields: Any) -> Any:
    for name, value in (defaults | fields).items():
        setattr(mutable, name, value)
    return mutable


_UNLIVE = (Stage.EMBARGOED, Stage.RESETTING, Stage.DORMANT)
_GATE_NAMES = {gate: gate.name for gate in Gate}
_GATE_COUNTS = {(gate, passed): f"gate_{gate.name}_{'passed' if passed else 'failed'}"
                for gate in Gate for passed in (False, True)}


class FastProjector:
    def __init__(self) -> None:
        self._seeds: dict[tuple[int, int, str], _Seed] = {}
        self._slots: dict[tuple[int, str], _Slot] = {}
        self._episodes: dict[tuple[int, int], int] = {}
        self._curves: dict[tuple[int, int, int], EpochPoint] = {}
        self._counts: dict[str, int] = {}
        self._run = RunView()
        self._episode_of: dict[int, int] = {}
        self._last_seq = -1
        self._last_acc: dict[tuple[int, int], float] = {}
        self._alive: dict[tuple[int, int], list[tuple[int, int, str]]] = {}

    def apply(self, record: Any) -> None:
        event = record.event
        try:
            self._last_seq = record.seq
        except AttributeError:  # an unstamped record leaves it as it was (cheaper than getattr)
            pass
        handler = _HANDLERS.get(type(event))
        if handler is not None:
            handler(self, record, event)

    def snapshot(self) -> Projections:
        run = _replace(
            self._run,
            episodes=tuple((e, ep, n) for (e, ep), n in sorted(self._episodes.items())),
            curves=tuple((e, ep, t, p) for (e, ep, t), p in sorted(self._curves.items(), key=lambda i: i[0])),
            counts=tuple(sorted((k, v) for k, v in self._counts.items() if v)), last_seq=self._last_seq,
        )
        return Projections(run=run, seeds=tuple(s.freeze() for s in self._seeds.values()),
                           slots=tuple(s.freeze() for s in self._slots.values()))

    def _count(self, name: str) -> None:
        self._counts[name] = self._counts.get(name, 0) + 1

    # -- handlers, each the twin of Projector's --------------------------------------------------

    def _run_started(self, record: Any, event: ev.RunStarted) -> None:
        policy = event.config.get("run", {}).get("policy") if isinstance(event.config.get("run"), dict) else None
        self._run = _replace(self._run, run_id=getattr(record, "run_id", None), status="unterminated",
                             task=event.task, seed=event.seed, policy=policy)

    def _run_finished(self, record: Any, event: ev.RunFinished) -> None:
        self._run = _replace(self._run, status=event.status)

    def _episode_started(self, record: Any, event: ev.EpisodeStarted) -> None:
        previous = self._episode_of.get(record.env)
        if previous is not None:
            self._close_episode(record.env, previous)
        self._episode_of[record.env] = record.episode
        self._episodes[(record.env, record.episode)] = 0
        for slot in event.slots_enabled:
            self._slots[(record.env, slot)] = _new(_Slot(), _SLOT_DEFAULTS, env=record.env, slot=slot)

    def _episode_finished(self, record: Any, event: ev.EpisodeFinished) -> None:
        self._close_episode(record.env, record.episode)
        self._count("episodes_finished")

    def _close_episode(self, env: int, episode: int) -> None:
        for key in self._alive.pop((env, episode), ()):
            view = self._seeds[key]
            if view.outcome == "alive":
                view.outcome = "episode_ended"

    def _epoch_completed(self, record: Any, event: ev.EpochCompleted) -> None:
        env_episode = (record.env, record.episode)
        self._episodes[env_episode] = event.epoch
        self._curves[(record.env, record.episode, event.epoch)] = EpochPoint(
            event.train_loss, event.train_acc, event.val_loss, event.val_acc)
        self._last_acc[env_episode] = acc = event.val_acc
        seeds = self._seeds
        for key in self._alive.get(env_episode, ()):
            view = seeds[key]
            view.best_acc = view.best_acc if view.best_acc is not None and view.best_acc >= acc else acc
            view.current_acc = acc

    def _germinated(self, record: Any, event: ev.SeedGerminated) -> None:
        last = self._last_acc.get((record.env, record.episode))
        key = (record.env, record.episode, event.seed_id)
        self._alive.setdefault((record.env, record.episode), []).append(key)
        self._seeds[key] = _new(
            _Seed(), _SEED_DEFAULTS, env=record.env, episode=record.episode, seed_id=event.seed_id,
            slot=event.slot, blueprint=event.blueprint, blend=event.blend.kind, seed_params=event.seed_params,
            stage=Stage.DORMANT, history=[], germinated_epoch=event.epoch, acc_at_germination=last,
            current_acc=last, best_acc=last, acc_at_stage_start=last, verdicts=[],
        )
        self._count("germinated")

    def _stage_changed(self, record: Any, event: ev.StageChanged) -> None:
        key = (record.env, record.episode, event.seed_id)
        view = self._seeds[key]
        to_stage = event.to_stage
        view.history.append((to_stage, event.epoch, getattr(record, "seq", -1), event.reason))
        if to_stage not in _UNLIVE:
            view.stage, view.acc_at_stage_start = to_stage, view.current_acc
        if to_stage == Stage.CULLED:
            view.ended_epoch, view.outcome = event.epoch, "culled"
            self._alive[(record.env, record.episode)].remove(key)
        elif to_stage == Stage.FOSSILIZED:
            view.ended_epoch, view.outcome = event.epoch, "fossilized"
        slot = self._slots[(record.env, event.slot)]
        released = to_stage == Stage.DORMANT
        slot.stage, slot.entered_epoch = to_stage, event.epoch
        slot.current_seed = None if released else event.seed_id
        slot.blueprint = None if released else view.blueprint
        slot.alpha = 0.0 if released else slot.alpha
        slot.seeds_hosted += to_stage == Stage.GERMINATED

    def _alpha_changed(self, record: Any, event: ev.AlphaChanged) -> None:
        self._seeds[(record.env, record.episode, event.seed_id)].alpha = event.new
        self._slots[(record.env, event.slot)].alpha = event.new

    def _measured(self, record: Any, event: ev.SeedMeasured) -> None:
        view = self._seeds[(record.env, record.episode, event.seed_id)]
        view.leaks += event.isolation_leaks or 0 if event.stage == Stage.TRAINING else 0
        view.grad_ratio_ema = event.grad_ratio_ema

    def _counterfactual(self, record: Any, event: ev.CounterfactualMeasured) -> None:
        if event.kind != "ablation":
            return
        view = self._seeds[(record.env, record.episode, event.seed_id)]
        view.last_contribution, view.last_contribution_epoch = event.contribution, event.epoch

    def _gate(self, record: Any, event: ev.GateEvaluated) -> None:
        counts, name = self._counts, _GATE_COUNTS[(event.gate, event.passed)]
        counts[name] = counts.get(name, 0) + 1
        view = self._seeds.get((record.env, record.episode, event.seed_id))
        if view is None:  # a failed G0: the seed never existed
            return
        failed = ()
        for check in event.checks:  # a plain loop: a comprehension is a call of its own
            if not check.passed:
                failed += (check.tag,)
        view.verdicts.append((_GATE_NAMES[event.gate], event.epoch, event.passed, failed))

    def _culled(self, record: Any, event: ev.SeedCulled) -> None:
        self._seeds[(record.env, record.episode, event.seed_id)].cull_reason = event.reason
        self._slots[(record.env, event.slot)].last_cull_reason = event.reason
        self._count(f"culled_{event.reason}")

    def _fossilized(self, record: Any, event: ev.SeedFossilized) -> None:
        self._count("fossilized")

    def _decided(self, record: Any, event: ev.PolicyDecided) -> None:
        if not event.commands:
            self._count("decision_wait")
        for command in event.commands:
            self._count(f"decision_{command.op}")

    def _counter(name: str):
        def handler(self: "FastProjector", record: Any, event: Any) -> None:
            self._count(name)

        return handler


_HANDLERS = {
    ev.RunStarted: FastProjector._run_started,
    ev.RunFinished: FastProjector._run_finished,
    ev.EpisodeStarted: FastProjector._episode_started,
    ev.EpisodeFinished: FastProjector._episode_finished,
    ev.EpochCompleted: FastProjector._epoch_completed,
    ev.SeedGerminated: FastProjector._germinated,
    ev.StageChanged: FastProjector._stage_changed,
    ev.AlphaChanged: FastProjector._alpha_changed,
    ev.SeedMeasured: FastProjector._measured,
    ev.CounterfactualMeasured: FastProjector._counterfactual,
    ev.GateEvaluated: FastProjector._gate,
    ev.SeedCulled: FastProjector._culled,
    ev.SeedFossilized: FastProjector._fossilized,
    ev.PolicyDecided: FastProjector._decided,
    ev.ActionRejected: FastProjector._counter("rejections"),
    ev.GovernorRolledBack: FastProjector._counter("rollbacks"),
    ev.CheckpointWritten: FastProjector._counter("checkpoints"),
    ev.EpisodeExtended: FastProjector._counter("episodes_extended"),
    ev.PolicyUpdated: FastProjector._counter("ppo_updates"),
}
