"""The PPO update (policy §5.5): GAE, the loss with per-head masking, the KL stop, the whole update on
segments collected by the real controller, and learning on a toy sequence bandit.
"""

import math

import attrs
import msgspec
import pytest
import torch
from test_actions import Driver, play

from esper.events.catalogue import PolicyUpdated
from esper.policy.gae import batch_gae, segment_gae
from esper.policy.network import PolicyNetwork
from esper.policy.normaliser import RewardScaler
from esper.policy.ppo import PPOLearner, Segment, SegmentBuilder, make_optimizer, ppo_loss, ppo_update, \
    update_generator
from esper.policy.ppo_config import PPOConfig
from esper.policy.ppo_policy import PPOPolicy
from esper.policy.rewards import RewardConfig, make_reward_function
from esper.policy.sampling import Evaluation, MaskSet, draw_uniforms, policy_generator, sample_actions

SMALL = PPOConfig(feature_dim=32, lstm_hidden=32, head_hidden=16, entropy_anneal_updates=10)
CALLER_FIELDS = {"update", "round", "episodes_completed", "wall_time_s"}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny networks: one thread is fastest, and two xdist workers must not fight over cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- GAE -------------------------------------------------------------------------------------


def test_gae_against_a_hand_computed_batch_with_truncation_and_termination():
    gamma, lam = 0.9, 0.5
    # Segment A is cut by the round boundary: bootstrap from V(s_3) = 2.0.
    #   δ2 = 2 + 0.9·2.0 − 1.5 = 2.3                  A2 = 2.3
    #   δ1 = 0 + 0.9·1.5 − 1.0 = 0.35                 A1 = 0.35 + 0.45·2.3   = 1.385
    #   δ0 = 1 + 0.9·1.0 − 0.5 = 1.4                  A0 = 1.4  + 0.45·1.385 = 2.02325
    # Segment B ends its episode: no bootstrap, whatever value is offered.
    #   δ1 = 3 + 0 − (−0.4) = 3.4                     A1 = 3.4
    #   δ0 = −1 + 0.9·(−0.4) − 0.2 = −1.56            A0 = −1.56 + 0.45·3.4 = −0.03
    adv, ret = batch_gae(rewards=[[1.0, 0.0, 2.0], [-1.0, 3.0]], values=[[0.5, 1.0, 1.5], [0.2, -0.4]],
                         terminated=[False, True], bootstrap_values=[2.0, 99.0], gamma=gamma, lam=lam)
    assert adv[0].tolist() == pytest.approx([2.02325, 1.385, 2.3], abs=1e-12)
    assert ret[0].tolist() == pytest.approx([2.52325, 2.385, 3.8], abs=1e-12)
    assert adv[1].tolist() == pytest.approx([-0.03, 3.4], abs=1e-12)
    assert ret[1].tolist() == pytest.approx([0.17, 3.0], abs=1e-12)
    with pytest.raises(ValueError, match="bootstrap"):
        segment_gae([1.0], [0.0], terminated=False, bootstrap_value=None, gamma=gamma, lam=lam)


# -- the loss on a crafted batch -------------------------------------------------------------


def _crafted():
    """Three steps: WAIT (op only), CULL (op, slot), GERMINATE (all four heads)."""
    applicable = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    ratios = torch.tensor([[1.5, 1.0, 1.0, 1.0], [0.5, 1.3, 1.0, 1.0], [1.1, 0.7, 2.0, 1.0]], dtype=torch.float64)
    old = torch.where(applicable, torch.full((3, 4), math.log(0.3), dtype=torch.float64), 0.0)
    new_lp = torch.where(applicable, old + ratios.log(), 0.0)
    n_valid = torch.tensor([[2, 0, 0, 3], [3, 1, 2, 3], [5, 3, 2, 3]])
    scaled_entropy = torch.tensor([[0.5, 0, 0, 0], [1.0, 0.8, 0, 0], [0.2, 0.6, 0.9, 0.3]], dtype=torch.float64)
    entropies = torch.where(applicable, scaled_entropy * n_valid.clamp(min=2).double().log(), 0.0)
    new = Evaluation(log_probs=new_lp, entropies=entropies, n_valid=n_valid,
                     values=torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64))
    return new, old, applicable, ratios


