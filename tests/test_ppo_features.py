"""PPO's observation vector (policy §5.2), its normaliser (§5.3) and the observation contract (§8).

Observations are made by the real decider (the Ledger-backed Driver of test_actions) so every
feature is read from a state the lifecycle actually produced.
"""

import math

import attrs
import pytest
import torch
from support import SLOTS
from test_actions import BLUEPRINTS, HOST_PARAMS, Driver, _germinate

from esper.compute.observation import EpochSignals
from esper.events import catalogue as ev
from esper.events.catalogue import PolicyCommand
from esper.policy.baselines import NonePolicy
from esper.policy.features import (
    BASE_DIM, SLOT_BASE_DIM, ObservationContract, feature_dim, observe, raw_columns,
)
from esper.policy.normaliser import RewardScaler, RunningNormaliser, Welford

L_RAND = math.log(4)


def loss(acc: float) -> float:  # the Driver's loss for a score
    return L_RAND * (1 - acc / 100)


def _wait(driver: Driver) -> None:
    driver.act(NonePolicy().decide(driver.observe()))


def _command(driver: Driver, op: str, slot: str) -> None:
    driver.act(ev.PolicyDecided(epoch=driver.env.epoch, policy="test", policy_id="t",
                                commands=(PolicyCommand(op=op, slot=slot, reason="x"),), action={},
                                action_index={}, legal={}, rationale=""))


def slot_block(vector: list[float], slot_index: int, n_blueprints: int = len(BLUEPRINTS)) -> list[float]:
    start = BASE_DIM + slot_index * (SLOT_BASE_DIM + n_blueprints)
    return vector[start:start + SLOT_BASE_DIM + n_blueprints]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny networks: one thread is fastest, and two xdist workers must not fight over cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- dimension and layout --------------------------------------------------------------------


def test_dimension_matches_the_spec():
    assert feature_dim(3, 5) == 103 and feature_dim(3, 4) == 100
    assert feature_dim(3, len(BLUEPRINTS)) == 22 + 3 * 24
    raw = raw_columns(3, 5)
    assert len(raw) == 103
    assert [i for i in range(BASE_DIM) if raw[i]] == [9]
    block = raw[BASE_DIM:BASE_DIM + 27]
    assert [i for i, r in enumerate(block) if r] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 13, 17, 21, 22, 23, 24, 25, 26]


@pytest.mark.parametrize("slots", [SLOTS, ("mid",), ("early", "late")])
def test_vector_length_follows_enabled_slots_and_blueprints(slots):
    driver = Driver.start(slots=slots)
    obs = driver.record_epoch(40.0)
    vector, raw = observe(obs)
    assert len(vector) == len(raw) == feature_dim(len(slots), len(BLUEPRINTS))
    narrowed, _ = observe(attrs.evolve(obs, blueprints=("norm",)))
    assert len(narrowed) == feature_dim(len(slots), 1)
    # an empty slot is the DORMANT one-hot and zeros
    assert slot_block(vector, 0) == [1.0] + [0.0] * (SLOT_BASE_DIM - 1 + len(BLUEPRINTS))


# -- scaling on crafted observations ---------------------------------------------------------


def test_host_features_are_scaled_as_specified():
    driver = Driver.start(lifecycle={"max_seeds": 2}, max_epochs=20)
    for acc in (40.0, 45.0):
        driver.record_epoch(acc)
        _wait(driver)
    obs = driver.record_epoch(45.2)
    v, _ = observe(obs)
    assert v[0] == pytest.approx(3 / 20)
    assert v[1] == v[2] == pytest.approx(1 - 0.452)  # train = val in the Driver; /L_rand
    assert v[3] == pytest.approx((loss(45.0) - loss(45.2)) / L_RAND)
    assert v[4] == v[5] == pytest.approx(0.452)
    assert v[6] == pytest.approx(0.02)  # clip(0.2/10)
    assert v[7] == pytest.approx(0.452)
    assert v[8] == pytest.approx(0.1)  # plateau: 1 (t=1), 0 (+5 pp), 1 (+0.2 pp)
    assert v[9] == 0.0  # latch: only one stable epoch so far
    assert v[10:15] == pytest.approx([0.40, 0.40, 0.40, 0.45, 0.452])  # left-padded with the earliest
    assert v[15:20] == pytest.approx([loss(a) / L_RAND for a in (40, 40, 40, 45, 45.2)])
    assert v[20] == 0.0 and v[21] == 0.0


