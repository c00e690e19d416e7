"""The torch backend: isolation over a whole epoch, counterfactual passes, optimizer groups, snapshots."""

import math

import pytest
import torch

from esper.compute.backend import EpochPlan
from esper.compute.governor import Governor
from esper.compute.settings import GovernorSettings, TrainSettings
from esper.compute.torch_backend import TorchBackend
from esper.lifecycle.config import LifecycleConfig
from esper.tasks import load_task

SLOTS = ("early", "mid", "late")


@pytest.fixture(scope="module")
def digits():
    return load_task("digits")


def backend(data, **train) -> TorchBackend:
    b = TorchBackend(data, TrainSettings(**train), LifecycleConfig(), SLOTS, torch.device("cpu"))
    b.build(episode_seed=7, max_epochs=5)
    return b


def host_state(b: TorchBackend) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in b.model.host.state_dict().items()}


def test_an_incubating_seed_leaves_the_host_exactly_as_without_it(digits):
    plain, grown = backend(digits), backend(digits)
    grown.germinate("mid", "conv_light", "linear", init_seed=3)
    grown.set_slot("mid", "incubate", 0.0, True, False)
    seed_before = [p.clone() for p in grown.model.slots["mid"].seed_parameters()]
    a = plain.run_epoch(EpochPlan(1))[0]
    b = grown.run_epoch(EpochPlan(1, ("mid",), ("mid",), ("mid",)))[0]
    assert a.loss == b.loss
    for (name, x), y in zip(host_state(plain).items(), host_state(grown).values()):
        assert torch.equal(x, y), name  # weights and BatchNorm running statistics
    moved = [not torch.equal(p, q) for p, q in zip(seed_before, grown.model.slots["mid"].seed_parameters())]
    assert any(moved)
    stats = b.seeds["mid"]
    assert stats.isolation_leaks == 0 and stats.grad_ratio is not None and stats.grad_ratio > 0 and stats.finite


@pytest.mark.parametrize("amp", ["off", "fp16"])
def test_an_epoch_reads_one_value_back_from_the_device(digits, monkeypatch, amp):
    """On a GPU every read of a tensor's value waits for the device to finish, so a pass performs
    one (runtime §3.2): a batch that must not step is skipped on the device. Counted here on CPU
    with every measurement on: an incubating seed, a gated blend, gradient statistics, leak checks,
    clipping, ablation, shadow and all-off validation; under fp16 the scaler's scale is read after."""
    b = backend(digits, grad_clip=1.0, amp=amp)
    b.germinate("mid", "conv_light", "linear", init_seed=3)
    b.set_slot("mid", "incubate", 0.0, True, False)
    b.germinate("late", "conv_light", "gated", init_seed=4)
    b.set_slot("late", "blend", 0.3, True, False)
    reads: list[str] = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    plan = EpochPlan(1, ("mid", "late"), ("mid",), ("mid", "late"), ablate=("late",), shadow=("mid",), all_off=True)
    train, val = b.run_epoch(plan)
    monkeypatch.undo()
    assert reads[0] == "tolist" and len(reads) == (1 if amp == "off" else 2), reads
    assert train.seeds["mid"].grad_ratio > 0 and train.seeds["late"].isolation_leaks == 0
    assert val.shadows["mid"].examples == val.ablations["late"].examples == val.main.examples
    assert (train.amp_scale is None) == (amp == "off")
    assert train.peak_memory_bytes is None  # measured on CUDA only (events §4.3: null on CPU)


def test_fused_and_sequential_counterfactuals_agree(digits):
    results = []
    for fused in (True, False):
        b = backend(digits, fused_counterfactuals=fused)
        b.run_epoch(EpochPlan(1))
        for slot, blueprint in (("early", "conv_light"), ("mid", "norm"), ("late", "attention")):
            b.germinate(slot, blueprint, "linear", init_seed=len(slot))
        for p in b.model.slots["early"].seed_parameters():
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(1))
        b.set_slot("early", "blend", 0.4, True, False)
        b.set_slot("mid", "incubate", 0.0, True, False)
        b.set_slot("late", "fused", 1.0, False, True)
        results.append(b.validate(("early", "late"), ("mid",), True))
    fused, sequential = results
    assert fused.forward_passes < sequential.forward_passes
    for a, b in [(fused.main, sequential.main), (fused.all_off, sequential.all_off),
                 *zip(fused.ablations.values(), sequential.ablations.values()),
                 *zip(fused.shadows.values(), sequential.shadows.values())]:
        assert math.isclose(a.loss, b.loss, rel_tol=1e-5) and math.isclose(a.score, b.score, rel_tol=1e-5)


def test_ablating_a_blended_seed_is_the_host_alone(digits):
    b = backend(digits)
    before = b.validate((), (), False).main
    b.germinate("mid", "conv_light", "linear", init_seed=1)
    for p in b.model.slots["mid"].seed_parameters():
        torch.nn.init.normal_(p, std=0.3, generator=torch.Generator().manual_seed(2))
    b.set_slot("mid", "blend", 0.6, True, False)
    after = b.validate(("mid",), (), False)
    assert after.main.loss != before.loss
    assert after.ablations["mid"].loss == pytest.approx(before.loss, rel=1e-6)