def test_loss_has_known_values_with_per_head_masking():
    new, old, applicable, ratios = _crafted()
    advantages = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    returns = torch.tensor([1.5, 1.0, 0.5], dtype=torch.float64)
    old_values = torch.tensor([0.9, 2.5, 0.0], dtype=torch.float64)
    config = PPOConfig(clip=0.2, value_coef=0.5)
    terms = ppo_loss(new, old, old_values, advantages, returns, applicable, config, entropy_coef=0.1)
    # per head: mean over applicable steps of −min(r·Â, clip(r)·Â)
    op = (-1.2 + 1.6 - 0.55) / 3
    slot = (2.6 - 0.35) / 2  # the WAIT step does not dilute the slot head
    blueprint, blend = -0.6, -0.5  # one GERMINATE step each
    assert float(terms.policy_loss) == pytest.approx(op + slot + blueprint + blend)
    assert float(terms.value_loss) == pytest.approx(0.5 * (0.25 + 1.0 + 0.25) / 3)
    # entropy: scaled by ln(n_valid); the CULL step's single-slot choice carries none
    head_entropy = [(0.5 + 1.0 + 0.2) / 3, 0.6, 0.9, 0.3]
    assert terms.head_entropy.tolist() == pytest.approx(head_entropy)
    assert float(terms.loss) == pytest.approx(op + slot + blueprint + blend + 0.5 * float(terms.value_loss)
                                              - 0.1 * sum(head_entropy))
    k3 = lambda r: (r - 1) - math.log(r)  # noqa: E731
    kl = [(k3(1.5) + k3(0.5) + k3(1.1)) / 3, (k3(1.3) + k3(0.7)) / 2, k3(2.0), 0.0]
    assert terms.head_kl.tolist() == pytest.approx(kl)
    assert terms.approx_kl == pytest.approx(sum(kl))
    assert terms.head_clip_fraction.tolist() == pytest.approx([2 / 3, 1.0, 1.0, 0.0])
    # clipped value loss: V_c = V_old + clip(V − V_old, ±0.2) = [1.0, 2.3, 0.0]
    clipped = ppo_loss(new, old, old_values, advantages, returns, applicable,
                       PPOConfig(clip_value=True, value_clip=0.2), entropy_coef=0.0)
    assert float(clipped.value_loss) == pytest.approx(0.5 * (0.25 + 1.69 + 0.25) / 3)


def test_a_head_without_applicable_steps_contributes_nothing():
    new, old, applicable, _ = _crafted()
    wait_only = applicable[:1]
    sub = Evaluation(new.log_probs[:1], new.entropies[:1], new.n_valid[:1], new.values[:1])
    terms = ppo_loss(sub, old[:1], sub.values, torch.ones(1, dtype=torch.float64), sub.values, wait_only,
                     PPOConfig(), entropy_coef=0.0)
    assert float(terms.policy_loss) == pytest.approx(-1.2)  # the op head alone
    assert terms.head_kl[1:].tolist() == [0.0, 0.0, 0.0] and terms.head_entropy[1:].tolist() == [0.0, 0.0, 0.0]


# -- segments from the real controller -------------------------------------------------------


class Recorder:
    """Wraps a PPOPolicy as the engine would: keeps each decision's stored step."""

    def __init__(self, policy: PPOPolicy):
        self.policy, self.steps = policy, []

    def reset(self, env, episode, max_epochs):
        self.policy.reset(env, episode, max_epochs)

    def decide(self, observation):
        decision = self.policy.decide(observation)
        self.steps.append(self.policy.last_step[observation.env])
        return decision


def collect(policy: PPOPolicy, seeds=(0, 1), rollout: int = 10, max_epochs: int = 22, rollback_rate: float = 0.1):
    """Segments of whole episodes cut every `rollout` decisions (the last piece terminates)."""
    reward_fn = make_reward_function(RewardConfig(), policy.config.gamma)
    segments = []
    for seed in seeds:
        recorder = Recorder(policy)
        steps = play(recorder, Driver.start(seed, {"gate_mode_g2": "explicit"}, max_epochs=max_epochs),
                     rollback_rate)
        assert len(steps) == len(recorder.steps) == max_epochs - 1
        for start in range(0, len(steps), rollout):
            chunk = range(start, min(start + rollout, len(steps)))
            builder = SegmentBuilder(recorder.steps[start].h0, recorder.steps[start].c0)
            for i in chunk:
                s, stored = steps[i], recorder.steps[i]
                builder.add(stored.obs, stored.sample, stored.raw_obs)
                r = reward_fn(s.before, s.decision, s.executed, s.after, terminated=s.terminated, governor=s.governor)
                governor = r.components.get("governor", 0.0)
                builder.reward(r.total_raw - governor, governor)
            last = chunk[-1] + 1 == len(steps)
            # V(s_{t+1}) at collection time: what the policy said of that observation, from that state
            boot = None if last else float(recorder.steps[chunk[-1] + 1].sample.value[0])
            segments.append(builder.close(terminated=last, bootstrap_value=boot))
    return segments


