"""Rewards (policy §6): every component against a hand-worked example, the ransomware case, mode
sets, components summing to total_raw, and the PBRS telescoping property on real episodes."""

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_actions import Driver, play
from test_heuristic import craft, flat_history, slot

from esper.compute.observation import EpochSignals, Executed
from esper.events.catalogue import Blend, PolicyCommand, PolicyDecided
from esper.events.enums import Stage
from esper.lifecycle.config import LifecycleConfig
from esper.lifecycle.state import Counterfactual
from esper.policy.baselines import RandomPolicy
from esper.policy.heuristic import HeuristicPolicy
from esper.policy.rewards import (
    COMPONENTS,
    MODES,
    RewardConfig,
    attribution,
    compute_reward,
    make_reward_function,
    ratio_penalty,
)

SHAPED = RewardConfig(mode="shaped")


def decision(epoch: int, *commands: PolicyCommand) -> PolicyDecided:
    return PolicyDecided(epoch=epoch, policy="test", policy_id="t", commands=commands, action={}, action_index={},
                         legal={}, rationale="")


def cf(value: float, epoch: int, alpha: float = 1.0) -> Counterfactual:
    return Counterfactual(value, epoch, alpha)


def reward(before, after, *commands, executed=(), terminated=False, governor=False, config=SHAPED, gamma=0.995):
    return compute_reward(before, decision(before.epoch, *commands), tuple(executed), after, terminated=terminated,
                          governor=governor, config=config, gamma=gamma)


def check_sum(r) -> None:
    assert set(r.components) == set(MODES[r.mode])
    assert r.total_raw == pytest.approx(sum(r.components.values()))


# -- bounded attribution and ratio penalty --------------------------------------------------------


@pytest.mark.parametrize("c, p, b, q", [
    (-2.0, 1.0, -2.0, 0.0),  # harm is paid in full
    (-2.0, -1.0, -2.0, 0.0),
    (3.0, -1.0, 0.0, -0.09),  # nothing while P <= 0; q = -0.3 * min(1, 3/10)
    (0.5, 0.0, 0.0, 0.0),  # c <= 1: no ratio penalty
    (2.0, 3.0, 2.0, 0.0),  # 0 <= c <= P: c
    (8.0, 2.0, 4.0, 0.0),  # c > P > 0: sqrt(c P); c/P = 4 <= 5
    (9.0, 1.0, 3.0, -0.08),  # c/P = 9 > 5: -min(0.3, 0.02 * 4)
    (50.0, 1.0, math.sqrt(50.0), -0.3),  # capped at 0.3
    (3.0, 0.05, math.sqrt(0.15), -0.09),  # P <= 0.1: the small-progress branch
])
def test_attribution_and_ratio_penalty(c, p, b, q):
    assert attribution(c, p) == pytest.approx(b)
    assert ratio_penalty(c, p) == pytest.approx(q)


def test_ransomware_seed_is_paid_nothing_and_penalised():
    # A probationary seed the host depends on (c = 12 pp) while the score fell since germination.
    ransom = dict(step=5, alpha=1.0, current_acc=49.5, seed_params=50)
    before = craft(10, {"mid": slot(Stage.PROBATIONARY, 8, last_counterfactual=cf(12.0, 10), **ransom)})
    after = craft(11, {"mid": slot(Stage.PROBATIONARY, 8, last_counterfactual=cf(12.0, 11), **ransom)})
    fossilize = PolicyCommand(op="fossilize", slot="mid")
    r = reward(before, after, fossilize, executed=[Executed("fossilize", "mid", None, False, True)])
    assert r.components["contribution"] == 0.0
    assert r.components["attribution_ratio_penalty"] == pytest.approx(-0.3)
    # P = -0.5 < 0: -0.5 - min(0.2 * 0.5, 1) and a further -0.3 since c > 0.1 and P < -0.2
    assert r.components["fossilize_assessment"] == pytest.approx(-0.9)
    (row,) = r.seeds
    assert (row.contribution, row.progress, row.attribution) == (12.0, -0.5, 0.0)
    assert row.ratio_penalty == pytest.approx(-0.3)
    check_sum(r)


# -- a whole shaped step by hand --------------------------------------------------------------------


