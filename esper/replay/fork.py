"""`esper fork` (events §7): a new run from the state at a quiescent seq, with another controller.

The parent is reproduced up to SEQ, from the latest usable checkpoint whose `CheckpointWritten`
lies at or before SEQ (its records re-appended, as a resume does) or from the start. During that
prefix the log itself is the controller: `LogController` re-issues each recorded `PolicyDecided`,
so the parent's policy is not needed. Every record the fork writes up to SEQ is checked for
payload equality with the parent's. Then the new controller takes over to the run's last epoch.
The new log starts with its own `RunStarted` (`run.policy` replaced, `forked_from` = parent run
id, SEQ and the sha256 of the parent's bytes through SEQ), so it folds without its parent.
"""

from pathlib import Path
from typing import Any, Sequence

import attrs

from esper.events import catalogue as ev
from esper.events.envelope import Record
from esper.events.log import prefix_sha256
from esper.lifecycle.evolve import evolve
from esper.lifecycle.state import initial_state
from esper.replay.compare import Divergence, as_stored, divergence, same
from esper.replay.timetravel import Loaded, load


class ForkRefused(ValueError):
    """Not a quiescent seq, an unknown policy, an unusable log: a user error (exit code 2)."""


class ForkDiverged(Exception):
    """The reproduced prefix differs from the parent's (exit code 1)."""

    def __init__(self, divergence: Divergence):
        super().__init__(divergence.describe())
        self.divergence = divergence
        self.run_dir: Path | None = None  # the fork's directory, left as it was when the check failed


@attrs.frozen
class QuiescentPoint:
    seq: int
    type: str
    env: int | None
    episode: int | None
    epoch: int | None
    checkpoint_seq: int | None  # the latest CheckpointWritten at or before seq


def quiescent_points(records: Sequence[Record], run_dir: Path | None = None) -> list[QuiescentPoint]:
    """Batch ends of a running run after which every running env has ended its step (EpochTicked,
    or EpisodeFinished) and no decision is pending. With `run_dir`, `checkpoint_seq` counts only
    checkpoints whose file is still there (older ones are pruned)."""
    points: list[QuiescentPoint] = []
    state = initial_state()
    pending: dict[int, int] = {}  # env -> commands of its last decision not yet carried out
    checkpoint = None
    for record in records:
        state = evolve(state, record)
        event = record.event
        if isinstance(event, ev.CheckpointWritten) and (run_dir is None or (run_dir / event.path).is_file()):
            checkpoint = record.seq
        if isinstance(event, ev.PolicyDecided):
            pending[record.env] = len(event.commands)
        elif record.env is not None and _is_command_batch_head(record) and pending.get(record.env):
            pending[record.env] -= 1
        if not record.batch_end or state.status != "running":
            continue
        if any(e.status == "running" and not e.ticked for e in state.envs.values()) or any(pending.values()):
            continue
        points.append(QuiescentPoint(seq=record.seq, type=type(event).__name__, env=record.env,
                                     episode=record.episode, epoch=getattr(event, "epoch", None),
                                     checkpoint_seq=checkpoint))
    return points


def _is_command_batch_head(record: Record) -> bool:
    e = record.event
    return isinstance(e, ev.ActionRejected) or (
        isinstance(e, ev.GateEvaluated) and e.trigger == "command") or (
        isinstance(e, ev.StageChanged) and e.trigger == "command" and e.to_stage == ev.Stage.CULLED)


class LogController:
    """Re-issues the recorded decisions of a log, verbatim (the controller of a fork's prefix)."""

    name = "log"

    def __init__(self, records: Sequence[Record], successor: Any):
        self.decisions = {(r.env, r.episode, r.event.epoch): r.event for r in records
                          if isinstance(r.event, ev.PolicyDecided)}
        self.successor = successor
        self.episode: dict[int, int] = {}

    def reset(self, env: int, episode: int, max_epochs: int) -> None:
        self.episode[env] = episode

    def decide(self, observation: Any) -> ev.PolicyDecided:
        key = (observation.env, observation.episode, observation.epoch)
        if key not in self.decisions:
            raise ForkRefused(f"the parent log records no decision for env {key[0]} episode {key[1]} epoch {key[2]}")
        return self.decisions[key]

    def state_dict(self) -> dict:
        # A checkpoint written inside the prefix holds the new controller's fresh state.
        return self.successor.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.successor.load_state_dict(state)