def _policy(config: PPOConfig = SMALL, seed: int = 0) -> PPOPolicy:
    obs = Driver.start(0, {"gate_mode_g2": "explicit"}).record_epoch(40.0)
    torch.manual_seed(seed)
    return PPOPolicy.for_observation(obs, config, run_seed=seed)


def test_update_on_collected_segments_reports_policy_updated_fields():
    policy = _policy()
    segments = collect(policy)
    assert [len(s) for s in segments] == [10, 10, 1, 10, 10, 1]
    assert [s.truncated for s in segments] == [True, True, False] * 2
    learner = PPOLearner(policy.net, SMALL, run_seed=0)
    before = policy.policy_id
    result = learner.update(segments, obs_normaliser=policy.normaliser)
    assert set(result) == set(PolicyUpdated.__struct_fields__) - CALLER_FIELDS
    event = PolicyUpdated(**result, update=0, round=0, episodes_completed=2, wall_time_s=0.0)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(event), type=PolicyUpdated) == event
    # the anchor re-runs each segment from its stored LSTM state and reproduces the rollout
    assert result["logprob_drift"] < 1e-5
    assert result["steps"] == 42 and result["segments"] == 6 and result["ppo_epochs"] == 4
    assert result["epochs_run"] == 4 and not result["early_stopped"] and result["stop_epoch"] is None
    flags = torch.cat([s.applicable for s in segments])
    heads = ("op", "slot", "blueprint", "blend")
    assert result["applicable"] == {h: int(flags[:, i].sum()) for i, h in enumerate(heads)}
    assert result["applicable"]["op"] == 42
    assert sum(result["op_counts"].values()) == 42 and set(result["op_counts"]) == {
        "wait", "germinate", "advance", "cull", "fossilize"}
    assert result["observations"] == 42  # merged after the update
    assert result["entropy_coef"] == pytest.approx(0.05) and result["lr"] == SMALL.lr
    assert result["grad_norm_max"] >= result["grad_norm_mean"] > 0
    raw = torch.cat([s.rewards for s in segments])
    assert result["reward_std"] == pytest.approx(float(raw.std(correction=0)))
    assert result["rollbacks"] == sum(int((s.penalties != 0).sum()) for s in segments)
    assert learner.updates == 1 and policy.policy_id != before


def test_kl_stop_fires_with_a_forced_large_lr():
    policy = _policy()
    segments = collect(policy, seeds=(0, 1, 2))
    reference = {k: v.clone() for k, v in policy.net.state_dict().items()}
    forced = PPOConfig(feature_dim=32, lstm_hidden=32, head_hidden=16, entropy_anneal_updates=10, lr=0.5)
    result = PPOLearner(policy.net, forced, run_seed=0).update(segments)
    assert result["early_stopped"] and result["stop_epoch"] == 1 and result["stop_minibatch"] == 2
    assert result["epochs_run"] == 1  # the first step always proceeds: the network equals the frozen copy
    assert result["approx_kl"] > 1.5 * forced.target_kl / 2  # the mean includes the first, near-zero KL
    # with the default lr, on the same data, all K epochs run
    policy.net.load_state_dict(reference)
    calm = PPOLearner(policy.net, SMALL, run_seed=0).update(segments)
    assert not calm["early_stopped"] and calm["epochs_run"] == 4 and calm["stop_minibatch"] is None


def _tiny_segment(rewards, governor, values_zero_net):
    T = len(rewards)
    net = values_zero_net
    one = MaskSet(op=torch.tensor([True, True, False, False, False]),
                  slot=torch.tensor([[False] * 2, [True] * 2, [False] * 2, [False] * 2, [False] * 2]),
                  blueprint=torch.ones(2, 2, dtype=torch.bool), blend=torch.ones(1, dtype=torch.bool))
    masks = MaskSet.stack([one] * T)
    obs = torch.zeros(T, net.obs_dim)
    z, _ = net.encode(obs.unsqueeze(0), net.initial_state(1))
    sample = sample_actions(net, z[0], masks, torch.rand(T, 4, dtype=torch.float64))
    return Segment(obs=obs, h0=torch.zeros(net.lstm_hidden), c0=torch.zeros(net.lstm_hidden), actions=sample.actions,
                   applicable=sample.applicable, op_mask=sample.op_mask, slot_mask=sample.slot_mask,
                   blueprint_mask=sample.blueprint_mask, blend_mask=sample.blend_mask, log_probs=sample.log_probs,
                   values=sample.value, rewards=rewards, terminated=True,
                   governor=torch.tensor(governor, dtype=torch.float64))


