"""PPO core (policy §5): config, network init, exact masked sampling, the PPO controller, checkpoints.

The sampling property draws 100,000 actions in one batch from masks of random lifecycle states
(made by the real decider) and checks each against the valid-action table; a sample of them is
then executed by the pure decider from the very state it was drawn for.
"""

import math

import attrs
import pytest
import torch
from support import SLOTS
from test_actions import Driver, play

from esper.events.catalogue import Blend, PolicyCommand
from esper.lifecycle import DomainError, decide
from esper.lifecycle.blend import BLEND_KINDS
from esper.policy.actions import OPS, head_values, legal_summary, valid_actions
from esper.policy.baselines import RandomPolicy
from esper.policy.features import ObservationContract, feature_dim
from esper.policy.network import PolicyNetwork
from esper.policy.ppo import make_optimizer
from esper.policy.ppo_config import PPOConfig
from esper.policy.ppo_policy import PPOPolicy, read_checkpoint
from esper.policy.sampling import MaskSet, masked_log_softmax, sample_actions
from esper.policy.seeding import policy_seed

SMALL = PPOConfig(feature_dim=32, lstm_hidden=32, head_hidden=16)
LIFECYCLES = (
    {},
    {"gate_mode_g1": "explicit", "gate_mode_g2": "explicit", "gate_mode_g3": "explicit", "blend_steps": 2},
    {"max_seeds": 2, "gate_mode_g3": "explicit", "blend_steps": 1, "embargo_epochs": 1},
    {"max_seeds": 1, "gate_mode_g2": "explicit", "g5_min_contribution": 0.5},
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny networks: one thread is fastest, and two xdist workers must not fight over cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- config ----------------------------------------------------------------------------------


def test_config_defaults_match_the_spec():
    c = PPOConfig()
    assert (c.gamma, c.gae_lambda, c.clip, c.epochs, c.minibatches, c.target_kl) == (0.995, 0.97, 0.2, 4, 2, 0.015)
    assert (c.value_coef, c.clip_value, c.value_clip) == (0.5, False, 0.2)
    assert (c.entropy_start, c.entropy_end, c.entropy_anneal_updates) == (0.05, 0.01, 0)
    assert (c.max_grad_norm, c.lr, c.feature_dim, c.lstm_hidden, c.head_hidden) == (1.0, 3e-4, 128, 128, 64)
    assert (c.reward_clip, c.obs_clip, c.envs, c.rollout_length, c.normalise_rewards) == (10.0, 10.0, 4, 0, True)
    assert c.blend_kinds == ("linear", "sigmoid", "gated")
    assert c.rollout(25) == 24 and PPOConfig(rollout_length=8).rollout(25) == 8


@pytest.mark.parametrize("changes", [
    {"gamma": 0.0}, {"gamma": 1.5}, {"gae_lambda": -0.1}, {"clip": 0.0}, {"epochs": 0}, {"minibatches": 0},
    {"target_kl": 0.0}, {"lr": float("nan")}, {"blend_kinds": ()}, {"blend_kinds": ("linear", "linear")},
    {"blend_kinds": ("cubic",)}, {"max_grad_norm": -1.0}, {"clip_value": 1}, {"entropy_start": -0.1},
])
def test_config_rejects_bad_values(changes):
    with pytest.raises((ValueError, TypeError)):
        PPOConfig(**changes)


def test_entropy_schedule_anneals_to_its_floor():
    c = PPOConfig(entropy_anneal_updates=10)
    assert c.entropy_coef(0) == pytest.approx(0.05)
    assert c.entropy_coef(5) == pytest.approx(0.03)
    assert c.entropy_coef(10) == c.entropy_coef(99) == pytest.approx(0.01)
    assert PPOConfig().entropy_coef(2, planned_updates=4) == pytest.approx(0.03)  # U = planned rounds
    with pytest.raises(ValueError, match="planned"):
        PPOConfig().entropy_coef(1)


# -- network ---------------------------------------------------------------------------------


def _singular(layer: torch.nn.Linear) -> torch.Tensor:
    return torch.linalg.svdvals(layer.weight.detach())


def test_network_init_follows_the_spec():
    net = PolicyNetwork(94, 3, 2, 3)
    root2 = math.sqrt(2)
    assert torch.allclose(_singular(net.features[0]), torch.full((94,), root2), atol=1e-5)
    for head in (net.op_head, net.slot_head, net.blueprint_head, net.blend_head, net.value_head):
        assert torch.allclose(_singular(head[0]), torch.tensor(root2), atol=1e-5)
        assert not head[0].bias.any() and not head[2].bias.any()
    for head in (net.op_head, net.slot_head, net.blueprint_head, net.blend_head):
        assert torch.allclose(_singular(head[2]), torch.tensor(0.01), atol=1e-6)
    assert torch.allclose(_singular(net.value_head[2]), torch.tensor(1.0), atol=1e-5)
    H = net.lstm_hidden
    bias = net.lstm.bias_ih_l0.detach()
    assert bias[H:2 * H].eq(1).all() and bias[:H].eq(0).all() and bias[2 * H:].eq(0).all()
    assert not net.lstm.bias_hh_l0.any()
    w = net.lstm.weight_hh_l0.detach()  # (4H, H) orthogonal, gain 1: orthonormal columns
    assert torch.allclose(w.T @ w, torch.eye(H), atol=1e-5)
    # near-uniform start: the op head's probabilities are close to 1/5
    z, _ = net.step(torch.randn(8, 94), net.initial_state(8))
    p = net.op_logits(z).softmax(-1)
    assert (p - 0.2).abs().max() < 0.02
    # conditional heads see onehot(op) / onehot(slot)
    assert net.slot_head[0].in_features == H + 5 and net.blueprint_head[0].in_features == H + 3


# -- exact masked sampling -------------------------------------------------------------------


def random_states(episodes: int = 8, max_epochs: int = 30):
    """(observation, decider state) pairs at every decision point of random-policy episodes."""
    pool = []
    for seed in range(episodes):
        driver = Driver.start(seed, LIFECYCLES[seed % len(LIFECYCLES)], max_epochs=max_epochs)
        play(RandomPolicy(seed, 0), driver, 0.05, on_observe=lambda obs: pool.append((obs, driver.ledger.state)))
    return pool


def _command(table, a: list[int], blend_steps: int) -> PolicyCommand | None:
    op = OPS[a[0]]
    if op == "wait":
        return None
    slot = table.slot_ids[a[1]]
    if op != "germinate":
        return PolicyCommand(op=op, slot=slot)
    return PolicyCommand(op=op, slot=slot, blueprint=table.blueprint_ids[a[2]],
                         blend=Blend(kind=table.blend_kinds[a[3]], steps=blend_steps))


def _to_decider(command: PolicyCommand, epoch: int):
    return Driver._command(command, epoch)


def test_100k_masked_samples_are_all_valid_and_execute_without_rejection():
    pool = random_states()
    tables = [valid_actions(obs) for obs, _ in pool]
    stacked = MaskSet.stack([MaskSet.from_table(t) for t in tables])
    g = torch.Generator().manual_seed(7)
    n = 100_000
    idx = torch.randint(len(pool), (n,), generator=g)
    masks = MaskSet(*(getattr(stacked, f.name)[idx] for f in attrs.fields(MaskSet)))
    net = PolicyNetwork(8, len(SLOTS), 2, 3, feature_dim=16, lstm_hidden=32, head_hidden=16)
    with torch.no_grad():  # sharp, arbitrary logits: a leak through the masks would show at once
        for head in (net.op_head, net.slot_head, net.blueprint_head, net.blend_head):
            head[2].weight.mul_(500.0)
            head[2].bias.normal_(0.0, 20.0, generator=g)
    z = torch.randn(n, 32, generator=g)
    uniforms = torch.rand(n, 4, generator=g, dtype=torch.float64)
    sample = sample_actions(net, z, masks, uniforms)
    greedy = sample_actions(net, z, masks, greedy=True)

    for s in (sample, greedy):
        a, flags = s.actions, s.applicable
        assert flags[:, 0].all()
        assert torch.equal(flags[:, 1], a[:, 0] != 0) and torch.equal(flags[:, 2], a[:, 0] == 1)
        assert torch.equal(flags[:, 3], flags[:, 2])
        assert (a[~flags] == 0).all() and (s.log_probs[~flags] == 0).all() and (s.entropies[~flags] == 0).all()
        assert torch.isfinite(s.log_probs).all() and (s.log_probs <= 0).all() and (s.entropies >= -1e-6).all()
        # Every sampled action is in the valid-action table (checked once per distinct (state, action)).
        distinct = torch.unique(torch.cat([idx.unsqueeze(1), a], dim=1), dim=0).tolist()
        for state_i, *action in distinct:
            table = tables[state_i]
            command = _command(table, action, 2)
            assert (command is None and "wait" in table.ops) or table.is_valid(command), (state_i, action)
    assert len(torch.unique(sample.actions[:, 0])) == 5  # every op was reached somewhere

    # A sample of them executed by the pure decider from the state they were drawn for: no refusal.
    executed = 0
    for k in torch.randperm(n, generator=g)[:3000].tolist():
        obs, state = pool[int(idx[k])]
        command = _command(tables[int(idx[k])], sample.actions[k].tolist(), obs.lifecycle.blend_steps)
        if command is None:
            continue
        try:
            decide(_to_decider(command, obs.epoch), state)
        except DomainError as error:  # pragma: no cover - the assertion message is the point
            pytest.fail(f"decider refused {command} at epoch {obs.epoch}: {error}")
        executed += 1
    assert executed > 1000


def test_sampling_frequencies_equal_the_masked_softmax():
    pool = random_states(2)
    obs = next(o for o, _ in pool if len(valid_actions(o).ops) >= 3)
    table = valid_actions(obs)
    net = PolicyNetwork(8, 3, 2, 3, feature_dim=16, lstm_hidden=16, head_hidden=8)
    with torch.no_grad():
        net.op_head[2].weight.mul_(100.0)
    n = 200_000
    z = torch.randn(1, 16, generator=torch.Generator().manual_seed(1)).expand(n, 16)
    masks = MaskSet.stack([MaskSet.from_table(table)] * n)
    uniforms = torch.rand(n, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sample = sample_actions(net, z, masks, uniforms)
    p = masked_log_softmax(net.op_logits(z[:1]), masks.op[:1]).exp()[0].detach()
    freq = torch.bincount(sample.actions[:, 0], minlength=5).double() / n
    assert (freq[~masks.op[0]] == 0).all()
    tolerance = 5 * torch.sqrt(p.double() * (1 - p.double()) / n) + 1e-4
    assert ((freq - p.double()).abs() <= tolerance).all(), (freq, p)


def test_an_applicable_head_without_a_valid_entry_is_an_error():
    net = PolicyNetwork(4, 2, 2, 1, feature_dim=8, lstm_hidden=8, head_hidden=8)
    masks = MaskSet(op=torch.tensor([[True, True, False, False, False]]), slot=torch.zeros(1, 5, 2, dtype=torch.bool),
                    blueprint=torch.ones(1, 2, 2, dtype=torch.bool), blend=torch.ones(1, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="slot mask"):
        for _ in range(50):  # germinate is drawn sooner or later; its slot mask is empty
            sample_actions(net, torch.randn(1, 8), masks, torch.rand(1, 4, dtype=torch.float64))


# -- the controller --------------------------------------------------------------------------


def _first_observation(lifecycle=None, slots=SLOTS):
    return Driver.start(0, lifecycle, slots=slots).record_epoch(40.0)


@pytest.mark.parametrize("lifecycle", LIFECYCLES)
def test_ppo_policy_is_never_rejected_and_records_complete_decisions(lifecycle):
    policy = PPOPolicy.for_observation(_first_observation(), SMALL, run_seed=3)
    for seed in range(2):
        driver = Driver.start(seed, lifecycle, max_epochs=25)
        steps = play(policy, driver, 0.05)
        assert driver.rejected == []
        for step in steps:
            d, table = step.decision, valid_actions(step.before)
            assert d.policy == "ppo" and d.policy_id == policy.policy_id and d.epoch == step.before.epoch
            assert all(table.is_valid(c) for c in d.commands) and len(d.commands) <= 1
            assert d.legal == legal_summary(table)
            assert (d.action, d.action_index) == head_values(table, d.commands[0] if d.commands else None)
            assert d.log_prob_total == pytest.approx(sum(d.log_prob.values()))
            assert all(d.log_prob[h] == 0.0 and d.entropy[h] == 0.0 for h in ("blueprint", "blend")
                       if d.action["op"] != "germinate")
            assert math.isfinite(d.value) and d.rationale.startswith("ppo sampled")
            if d.commands and d.commands[0].op == "germinate":
                assert d.commands[0].blend.steps == step.before.lifecycle.blend_steps


def test_sampling_is_per_env_and_independent_of_batching():
    obs = _first_observation()
    a = PPOPolicy.for_observation(obs, SMALL, run_seed=11)
    b = PPOPolicy.for_observation(obs, SMALL, run_seed=11)
    b.net.load_state_dict(a.net.state_dict())
    other = attrs.evolve(obs, env=1)
    for _ in range(20):
        batched = a.decide_batch([obs, other])
        alone = [b.decide(obs), b.decide(other)]
        for x, y in zip(batched, alone):
            assert x.action_index == y.action_index and x.commands == y.commands
            assert x.value == pytest.approx(y.value, abs=1e-6)
            assert all(x.log_prob[h] == pytest.approx(y.log_prob[h], abs=1e-6) for h in x.log_prob)
    assert a.generators[0].initial_seed() == policy_seed(11, 0) >> 1


def test_lstm_state_is_carried_per_env_and_zeroed_at_reset():
    obs = _first_observation()
    policy = PPOPolicy.for_observation(obs, SMALL, greedy=True)
    policy.reset(0, obs.episode, obs.max_epochs)
    first = policy.decide(obs)
    h, c = policy.states[0]
    assert h.abs().sum() > 0 and c.abs().sum() > 0
    assert policy.last_step[0].h0.abs().sum() == 0  # the step started from zero
    second = policy.decide(obs)
    assert second.value != first.value  # same observation, carried state
    assert policy.last_step[0].h0.abs().sum() > 0
    policy.reset(0, obs.episode, obs.max_epochs)
    assert policy.states[0][0].abs().sum() == 0
    assert policy.decide(obs).value == first.value and first.rationale.startswith("ppo greedy")
    # a new episode without reset starts from zero too
    assert policy.decide(attrs.evolve(obs, episode=obs.episode + 1)).value == first.value
    # values() reads V(s) without moving the state
    later = attrs.evolve(obs, episode=obs.episode + 1)
    state = policy.states[0]
    v = policy.values([later])[0]
    assert policy.states[0] is state and math.isfinite(v)
    assert policy.decide(later).value == v


def test_observation_contract_is_checked_per_decision():
    policy = PPOPolicy.for_observation(_first_observation(), SMALL)
    with pytest.raises(ValueError, match="slot_ids"):
        policy.decide(_first_observation(slots=("mid",)))


def test_policy_id_is_a_weights_digest():
    policy = PPOPolicy.for_observation(_first_observation(), SMALL)
    first = policy.policy_id
    assert first.startswith("ppo-") and len(first) == 20 and policy.policy_id == first
    optimizer = make_optimizer(policy.net, SMALL)
    z, _ = policy.net.step(torch.randn(2, policy.contract.dim), policy.net.initial_state(2))
    policy.net.value(z).sum().backward()
    optimizer.step()
    assert policy.policy_id != first


def test_checkpoint_round_trip_and_contract_mismatch(tmp_path):
    obs = _first_observation()
    policy = PPOPolicy.for_observation(obs, SMALL, run_seed=5)
    policy.normaliser.merge(torch.randn(10, policy.contract.dim))
    driver = Driver.start(1, max_epochs=12)
    play(policy, driver)  # advance the generator and leave LSTM state behind
    path = tmp_path / "policy.pt"
    policy.save(path, extra={"update": 3, "round": 2})
    data = read_checkpoint(path)  # weights_only=True
    assert data["extra"] == {"update": 3, "round": 2}
    loaded = PPOPolicy.load(path, ObservationContract.for_observation(obs, SMALL.blend_kinds))
    assert loaded.policy_id == policy.policy_id and loaded.config == policy.config
    assert loaded.normaliser.count == 10 and loaded.extra["round"] == 2
    assert torch.equal(loaded.states[0][0], policy.states[0][0])
    # the same continuation: same generator state, same weights, same LSTM state
    d1 = [s.decision for s in play(policy, Driver.start(2, max_epochs=12))]
    d2 = [s.decision for s in play(loaded, Driver.start(2, max_epochs=12))]
    assert d1 == d2
    wrong = ObservationContract.of(SLOTS, ("conv_light",), BLEND_KINDS)
    with pytest.raises(ValueError) as info:
        PPOPolicy.load(path, wrong)
    assert "\n" not in str(info.value) and "blueprints" in str(info.value)
    with pytest.raises(ValueError, match="dim|slot_ids"):
        PPOPolicy.load(path, ObservationContract.of(("mid",), ("conv_light", "norm"), BLEND_KINDS))
    assert feature_dim(3, 2) == loaded.contract.dim
