"""`esper train-policy` (policy §7): N envs stepped together on one process, one PPO update per round.

Each env is the engine of `esper run` with its own backend, governor and episode memory; they share
one PPO policy, which decides for all of them in one batched forward. A step runs in two phases:
every env's measure half (train, validate, govern, record, reward), then one batched decision and
every env's act half (commands, tick). Each engine writes into its own `StepBuffer`, and the
buffers are appended env-major when a phase ends, so each env's batches of a step stay together.

A round ends once every env has made T decisions and the reward of the T-th is known: at that
point, between the two halves of a step, segments of still-running episodes are cut (truncated,
bootstrapped from V of the real next observation), the update runs, `PolicyUpdated` follows every
env's batches, and the round's checkpoint is written. With the default T = E − 1 every round ends
exactly where every episode does.

Under torchrun (policy §7.4) env i lives on rank i mod W, and a rank builds only its own envs. Each
rank steps its envs and decides for them with its replica of the policy; where one process drains
its buffers into the log, every rank sends its buffers to rank 0 (one gather per step), which
appends them in env order and folds the other ranks' envs into `others`, so it holds the whole
run's state. At a round's end rank 0 gathers the segments, updates, writes the policy file and the
checkpoint, and publishes the run-scoped records and the new policy to every rank. With W = 1
(`Solo`) every collective is an identity and the code path is the same.
"""

import time
from pathlib import Path
from typing import Any, Callable

import attrs
import torch

from esper.compute.checkpoints import prune, write_checkpoint
from esper.compute.engine import Engine
from esper.compute.governor import Governor
from esper.compute.run_header import run_started
from esper.compute.simulated import SimulatedBackend
from esper.compute.streams import episode_seed
from esper.compute.torch_backend import TorchBackend
from esper.events import catalogue as ev
from esper.events.log_writer import LogWriter
from esper.lifecycle import commands as cmd
from esper.lifecycle.decide import decide, state_digest
from esper.lifecycle.evolve import evolve
from esper.lifecycle.state import RunState, initial_state, replace
from esper.policy.dist_ranks import Group, Solo
from esper.policy.dist_round import (
    CUT,
    ENDED,
    Publication,
    RoundShare,
    SegmentKey,
    adopt,
    round_envs,
    round_segments,
)
from esper.policy.ppo import PPOLearner, Segment, SegmentBuilder
from esper.policy.ppo_policy import PPOPolicy
from esper.policy.rewards import make_reward_function
from esper.policy.run_config import RunConfig, config_hash, unstructure
from esper.policy.runner import (
    LOG_NAME,
    RunError,
    configure_torch,
    load_policy,
    policy_blueprints,
    resolve_device,
    run_contract,
    write_config,
)
from esper.policy.step_buffer import StepBuffer
from esper.tasks import TaskData

CHECKPOINT_FORMAT = 1
POLICY_DIR = "policy"
LATEST = "latest"


@attrs.define(eq=False)
class TrainingEnv:
    engine: Engine
    buffer: StepBuffer
    epoch: int = 0  # the epoch this env trains at its next step; 0: it starts an episode first
    decisions: int = 0  # made in the current round
    builder: SegmentBuilder | None = None


@attrs.frozen
class RoundSummary:
    round: int
    episodes: int  # finished within the round
    mean_return: float | None  # raw reward summed over each finished episode, averaged
    update: ev.PolicyUpdated
    seconds: float