@pytest.mark.parametrize("normalise", [True, False])
def test_rewards_are_scaled_by_their_std_and_the_governor_penalty_bypasses_it(normalise):
    net = PolicyNetwork(3, 2, 2, 1, feature_dim=8, lstm_hidden=8, head_hidden=8)
    with torch.no_grad():  # V ≡ 0, so returns are discounted sums of the rewards the update used
        net.value_head[2].weight.zero_()
        net.value_head[2].bias.zero_()
    segment = _tiny_segment([2.0, 6.0], [0.0, -5.0], net)
    config = PPOConfig(normalise_rewards=normalise, entropy_anneal_updates=1, epochs=1)
    result = ppo_update(net, make_optimizer(net, config), [segment], config, generator=update_generator(0),
                        reward_scaler=RewardScaler(), update_index=0)
    gl = config.gamma * config.gae_lambda
    r = [1.0, 3.0 - 5.0] if normalise else [2.0, 6.0 - 5.0]  # σ = 2; the penalty joins unscaled
    assert result["return_mean"] == pytest.approx((r[0] + gl * r[1] + r[1]) / 2)
    assert result["reward_std"] == pytest.approx(2.0) and result["rollbacks"] == 1
    assert result["explained_variance"] == pytest.approx(0.0, abs=1e-12)  # V_old ≡ 0 explains nothing


def test_segment_validation():
    net = PolicyNetwork(3, 2, 2, 1, feature_dim=8, lstm_hidden=8, head_hidden=8)
    segment = _tiny_segment([1.0], [0.0], net)
    with pytest.raises(ValueError, match="exactly one"):
        Segment(**{**_fields(segment), "terminated": False})
    with pytest.raises(ValueError, match="bootstrap"):
        Segment(**{**_fields(segment), "terminated": False, "truncated": True})
    with pytest.raises(ValueError, match="rewards"):
        Segment(**{**_fields(segment), "rewards": [1.0, 2.0]})


def _fields(segment: Segment) -> dict:
    return {f.name: getattr(segment, f.name) for f in attrs.fields(Segment)}


# -- learning on a toy sequence bandit -------------------------------------------------------


def test_ppo_learns_a_contextual_sequence_bandit():
    """Episodes of 4 steps; the context (one-hot) says which blueprint pays. GERMINATE with the
    right blueprint pays +1, with the wrong one −0.5; WAIT pays 0. A uniform policy earns ≈ 0.5
    per episode, the optimum 4. The blueprint head must read the context through z."""
    T, N, rounds = 4, 16, 12
    config = PPOConfig(feature_dim=32, lstm_hidden=32, head_hidden=32, lr=3e-3, gamma=0.9, gae_lambda=0.9,
                       entropy_start=0.01, entropy_end=0.01, entropy_anneal_updates=1, target_kl=0.05)
    torch.manual_seed(0)
    net = PolicyNetwork(4, 2, 2, 1, feature_dim=32, lstm_hidden=32, head_hidden=32)
    learner = PPOLearner(net, config, run_seed=0)
    generators = [policy_generator(1000 + e) for e in range(N)]
    env_rng = torch.Generator().manual_seed(3)
    mask = MaskSet(op=torch.tensor([True, True, False, False, False]),
                   slot=torch.tensor([[False, False], [True, True], [False, False], [False, False], [False, False]]),
                   blueprint=torch.ones(2, 2, dtype=torch.bool), blend=torch.ones(1, dtype=torch.bool))
    masks = MaskSet.stack([mask] * N)
    returns = []
    for _ in range(rounds):
        context = torch.randint(2, (N,), generator=env_rng)
        state = net.initial_state(N)
        builders = [SegmentBuilder(state[0][0, i], state[1][0, i]) for i in range(N)]
        total = torch.zeros(N)
        for t in range(T):
            obs = torch.stack([(context == 0).float(), (context == 1).float(), torch.full((N,), t / T),
                               torch.ones(N)], dim=1)
            with torch.no_grad():
                z, state = net.step(obs, state)
                sample = sample_actions(net, z, masks, draw_uniforms(generators))
            germinate = sample.actions[:, 0] == 1
            right = sample.actions[:, 2] == context
            reward = torch.where(germinate, torch.where(right, 1.0, -0.5), 0.0)
            total += reward
            for i in range(N):
                builders[i].add(obs[i], sample.row(i))
                builders[i].reward(float(reward[i]))
        returns.append(float(total.mean()))
        learner.update([b.close(terminated=True) for b in builders])
    assert returns[0] < 1.5
    assert sum(returns[-3:]) / 3 > returns[0] + 1.5, returns
