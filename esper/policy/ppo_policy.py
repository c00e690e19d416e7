"""The PPO controller (policy §2, §5): features → normaliser → network → masked sampler → `PolicyDecided`.

One instance acts for any number of envs. Per env it keeps the LSTM state (zero at `reset`, carried
from step to step, also across round boundaries) and the sampling generator, seeded from (run seed,
env) and never reset, so which process or batch steps an env never changes its samples (§7.3).
`decide_batch` makes one batched forward for several envs (§5.4); `decide` is its one-env case.
After each decision `last_step[env]` holds what the trainer stores with the transition: normalised
and raw observation, the sample (actions, flags, log-probs, value, mask rows) and the LSTM state
the step started from.

`save`/`load` write and read a policy checkpoint (§8): tensors and primitives only (loaded with
`weights_only=True`), written to a temporary name, fsynced and renamed. It carries the observation
contract; loading it for a task with another contract fails with a one-line `ValueError` naming the
first difference. The trainer adds its own state (optimizer, reward statistics, counters, RNG
states) through `extra`.
"""

import hashlib
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from esper.compute.observation import Observation
from esper.events.catalogue import Blend, PolicyCommand, PolicyDecided
from esper.policy.actions import GERMINATE, OPS, WAIT, ActionTable, head_values, legal_summary, valid_actions
from esper.policy.features import ObservationContract, enabled_slots, observe, raw_columns
from esper.policy.network import PolicyNetwork
from esper.policy.normaliser import RunningNormaliser
from esper.policy.ppo_config import PPOConfig
from esper.policy.sampling import HEADS, ActionSample, MaskSet, draw_uniforms, policy_generator, sample_actions
from esper.policy.seeding import policy_seed

CHECKPOINT_FORMAT = 1
REASON = "ppo"


@attrs.frozen(eq=False)
class PolicyStep:
    """One env's decision as the trainer stores it."""

    obs: torch.Tensor  # (D,) float32, normalised
    raw_obs: torch.Tensor  # (D,) float64
    sample: ActionSample  # batch of one
    h0: torch.Tensor  # (H,) state before the step
    c0: torch.Tensor


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 over every tensor of the state dict (name, dtype, shape, bytes), in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _config_dict(config: PPOConfig) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in attrs.asdict(config).items()}