def test_window_keeps_the_last_five_and_clips_deltas():
    driver = Driver.start(max_epochs=40)
    for acc in (10, 20, 30, 40, 50, 60):
        driver.record_epoch(float(acc))
        _wait(driver)
    obs = driver.record_epoch(90.0)  # +30 pp: clipped to 1
    v, _ = observe(obs)
    assert v[10:15] == pytest.approx([0.3, 0.4, 0.5, 0.6, 0.9])
    assert v[6] == 1.0 and v[8] == 0.0


def test_latch_and_plateau_are_shared_with_the_tracker():
    driver = Driver.start(max_epochs=40)
    for _ in range(5):
        driver.record_epoch(50.0)
        _wait(driver)
    v, _ = observe(driver.record_epoch(50.0))
    assert v[9] == 1.0 and v[8] == pytest.approx(0.6)
    # the tracker's plateau threshold is a parameter (the heuristic's, shared)
    v, _ = observe(driver.observe(), plateau_threshold=0.0)
    assert v[8] == 0.0


def test_seed_features_through_a_lifecycle():
    driver = Driver.start(lifecycle={"max_seeds": 2, "blend_steps": 2}, max_epochs=20)
    _germinate(driver, "mid", "norm")  # epoch 1 at 50.0; the tick moves it to TRAINING
    obs = driver.record_epoch(51.0, shadow={"mid": 2.0})  # t = 2
    v, _ = observe(obs)
    size = math.log1p(17 / HOST_PARAMS)  # norm at width 8: 2·8 + 1 parameters
    assert v[20] == pytest.approx(size) and v[21] == pytest.approx(0.5)
    mid = slot_block(v, 1)
    assert mid[:9] == [0, 0, 1, 0, 0, 0, 0, 0, 0]  # TRAINING
    assert mid[9] == pytest.approx(1 / 20)  # one epoch in stage
    assert mid[10] == pytest.approx(1 / 20)  # age
    assert mid[11:15] == [0.0, 0.0, 0.0, 0.0]  # alpha, ramp, c not measured (a shadow is not an ablation)
    assert mid[15] == pytest.approx(0.1) and mid[16] == pytest.approx(0.1)  # +1 pp since stage start, germination
    assert mid[17] == 1.0 and mid[18] == pytest.approx(1.0)  # ρ = 0.2 fresh: min(0.2/0.05, 4)/4
    assert mid[19] == pytest.approx(size)
    assert mid[20] == 0.0
    assert mid[21] == 0.0  # G2 needs 3 epochs in TRAINING
    assert mid[22:] == [0.0, 1.0]  # blueprint one-hot: conv_light, norm
    assert slot_block(v, 0)[:9] == [1, 0, 0, 0, 0, 0, 0, 0, 0]

    _wait(driver)
    driver.record_epoch(51.0, shadow={"mid": 2.0})
    _wait(driver)
    obs = driver.record_epoch(52.0, shadow={"mid": 2.0})  # t = 4: in stage 3, fresh shadow and ratio
    assert slot_block(observe(obs)[0], 1)[21] == 1.0  # the G2 dry run passes: next gate ready
    _wait(driver)  # the tick passes G2: BLENDING, ramp step 1 of 2
    obs = driver.record_epoch(52.0, contribution={"mid": 3.0})  # t = 5
    mid = slot_block(observe(obs)[0], 1)
    assert mid[:9] == [0, 0, 0, 1, 0, 0, 0, 0, 0]
    assert mid[11] == pytest.approx(0.5) and mid[12] == pytest.approx(0.5)  # alpha, ramp progress
    assert mid[13] == 1.0 and mid[14] == pytest.approx(0.3)  # c measured: 3 pp
    assert mid[15] == pytest.approx(0.0)  # acc at stage start was 52
    assert mid[16] == pytest.approx(0.2)  # P = 52 − 50
    assert mid[21] == 0.0  # ramp incomplete: G3 not considered

    _command(driver, "cull", "mid")  # cull at 5; the same step's tick embargoes it
    obs = driver.record_epoch(52.0)  # t = 6
    mid = slot_block(observe(obs)[0], 1)
    assert mid[:9] == [0, 0, 0, 0, 0, 0, 0, 1, 0]  # EMBARGOED
    assert mid[10:20] == [0.0] * 10  # measurements belong to live seeds only
    assert mid[20] == pytest.approx(6 / 7)  # germinable again at decision 12 (lifecycle §4.7: e + 7)
    assert mid[22:] == [0.0, 1.0]  # the culled blueprint stays visible
    remaining = []
    for _ in range(6):
        _wait(driver)
        obs = driver.record_epoch(52.0)
        remaining.append(slot_block(observe(obs)[0], 1)[20])
    assert remaining == pytest.approx([5 / 7, 4 / 7, 3 / 7, 2 / 7, 1 / 7, 0.0])
    assert obs.epoch == 12 and obs.state.slot("mid").stage.name == "DORMANT"


