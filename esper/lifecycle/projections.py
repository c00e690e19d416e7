"""Read models (events §6): SeedView, SlotView and RunView, folded from records.

`Projector.apply` takes one record at a time, so the engine keeps views live and replay rebuilds
them from any prefix; `snapshot()` freezes the current views for comparison and display.
"""

from collections import Counter
from typing import Any

import attrs

from esper.events import catalogue as ev
from esper.events.enums import Stage
from esper.lifecycle.state import replace as _replace



@attrs.frozen
class SeedView:
    env: int
    episode: int
    seed_id: str
    slot: str
    blueprint: str
    blend: str
    seed_params: int
    stage: Stage
    history: tuple[tuple[Stage, int, int, str], ...]  # (stage, epoch, seq, reason)
    germinated_epoch: int
    ended_epoch: int | None = None
    outcome: str = "alive"  # alive | fossilized | culled | episode_ended
    cull_reason: str | None = None
    alpha: float = 0.0
    acc_at_germination: float | None = None
    current_acc: float | None = None
    best_acc: float | None = None
    acc_at_stage_start: float | None = None
    grad_ratio_ema: float | None = None
    leaks: int = 0
    last_contribution: float | None = None
    last_contribution_epoch: int | None = None
    verdicts: tuple[tuple[str, int, bool, tuple[str, ...]], ...] = ()  # (gate, epoch, passed, failed tags)

    @property
    def improvement(self) -> float | None:
        if self.current_acc is None or self.acc_at_germination is None:
            return None
        return self.current_acc - self.acc_at_germination

    @property
    def stage_improvement(self) -> float | None:
        if self.current_acc is None or self.acc_at_stage_start is None:
            return None
        return self.current_acc - self.acc_at_stage_start


@attrs.frozen
class SlotView:
    env: int
    slot: str
    stage: Stage = Stage.DORMANT
    current_seed: str | None = None
    blueprint: str | None = None
    alpha: float = 0.0
    entered_epoch: int = 0
    seeds_hosted: int = 0
    last_cull_reason: str | None = None


@attrs.frozen
class EpochPoint:
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float


@attrs.frozen
class RunView:
    run_id: str | None = None
    status: str = "unterminated"  # running (a live writer) is decided by the reader, not the fold
    task: str | None = None
    seed: int | None = None
    policy: str | None = None
    episodes: tuple[tuple[int, int, int], ...] = ()  # (env, episode, epoch reached)
    curves: tuple[tuple[int, int, int, EpochPoint], ...] = ()  # (env, episode, epoch, point)
    counts: tuple[tuple[str, int], ...] = ()  # sorted (name, count)
    last_seq: int = -1


@attrs.frozen
class Projections:
    run: RunView
    seeds: tuple[SeedView, ...]
    slots: tuple[SlotView, ...]