class PPOPolicy:
    name = "ppo"

    def __init__(self, contract: ObservationContract, config: PPOConfig = PPOConfig(), *, run_seed: int = 0,
                 greedy: bool = False, plateau_threshold: float = 0.5, network: PolicyNetwork | None = None,
                 normaliser: RunningNormaliser | None = None, device: str | torch.device = "cpu"):
        if tuple(contract.blend_kinds) != tuple(config.blend_kinds):
            raise ValueError(f"contract blend kinds {list(contract.blend_kinds)} differ from ppo.blend_kinds "
                             f"{list(config.blend_kinds)}")
        self.contract, self.config = contract, config
        self.run_seed, self.greedy, self.plateau_threshold = run_seed, greedy, plateau_threshold
        self.device = torch.device(device)
        n_slots, n_bp = len(contract.slot_ids), len(contract.blueprints)
        self.net = network if network is not None else PolicyNetwork(
            contract.dim, n_slots, n_bp, len(contract.blend_kinds), feature_dim=config.feature_dim,
            lstm_hidden=config.lstm_hidden, head_hidden=config.head_hidden)
        self.net.to(self.device)
        self.normaliser = normaliser if normaliser is not None else RunningNormaliser(
            raw_columns(n_slots, n_bp), clip=config.obs_clip)
        if self.normaliser.dim != contract.dim or self.net.obs_dim != contract.dim:
            raise ValueError(f"network/normaliser width differs from the contract's D = {contract.dim}")
        self.states: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # env -> (h, c), each (1, 1, H)
        self.episodes: dict[int, int] = {}
        self.generators: dict[int, torch.Generator] = {}
        self.last_step: dict[int, PolicyStep] = {}
        self._digest: tuple[tuple, str] | None = None
        self.extra: dict = {}  # the trainer's part of a loaded checkpoint

    @classmethod
    def for_observation(cls, observation: Observation, config: PPOConfig = PPOConfig(), **kwargs) -> "PPOPolicy":
        return cls(ObservationContract.for_observation(observation, config.blend_kinds), config, **kwargs)

    # -- identity -----------------------------------------------------------------------------

    @property
    def policy_id(self) -> str:
        """`ppo-` + 16 hex digits of the weights' sha256; recomputed only when a tensor changed
        (every in-place update, optimizer steps included, bumps a tensor's version counter)."""
        key = tuple((id(t), t._version) for t in self.net.state_dict(keep_vars=True).values())
        if self._digest is None or self._digest[0] != key:
            self._digest = (key, "ppo-" + weights_digest(self.net)[:16])
        return self._digest[1]

    # -- Controller protocol ------------------------------------------------------------------

    def reset(self, env: int, episode: int, max_epochs: int) -> None:
        self.states[env] = self.net.initial_state(1, self.device)
        self.episodes[env] = episode

    def _state(self, env: int, episode: int) -> tuple[torch.Tensor, torch.Tensor]:
        if env not in self.states or self.episodes.get(env) != episode:  # a new episode starts from zero
            self.reset(env, episode, 0)
        return self.states[env]

    def _peek(self, env: int, episode: int) -> tuple[torch.Tensor, torch.Tensor]:
        if env in self.states and self.episodes.get(env) == episode:
            return self.states[env]
        return self.net.initial_state(1, self.device)

    def _generator(self, env: int) -> torch.Generator:
        if env not in self.generators:
            self.generators[env] = policy_generator(policy_seed(self.run_seed, env))
        return self.generators[env]

    def check_observation(self, observation: Observation) -> None:
        offered = ObservationContract.of(enabled_slots(observation), observation.blueprints, self.contract.blend_kinds)
        self.contract.check(offered)

    def decide(self, observation: Observation) -> PolicyDecided:
        return self.decide_batch([observation])[0]

    def decide_batch(self, observations: Sequence[Observation]) -> list[PolicyDecided]:
        """One batched forward for the envs of `observations` (distinct envs)."""
        envs = [o.env for o in observations]
        if len(set(envs)) != len(envs):
            raise ValueError("decide_batch takes at most one observation per env")
        tables, raws = [], []
        for obs in observations:
            self.check_observation(obs)
            tables.append(valid_actions(obs, self.contract.blend_kinds))
            raws.append(observe(obs, self.contract.blueprints, plateau_threshold=self.plateau_threshold)[0])
        raw = torch.tensor(raws, dtype=torch.float64)
        x = self.normaliser.normalise(raw)
        states = [self._state(o.env, o.episode) for o in observations]
        h0 = torch.cat([s[0] for s in states], dim=1)
        c0 = torch.cat([s[1] for s in states], dim=1)
        masks = MaskSet.stack([MaskSet.from_table(t) for t in tables])
        uniforms = None if self.greedy else draw_uniforms([self._generator(e) for e in envs])
        with torch.inference_mode():
            z, (h1, c1) = self.net.step(x.to(self.device), (h0, c0))
            sample = sample_actions(self.net, z, _to(masks, self.device), uniforms, greedy=self.greedy)
        sample = ActionSample(*(getattr(sample, f.name).cpu().clone() for f in attrs.fields(ActionSample)))
        decisions = []
        policy_id = self.policy_id  # one digest check per batch, not per env
        for i, obs in enumerate(observations):
            self.states[obs.env] = (h1[:, i:i + 1].clone(), c1[:, i:i + 1].clone())
            row = sample.row(i)
            self.last_step[obs.env] = PolicyStep(x[i].clone(), raw[i].clone(), row, h0[0, i].cpu().clone(),
                                                 c0[0, i].cpu().clone())
            decisions.append(self._decision(obs, tables[i], row, policy_id))
        return decisions

    @torch.no_grad()
    def values(self, observations: Sequence[Observation]) -> list[float]:
        """V(s) of each env's observation from its current LSTM state, changing nothing: the
        bootstrap value of a segment cut by the round boundary (the real next observation)."""
        raw = torch.tensor([observe(o, self.contract.blueprints, plateau_threshold=self.plateau_threshold)[0]
                            for o in observations], dtype=torch.float64)
        states = [self._peek(o.env, o.episode) for o in observations]
        with torch.inference_mode():
            z, _ = self.net.step(self.normaliser.normalise(raw).to(self.device),
                                 (torch.cat([s[0] for s in states], 1), torch.cat([s[1] for s in states], 1)))
            return [float(v) for v in self.net.value(z).cpu()]

    def _decision(self, obs: Observation, table: ActionTable, sample: ActionSample, policy_id: str) -> PolicyDecided:
        a = [int(x) for x in sample.actions[0]]
        flags = [bool(x) for x in sample.applicable[0]]
        op = OPS[a[0]]
        command = None
        if op != WAIT:
            slot = table.slot_ids[a[1]]
            blueprint = blend = None
            if op == GERMINATE:
                blueprint = table.blueprint_ids[a[2]]
                blend = Blend(kind=table.blend_kinds[a[3]], steps=obs.lifecycle.blend_steps)
            command = PolicyCommand(op=op, slot=slot, blueprint=blueprint, blend=blend, reason=REASON)
        action, index = head_values(table, command)
        log_prob = {h: float(sample.log_probs[0, i]) for i, h in enumerate(HEADS)}
        entropy = {h: float(sample.entropies[0, i]) for i, h in enumerate(HEADS)}
        value = float(sample.value[0])
        chosen = "; ".join(f"{h} {action[h]} p={math.exp(log_prob[h]):.3f}" for i, h in enumerate(HEADS) if flags[i])
        mode = "greedy" if self.greedy else "sampled"
        return PolicyDecided(
            epoch=obs.epoch, policy=self.name, policy_id=policy_id,
            commands=() if command is None else (command,), action=action, action_index=index,
            legal=legal_summary(table), log_prob=log_prob, log_prob_total=sum(log_prob.values()), value=value,
            entropy=entropy, rationale=f"ppo {mode}: {chosen}; V={value:.4f}",
        )

    # -- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Tensors and primitives only: weights, statistics, contract, config, per-env LSTM states
        (unfinished episodes) and sampling generators."""
        return {
            "kind": self.name,
            "contract": self.contract.to_dict(),
            "config": _config_dict(self.config),
            "architecture": self.net.architecture(),
            "network": {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()},
            "normaliser": self.normaliser.state_dict(),
            "run_seed": self.run_seed,
            "greedy": self.greedy,
            "plateau_threshold": self.plateau_threshold,
            "envs": [[env, self.episodes.get(env, 0), h.detach().cpu().clone(), c.detach().cpu().clone()]
                     for env, (h, c) in sorted(self.states.items())],
            "generators": [[env, g.get_state()] for env, g in sorted(self.generators.items())],
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.name:
            raise ValueError(f"not a {self.name} policy state: {state.get('kind')!r}")
        ObservationContract.from_dict(state["contract"]).check(self.contract)
        self.net.load_state_dict(state["network"])
        self.normaliser.load_state_dict(state["normaliser"])
        self.run_seed = int(state["run_seed"])
        self.greedy = bool(state["greedy"])
        self.plateau_threshold = float(state["plateau_threshold"])
        self.states = {int(env): (h.to(self.device), c.to(self.device)) for env, _, h, c in state["envs"]}
        self.episodes = {int(env): int(ep) for env, ep, _, _ in state["envs"]}
        self.generators = {}
        for env, gstate in state["generators"]:
            g = torch.Generator()
            g.set_state(gstate)
            self.generators[int(env)] = g
        self.last_step = {}
        self._digest = None

    # -- checkpoints --------------------------------------------------------------------------

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        """Write a policy checkpoint atomically (temporary name, fsync, rename, fsync directory)."""
        path = Path(path)
        payload = {"format": CHECKPOINT_FORMAT, "policy": self.state_dict(), "extra": extra or {}}
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @classmethod
    def load(cls, path: str | Path, contract: ObservationContract | None = None, *,
             greedy: bool | None = None, device: str | torch.device = "cpu") -> "PPOPolicy":
        """Rebuild a policy from a checkpoint (weights-only load). With `contract` (the task's),
        a mismatch raises a one-line ValueError naming the first difference."""
        data = read_checkpoint(path)
        state = data["policy"]
        saved = ObservationContract.from_dict(state["contract"])
        if contract is not None:
            saved.check(contract)
        config = PPOConfig(**state["config"])
        arch = state["architecture"]
        net = PolicyNetwork(arch["obs_dim"], arch["n_slots"], arch["n_blueprints"], arch["n_blends"],
                            feature_dim=arch["feature_dim"], lstm_hidden=arch["lstm_hidden"],
                            head_hidden=arch["head_hidden"])
        policy = cls(saved, config, run_seed=int(state["run_seed"]), network=net, device=device)
        policy.load_state_dict(state)
        if greedy is not None:
            policy.greedy = greedy
        policy.extra = data["extra"]
        return policy


def read_checkpoint(path: str | Path) -> dict:
    data = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT or "policy" not in data:
        raise ValueError(f"{path}: not a policy checkpoint of format {CHECKPOINT_FORMAT}")
    return data


def _to(masks: MaskSet, device: torch.device) -> MaskSet:
    return MaskSet(*(getattr(masks, f.name).to(device) for f in attrs.fields(MaskSet)))
