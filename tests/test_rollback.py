"""The governor end to end: a NaN loss mid-run rolls back to the snapshot, culls the cullable seed,
keeps the fossil, clears the optimizer and is recorded; exhaustion fails the run."""

import pytest
import torch

from esper.compute.engine import Engine, GovernorExhausted
from esper.compute.governor import Governor
from esper.compute.run_header import run_started
from esper.compute.settings import GovernorSettings, TrainSettings
from esper.compute.streams import episode_seed
from esper.compute.torch_backend import TorchBackend
from esper.events import catalogue as ev
from esper.events.log import LogReader, LogWriter
from esper.lifecycle.config import LifecycleConfig
from esper.policy.rewards import RewardConfig, make_reward_function
from esper.tasks import load_task

SLOTS = ("early", "mid", "late")


class Poisoned(TorchBackend):
    """Training at the listed epochs starts from NaN weights, as a blown-up step would leave them."""

    def __init__(self, *args, poison: tuple[int, ...], **kwargs):
        super().__init__(*args, **kwargs)
        self.poison = poison

    def run_epoch(self, plan):
        if plan.epoch in self.poison:
            with torch.no_grad():
                self.model.host.head.weight.fill_(float("nan"))
        return super().run_epoch(plan)


class Script:
    """Germinate into `mid` at epoch 1 and `late` at epoch 4; fossilize whatever reaches probation."""

    def reset(self, env, episode, max_epochs):
        pass

    def decide(self, observation):
        commands = []
        for slot in observation.state.slots:
            if slot.stage.name == "DORMANT" and (observation.epoch, slot.slot_id) in ((1, "mid"), (4, "late")):
                commands.append(ev.PolicyCommand(op="germinate", slot=slot.slot_id, blueprint="conv_light",
                                                 blend=ev.Blend(kind="linear", steps=1), reason="script"))
            if slot.stage.name == "PROBATIONARY":
                commands.append(ev.PolicyCommand(op="fossilize", slot=slot.slot_id, reason="script"))
        return ev.PolicyDecided(epoch=observation.epoch, policy="heuristic", policy_id="script",
                                commands=tuple(commands), action={}, action_index={}, legal={}, rationale="")

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def run(tmp_path, poison, epochs, lifecycle=None, governor=None):
    torch.set_num_threads(1)
    data = load_task("digits")
    lifecycle = lifecycle or {"g2_min_shadow_gain": -100.0, "g2_min_training_epochs": 1,
                              "g3_min_blending_epochs": 1, "g5_min_contribution": -100.0}
    backend = Poisoned(data, TrainSettings(), LifecycleConfig(**lifecycle), SLOTS, torch.device("cpu"),
                       poison=poison)
    writer = LogWriter.create(tmp_path / "events.elog")
    seen = {}

    def on_epoch(engine, metrics):
        if metrics.rolled_back:
            seen["host"] = {k: v.clone() for k, v in engine.backend.model.host.state_dict().items()}
            seen["snapshot"] = engine.snapshot
            seen["optimizer_state"] = len(engine.backend.optimizer.state)

    engine = Engine(writer=writer, run_id="rollback", backend=backend, controller=Script(),
                    reward=make_reward_function(RewardConfig(), 0.995),
                    governor=Governor(GovernorSettings(**(governor or {})), data.spec.l_rand),
                    blueprints=("conv_light",), l_rand=data.spec.l_rand, snapshot_every=5,
                    counterfactual_all_off=True, on_epoch=on_epoch)
    host = backend.build(episode_seed(0, 0, 0), epochs)
    engine.start_run(run_started(config={"lifecycle": lifecycle}, config_hash="t", seed=0, device="cpu",
                                 deterministic=True, threads=1, task="digits", topology="cnn", host=host,
                                 enabled=SLOTS, score_kind="accuracy", data_digest=None), 0)
    engine.start_episode(0, backend.episode_seed, epochs, SLOTS, host.param_count)
    writer.commit()
    try:
        for epoch in range(1, epochs + 1):
            if engine.step(0, epoch):
                break
    finally:
        writer.close()
    return engine, seen, list(LogReader(tmp_path / "events.elog").records())


def test_a_nan_loss_rolls_back_culls_the_cullable_and_keeps_the_fossil(tmp_path):
    engine, seen, records = run(tmp_path, poison=(6,), epochs=8)
    rollbacks = [r.event for r in records if isinstance(r.event, ev.GovernorRolledBack)]
    assert len(rollbacks) == 1
    rollback = rollbacks[0]
    assert rollback.reason == "nan_loss" and rollback.epoch == 6 and rollback.restored_epoch == 5
    fossils = [r.event.seed_id for r in records if isinstance(r.event, ev.SeedFossilized)]
    assert fossils == ["mid#1"]
    assert rollback.culled == ("late#2",)
    culls = [r.event for r in records if isinstance(r.event, ev.SeedCulled)]
    assert [(c.seed_id, c.reason, c.initiator) for c in culls] == [("late#2", "governor_rollback", "governor")]
    # The validation after the rollback saw exactly the snapshot's weights, and no momentum.
    assert all(torch.equal(v, seen["snapshot"]["host"][k]) for k, v in seen["host"].items())
    assert seen["optimizer_state"] == 0
    epoch6 = next(r.event for r in records if isinstance(r.event, ev.EpochCompleted) and r.event.epoch == 6)
    assert epoch6.rolled_back and epoch6.val_loss == epoch6.val_loss  # finite after the restore
    state = engine.state.envs[0]
    assert state.slot("mid").stage.name == "FOSSILIZED" and state.slot("late").stage.name == "EMBARGOED"
    assert "late" not in engine.backend.seeds and "mid" in engine.backend.seeds


def test_too_many_rollbacks_fail_the_run(tmp_path):
    with pytest.raises(GovernorExhausted):
        run(tmp_path, poison=(2, 3), epochs=5, governor={"max_rollbacks": 1})