class PolicyTrainer:
    """`run_dir` is rank 0's alone (None on the other ranks): rank 0 writes every file."""

    def __init__(self, config: RunConfig, run_dir: Path | None, data: TaskData,
                 on_round: Callable[[RoundSummary], None] | None = None,
                 on_evaluation: Callable[[int, list, float], None] | None = None,
                 ranks: Solo | Group | None = None):
        self.config, self.run_dir, self.data = config, run_dir, data
        self.on_round, self.on_evaluation = on_round, on_evaluation
        self.ranks = ranks or Solo()
        self.leader = self.ranks.rank == 0
        spec = data.spec
        simulated = config.run.backend == "simulated"
        self.device = torch.device("cpu") if simulated else self.ranks.device(resolve_device(config.run.device))
        self.threads = configure_torch(config, self.device)
        self.blueprints = policy_blueprints(config, spec.topology)
        self.episode_length = config.run.epochs
        self.rollout = config.ppo.rollout(self.episode_length)
        self.policy = self._initial_policy(run_contract(config, spec.topology))
        self.learner = PPOLearner(self.policy.net, config.ppo, config.run.seed)
        if config.ppo.init and "learner" in self.policy.extra:
            self.learner.load_state_dict(self.policy.extra["learner"])
            self.learner.updates = 0  # the schedule of this run starts again
        self.run_id = self.ranks.broadcast(run_dir.name if self.leader else None)
        self.writer = None
        if self.leader:  # config.toml before the log, so a kill at any moment leaves it resumable
            write_config(run_dir, config)
            self.writer = LogWriter.create(run_dir / LOG_NAME, fsync=config.run.fsync)
        # Held-out greedy episodes run on envs of their own, after the training envs, so their
        # episode seeds come from streams no training episode uses.
        self.evaluator = None
        if config.ppo.eval_every:
            self.evaluator = PPOPolicy(self.policy.contract, config.ppo, run_seed=config.run.seed, greedy=True,
                                       network=self.policy.net, normaliser=self.policy.normaliser)
        self.training = config.ppo.envs
        controllers = [self.policy] * self.training + [self.evaluator] * (config.ppo.eval_episodes
                                                                          if self.evaluator else 0)
        self.n_envs = len(controllers)
        reward = make_reward_function(config.reward, config.ppo.gamma)
        self.envs = {  # this rank's envs, by index, ascending
            i: TrainingEnv(Engine(
                writer=buffer, run_id=self.run_id, backend=self._backend(), controller=controller, reward=reward,
                governor=self._governor(), blueprints=self.blueprints, l_rand=spec.l_rand,
                snapshot_every=config.governor.snapshot_every,
                counterfactual_all_off=config.train.counterfactual_all_off,
            ), buffer)
            for i, controller, buffer in ((i, c, StepBuffer()) for i, c in enumerate(controllers))
            if self.ranks.owns(i)
        }
        # Rank 0 of several folds the other ranks' envs from the batches it appends.
        self.others: RunState | None = initial_state() if self.leader and self.ranks.world > 1 else None
        self.unpublished: list[list] = []  # run-scoped batches the other ranks have not folded yet
        self.round = 0  # updates made
        self.steps = 0  # engine steps taken (every env steps once per step)
        self.collecting = True  # false once the last round's update is made
        self.segments: list[tuple[SegmentKey, Segment]] = []  # keyed in the order one process collects them
        self.pending: dict[int, Any] | None = None  # observations awaiting the act half (after resume)
        self.evaluation_due = False
        self.started = self.round_started = time.perf_counter()

    def _initial_policy(self, contract: Any) -> PPOPolicy:
        config = self.config
        if not config.ppo.init:
            return PPOPolicy(contract, config.ppo, run_seed=config.run.seed)
        policy = load_policy(Path(config.ppo.init), contract, greedy=False)
        architecture = policy.net.architecture()
        for key in ("feature_dim", "lstm_hidden", "head_hidden"):
            if architecture[key] != getattr(config.ppo, key):
                raise RunError(f"--init {config.ppo.init}: its network has {key} {architecture[key]}, "
                               f"the configuration ppo.{key} = {getattr(config.ppo, key)}")
        policy.config, policy.run_seed = config.ppo, config.run.seed
        policy.states, policy.episodes, policy.generators = {}, {}, {}
        return policy

    def _backend(self) -> Any:
        config, data = self.config, self.data
        if config.run.backend == "simulated":
            return SimulatedBackend(data.spec, config.simulated, config.train, config.lifecycle, config.run.slots,
                                    data.context)
        return TorchBackend(data, config.train, config.lifecycle, config.run.slots, self.device)

    def _governor(self) -> Governor:
        return Governor(self.config.governor, self.data.spec.l_rand)

    # -- run-scoped records ---------------------------------------------------------------------

    def merged_state(self) -> RunState:
        """The whole run's state on rank 0 (each engine folds its own env and every run-scoped
        record, `others` the other ranks' envs); the rank's own envs elsewhere."""
        views = [env.engine.state for env in self.envs.values()] + ([self.others] if self.others is not None else [])
        state = views[0]
        for view in views:
            for i, env_state in view.envs.items():
                state = state.with_env(i, env_state)
        return replace(state, episodes_completed=sum(view.episodes_completed for view in views))

    def run_scoped(self, command: cmd.Command) -> None:
        """Rank 0 only; the other ranks fold the batch when it is next published."""
        events = decide(command, self.merged_state())
        records = self.writer.append_batch(self.run_id, None, None, events)
        self._absorb_run_scoped(records)
        if self.ranks.world > 1:
            self.unpublished.append(records)

    def _absorb_run_scoped(self, records: list) -> None:
        for env in self.envs.values():
            before = env.engine.state
            for record in records:
                env.engine.absorb(record, before)
        self._fold_others(records)

    def _fold_others(self, records: list) -> None:
        if self.others is not None:
            for record in records:
                self.others = evolve(self.others, record)

    def fold_copied(self, records: list) -> None:
        """One batch of the prefix a resumed log copies: each engine folds its env's and every
        run-scoped batch, rank 0's `others` the other ranks' envs."""
        env = records[0].env
        if env is None:
            self._absorb_run_scoped(records)
        elif env in self.envs:
            engine = self.envs[env].engine
            before = engine.state
            for record in records:
                engine.absorb(record, before)
        else:
            self._fold_others(records)

    def publish(self) -> None:
        """After the start and after each update, with several ranks: rank 0's run-scoped batches
        and policy reach every rank, which folds and loads them before it steps again."""
        if self.ranks.world == 1:
            return
        message = Publication.of(self.unpublished, self.policy, self.learner.updates) if self.leader else None
        message = self.ranks.broadcast(message)
        self.unpublished = []
        if not self.leader:
            for records in message.batches:
                self._absorb_run_scoped(records)
            message.load(self.policy)
            self.learner.updates = message.updates

    def header(self, forked_from: ev.ForkOrigin | None = None) -> ev.RunStarted:
        config, spec = self.config, self.data.spec
        host = self.envs[0].engine.backend.build(episode_seed(config.run.seed, 0, 0), self.episode_length)
        return run_started(
            config=unstructure(config), config_hash=config_hash(config), seed=config.run.seed,
            device=str(self.device), deterministic=config.run.deterministic, threads=self.threads, task=spec.name,
            topology=spec.topology, host=host, enabled=config.run.slots, score_kind=spec.score_kind,
            data_digest=self.data.data_digest, n_envs=self.n_envs, world_size=self.ranks.world,
            forked_from=forked_from,
        )

    def start(self) -> None:
        if self.leader:
            self.run_scoped(cmd.StartRun(run=self.header()))
            self.writer.commit()
        self.publish()

    # -- the loop ---------------------------------------------------------------------------------

    def train(self, interrupt: Any) -> str:
        if self.pending is not None:  # resumed between the halves of a step
            if self.evaluation_due:
                self._evaluate()
            self._act(self.pending)
            self._drain()
            self._commit()
            self.pending = None
        # Every env of every rank steps in lockstep (all episodes last E epochs), so each rank's
        # own envs tell it when a round and the training end, at the same step as on every rank.
        while True:
            observations = self._measure()
            if self.collecting and all(env.decisions == self.rollout for _, env in self._training_envs()):
                self._end_round(observations)
                if self.evaluation_due:
                    self._evaluate()
            if not observations and not self.collecting:
                self._drain()
                self._commit()
                return "completed"
            self._act(observations)
            self._drain()
            self._commit()
            if self.ranks.any(interrupt.requested):
                return "interrupted"

    def _training_envs(self) -> list[tuple[int, TrainingEnv]]:
        return [(i, env) for i, env in self.envs.items() if i < self.training]

    def _start_episode(self, i: int, evaluation: bool = False) -> None:
        env = self.envs[i]
        engine = env.engine
        known = engine.state.envs.get(i)
        seed = episode_seed(self.config.run.seed, i, known.episode + 1 if known is not None else 0)
        host = engine.backend.build(seed, self.episode_length)
        engine.governor = self._governor()  # rollbacks are counted per episode
        engine.start_episode(i, seed, self.episode_length, self.config.run.slots, host.param_count, evaluation)
        env.epoch = 1

    def _measure(self) -> dict[int, Any]:
        """Every env's first half of a step; the observations of envs whose episode goes on."""
        self.steps += 1
        observations = {}
        for i, env in self._training_envs():
            if env.epoch == 0:
                if not self.collecting:
                    continue
                self._start_episode(i)
            observation, reward = env.engine.measure(i, env.epoch)
            if reward is not None and env.builder is not None:
                penalty = reward.components.get("governor") or 0.0  # normalised units, added after scaling
                env.builder.reward(reward.total_raw - penalty, penalty)
            if observation is None:
                if env.builder is not None:
                    self.segments.append(((self.steps, ENDED, i), env.builder.close(terminated=True)))
                env.builder, env.epoch = None, 0
            else:
                observations[i] = observation
        return observations

    def _act(self, observations: dict[int, Any]) -> None:
        """One batched forward for every env still in an episode, then each env's second half."""
        if not observations:
            return
        order = sorted(observations)
        decisions = self.policy.decide_batch([observations[i] for i in order])
        for i, decision in zip(order, decisions):
            env = self.envs[i]
            if self.collecting:
                step = self.policy.last_step[i]
                if env.builder is None:
                    env.builder = SegmentBuilder(step.h0, step.c0)
                env.builder.add(step.obs, step.sample, step.raw_obs)
                env.decisions += 1
            env.engine.act(i, env.epoch, decision)
            env.epoch += 1

    def _drain(self) -> None:
        """Every env's buffered batches into the log, env-major: rank 0 gathers every rank's (one
        gather, whether or not a rank has any), appends them in env order and folds the others'."""
        gathered = self.ranks.gather([(i, env.buffer.take()) for i, env in self.envs.items()])
        if gathered is None:
            return
        for i, batches in sorted((part for rank in gathered for part in rank), key=lambda part: part[0]):
            for batch in batches:
                records = self.writer.append_batch(*batch)
                if not self.ranks.owns(i):
                    self._fold_others(records)

    def _commit(self) -> None:
        if self.leader:
            self.writer.commit()

    def _end_round(self, observations: dict[int, Any]) -> None:
        cut = sorted(i for i in observations if self.envs[i].builder is not None)
        if cut:
            values = self.policy.values([observations[i] for i in cut])
            for i, value in zip(cut, values):
                self.segments.append(((self.steps, CUT, i),
                                      self.envs[i].builder.close(terminated=False, bootstrap_value=value)))
                self.envs[i].builder = None
        self._drain()
        planned = self.config.ppo.rounds
        self.round += 1
        self.collecting = self.round < planned
        self.evaluation_due = self._evaluates(self.round)
        every = self.config.run.checkpoint_every
        due = bool(every) and (self.round % every == 0 or not self.collecting)
        owned = [i for i, _ in self._training_envs()]
        shares = self.ranks.gather(RoundShare.of(self.policy, self.segments, owned,
                                                 self._checkpoint_parts(owned) if due else {}))
        self.segments = []
        for env in self.envs.values():
            env.decisions = 0
        if shares is not None:
            self._update(shares, planned, due)
        self.publish()

    def _update(self, shares: list[RoundShare], planned: int, due: bool) -> None:
        """Rank 0: the update, its record, the policy file and, when due, the run checkpoint."""
        segments = round_segments(shares)
        adopt(self.policy, shares, self.ranks.owns)
        finished = [s for s in segments if s.terminated]
        started = time.perf_counter()
        result = self.learner.update(segments, planned_updates=planned, obs_normaliser=self.policy.normaliser)
        update = ev.PolicyUpdated(update=self.learner.updates, round=self.round,
                                  episodes_completed=self.merged_state().episodes_completed,
                                  wall_time_s=time.perf_counter() - started, **result)
        self.run_scoped(cmd.RecordPolicyUpdate(update=update))
        self._save_policy()
        if due:
            self._checkpoint(round_envs(shares))
        self.writer.commit()
        if self.config.run.checkpoint_every:
            prune(self.run_dir, self.config.run.keep_checkpoints)
        now = time.perf_counter()
        if self.on_round is not None:
            returns = [float((s.rewards + s.penalties).sum()) for s in finished]
            self.on_round(RoundSummary(self.round, len(finished), sum(returns) / len(returns) if returns else None,
                                       update, now - self.round_started))
        self.round_started = now

    # -- held-out evaluation ----------------------------------------------------------------------

    def _evaluates(self, round_: int) -> bool:
        every = self.config.ppo.eval_every
        return bool(every) and round_ % every == 0

    def _evaluate(self) -> None:
        """One greedy episode on each evaluation env, stepped together; logged as ordinary
        episodes with `EpisodeStarted.evaluation` true and never part of an update. Every rank
        takes the episode's E steps, drains included, whether or not it owns an evaluation env."""
        ids = [i for i in self.envs if i >= self.training]
        started = time.perf_counter()
        for i in ids:
            self._start_episode(i, evaluation=True)
        for _ in range(self.episode_length):
            observations = {}
            for i in ids:
                env = self.envs[i]
                if env.epoch == 0:
                    continue
                observation, _ = env.engine.measure(i, env.epoch)
                if observation is None:
                    env.epoch = 0
                else:
                    observations[i] = observation
            if observations:
                order = sorted(observations)
                for i, decision in zip(order, self.evaluator.decide_batch([observations[i] for i in order])):
                    self.envs[i].engine.act(i, self.envs[i].epoch, decision)
                    self.envs[i].epoch += 1
            self._drain()
            self._commit()
        self.evaluation_due = False
        if self.leader and self.on_evaluation is not None:
            merged = self.merged_state()
            scores = [merged.envs[i].last_val_acc for i in range(self.training, self.n_envs)]
            self.on_evaluation(self.round, scores, time.perf_counter() - started)

    # -- checkpoints ----------------------------------------------------------------------------

    def _save_policy(self) -> None:
        """The deployable artefact: `policy/round-NNNNNN.pt`, and `latest` naming the newest."""
        folder = self.run_dir / POLICY_DIR
        folder.mkdir(exist_ok=True)
        name = f"round-{self.round:06d}.pt"
        self.policy.save(folder / name, extra={"learner": self.learner.state_dict(), "round": self.round})
        staging = folder / f".{LATEST}.tmp"
        staging.write_text(name + "\n")
        staging.replace(folder / LATEST)

    def _checkpoint_parts(self, owned: list[int]) -> dict[int, dict[str, Any]]:
        """What a checkpoint holds of each of this rank's training envs."""
        return {i: {"backend": env.engine.backend.state_dict(), "governor": env.engine.governor.state_dict(),
                    "snapshot": env.engine.snapshot, "epoch": env.epoch}
                for i, env in ((i, self.envs[i]) for i in owned)}

    def _checkpoint(self, envs: list[dict[str, Any]]) -> None:
        """Everything not folded from the log, at a round boundary: the envs' backends, governors,
        snapshots and positions (`envs`, every rank's), the policy with its LSTM states and
        generators, the learner."""
        covers = self.writer.next_seq - 1
        merged = self.merged_state()
        state = {
            "format": CHECKPOINT_FORMAT, "round": self.round, "steps": self.steps, "covers_seq": covers,
            "digests": [state_digest(merged.envs[i]) for i in range(self.training)], "envs": envs,
            "policy": self.policy.state_dict(), "learner": self.learner.state_dict(),
        }
        path, sha, size = write_checkpoint(self.run_dir, self.steps, state)
        self.run_scoped(cmd.RecordCheckpoint(path=path, sha256=sha, size=size, covers_seq=covers, kind="full"))

    def restore(self, state: dict) -> None:
        """Continue from a round-boundary checkpoint, after the log prefix it covers was folded;
        this rank restores its own envs."""
        for i, saved in enumerate(state["envs"]):
            if i not in self.envs:
                continue
            env = self.envs[i]
            # The episode seed is the build's, not the state's: seed-module init derives from it.
            episode = env.engine.state.envs[i].episode
            env.engine.backend.build(episode_seed(self.config.run.seed, i, episode), self.episode_length)
            env.engine.backend.load_state_dict(saved["backend"])
            env.engine.governor.load_state_dict(saved["governor"])
            env.engine.snapshot = saved["snapshot"]
            env.epoch = int(saved["epoch"])
        self.policy.load_state_dict(state["policy"])
        self.learner.load_state_dict(state["learner"])
        self.round, self.steps = int(state["round"]), int(state["steps"])
        self.collecting = self.round < self.config.ppo.rounds
        self.evaluation_due = self._evaluates(self.round)
        self.pending = {i: env.engine.observe(i) for i, env in self._training_envs() if env.epoch}

    # -- the end --------------------------------------------------------------------------------

    def finish(self, status: str, error: BaseException | None = None) -> dict[str, float | None]:
        """Rank 0 records the end; no collective, since after a failure the other ranks may be
        gone. Only a failure leaves batches buffered, and rank 0 appends its own."""
        final: dict[str, float | None] = {"rounds": float(self.round), "updates": float(self.learner.updates)}
        try:
            if self.leader:
                for env in self.envs.values():
                    for batch in env.buffer.take():
                        self.writer.append_batch(*batch)
                self.run_scoped(cmd.FinishRun(
                    status=status, final=final, error_type=type(error).__name__ if error else None,
                    error_message=str(error) if error else None, wall_time_s=time.perf_counter() - self.started,
                ))
                self.writer.close()
        finally:
            self.ranks.close()
        return final

    def close(self) -> None:
        """Release the log and the process group, whatever a failure left them in."""
        try:
            if self.writer is not None:
                self.writer.close()
        finally:
            self.ranks.close()

