"""`esper train-policy` as an application service: start or resume a trainer and drive it to the end.

Resume (runtime §6.4, policy §8) is a fork at the newest round-boundary checkpoint whose per-env
digests match the folded log: the parent's records through its `CheckpointWritten` are copied into
a sibling directory, every engine folds them, the checkpoint restores what the log cannot hold,
and training continues with the second half of the step the round ended in. Resume runs in one
process; a run trained under torchrun resumes there too, since rank 0 gathers every env's part of
each checkpoint.
"""

from pathlib import Path
from typing import Any, Callable

import attrs

from esper.compute.checkpoints import read_checkpoint
from esper.compute.streams import episode_seed
from esper.events import catalogue as ev
from esper.lifecycle import commands as cmd
from esper.lifecycle.decide import state_digest
from esper.lifecycle.fold import fold
from esper.policy.run_config import RunConfig
from esper.policy.runner import (
    RunError,
    drive,
    fork_origin,
    load_data,
    read_parent,
    resumed_config,
    sibling_dir,
)
from esper.policy.trainer import CHECKPOINT_FORMAT, POLICY_DIR, LATEST, PolicyTrainer, RoundSummary


@attrs.frozen
class TrainingOutcome:
    run_dir: Path | None  # None on ranks other than 0, which write nothing
    status: str
    rounds: int
    episodes: int
    policy_path: Path | None


def execute_training(trainer: PolicyTrainer, resume: bool = False) -> TrainingOutcome:
    """Train to the last round (or an interrupt); a failure still writes RunFinished(failed) when it can."""
    status = drive(trainer, resume, trainer.close)
    trainer.finish(status)
    policy = None
    if trainer.leader:
        latest = trainer.run_dir / POLICY_DIR / LATEST
        policy = trainer.run_dir / POLICY_DIR / latest.read_text().strip() if latest.is_file() else None
    return TrainingOutcome(trainer.run_dir, status, trainer.round, trainer.merged_state().episodes_completed, policy)


def resume_training(parent: Path, out: Path | None, overrides: dict[str, Any],
                    on_round: Callable[[RoundSummary], None] | None = None) -> PolicyTrainer:
    """Only `--rounds` (extend only), `--device` and verbosity may differ from the recorded run."""
    records, recorded = read_parent(parent, "training")
    config = resumed_config(recorded, overrides, extend=("ppo.rounds", "--rounds"))
    cut, checkpoint = _usable_checkpoint(parent, records, config)
    trainer = PolicyTrainer(config, sibling_dir(parent, out), load_data(config, check_policy=False), on_round)
    trainer.run_scoped(cmd.StartRun(run=trainer.header(fork_origin(parent, records, cut))))
    if checkpoint is None:  # nothing usable: train again from the beginning, same configuration
        trainer.writer.commit()
        return trainer
    for i, env in trainer.envs.items():  # observations folded from the prefix need a built host
        env.engine.backend.build(episode_seed(config.run.seed, i, 0), trainer.episode_length)
    _copy_prefix(trainer, records[1:cut + 1])
    try:
        trainer.restore(checkpoint)
    except Exception as error:
        problem = " ".join(str(error).split())[:300] or type(error).__name__
        failure = RunError(f"checkpoint '{parent / records[cut].event.path}' does not match the run's "
                           f"configuration: {problem} (it was not written by this run)")
        try:
            trainer.finish("failed", failure)
        finally:
            trainer.close()
        raise failure from None
    trainer.writer.commit()
    return trainer


def _usable_checkpoint(parent: Path, records: list, config: RunConfig) -> tuple[int, dict | None]:
    """The newest checkpoint in the complete prefix whose every env digest matches the folded log."""
    for record in reversed(records):
        event = record.event
        if not isinstance(event, ev.CheckpointWritten) or not (parent / event.path).exists():
            continue
        try:
            state = read_checkpoint(parent / event.path)
        except Exception:
            continue
        if state.get("format") != CHECKPOINT_FORMAT or len(state.get("digests", ())) != config.ppo.envs:
            continue
        folded = fold(r for r in records if r.seq <= event.covers_seq).state
        if all(i in folded.envs and state_digest(folded.envs[i]) == digest
               for i, digest in enumerate(state["digests"])):
            return record.seq, state
    return 0, None


def _copy_prefix(trainer: PolicyTrainer, records: list) -> None:
    """Re-append the parent's batches under the new run id; each engine folds its env's and every
    run-scoped record."""
    batch: list = []
    for record in records:
        batch.append(record)
        if not record.batch_end:
            continue
        env = batch[0].env
        stamped = trainer.writer.append_batch(trainer.run_id, env, batch[0].episode, [r.event for r in batch])
        engines = [e.engine for e in trainer.envs.values()] if env is None else [trainer.envs[env].engine]
        for engine in engines:
            before = engine.state
            for new in stamped:
                engine.absorb(new, before)
        batch = []
