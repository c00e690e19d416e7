"""`esper train-policy` as an application service: start or resume a trainer and drive it to the end.

Resume (runtime §6.4, policy §8) is a fork at the newest round-boundary checkpoint whose per-env
digests match the folded log: the parent's records through its `CheckpointWritten` are copied into
a sibling directory, every engine folds them, the checkpoint restores what the log cannot hold,
and training continues with the second half of the step the round ended in. Under torchrun every
rank reads the parent log and the checkpoint itself and takes its own envs' parts, with any world
size: rank 0 gathers every env's part into each checkpoint, whatever the world size that wrote it.
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
from esper.policy.dist_ranks import join
from esper.policy.run_config import RunConfig
from esper.policy.runner import (
    checkpoint_mismatch,
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
                    on_round: Callable[[RoundSummary], None] | None = None, dist_mode: str = "auto") -> PolicyTrainer:
    records, config = resumed_training_config(parent, overrides)
    cut, checkpoint = _usable_checkpoint(parent, records, config)
    data = load_data(config, check_policy=False)
    ranks = join(dist_mode, config.ppo.envs, config.dist)
    try:
        trainer = PolicyTrainer(config, sibling_dir(parent, out) if ranks.rank == 0 else None, data, on_round,
                                ranks=ranks)
    except BaseException:
        ranks.close()
        raise
    if trainer.leader:
        trainer.run_scoped(cmd.StartRun(run=trainer.header(fork_origin(parent, records, cut))))
    trainer.publish()
    if checkpoint is not None:
        for i, env in trainer.envs.items():  # observations folded from the prefix need a built host
            env.engine.backend.build(episode_seed(config.run.seed, i, 0), trainer.episode_length)
        _copy_prefix(trainer, records[1:cut + 1])
        try:
            trainer.restore(checkpoint)
        except Exception as error:
            failure = checkpoint_mismatch(parent / records[cut].event.path, error)
            try:
                trainer.finish("failed", failure)
            finally:
                trainer.close()
            raise failure from None
    # With no usable checkpoint the training starts again from the beginning, same configuration.
    if trainer.leader:
        trainer.writer.commit()
    return trainer


def resumed_training_config(parent: Path, overrides: dict[str, Any]) -> tuple[list, RunConfig]:
    """The parent's records, and its configuration: only `--rounds` (extend only), `--device` and
    verbosity may differ from the recorded one."""
    records, recorded = read_parent(parent, "training")
    return records, resumed_config(recorded, overrides, extend=("ppo.rounds", "--rounds"))


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
    """Rank 0 re-appends the parent's batches under the new run id; every rank folds them."""
    batch: list = []
    for record in records:
        batch.append(record)
        if not record.batch_end:
            continue
        if trainer.leader:
            batch = trainer.writer.append_batch(trainer.run_id, batch[0].env, batch[0].episode,
                                                [r.event for r in batch])
        trainer.fold_copied(batch)
        batch = []