def _worked():
    before = craft(10, {
        "early": slot(Stage.TRAINING, 8, sid="early", seed_params=100),
        "mid": slot(Stage.PROBATIONARY, 7, step=5, alpha=1.0, seed_params=50, current_acc=51.0,
                    last_counterfactual=cf(2.0, 10)),
        "late": slot(Stage.BLENDING, 9, sid="late", step=1, alpha=0.2, seed_params=30,
                     last_counterfactual=cf(-1.0, 10, 0.2)),
    })
    after = craft(11, {
        "early": slot(Stage.BLENDING, 10, sid="early", step=1, alpha=0.2, seed_params=100, current_acc=51.0,
                      last_counterfactual=cf(0.5, 11, 0.2)),
        "mid": slot(Stage.PROBATIONARY, 7, step=5, alpha=1.0, seed_params=50, current_acc=50.5,
                    last_counterfactual=cf(3.0, 11)),
        "late": slot(Stage.CULLED, 10, sid="late", seed_params=30),
    })
    cull = PolicyCommand(op="cull", slot="late", reason="blending_harm")
    return before, after, cull


def test_worked_shaped_step():
    before, after, cull = _worked()
    r = reward(before, after, cull, executed=[Executed("cull", "late", None, False, None)])
    expected = {
        "contribution": 0.5 + math.sqrt(3.0 * 0.5),  # early: c <= P; mid: c > P > 0
        "attribution_ratio_penalty": -min(0.3, 0.02 * (3.0 / 0.5 - 5)),  # mid: c/P = 6
        "pbrs": 0.3 * (0.995 * (3.5 + 5.5 + 0.0) - (2.0 + 5.5 + 3.5)),
        "rent": -0.5 * math.log(1 + 150 / 320),  # the culled seed no longer counts
        "intervention": -0.005,
        "cull_assessment": 0.3,  # late's c = -1.0 < -0.5 at s_t
        "fossilize_assessment": 0.0,
        "advance_assessment": 0.0,
        "holding_warning": -0.15,  # mid: e_prob 3, c 2.0 >= 1.0, neither fossilized nor culled
        "terminal": 0.0,
        "governor": 0.0,
    }
    assert r.components == pytest.approx(expected)
    check_sum(r)
    assert (r.epoch, r.decision_epoch, r.mode) == (11, 10, "shaped")
    assert (r.potential_before, r.potential_after) == (11.0, 9.0)
    assert (r.seed_params_total, r.host_params) == (150, 320)
    assert (r.score_before, r.score_after, r.terminated, r.truncated, r.governor) == (50.0, 50.0, False, False, False)
    assert [(s.seed_id, s.stage) for s in r.seeds] == [("early#1", Stage.BLENDING), ("mid#1", Stage.PROBATIONARY)]
    assert [(s.contribution, s.progress, s.attribution, s.ratio_penalty) for s in r.seeds[:1]] == [
        (0.5, 1.0, 0.5, 0.0)]
    assert r.seeds[1].attribution == pytest.approx(math.sqrt(1.5))
    assert r.seeds[1].ratio_penalty == pytest.approx(-0.02)


def test_mode_selects_components():
    before, after, cull = _worked()
    executed = [Executed("cull", "late", None, False, None)]
    shaped = reward(before, after, cull, executed=executed)
    for mode in MODES:
        r = reward(before, after, cull, executed=executed, config=RewardConfig(mode=mode))
        check_sum(r)
        assert tuple(r.components) == MODES[mode]
        for name in r.components:  # a component's value does not depend on the mode
            if name in shaped.components:
                assert r.components[name] == pytest.approx(shaped.components[name])
    assert set(MODES["simplified"]) == {"contribution", "attribution_ratio_penalty", "rent", "intervention",
                                         "budget_pressure", "terminal", "governor"}
    assert set(MODES["shaped"]) == set(COMPONENTS) - {"budget_pressure", "terminal_sparse"}
    assert set(MODES["sparse"]) == {"terminal_sparse", "governor"}
    assert RewardConfig().mode == "simplified"
    with pytest.raises(ValueError):
        RewardConfig(mode="dense")


# -- the assessments, one by one --------------------------------------------------------------------


@pytest.mark.parametrize("c, value", [(-1.0, 0.3), (-0.5, 0.1), (-0.1, 0.1), (0.0, -0.3), (4.0, -0.5),
                                      (30.0, -0.8), (None, 0.0)])
