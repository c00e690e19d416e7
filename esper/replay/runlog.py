"""What a report reads from one log, gathered in one pass over its records."""

from typing import Any

import attrs

from esper.events import catalogue as ev
from esper.events.enums import Stage
from esper.replay.timetravel import Loaded, Replayed, replay, run_header, seed_rows

Key = tuple[int, int]  # (env, episode)


@attrs.define
class RunLog:
    loaded: Loaded
    replayed: Replayed
    header: dict[str, Any]
    seeds: list[dict[str, Any]]
    start: ev.RunStarted | None = None
    finished: ev.RunFinished | None = None
    episodes: dict[Key, ev.EpisodeStarted] = attrs.Factory(dict)
    episode_ends: dict[Key, ev.EpisodeFinished] = attrs.Factory(dict)
    epochs: dict[Key, list[ev.EpochCompleted]] = attrs.Factory(dict)
    stages: dict[tuple[Key, str], list[tuple[int, Stage]]] = attrs.Factory(dict)  # (key, slot) -> (epoch, stage)
    germinations: list[tuple[Key, ev.SeedGerminated]] = attrs.Factory(list)
    verdicts: list[tuple[Key, ev.GateEvaluated]] = attrs.Factory(list)
    culls: list[tuple[Key, ev.SeedCulled]] = attrs.Factory(list)
    fossils: list[tuple[Key, ev.SeedFossilized]] = attrs.Factory(list)
    rollbacks: list[tuple[Key, ev.GovernorRolledBack]] = attrs.Factory(list)
    alphas: dict[tuple[Key, str], list[tuple[int, float]]] = attrs.Factory(dict)  # (key, seed) -> (epoch, alpha)
    contributions: dict[tuple[Key, str], list[tuple[int, float | None]]] = attrs.Factory(dict)
    shadows: dict[tuple[Key, str], list[tuple[int, float | None]]] = attrs.Factory(dict)
    decisions: list[tuple[Key, ev.PolicyDecided, list[str]]] = attrs.Factory(list)
    rewards: list[tuple[Key, ev.RewardComputed]] = attrs.Factory(list)
    updates: list[ev.PolicyUpdated] = attrs.Factory(list)

    @property
    def keys(self) -> list[Key]:
        return sorted(self.episodes)

    def label(self, key: Key) -> str:
        """'' for a plain run (one env, one episode), else 'e<env>/k<episode>'."""
        return "" if len(self.episodes) <= 1 else f"e{key[0]}/k{key[1]}"

    def last_epoch(self, key: Key) -> int:
        points = self.epochs.get(key, [])
        return points[-1].epoch if points else 0

    def slots(self, key: Key) -> tuple[str, ...]:
        return self.episodes[key].slots_enabled


def collect(loaded: Loaded) -> RunLog:
    replayed = replay(loaded.records)
    run = RunLog(loaded=loaded, replayed=replayed, header=run_header(loaded, replayed), seeds=seed_rows(replayed))
    pending: dict[Key, list[str]] = {}
    for record in loaded.records:
        e = record.event
        key = (record.env, record.episode)
        if isinstance(e, ev.RunStarted):
            run.start = e
        elif isinstance(e, ev.RunFinished):
            run.finished = e
        elif isinstance(e, ev.PolicyUpdated):
            run.updates.append(e)
        elif isinstance(e, ev.EpisodeStarted):
            run.episodes[key] = e
            run.epochs[key] = []
            for slot in e.slots_enabled:
                run.stages[(key, slot)] = [(0, Stage.DORMANT)]
        elif isinstance(e, ev.EpisodeFinished):
            run.episode_ends[key] = e
        elif isinstance(e, ev.EpochCompleted):
            run.epochs.setdefault(key, []).append(e)
        elif isinstance(e, ev.StageChanged):
            run.stages.setdefault((key, e.slot), [(0, Stage.DORMANT)]).append((e.epoch, e.to_stage))
            if e.trigger == "command" and e.to_stage == Stage.CULLED:
                _outcome(pending, key, "culled")
        elif isinstance(e, ev.SeedGerminated):
            run.germinations.append((key, e))
            run.alphas[(key, e.seed_id)] = [(e.epoch, 0.0)]
        elif isinstance(e, ev.GateEvaluated):
            run.verdicts.append((key, e))
            if e.trigger == "command":
                failed = ", ".join(c.tag for c in e.checks if not c.passed)
                _outcome(pending, key, f"{e.gate.name} passed" if e.passed else f"{e.gate.name} failed: {failed}")
        elif isinstance(e, ev.SeedCulled):
            run.culls.append((key, e))
        elif isinstance(e, ev.SeedFossilized):
            run.fossils.append((key, e))
        elif isinstance(e, ev.GovernorRolledBack):
            run.rollbacks.append((key, e))
        elif isinstance(e, ev.AlphaChanged):
            run.alphas.setdefault((key, e.seed_id), [(e.epoch, e.old)]).append((e.epoch, e.new))
        elif isinstance(e, ev.CounterfactualMeasured):
            target = run.contributions if e.kind == "ablation" else run.shadows
            target.setdefault((key, e.seed_id), []).append((e.epoch, e.contribution))
        elif isinstance(e, ev.PolicyDecided):
            outcomes: list[str] = []
            run.decisions.append((key, e, outcomes))
            pending[key] = outcomes
        elif isinstance(e, ev.ActionRejected):
            _outcome(pending, key, f"rejected: {e.code}")
        elif isinstance(e, ev.RewardComputed):
            run.rewards.append((key, e))
    return run


def _outcome(pending: dict[Key, list[str]], key: Key, text: str) -> None:
    if key in pending:
        pending[key].append(text)