class Projector:
    def __init__(self) -> None:
        self._seeds: dict[tuple[int, int, str], SeedView] = {}
        self._slots: dict[tuple[int, str], SlotView] = {}
        self._episodes: dict[tuple[int, int], int] = {}
        self._curves: dict[tuple[int, int, int], EpochPoint] = {}
        self._counts: Counter[str] = Counter()
        self._run = RunView()
        self._episode_of: dict[int, int] = {}
        self._last_seq = -1
        self._last_acc: dict[tuple[int, int], float] = {}
        self._alive: dict[tuple[int, int], list[tuple[int, int, str]]] = {}  # seeds still in a slot

    def apply(self, record: Any) -> None:
        event = record.event
        self._last_seq = getattr(record, "seq", self._last_seq)
        handler = _HANDLERS.get(type(event))
        if handler is not None:
            handler(self, record, event)

    def snapshot(self) -> Projections:
        counts = tuple(sorted((k, v) for k, v in self._counts.items() if v))
        run = _replace(
            self._run,
            episodes=tuple((e, ep, n) for (e, ep), n in sorted(self._episodes.items())),
            curves=tuple((e, ep, t, p) for (e, ep, t), p in sorted(self._curves.items(), key=lambda i: i[0])),
            counts=counts, last_seq=self._last_seq,
        )
        return Projections(run=run, seeds=tuple(self._seeds.values()),
                           slots=tuple(self._slots.values()))  # canonical slot order

    # -- handlers -------------------------------------------------------------------------------

    def _key(self, record: Any, event: Any) -> tuple[int, int, str]:
        return (record.env, record.episode, event.seed_id)

    def _run_started(self, record: Any, event: ev.RunStarted) -> None:
        policy = event.config.get("run", {}).get("policy") if isinstance(event.config.get("run"), dict) else None
        self._run = _replace(self._run, run_id=getattr(record, "run_id", None), status="unterminated",
                             task=event.task, seed=event.seed, policy=policy)

    def _run_finished(self, record: Any, event: ev.RunFinished) -> None:
        self._run = _replace(self._run, status=event.status)

    def _episode_started(self, record: Any, event: ev.EpisodeStarted) -> None:
        # The previous episode of this env ends here for any seed still alive in it.
        previous = self._episode_of.get(record.env)
        if previous is not None:
            self._close_episode(record.env, previous)
        self._episode_of[record.env] = record.episode
        self._episodes[(record.env, record.episode)] = 0
        for slot in event.slots_enabled:
            self._slots[(record.env, slot)] = SlotView(env=record.env, slot=slot)

    def _episode_finished(self, record: Any, event: ev.EpisodeFinished) -> None:
        self._close_episode(record.env, record.episode)
        self._counts["episodes_finished"] += 1

    def _close_episode(self, env: int, episode: int) -> None:
        for key in self._alive.pop((env, episode), ()):
            if self._seeds[key].outcome == "alive":
                self._seeds[key] = _replace(self._seeds[key], outcome="episode_ended")

    def _epoch_completed(self, record: Any, event: ev.EpochCompleted) -> None:
        env, episode = record.env, record.episode
        self._episodes[(env, episode)] = event.epoch
        self._curves[(env, episode, event.epoch)] = EpochPoint(
            event.train_loss, event.train_acc, event.val_loss, event.val_acc)
        self._last_acc[(env, episode)] = acc = event.val_acc
        alive = self._alive.get((env, episode), ())
        for key in alive:
            view = self._seeds[key]
            best = view.best_acc if view.best_acc is not None and view.best_acc >= acc else acc
            self._seeds[key] = _replace(view, current_acc=acc, best_acc=best)

    def _germinated(self, record: Any, event: ev.SeedGerminated) -> None:
        last = self._last_acc.get((record.env, record.episode))
        key = self._key(record, event)
        self._alive.setdefault((record.env, record.episode), []).append(key)
        self._seeds[key] = SeedView(
            env=record.env, episode=record.episode, seed_id=event.seed_id, slot=event.slot,
            blueprint=event.blueprint, blend=event.blend.kind, seed_params=event.seed_params,
            stage=Stage.DORMANT, history=(), germinated_epoch=event.epoch, acc_at_germination=last,
            current_acc=last, best_acc=last, acc_at_stage_start=last,
        )
        self._counts["germinated"] += 1

    def _stage_changed(self, record: Any, event: ev.StageChanged) -> None:
        key = self._key(record, event)
        view = self._seeds[key]
        entry = (event.to_stage, event.epoch, getattr(record, "seq", -1), event.reason)
        changes: dict[str, Any] = {"history": view.history + (entry,)}
        if event.to_stage not in (Stage.EMBARGOED, Stage.RESETTING, Stage.DORMANT):
            changes.update(stage=event.to_stage, acc_at_stage_start=view.current_acc)
        if event.to_stage == Stage.CULLED:
            changes.update(ended_epoch=event.epoch, outcome="culled")
            self._alive[(record.env, record.episode)].remove(key)
        elif event.to_stage == Stage.FOSSILIZED:
            changes.update(ended_epoch=event.epoch, outcome="fossilized")
        self._seeds[key] = _replace(view, **changes)
        slot_key = (record.env, event.slot)
        slot = self._slots[slot_key]
        released = event.to_stage == Stage.DORMANT
        self._slots[slot_key] = _replace(
            slot, stage=event.to_stage, entered_epoch=event.epoch,
            current_seed=None if released else event.seed_id,
            blueprint=None if released else view.blueprint,
            alpha=0.0 if released else slot.alpha,
            seeds_hosted=slot.seeds_hosted + (event.to_stage == Stage.GERMINATED),
        )

    def _alpha_changed(self, record: Any, event: ev.AlphaChanged) -> None:
        key = self._key(record, event)
        self._seeds[key] = _replace(self._seeds[key], alpha=event.new)
        slot_key = (record.env, event.slot)
        self._slots[slot_key] = _replace(self._slots[slot_key], alpha=event.new)

    def _measured(self, record: Any, event: ev.SeedMeasured) -> None:
        key = self._key(record, event)
        view = self._seeds[key]
        leaks = view.leaks + (event.isolation_leaks or 0 if event.stage == Stage.TRAINING else 0)
        self._seeds[key] = _replace(view, grad_ratio_ema=event.grad_ratio_ema, leaks=leaks)

    def _counterfactual(self, record: Any, event: ev.CounterfactualMeasured) -> None:
        if event.kind != "ablation":
            return
        key = self._key(record, event)
        self._seeds[key] = _replace(self._seeds[key], last_contribution=event.contribution,
                                    last_contribution_epoch=event.epoch)

    def _gate(self, record: Any, event: ev.GateEvaluated) -> None:
        self._counts[f"gate_{event.gate.name}_{'passed' if event.passed else 'failed'}"] += 1
        key = self._key(record, event)
        view = self._seeds.get(key)
        if view is None:  # a failed G0: the seed never existed
            return
        failed = tuple(c.tag for c in event.checks if not c.passed)
        self._seeds[key] = _replace(view, verdicts=view.verdicts + ((event.gate.name, event.epoch, event.passed,
                                                                       failed),))

    def _culled(self, record: Any, event: ev.SeedCulled) -> None:
        key = self._key(record, event)
        self._seeds[key] = _replace(self._seeds[key], cull_reason=event.reason)
        slot_key = (record.env, event.slot)
        self._slots[slot_key] = _replace(self._slots[slot_key], last_cull_reason=event.reason)
        self._counts[f"culled_{event.reason}"] += 1

    def _fossilized(self, record: Any, event: ev.SeedFossilized) -> None:
        self._counts["fossilized"] += 1

    def _decided(self, record: Any, event: ev.PolicyDecided) -> None:
        ops = [c.op for c in event.commands] or ["wait"]
        for op in ops:
            self._counts[f"decision_{op}"] += 1

    def _count(name: str):
        def handler(self: "Projector", record: Any, event: Any) -> None:
            self._counts[name] += 1

        return handler


_HANDLERS = {
    ev.RunStarted: Projector._run_started,
    ev.RunFinished: Projector._run_finished,
    ev.EpisodeStarted: Projector._episode_started,
    ev.EpisodeFinished: Projector._episode_finished,
    ev.EpochCompleted: Projector._epoch_completed,
    ev.SeedGerminated: Projector._germinated,
    ev.StageChanged: Projector._stage_changed,
    ev.AlphaChanged: Projector._alpha_changed,
    ev.SeedMeasured: Projector._measured,
    ev.CounterfactualMeasured: Projector._counterfactual,
    ev.GateEvaluated: Projector._gate,
    ev.SeedCulled: Projector._culled,
    ev.SeedFossilized: Projector._fossilized,
    ev.PolicyDecided: Projector._decided,
    ev.ActionRejected: Projector._count("rejections"),
    ev.GovernorRolledBack: Projector._count("rollbacks"),
    ev.CheckpointWritten: Projector._count("checkpoints"),
    ev.EpisodeExtended: Projector._count("episodes_extended"),
    ev.PolicyUpdated: Projector._count("ppo_updates"),
}
