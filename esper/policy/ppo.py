"""The PPO update (policy §5.5), readable top to bottom in the manner of CleanRL's single file.

Input: the round's **segments** (maximal runs of one env's steps within one episode and one round).
Each carries the normalised observations the policy saw, the LSTM state it started from, the sampled
actions with their applicability flags and the mask rows used, the rollout log-probs and values, the
raw rewards (governor penalty apart) and how it ended: `terminated`, or `truncated` with the
bootstrap value V(s_{t+1}) of the real next observation.

The update, in order (the numbers are the spec's steps):
  1. reward normalisation: merge raw rewards into the running std, r̃ = clip(r/σ) + governor penalty;
  2. anchor pass: a frozen deep copy of the pre-update network re-runs every segment (same code path
     as training) for the old log-probs π_old and values V_old; `logprob_drift` = max |anchor − rollout|;
  3. GAE per segment with V_old (gae.py);
  4. advantages normalised over the whole round;
  5. K epochs × M minibatches of whole segments (full BPTT from each stored initial state, so the
     LSTM sees exactly what it saw when acting); before each step the summed per-head approximate KL
     against π_old is checked and the update stops above 1.5·target_kl, without stepping;
  6. loss = Σ_h clipped surrogate_h + c_v·value loss − c_e(u)·normalised entropy, with per-head
     advantage masking (a head only learns from steps where it was applicable), global grad-norm
     clipping (the pre-clip norm is recorded) and Adam (eps 1e-5);
  7. the round's raw observations are merged into the observation statistics.
The result is a dict with the fields of `PolicyUpdated` (events §4.3) except `update`, `round`,
`episodes_completed` and `wall_time_s`, which belong to the caller.
"""

import copy
import logging
from collections.abc import Sequence

import attrs
import torch
from torch import nn

from esper.compute.streams import mix64
from esper.policy.actions import OPS
from esper.policy.gae import segment_gae
from esper.policy.network import PolicyNetwork
from esper.policy.normaliser import RewardScaler, RunningNormaliser
from esper.policy.ppo_config import PPOConfig
from esper.policy.sampling import HEADS, ActionSample, Evaluation, evaluate_actions

log = logging.getLogger(__name__)

KL_STOP_FACTOR = 1.5  # stop when Σ_h KL_h > 1.5·target_kl
DRIFT_FLAG = 1e-3  # anchor vs rollout log-prob difference worth a warning
ADAM_EPS = 1e-5
UPDATE_STREAM = 0x757064617465  # "update" in ASCII: tags the minibatch-shuffling stream


def update_seed(run_seed: int) -> int:
    """The seed of the updating process's minibatch-shuffling generator (§7.3)."""
    return mix64(UPDATE_STREAM, run_seed)