def test_cull_assessment(c, value):
    measured = None if c is None else cf(c, 10, 0.4)
    before = craft(10, {"mid": slot(Stage.BLENDING, 8, step=2, alpha=0.4, last_counterfactual=measured)})
    after = craft(11, {"mid": slot(Stage.CULLED, 10)})
    r = reward(before, after, PolicyCommand(op="cull", slot="mid"),
               executed=[Executed("cull", "mid", None, False, None)])
    assert r.components["cull_assessment"] == pytest.approx(value)
    assert r.components["intervention"] == pytest.approx(-0.005)


def test_fossilize_assessment():
    def case(progress, c, passed, in_stage=2):
        seed = dict(step=5, alpha=1.0, current_acc=50.0 + progress, last_counterfactual=cf(c, 10))
        before = craft(10, {"mid": slot(Stage.PROBATIONARY, 10 - in_stage, **seed)})
        after = craft(11, {"mid": slot(Stage.FOSSILIZED if passed else Stage.PROBATIONARY, 10, **seed)})
        r = reward(before, after, PolicyCommand(op="fossilize", slot="mid"),
                   executed=[Executed("fossilize", "mid", None, False, passed)])
        return r.components["fossilize_assessment"], r.components["intervention"]

    assert case(-0.1, 0.05, True) == pytest.approx((-0.52, -0.01))  # P < 0, c small: no extra
    assert case(-8.0, 2.0, False) == pytest.approx((-0.5 - 1.0 - 0.3, -0.01))  # |P| capped at 1.0
    assert case(0.5, 0.8, False) == pytest.approx((-0.2, -0.01))  # gate refused
    assert case(0.5, 4.0, True) == pytest.approx(((0.5 + 0.4) * 2 / 3, -0.01))
    assert case(0.5, 40.0, True, in_stage=5) == pytest.approx((1.5, -0.01))


def test_advance_assessment_and_rejected_commands_cost_nothing():
    s = {"mid": slot(Stage.BLENDING, 5, step=5, alpha=1.0)}
    advance = PolicyCommand(op="advance", slot="mid")
    refused = reward(craft(10, s), craft(11, s), advance, executed=[Executed("advance", "mid", None, False, False)])
    assert refused.components["advance_assessment"] == -0.05 and refused.components["intervention"] == -0.005
    passed = reward(craft(10, s), craft(11, s), advance, executed=[Executed("advance", "mid", None, False, True)])
    assert passed.components["advance_assessment"] == 0.0
    rejected = reward(craft(10, s), craft(11, s), advance, executed=[Executed("advance", "mid", None, True, None)])
    assert rejected.components["advance_assessment"] == rejected.components["intervention"] == 0.0


def test_holding_warning_grows_and_is_capped():
    def warning(e_prob, c=2.0, command=None):
        s = {"mid": slot(Stage.PROBATIONARY, 10 - e_prob, step=5, alpha=1.0, last_counterfactual=cf(c, 10))}
        return reward(craft(10, s), craft(11, s), *([command] if command else [])).components["holding_warning"]

    assert warning(1) == 0.0
    assert warning(2) == pytest.approx(-0.1)
    assert warning(4) == pytest.approx(-0.2)
    assert warning(9) == pytest.approx(-0.3)
    assert warning(4, c=0.9) == 0.0  # below θ_G5
    assert warning(4, command=PolicyCommand(op="cull", slot="mid")) == 0.0


def test_budget_pressure_and_germination_cost():
    lc = LifecycleConfig(max_seeds=2)
    before = craft(10, {"early": slot(Stage.FOSSILIZED, 5, sid="early")}, lifecycle=lc)
    after = craft(11, {"early": slot(Stage.FOSSILIZED, 5, sid="early"), "mid": slot(Stage.TRAINING, 10)},
                  lifecycle=lc)
    g = PolicyCommand(op="germinate", slot="mid", blueprint="norm", blend=Blend(kind="linear", steps=5))
    r = reward(before, after, g, executed=[Executed("germinate", "mid", "norm", False, True)],
               config=RewardConfig())
    assert r.components["budget_pressure"] == pytest.approx(-0.5 * 1.0**2)  # 2 of 2 used after it
    assert r.components["intervention"] == pytest.approx(-0.02)
    unlimited = reward(craft(10), after, g, executed=[Executed("germinate", "mid", "norm", False, True)],
                       config=RewardConfig())
    assert unlimited.components["budget_pressure"] == 0.0