class CheckingWriter:
    """The fork's log writer, checking each record it stamps up to SEQ against the parent's."""

    def __init__(self, writer: Any, parent: Sequence[Record], through: int):
        self._writer, self._parent, self._through = writer, parent, through

    def append_batch(self, run_id: str, env: int | None, episode: int | None, events: Sequence[ev.Event]) -> list:
        records = self._writer.append_batch(run_id, env, episode, events)
        for record in records:
            if 0 < record.seq <= self._through:
                stored = as_stored(record)
                if not same(self._parent[record.seq], stored):
                    raise ForkDiverged(divergence(self._parent, record.seq, stored))
        return records

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)


@attrs.frozen
class ForkOutcome:
    run_dir: Path
    run_id: str
    parent_run_id: str
    seq: int
    policy: str
    checkpoint_seq: int | None  # the prefix was restored from this checkpoint (None: from the start)
    reproduced: int  # parent records re-executed and checked (beyond the copied ones)
    copied: int  # parent records copied from the checkpoint's prefix
    status: str
    epochs: int
    records: int

    def to_json(self) -> dict[str, Any]:
        return {**attrs.asdict(self), "run_dir": str(self.run_dir)}


def fork(path: str | Path, seq: int, policy: str, out: Path | None = None) -> ForkOutcome:
    from esper.policy.run_config import ConfigError, structure
    from esper.policy.runner import Run, RunError, load_data, make_controller
    from esper.tasks.errors import DataError

    loaded = load(path)
    start = loaded.run_started
    if start is None:
        raise ForkRefused(f"{loaded.path} holds no complete RunStarted batch")
    points = {p.seq: p for p in quiescent_points(loaded.records)}
    if seq not in points:
        near = sorted(points, key=lambda s: abs(s - seq))[:3]
        hint = f"nearest: {', '.join(map(str, sorted(near)))}" if near else "the log has none"
        raise ForkRefused(f"seq {seq} is not a quiescent point ({hint}; esper fork LOG --list shows them)")
    try:
        parent_config = structure(start.config)
        config = attrs.evolve(parent_config, run=attrs.evolve(parent_config.run, policy=policy))
        make_controller(config)
        data = load_data(config)
    except (ConfigError, RunError, DataError) as exc:
        raise ForkRefused(str(exc)) from None
    run_dir = _new_dir(loaded.path.parent, out)
    run = Run(config, run_dir, data)
    try:
        return _fork(loaded, seq, points[seq], run, make_controller(config))
    except ForkDiverged as exc:
        exc.run_dir = run_dir
        raise
    finally:
        run.writer.close()