def test_one_optimizer_whose_groups_follow_the_seeds(digits):
    b = backend(digits)
    groups = lambda: [g["slot"] for g in b.optimizer.param_groups]  # noqa: E731
    assert groups() == ["host"]
    b.germinate("mid", "conv_light", "gated", init_seed=1)
    b.germinate("late", "noop", "linear", init_seed=2)  # no parameters, no group
    assert groups() == ["host", "mid"]
    b.set_slot("mid", "blend", 1.0, True, False)  # probation discards the gate: the group is rebuilt
    assert groups() == ["host", "mid"] and b.model.slots["mid"].gate is None
    b.set_slot("mid", "fused", 1.0, False, True)
    mid = b.optimizer.param_groups[1]
    assert mid["weight_decay"] == digits.spec.host_optimizer.weight_decay
    b.run_epoch(EpochPlan(1))
    assert b.optimizer.state
    b.drop("late")
    b.germinate("early", "norm", "linear", init_seed=3)
    b.drop("early")
    assert groups() == ["host", "mid"]
    b.reset_optimizer_state()
    assert not b.optimizer.state


def test_rollback_restores_the_snapshot_exactly(digits):
    b = backend(digits)
    b.run_epoch(EpochPlan(1))
    b.germinate("mid", "conv_light", "linear", init_seed=1)
    b.set_slot("mid", "fused", 1.0, False, True)
    snapshot = b.snapshot(1)
    b.germinate("late", "conv_light", "linear", init_seed=2)
    b.set_slot("late", "blend", 0.5, True, False)
    b.run_epoch(EpochPlan(2, ("late",)))
    b.drop("late")
    b.restore(snapshot)
    assert all(torch.equal(v, snapshot["host"][k]) for k, v in b.model.host.state_dict().items())
    mid = b.model.slots["mid"].seed.state_dict()
    assert all(torch.equal(v, snapshot["fossils"]["mid"][k]) for k, v in mid.items())
    assert not b.optimizer.state


def test_a_nan_loss_is_seen_by_the_governor(digits):
    b = backend(digits)
    with torch.no_grad():
        b.model.host.head.weight.fill_(float("nan"))
    conv = b.model.host.blocks[0][0].weight.clone()
    stats = b.run_epoch(EpochPlan(1))[0]
    assert stats.non_finite
    assert torch.equal(b.model.host.blocks[0][0].weight, conv)  # every batch skipped its step
    assert all(torch.equal(buf, torch.zeros_like(buf)) for buf in  # and left its momentum untouched
               (b.optimizer.state[p]["momentum_buffer"] for p in b.model.host.parameters()))
    governor = Governor(GovernorSettings(), digits.spec.l_rand)
    panic = governor.check(stats.loss, float("nan"), stats.non_finite)
    assert panic is not None and panic.reason == "nan_loss"


def test_checkpoint_state_round_trips(digits):
    a = backend(digits)
    a.germinate("mid", "conv_light", "gated", init_seed=1)
    a.set_slot("mid", "blend", 0.3, True, False)
    a.run_epoch(EpochPlan(1, ("mid",)))
    state = a.state_dict()
    b = backend(digits)
    b.load_state_dict(state)
    a.run_epoch(EpochPlan(2, ("mid",)))
    b.run_epoch(EpochPlan(2, ("mid",)))
    for (k, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), k


class TestGovernor:
    def governor(self, **settings):
        return Governor(GovernorSettings(**{"min_history": 3, "window": 5, **settings}), l_rand=math.log(10))

    def test_divergence_needs_consecutive_epochs(self):
        g = self.governor(absolute=2.0, consecutive=2)
        for loss in (0.5, 0.4, 0.45):
            assert g.check(loss, loss, False) is None
        assert g.check(5.0, 5.0, False) is None
        panic = g.check(5.0, 5.0, False)
        assert panic.reason == "divergence" and panic.consecutive == 2
        assert g.history == [0.5, 0.4, 0.45]  # anomalous values never join the history

    def test_lobotomy_is_a_collapse_to_uniform_after_learning(self):
        g = self.governor()
        for loss in (0.5, 0.4, 0.45):
            g.check(loss, loss, False)
        panic = g.check(math.log(10), math.log(10), False)
        assert panic.reason == "lobotomy"

    def test_no_lobotomy_before_learning(self):
        g = self.governor()
        for loss in (2.2, 2.25, 2.3):
            g.check(loss, loss, False)
        assert g.check(math.log(10), math.log(10), False) is None

    def test_disabled_governor_sees_nothing(self):
        assert self.governor(enabled=False).check(float("nan"), float("nan"), True) is None

    def test_rollbacks_are_counted_and_the_panic_counter_resets(self):
        g = self.governor(max_rollbacks=1)
        g.consecutive = 2
        g.rolled_back()
        assert g.consecutive == 0 and not g.exhausted
        g.rolled_back()
        assert g.exhausted


def test_a_checkpoint_of_a_non_fused_optimizer_loads_fused(digits):
    """Checkpoints written before the optimizers were fused still resume, and step on the device's
    skip flag."""
    a = backend(digits)
    a.run_epoch(EpochPlan(1))
    state = a.state_dict()
    for group in state["optimizer"]["param_groups"]:
        group["fused"] = False
    b = backend(digits)
    b.load_state_dict(state)
    assert all(group["fused"] for group in b.optimizer.param_groups)
    a.run_epoch(EpochPlan(2))
    b.run_epoch(EpochPlan(2))
    for (k, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), k