def test_rent_is_capped():
    big = {"mid": slot(Stage.FOSSILIZED, 5, seed_params=320 * 100)}
    r = reward(craft(10), craft(11, big), config=RewardConfig())
    assert r.components["rent"] == -2.0
    small = {"mid": slot(Stage.GERMINATED, 10, seed_params=32)}
    assert reward(craft(10), craft(11, small)).components["rent"] == pytest.approx(-0.5 * math.log(1.1))


def test_terminal_rewards():
    fossils = {
        "early": slot(Stage.FOSSILIZED, 20, sid="early", acc_at_stage_start=51.5, current_acc=60.0, seed_params=32),
        "mid": slot(Stage.FOSSILIZED, 22, acc_at_stage_start=50.5, current_acc=60.0),  # P at fossilization 0.5
        "late": slot(Stage.PROBATIONARY, 28, sid="late", step=5, alpha=1.0),
    }
    history = flat_history(29) + (EpochSignals(1.0, 60.0, 1.0, 60.0),)
    before, after = craft(29, fossils), craft(30, fossils, history=history)
    r = reward(before, after, terminated=True)
    assert r.components["terminal"] == pytest.approx(0.05 * 60.0 + 3.0 * 1)
    assert r.potential_after == 0.0  # Φ(s_E) := 0
    assert r.components["pbrs"] == pytest.approx(-0.3 * (6.0 + 6.0 + 5.5))
    assert r.terminated and r.score_after == 60.0
    sparse = reward(before, after, terminated=True, config=RewardConfig(mode="sparse"))
    assert sparse.components["terminal_sparse"] == pytest.approx(0.6 - 0.1 * math.log(1 + 52 / 320))  # A: 32 + 10 + 10
    assert reward(before, after, config=RewardConfig(mode="sparse")).components["terminal_sparse"] == 0.0
    not_done = reward(before, after)
    assert not_done.components["terminal"] == 0.0 and not_done.potential_after == 17.5  # truncation: real Φ


def test_governor_penalty_in_every_mode():
    for mode in MODES:
        r = reward(craft(10), craft(11), governor=True, config=RewardConfig(mode=mode))
        assert r.components["governor"] == -5.0 and r.governor
        check_sum(r)


def test_reward_function_binds_config_and_gamma():
    fn = make_reward_function(SHAPED, gamma=0.5)
    s = {"mid": slot(Stage.TRAINING, 9)}
    r = fn(craft(10, s), decision(10), (), craft(11, s), terminated=False, governor=False)
    assert r.components["pbrs"] == pytest.approx(0.3 * (0.5 * 2.0 - 2.0))
    with pytest.raises(ValueError):
        make_reward_function(SHAPED, gamma=1.5)


# -- PBRS telescopes over whole episodes --------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), gamma=st.floats(0.8, 1.0), heuristic=st.booleans(),
       rollback_rate=st.sampled_from([0.0, 0.15]), max_seeds=st.integers(0, 3))
def test_pbrs_episode_sum_is_zero(seed, gamma, heuristic, rollback_rate, max_seeds):
    policy = HeuristicPolicy() if heuristic else RandomPolicy(seed, 0)
    driver = Driver.start(seed, {"max_seeds": max_seeds}, max_epochs=25)
    steps = play(policy, driver, rollback_rate)
    rewards = [compute_reward(s.before, s.decision, s.executed, s.after, terminated=s.terminated,
                              governor=s.governor, config=SHAPED, gamma=gamma) for s in steps]
    assert rewards[0].potential_before == 0.0  # no seeds at the first decision
    assert rewards[-1].terminated and not any(r.terminated for r in rewards[:-1])
    for r, nxt in zip(rewards, rewards[1:]):
        assert r.potential_after == nxt.potential_before  # real states chain up
    for r in rewards:
        check_sum(r)
    total = sum(gamma**k * r.components["pbrs"] for k, r in enumerate(rewards))
    assert abs(total) < 1e-9
