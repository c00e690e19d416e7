"""Folding a log, whole or up to a point (events §7): what `esper replay` shows.

`load` reads a log (or a run directory) through the last complete batch. `replay` folds all of
it; `until` folds through the end of the batch holding a seq; `at_epoch` folds through the
`EpochTicked` of an epoch of one env-episode, or its `EpisodeFinished` for the last epoch. Where
the fold stops at an `EpochTicked` or `EpisodeFinished`, the recorded `state_digest` is checked
against the digest of the folded env state: the proof that the fold equals the live state.
"""

from pathlib import Path
from typing import Any, Sequence

import attrs

from esper.events import catalogue as ev
from esper.events.envelope import Record
from esper.events.log import LogReader, LogSummary, resolve
from esper.lifecycle.decide import state_digest
from esper.lifecycle.fold import fold
from esper.lifecycle.projections import Projections
from esper.lifecycle.state import RunState


class TimeTravelError(ValueError):
    """The requested point is not in the log (a user error)."""


@attrs.frozen
class Loaded:
    path: Path
    records: tuple[Record, ...]
    summary: LogSummary

    @property
    def run_started(self) -> ev.RunStarted | None:
        if self.records and isinstance(self.records[0].event, ev.RunStarted):
            return self.records[0].event
        return None


def load(path: str | Path) -> Loaded:
    """Every record through the last complete batch; raises the log's own errors (`LogError`,
    `UnknownEventType`) for the caller to report."""
    log = resolve(path)
    stream = LogReader(log).records()
    records = tuple(stream)
    return Loaded(path=log, records=records, summary=stream.summary)


@attrs.frozen
class DigestCheck:
    seq: int
    env: int
    episode: int
    epoch: int
    recorded: str
    folded: str

    @property
    def ok(self) -> bool:
        return self.recorded == self.folded


@attrs.frozen
class Replayed:
    state: RunState
    projections: Projections
    records: int  # how many were folded
    last_seq: int | None
    digest: DigestCheck | None  # set when the fold ended at an EpochTicked or EpisodeFinished
    point: tuple[int, int, int] | None = None  # (env, episode, epoch) of the stop, for --epoch and --until


def replay(records: Sequence[Record]) -> Replayed:
    return _fold_prefix(records, len(records))


def until(records: Sequence[Record], seq: int) -> Replayed:
    """Fold through the end of the batch that holds `seq`."""
    if not records:
        raise TimeTravelError("the log holds no complete batch")
    last = records[-1].seq
    if not 0 <= seq <= last:
        raise TimeTravelError(f"seq {seq} is not in the log (0..{last})")
    end = seq
    while not records[end].batch_end:
        end += 1
    return _fold_prefix(records, end + 1)


def at_epoch(records: Sequence[Record], epoch: int, env: int = 0, episode: int = 0) -> Replayed:
    """Fold through the end of step `epoch` of (env, episode): its EpochTicked, or the
    EpisodeFinished of its last epoch."""
    for i, record in enumerate(records):
        event = record.event
        if record.env == env and record.episode == episode and isinstance(event, (ev.EpochTicked,
                                                                                   ev.EpisodeFinished)) \
                and event.epoch == epoch:
            return _fold_prefix(records, i + 1)
    reached = [r.event.epoch for r in records if r.env == env and r.episode == episode
               and isinstance(r.event, (ev.EpochTicked, ev.EpisodeFinished))]
    span = f"epochs {min(reached)}..{max(reached)}" if reached else "no completed epoch"
    raise TimeTravelError(f"env {env} episode {episode} has no end of epoch {epoch} in the log ({span})")


def _fold_prefix(records: Sequence[Record], n: int) -> Replayed:
    folded = fold(records[:n])
    last = records[n - 1] if n else None
    digest = None
    point = None
    if last is not None and last.env is not None:
        point = (last.env, last.episode, getattr(last.event, "epoch", 0))
        if isinstance(last.event, (ev.EpochTicked, ev.EpisodeFinished)):
            env_state = folded.state.envs[last.env]
            digest = DigestCheck(seq=last.seq, env=last.env, episode=last.episode, epoch=last.event.epoch,
                                 recorded=last.event.state_digest, folded=state_digest(env_state))
    return Replayed(state=folded.state, projections=folded.projections, records=n,
                    last_seq=None if last is None else last.seq, digest=digest, point=point)


# -- what replay prints -------------------------------------------------------------------------


def run_header(loaded: Loaded, replayed: Replayed) -> dict[str, Any]:
    """Run id, task, status, episodes, epochs, events and the log's tail (events §7)."""
    run = replayed.projections.run
    start = loaded.run_started
    status = run.status
    if status == "unterminated" and (loaded.summary.tail == "live" or replayed.records < len(loaded.records)):
        status = "running"  # a live log, or the run as it was at an earlier point
    episodes = [{"env": e, "episode": k, "epochs": n} for e, k, n in run.episodes]
    forked = start.forked_from if start is not None else None
    return {
        "path": str(loaded.path),
        "run_id": run.run_id,
        "task": run.task,
        "policy": run.policy,
        "seed": run.seed,
        "status": status,
        "episodes": episodes,
        "epochs": sum(e["epochs"] for e in episodes),
        "events": replayed.records,
        "last_seq": replayed.last_seq,
        "log_records": loaded.summary.records,
        "tail": loaded.summary.tail,
        "torn_offset": loaded.summary.torn_offset,
        "torn_bytes": loaded.summary.torn_bytes,
        "forked_from": None if forked is None else {"run_id": forked.run_id, "seq": forked.seq,
                                                     "prefix_sha256": forked.prefix_sha256},
    }


def seed_rows(replayed: Replayed, env: int | None = None, episode: int | None = None) -> list[dict[str, Any]]:
    """The seeds table: env, episode, seed, slot, blueprint, stage, alpha, germinated, ended,
    outcome, last contribution."""
    rows = []
    for s in replayed.projections.seeds:
        if (env is not None and s.env != env) or (episode is not None and s.episode != episode):
            continue
        rows.append({
            "env": s.env, "episode": s.episode, "seed_id": s.seed_id, "slot": s.slot, "blueprint": s.blueprint,
            "stage": s.stage.name, "alpha": s.alpha, "germinated_epoch": s.germinated_epoch,
            "ended_epoch": s.ended_epoch, "outcome": s.outcome, "cull_reason": s.cull_reason,
            "last_contribution": s.last_contribution,
        })
    return rows


def slot_rows(replayed: Replayed, env: int | None = None) -> list[dict[str, Any]]:
    """Each env's slots as the fold leaves them (stage, seed, alpha, epochs in stage)."""
    rows = []
    for e, env_state in sorted(replayed.state.envs.items()):
        if env is not None and e != env:
            continue
        for slot in env_state.slots:
            if not slot.enabled:
                continue
            rows.append({
                "env": e, "episode": env_state.episode, "slot": slot.slot_id, "stage": slot.stage.name,
                "seed_id": slot.seed.seed_id if slot.seed else None,
                "alpha": slot.seed.alpha if slot.seed else 0.0,
                "epochs_in_stage": slot.epochs_in_stage(env_state.epoch),
            })
    return rows