def test_non_finite_features_never_reach_the_policy():
    driver = Driver.start()
    obs = driver.record_epoch(40.0)
    bad = attrs.evolve(obs, history=obs.history[:-1] + (EpochSignals(1.0, 40.0, math.nan, 40.0),))
    with pytest.raises(AssertionError, match="non-finite"):
        observe(bad)
    # a rolled-back epoch's training numbers may be NaN: the last finite ones stand in
    history = (EpochSignals(1.2, 30.0, 1.0, 40.0), EpochSignals(math.nan, math.nan, 1.0, 41.0))
    rolled = attrs.evolve(obs, history=history, epoch=2)
    v, _ = observe(rolled)
    assert v[1] == pytest.approx(1.2 / L_RAND) and v[4] == pytest.approx(0.30)


# -- normaliser ------------------------------------------------------------------------------


def test_welford_merges_equal_batch_statistics():
    g = torch.Generator().manual_seed(0)
    data = torch.randn(1000, 6, generator=g, dtype=torch.float64) * torch.tensor([1, 10, 0.1, 5, 1, 1e3]) + 7
    w = Welford((6,))
    for chunk in data.split([1, 3, 100, 250, 646]):
        w.merge(chunk)
    assert w.count == 1000
    assert torch.allclose(w.mean, data.mean(0), rtol=1e-12, atol=1e-12)
    assert torch.allclose(w.var, data.var(0, correction=0), rtol=1e-10)


def test_normaliser_scales_clips_and_passes_raw_columns():
    norm = RunningNormaliser([False, False, True], clip=10.0)
    x = torch.tensor([[3.0, -2.0, 1.0]])
    # initial μ = 0, σ² = 1: identity up to the 1e-8
    assert torch.allclose(norm.normalise(x), x.float(), atol=1e-6)
    norm.merge(torch.tensor([[0.0, 0.0, 5.0], [2.0, 0.0, 7.0]]))  # col 0: μ 1, σ 1; col 1: σ 0
    out = norm.normalise(torch.tensor([[3.0, 1.0, 42.0], [-100.0, -1.0, 0.5]]))
    assert out.dtype == torch.float32
    assert out[0].tolist() == pytest.approx([2.0, 10.0, 42.0], rel=1e-6)  # σ = 0 → huge → clipped at 10
    assert out[1].tolist() == pytest.approx([-10.0, -10.0, 0.5])
    # frozen: normalising never changes the statistics
    before = norm.state_dict()
    norm.normalise(torch.randn(50, 3))
    assert norm.count == 2 and torch.equal(norm.state_dict()["mean"], before["mean"])


def test_normaliser_state_round_trips_and_checks_layout():
    a = RunningNormaliser(raw_columns(1, 2))
    a.merge(torch.randn(20, a.dim))
    b = RunningNormaliser(raw_columns(1, 2))
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, a.dim)
    assert torch.equal(a.normalise(x), b.normalise(x))
    with pytest.raises(ValueError, match="column layout"):
        RunningNormaliser([not r for r in raw_columns(1, 2)]).load_state_dict(a.state_dict())


def test_reward_scaler_divides_by_the_running_std_and_clips():
    s = RewardScaler(clip=10.0)
    s.merge([1.0, 3.0])  # σ = 1 (population), no centring
    assert s.std == pytest.approx(1.0)
    assert s.scale([2.0, -50.0]).tolist() == pytest.approx([2.0, -10.0])


# -- contract --------------------------------------------------------------------------------


def test_contract_names_the_first_difference():
    driver = Driver.start()
    obs = driver.record_epoch(40.0)
    c = ObservationContract.for_observation(obs, ("linear", "sigmoid", "gated"))
    assert c.slot_ids == SLOTS and c.blueprints == BLUEPRINTS and c.dim == feature_dim(3, 2)
    assert ObservationContract.from_dict(c.to_dict()) == c
    other = ObservationContract.of(SLOTS, ("norm",), c.blend_kinds)
    with pytest.raises(ValueError) as info:
        c.check(other)
    message = str(info.value)
    assert "\n" not in message and "blueprints" in message and "conv_light, norm" in message