def update_generator(run_seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(update_seed(run_seed) >> 1)
    return g


def make_optimizer(net: nn.Module, config: PPOConfig) -> torch.optim.Adam:
    return torch.optim.Adam(net.parameters(), lr=config.lr, eps=ADAM_EPS)


# -- segments ---------------------------------------------------------------------------------


def _float64(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64).reshape(-1)


@attrs.frozen(eq=False)
class Segment:
    obs: torch.Tensor  # (T, D) float32, normalised as the policy saw it
    h0: torch.Tensor  # (H,) LSTM state before the first step
    c0: torch.Tensor  # (H,)
    actions: torch.Tensor  # (T, 4) long, head order op, slot, blueprint, blend
    applicable: torch.Tensor  # (T, 4) bool
    op_mask: torch.Tensor  # (T, 5) bool
    slot_mask: torch.Tensor  # (T, S) bool: the sampled op's row
    blueprint_mask: torch.Tensor  # (T, B) bool: the sampled slot's row
    blend_mask: torch.Tensor  # (T, K) bool
    log_probs: torch.Tensor  # (T, 4) rollout log-probs (0 where not applicable)
    values: torch.Tensor  # (T,) rollout V(s_t)
    rewards: torch.Tensor = attrs.field(converter=_float64)  # (T,) raw rewards, governor penalty excluded
    terminated: bool = False
    truncated: bool = False
    bootstrap_value: float | None = None  # V(s_{t+1}) of the real next observation, when truncated
    governor: torch.Tensor | None = None  # (T,) governor penalty, normalised units (bypasses normalisation)
    raw_obs: torch.Tensor | None = None  # (T, D) un-normalised, merged into the statistics after the update

    def __attrs_post_init__(self) -> None:
        T = self.obs.shape[0]
        if T == 0:
            raise ValueError("a segment has at least one step")
        for name in ("actions", "applicable", "op_mask", "slot_mask", "blueprint_mask", "blend_mask", "log_probs",
                     "values", "rewards"):
            if getattr(self, name).shape[0] != T:
                raise ValueError(f"segment field {name} has {getattr(self, name).shape[0]} steps, obs has {T}")
        if self.terminated == self.truncated:
            raise ValueError("a segment ends either terminated or truncated (exactly one)")
        if self.truncated and self.bootstrap_value is None:
            raise ValueError("a truncated segment needs its bootstrap value")
        if self.governor is not None and self.governor.shape[0] != T:
            raise ValueError("segment governor penalties do not match its steps")

    def __len__(self) -> int:
        return self.obs.shape[0]

    @property
    def penalties(self) -> torch.Tensor:
        return torch.zeros(len(self), dtype=torch.float64) if self.governor is None else _float64(self.governor)


class SegmentBuilder:
    """Accumulates one env's steps for a round; `reward` pays the last step (r_t is known at t+1)."""

    def __init__(self, h0: torch.Tensor, c0: torch.Tensor):
        self.h0, self.c0 = h0.detach().reshape(-1).clone(), c0.detach().reshape(-1).clone()
        self.steps: list[tuple[torch.Tensor, torch.Tensor | None, ActionSample]] = []
        self.rewards: list[float | None] = []
        self.governor: list[float] = []

    def __len__(self) -> int:
        return len(self.steps)

    def add(self, obs: torch.Tensor, sample: ActionSample, raw_obs=None) -> None:
        """One decision: its normalised observation (D,), the sample's row (batch of 1), the raw vector."""
        if self.rewards and self.rewards[-1] is None:
            raise ValueError("the previous step has no reward yet")
        raw = None if raw_obs is None else torch.as_tensor(raw_obs, dtype=torch.float64).reshape(-1)
        self.steps.append((obs.detach().reshape(-1), raw, sample))
        self.rewards.append(None)
        self.governor.append(0.0)

    def reward(self, raw: float, governor: float = 0.0) -> None:
        if not self.rewards or self.rewards[-1] is not None:
            raise ValueError("no step awaits a reward")
        self.rewards[-1], self.governor[-1] = float(raw), float(governor)

    def close(self, *, terminated: bool, bootstrap_value: float | None = None) -> Segment:
        if not self.steps or self.rewards[-1] is None:
            raise ValueError("a segment closes after at least one step and its reward")
        samples = [s for _, _, s in self.steps]

        def cat(name: str) -> torch.Tensor:
            return torch.cat([getattr(s, name) for s in samples])

        raws = [r for _, r, _ in self.steps]
        return Segment(
            obs=torch.stack([o for o, _, _ in self.steps]).to(torch.float32), h0=self.h0, c0=self.c0,
            actions=cat("actions"), applicable=cat("applicable"), op_mask=cat("op_mask"),
            slot_mask=cat("slot_mask"), blueprint_mask=cat("blueprint_mask"), blend_mask=cat("blend_mask"),
            log_probs=cat("log_probs"), values=cat("value"), rewards=self.rewards, terminated=terminated,
            truncated=not terminated, bootstrap_value=None if terminated else bootstrap_value,
            governor=torch.tensor(self.governor, dtype=torch.float64),
            raw_obs=None if any(r is None for r in raws) else torch.stack(raws),
        )


@attrs.frozen(eq=False)
class Batch:
    """Segments padded to (N, T_max, ·) for the LSTM, plus their steps flattened segment-major."""

    obs: torch.Tensor  # (N, T_max, D)
    h0: torch.Tensor  # (1, N, H)
    c0: torch.Tensor
    valid: torch.Tensor  # (N, T_max) bool
    actions: torch.Tensor  # (M, 4) …
    applicable: torch.Tensor
    op_mask: torch.Tensor
    slot_mask: torch.Tensor
    blueprint_mask: torch.Tensor
    blend_mask: torch.Tensor


def collate(segments: Sequence[Segment], device: torch.device | str = "cpu") -> Batch:
    n, t_max = len(segments), max(len(s) for s in segments)
    obs = torch.zeros(n, t_max, segments[0].obs.shape[1], dtype=torch.float32)
    valid = torch.zeros(n, t_max, dtype=torch.bool)
    for i, s in enumerate(segments):
        obs[i, :len(s)] = s.obs
        valid[i, :len(s)] = True

    def flat(name: str) -> torch.Tensor:
        return torch.cat([getattr(s, name) for s in segments]).to(device)

    return Batch(
        obs=obs.to(device), h0=torch.stack([s.h0 for s in segments]).unsqueeze(0).to(device, torch.float32),
        c0=torch.stack([s.c0 for s in segments]).unsqueeze(0).to(device, torch.float32), valid=valid.to(device),
        actions=flat("actions").long(), applicable=flat("applicable").bool(), op_mask=flat("op_mask").bool(),
        slot_mask=flat("slot_mask").bool(), blueprint_mask=flat("blueprint_mask").bool(),
        blend_mask=flat("blend_mask").bool(),
    )


def forward_segments(net: PolicyNetwork, batch: Batch) -> Evaluation:
    """Re-run the LSTM over whole segments from their stored initial states and evaluate the stored
    actions under the stored masks: the one code path of the anchor pass and of training."""
    z, _ = net.encode(batch.obs, (batch.h0, batch.c0))
    return evaluate_actions(net, z[batch.valid], batch.actions, batch.applicable, batch.op_mask, batch.slot_mask,
                            batch.blueprint_mask, batch.blend_mask)


# -- the loss ---------------------------------------------------------------------------------


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-column mean over rows where `mask` holds; 0 for a column with no such row."""
    m = mask.to(x.dtype)
    return (x * m).sum(0) / m.sum(0).clamp(min=1.0)


@attrs.frozen(eq=False)
class LossTerms:
    loss: torch.Tensor  # the scalar to minimise
    policy_loss: torch.Tensor  # Σ_h L_h
    value_loss: torch.Tensor
    entropy: torch.Tensor  # H = Σ_h normalised entropy
    head_kl: torch.Tensor  # (4,) approx KL per head vs π_old (no grad)
    head_clip_fraction: torch.Tensor  # (4,)
    head_entropy: torch.Tensor  # (4,) normalised entropy per head (no grad)

    @property
    def approx_kl(self) -> float:
        return float(self.head_kl.sum())


def ppo_loss(new: Evaluation, old_log_probs: torch.Tensor, old_values: torch.Tensor, advantages: torch.Tensor,
             returns: torch.Tensor, applicable: torch.Tensor, config: PPOConfig, entropy_coef: float) -> LossTerms:
    """The loss of §5.5 step 6 on flat steps (M rows); `advantages` already normalised."""
    flags = applicable
    logratio = new.log_probs - old_log_probs  # 0 on non-applicable heads (both sides are 0)
    ratio = logratio.exp()
    adv = advantages.unsqueeze(-1)

    # Clipped surrogate per head, averaged over the steps where the head was applicable.
    surrogate = torch.max(-adv * ratio, -adv * ratio.clamp(1 - config.clip, 1 + config.clip))
    policy_loss = _masked_mean(surrogate, flags).sum()

    # Value loss, optionally clipped around V_old (CleanRL's `clip_vloss`).
    v = new.values
    if config.clip_value:
        v_clipped = old_values + (v - old_values).clamp(-config.value_clip, config.value_clip)
        value_loss = 0.5 * torch.max((v - returns) ** 2, (v_clipped - returns) ** 2).mean()
    else:
        value_loss = 0.5 * ((v - returns) ** 2).mean()

    # Entropy over valid entries, scaled to [0, 1] by ln(n_valid); steps with one choice carry none.
    choosy = flags & (new.n_valid >= 2)
    scaled = new.entropies / new.n_valid.clamp(min=2).to(new.entropies.dtype).log()
    head_entropy = _masked_mean(scaled, choosy)
    entropy = head_entropy.sum()

    loss = policy_loss + config.value_coef * value_loss - entropy_coef * entropy
    with torch.no_grad():
        # k3 estimator of KL(π_old‖π): (r − 1) − ln r, per head over applicable steps.
        head_kl = _masked_mean((ratio - 1) - logratio, flags)
        head_clip = _masked_mean(((ratio - 1).abs() > config.clip).to(ratio.dtype), flags)
    return LossTerms(loss, policy_loss, value_loss, entropy, head_kl, head_clip, head_entropy.detach())


# -- the update -------------------------------------------------------------------------------


def _std(x: torch.Tensor) -> float:
    return float(x.std(correction=0)) if x.numel() else 0.0


def _mean(x: torch.Tensor) -> float:
    return float(x.mean()) if x.numel() else 0.0


def ppo_update(net: PolicyNetwork, optimizer: torch.optim.Optimizer, segments: Sequence[Segment], config: PPOConfig,
               *, generator: torch.Generator, reward_scaler: RewardScaler, update_index: int,
               planned_updates: int | None = None, obs_normaliser: RunningNormaliser | None = None) -> dict:
    """One PPO update over a round's segments. `update_index` is u (updates already made), for the
    entropy schedule; `generator` shuffles minibatches; `reward_scaler` and `obs_normaliser` are
    updated in place (rewards before the update, observations after it)."""
    if not segments:
        raise ValueError("an update needs at least one segment")
    device = next(net.parameters()).device
    lengths = [len(s) for s in segments]
    entropy_coef = config.entropy_coef(update_index, planned_updates)

    # 1. Rewards: σ from the raw rewards (governor penalty excluded), which then joins unscaled.
    raw = torch.cat([s.rewards for s in segments])
    reward_scaler.merge(raw)
    scaled = reward_scaler.scale(raw) if config.normalise_rewards else raw
    rewards = (scaled + torch.cat([s.penalties for s in segments])).split(lengths)

    # 2. Anchor: the frozen pre-update policy over every segment, on the training code path.
    frozen = copy.deepcopy(net)
    full = collate(segments, device)
    with torch.no_grad():
        anchor = forward_segments(frozen, full)
    old_log_probs = anchor.log_probs.detach()
    old_values = anchor.values.detach()
    rollout_log_probs = torch.cat([s.log_probs for s in segments]).to(device, old_log_probs.dtype)
    drift = float((old_log_probs - rollout_log_probs).abs().max())
    if drift > DRIFT_FLAG:
        log.warning("PPO anchor log-probs differ from the rollout's by %.3g (> %g)", drift, DRIFT_FLAG)

    # 3. GAE per segment on V_old, in float64.
    adv_parts, ret_parts = [], []
    for s, r, v in zip(segments, rewards, old_values.double().cpu().split(lengths)):
        a, ret = segment_gae(r, v, terminated=s.terminated, bootstrap_value=s.bootstrap_value,
                             gamma=config.gamma, lam=config.gae_lambda)
        adv_parts.append(a)
        ret_parts.append(ret)
    advantages, returns = torch.cat(adv_parts), torch.cat(ret_parts)

    # 4. Advantages normalised over the round (population std: a one-step round gives 0, not NaN).
    norm_adv = (advantages - advantages.mean()) / (advantages.std(correction=0) + 1e-8)

    # Per-segment slices, so a minibatch gathers its segments' steps in collate order.
    dtype = old_values.dtype
    per_seg = {
        "old_lp": old_log_probs.split(lengths),
        "old_v": old_values.split(lengths),
        "adv": norm_adv.to(device, dtype).split(lengths),
        "ret": returns.to(device, dtype).split(lengths),
    }

    # 5–6. Epochs of shuffled minibatches of whole segments, with the KL stop before each step.
    stop_epoch = stop_minibatch = None
    epochs_run = 0
    records: list[LossTerms] = []
    grad_norms: list[float] = []
    threshold = KL_STOP_FACTOR * config.target_kl
    for epoch in range(1, config.epochs + 1):
        order = torch.randperm(len(segments), generator=generator)
        chunks = [c for c in order.tensor_split(min(config.minibatches, len(segments))) if len(c)]
        stepped = False
        for mb, chunk in enumerate(chunks, start=1):
            ids = chunk.tolist()
            batch = collate([segments[i] for i in ids], device)
            new = forward_segments(net, batch)
            terms = ppo_loss(new, torch.cat([per_seg["old_lp"][i] for i in ids]),
                             torch.cat([per_seg["old_v"][i] for i in ids]), torch.cat([per_seg["adv"][i] for i in ids]),
                             torch.cat([per_seg["ret"][i] for i in ids]), batch.applicable, config, entropy_coef)
            records.append(terms)
            if terms.approx_kl > threshold:
                stop_epoch, stop_minibatch = epoch, mb
                break
            optimizer.zero_grad(set_to_none=True)
            terms.loss.backward()
            grad_norms.append(float(nn.utils.clip_grad_norm_(net.parameters(), config.max_grad_norm)))
            optimizer.step()
            stepped = True
        epochs_run += stepped
        if stop_epoch is not None:
            break

    # 7. The round's raw observations join the statistics only now (frozen during the round).
    if obs_normaliser is not None:
        raws = [s.raw_obs for s in segments if s.raw_obs is not None]
        if raws:
            obs_normaliser.merge(torch.cat(raws))

    var_r = float(returns.var(correction=0))
    explained = None if var_r < 1e-8 else 1.0 - float((returns - old_values.double().cpu()).var(correction=0)) / var_r
    flags = full.applicable.cpu()
    ops = full.actions[:, 0].cpu()
    return {
        "steps": sum(lengths),
        "segments": len(segments),
        "ppo_epochs": config.epochs,
        "epochs_run": epochs_run,
        "early_stopped": stop_epoch is not None,
        "stop_epoch": stop_epoch,
        "stop_minibatch": stop_minibatch,
        "approx_kl": sum(t.approx_kl for t in records) / len(records),
        "kl": _per_head([t.head_kl for t in records]),
        "clip_fraction": _per_head([t.head_clip_fraction for t in records]),
        "entropy": _per_head([t.head_entropy for t in records]),
        "applicable": {h: int(flags[:, i].sum()) for i, h in enumerate(HEADS)},
        "policy_loss": sum(float(t.policy_loss.detach()) for t in records) / len(records),
        "value_loss": sum(float(t.value_loss.detach()) for t in records) / len(records),
        "explained_variance": explained,
        "grad_norm_mean": sum(grad_norms) / len(grad_norms) if grad_norms else 0.0,
        "grad_norm_max": max(grad_norms, default=0.0),
        "lr": float(optimizer.param_groups[0]["lr"]),
        "entropy_coef": entropy_coef,
        "reward_std": reward_scaler.std,
        "observations": obs_normaliser.count if obs_normaliser is not None else 0,
        "logprob_drift": drift,
        "advantage_mean": _mean(advantages),
        "advantage_std": _std(advantages),
        "return_mean": _mean(returns),
        "return_std": _std(returns),
        "op_counts": {op: int((ops == i).sum()) for i, op in enumerate(OPS)},
        "rollbacks": int(sum(int((s.penalties != 0).sum()) for s in segments)),
    }


def _per_head(rows: list[torch.Tensor]) -> dict[str, float]:
    mean = torch.stack(rows).double().mean(0)
    return {h: float(mean[i]) for i, h in enumerate(HEADS)}


class PPOLearner:
    """The updating process's state: network, Adam, reward statistics, shuffling generator and the
    update counter u; `update` runs `ppo_update` and advances u."""

    def __init__(self, net: PolicyNetwork, config: PPOConfig, run_seed: int):
        self.net, self.config, self.run_seed = net, config, run_seed
        self.optimizer = make_optimizer(net, config)
        self.reward_scaler = RewardScaler(config.reward_clip)
        self.generator = update_generator(run_seed)
        self.updates = 0

    def update(self, segments: Sequence[Segment], *, planned_updates: int | None = None,
               obs_normaliser: RunningNormaliser | None = None) -> dict:
        result = ppo_update(self.net, self.optimizer, segments, self.config, generator=self.generator,
                            reward_scaler=self.reward_scaler, update_index=self.updates,
                            planned_updates=planned_updates, obs_normaliser=obs_normaliser)
        self.updates += 1
        return result

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "reward": self.reward_scaler.state_dict(),
                "generator": self.generator.get_state(), "updates": self.updates, "run_seed": self.run_seed}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.reward_scaler.load_state_dict(state["reward"])
        self.generator.set_state(state["generator"])
        self.updates = int(state["updates"])
        self.run_seed = int(state["run_seed"])