def _fork(loaded: Loaded, seq: int, point: QuiescentPoint, run: Any, controller: Any) -> ForkOutcome:
    from esper.compute.checkpoints import prune
    from esper.policy.run_config import dump_toml, unstructure
    from esper.policy.runner import _copy_prefix, _usable_checkpoint

    parent, engine = loaded.records, run.engine
    origin = ev.ForkOrigin(run_id=parent[0].run_id, seq=seq, prefix_sha256=prefix_sha256(loaded.path, seq))
    (run.run_dir / "config.toml").write_text(dump_toml(unstructure(run.config)))
    engine.writer = CheckingWriter(run.writer, parent, seq)
    engine.controller = LogController(parent, controller)
    engine.start_run(run.header(origin), run.config.run.seed)
    checkpoint_seq, checkpoint = _usable_checkpoint(loaded.path.parent, list(parent[:seq + 1]))
    copied = 0
    if checkpoint is not None:
        _copy_prefix(run, list(parent[1:checkpoint_seq + 1]))
        copied = checkpoint_seq
        run.backend.load_state_dict(checkpoint["backend"])
        engine.governor.load_state_dict(checkpoint["governor"])
        engine.snapshot = checkpoint["snapshot"]
        first = checkpoint["epoch"] + 1
        run.writer.commit()
    else:
        checkpoint_seq = None
        first = 1
        if seq > 0:
            # The episode's recorded length: a resume that extended it recorded config.run.epochs
            # in its RunStarted, and the extension itself (re-issued below) further on.
            length = _started_length(parent, run.config.run.epochs)
            if length != run.config.run.epochs:
                run.backend.build(run.backend.episode_seed, length)  # the same host, the parent's schedule
            host_params, _ = run.backend.param_counts()
            engine.start_episode(0, run.backend.episode_seed, length, run.config.run.slots, host_params)
            run.writer.commit()
    target = point.epoch if point.env is not None else _epoch_at(parent, seq)
    for epoch in range(first, target + 1):
        _extend_as_parent(run, parent, seq)
        engine.step(0, epoch)
        if run.config.run.checkpoint_every:
            prune(run.run_dir, run.config.run.keep_checkpoints)
    _extend_as_parent(run, parent, seq)
    if run.writer.next_seq <= seq:
        raise ForkRefused(f"the fork reproduced only {run.writer.next_seq} records, short of seq {seq}")
    reproduced = seq - copied
    # The new controller takes over from the next step.
    engine.writer, engine.controller = run.writer, controller
    if 0 not in engine.state.envs:
        host_params, _ = run.backend.param_counts()
        engine.start_episode(0, run.backend.episode_seed, run.config.run.epochs, run.config.run.slots, host_params)
        run.writer.commit()
    env = engine.state.envs[0]
    controller.reset(0, env.episode, run.config.run.epochs)
    status = "completed"
    error = None
    try:
        if env.status == "running":
            for epoch in range(env.epoch + 1, run.config.run.epochs + 1):
                finished = engine.step(0, epoch)
                if run.config.run.checkpoint_every:
                    prune(run.run_dir, run.config.run.keep_checkpoints)
                if finished:
                    break
    except Exception as exc:
        status, error = "failed", exc
    run.finish(status, error)
    if error is not None:
        raise error
    return ForkOutcome(run_dir=run.run_dir, run_id=run.run_dir.name, parent_run_id=parent[0].run_id, seq=seq,
                       policy=run.config.run.policy, checkpoint_seq=checkpoint_seq, reproduced=reproduced,
                       copied=copied, status=status, epochs=engine.state.envs[0].epoch,
                       records=run.writer.next_seq)


def _extend_as_parent(run: Any, parent: Sequence[Record], seq: int) -> None:
    """Where the parent's next record (up to SEQ) extends its episode (a resume with a larger
    `--epochs`), the fork extends its own the same way."""
    from esper.policy.runner import extend_episode

    following = run.writer.next_seq
    if following <= seq and isinstance(parent[following].event, ev.EpisodeExtended):
        extend_episode(run, parent[following].event.max_epochs)
        run.writer.commit()


def _started_length(records: Sequence[Record], default: int) -> int:
    """The max_epochs env 0's first episode started with (`default` if the log has none)."""
    return next((r.event.max_epochs for r in records if r.env == 0 and isinstance(r.event, ev.EpisodeStarted)),
                default)


def _epoch_at(records: Sequence[Record], seq: int) -> int:
    """The last epoch env 0 completed at or before `seq` (0 before any)."""
    epochs = [r.event.epoch for r in records[:seq + 1] if r.env == 0 and isinstance(r.event, ev.EpochTicked)]
    return max(epochs, default=0)


def _new_dir(parent_dir: Path, out: Path | None) -> Path:
    """`--out DIR` (new or empty), else a sibling of the parent's run directory: `<name>.f<k>`."""
    if out is not None:
        if out.exists() and any(out.iterdir()):
            raise ForkRefused(f"'{out}' already exists and is not empty (choose another --out)")
        out.mkdir(parents=True, exist_ok=True)
        return out
    for k in range(1, 10_000):
        path = parent_dir.parent / f"{parent_dir.name}.f{k}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise ForkRefused(f"no free directory name for a fork of '{parent_dir}'")
