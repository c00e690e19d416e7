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
from esper.lifecycle.state import RunState, replace
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
    def __init__(self, config: RunConfig, run_dir: Path, data: TaskData,
                 on_round: Callable[[RoundSummary], None] | None = None,
                 on_evaluation: Callable[[int, list, float], None] | None = None):
        self.config, self.run_dir, self.data = config, run_dir, data
        self.on_round, self.on_evaluation = on_round, on_evaluation
        spec = data.spec
        simulated = config.run.backend == "simulated"
        self.device = torch.device("cpu") if simulated else resolve_device(config.run.device)
        self.threads = configure_torch(config, self.device)
        self.blueprints = policy_blueprints(config, spec.topology)
        self.episode_length = config.run.epochs
        self.rollout = config.ppo.rollout(self.episode_length)
        self.policy = self._initial_policy(run_contract(config, spec.topology))
        self.learner = PPOLearner(self.policy.net, config.ppo, config.run.seed)
        if config.ppo.init and "learner" in self.policy.extra:
            self.learner.load_state_dict(self.policy.extra["learner"])
            self.learner.updates = 0  # the schedule of this run starts again
        self.writer = LogWriter.create(run_dir / LOG_NAME, fsync=config.run.fsync)
        self.run_id = run_dir.name
        # Held-out greedy episodes run on envs of their own, after the training envs, so their
        # episode seeds come from streams no training episode uses.
        self.evaluator = None
        if config.ppo.eval_every:
            self.evaluator = PPOPolicy(self.policy.contract, config.ppo, run_seed=config.run.seed, greedy=True,
                                       network=self.policy.net, normaliser=self.policy.normaliser)
        self.training = config.ppo.envs
        controllers = [self.policy] * self.training + [self.evaluator] * (config.ppo.eval_episodes
                                                                          if self.evaluator else 0)
        reward = make_reward_function(config.reward, config.ppo.gamma)
        self.envs = [
            TrainingEnv(Engine(
                writer=buffer, run_id=self.run_id, backend=self._backend(), controller=controller, reward=reward,
                governor=self._governor(), blueprints=self.blueprints, l_rand=spec.l_rand,
                snapshot_every=config.governor.snapshot_every,
                counterfactual_all_off=config.train.counterfactual_all_off,
            ), buffer)
            for controller, buffer in ((c, StepBuffer()) for c in controllers)
        ]
        self.round = 0  # updates made
        self.steps = 0  # engine steps taken (every env steps once per step)
        self.collecting = True  # false once the last round's update is made
        self.segments: list[Segment] = []
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
        """The whole run's state: each engine folds its own env and every run-scoped record."""
        state = self.envs[0].engine.state
        for i, env in enumerate(self.envs):
            if i in env.engine.state.envs:
                state = state.with_env(i, env.engine.state.envs[i])
        return replace(state, episodes_completed=sum(e.engine.state.episodes_completed for e in self.envs))

    def run_scoped(self, command: cmd.Command) -> None:
        events = decide(command, self.merged_state())
        records = self.writer.append_batch(self.run_id, None, None, events)
        for env in self.envs:
            before = env.engine.state
            for record in records:
                env.engine.absorb(record, before)

    def header(self, forked_from: ev.ForkOrigin | None = None) -> ev.RunStarted:
        config, spec = self.config, self.data.spec
        host = self.envs[0].engine.backend.build(episode_seed(config.run.seed, 0, 0), self.episode_length)
        return run_started(
            config=unstructure(config), config_hash=config_hash(config), seed=config.run.seed,
            device=str(self.device), deterministic=config.run.deterministic, threads=self.threads, task=spec.name,
            topology=spec.topology, host=host, enabled=config.run.slots, score_kind=spec.score_kind,
            data_digest=self.data.data_digest, n_envs=len(self.envs), forked_from=forked_from,
        )

    def start(self) -> None:
        write_config(self.run_dir, self.config)
        self.run_scoped(cmd.StartRun(run=self.header()))
        self.writer.commit()

    # -- the loop ---------------------------------------------------------------------------------

    def train(self, interrupt: Any) -> str:
        if self.pending is not None:  # resumed between the halves of a step
            if self.evaluation_due:
                self._evaluate()
            self._act(self.pending)
            self._drain()
            self.writer.commit()
            self.pending = None
        while True:
            observations = self._measure()
            if self.collecting and all(env.decisions == self.rollout for env in self.envs[:self.training]):
                self._end_round(observations)
                if self.evaluation_due:
                    self._evaluate()
            if not observations and not self.collecting:
                self._drain()
                self.writer.commit()
                return "completed"
            self._act(observations)
            self._drain()
            self.writer.commit()
            if interrupt.requested:
                return "interrupted"

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
        for i, env in enumerate(self.envs[:self.training]):
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
                    self.segments.append(env.builder.close(terminated=True))
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
        for env in self.envs:
            env.buffer.drain_into(self.writer)

    def _end_round(self, observations: dict[int, Any]) -> None:
        cut = sorted(i for i in observations if self.envs[i].builder is not None)
        if cut:
            values = self.policy.values([observations[i] for i in cut])
            for i, value in zip(cut, values):
                self.segments.append(self.envs[i].builder.close(terminated=False, bootstrap_value=value))
                self.envs[i].builder = None
        self._drain()
        segments, self.segments = self.segments, []
        finished = [s for s in segments if s.terminated]
        planned = self.config.ppo.rounds
        started = time.perf_counter()
        result = self.learner.update(segments, planned_updates=planned, obs_normaliser=self.policy.normaliser)
        self.round += 1
        update = ev.PolicyUpdated(update=self.learner.updates, round=self.round,
                                  episodes_completed=self.merged_state().episodes_completed,
                                  wall_time_s=time.perf_counter() - started, **result)
        self.run_scoped(cmd.RecordPolicyUpdate(update=update))
        self.collecting = self.round < planned
        self.evaluation_due = self._evaluates(self.round)
        for env in self.envs:
            env.decisions = 0
        self._save_policy()
        every = self.config.run.checkpoint_every
        if every and (self.round % every == 0 or not self.collecting):
            self._checkpoint()
        self.writer.commit()
        if every:
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
        episodes with `EpisodeStarted.evaluation` true and never part of an update."""
        ids = range(self.training, len(self.envs))
        started = time.perf_counter()
        for i in ids:
            self._start_episode(i, evaluation=True)
        while any(self.envs[i].epoch for i in ids):
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
            self.writer.commit()
        self.evaluation_due = False
        if self.on_evaluation is not None:
            scores = [self.envs[i].engine.state.envs[i].last_val_acc for i in ids]
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

    def _checkpoint(self) -> None:
        """Everything not folded from the log, at a round boundary: the envs' backends, governors,
        snapshots and positions, the policy with its LSTM states and generators, the learner."""
        covers = self.writer.next_seq - 1
        state = {
            "format": CHECKPOINT_FORMAT, "round": self.round, "steps": self.steps, "covers_seq": covers,
            "digests": [state_digest(env.engine.state.envs[i]) for i, env in enumerate(self.envs[:self.training])],
            "envs": [{"backend": env.engine.backend.state_dict(), "governor": env.engine.governor.state_dict(),
                      "snapshot": env.engine.snapshot, "epoch": env.epoch} for env in self.envs[:self.training]],
            "policy": self.policy.state_dict(), "learner": self.learner.state_dict(),
        }
        path, sha, size = write_checkpoint(self.run_dir, self.steps, state)
        self.run_scoped(cmd.RecordCheckpoint(path=path, sha256=sha, size=size, covers_seq=covers, kind="full"))

    def restore(self, state: dict) -> None:
        """Continue from a round-boundary checkpoint, after the log prefix it covers was folded."""
        for i, (env, saved) in enumerate(zip(self.envs, state["envs"])):
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
        self.pending = {i: env.engine.observe(i) for i, env in enumerate(self.envs[:self.training]) if env.epoch}

    # -- the end --------------------------------------------------------------------------------

    def finish(self, status: str, error: BaseException | None = None) -> dict[str, float | None]:
        final: dict[str, float | None] = {"rounds": float(self.round), "updates": float(self.learner.updates)}
        self._drain()
        self.run_scoped(cmd.FinishRun(
            status=status, final=final, error_type=type(error).__name__ if error else None,
            error_message=str(error) if error else None, wall_time_s=time.perf_counter() - self.started,
        ))
        self.writer.close()
        return final

