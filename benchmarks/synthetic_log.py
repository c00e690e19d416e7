"""A realistic event log without training anything: the real decider driven by scripted commands.

Episodes of a few envs run epoch after epoch with random measurements; seeds are germinated on idle
slots, culled or fossilized at random once they can be, and every step records a decision and a
reward, so the stream has the shape (and the validity) of a real run's log.
"""

import random
from pathlib import Path

from esper.events import catalogue as ev
from esper.events.enums import Stage
from esper.events.log import LogWriter
from esper.lifecycle import commands as cmd
from esper.lifecycle.decide import decide
from esper.lifecycle.evolve import evolve
from esper.lifecycle.state import initial_state

SLOTS = {"early": 4, "mid": 8, "late": 16}
BLUEPRINTS = {"norm": lambda c: 2 * c + 1, "conv_light": lambda c: 9 * c * c + 3 * c,
              "attention": lambda c: 2 * c * max(1, c // 4)}


def header(run: int, n_envs: int) -> ev.RunStarted:
    return ev.RunStarted(
        config={"run": {"policy": "heuristic", "task": "synthetic"}}, seed=run, esper_version="bench",
        torch_version=None, python_version="3.11", msgspec_version="0", platform="bench", device="cpu",
        deterministic=True, num_threads=1, task="synthetic", topology="cnn",
        host=ev.HostInfo(preset="synthetic", param_count=320, input_shape=(1, 8, 8), classes=4),
        slots=tuple(ev.SlotInfo(slot_id=s, channels=c, feature_shape=(c, 2, 2), enabled=True)
                    for s, c in SLOTS.items()),
        catalogue=tuple(ev.CatalogueEntry(name=b, identity_at_birth=True, params={s: f(c) for s, c in SLOTS.items()})
                        for b, f in BLUEPRINTS.items()),
        n_envs=n_envs, world_size=1, score_kind="accuracy", config_hash="0" * 64, data_digest=None, log_format=1,
        started_at="", hostname="bench", pid=0,
    )


def _metrics(epoch: int, acc: float) -> ev.EpochCompleted:
    return ev.EpochCompleted(
        epoch=epoch, train_loss=1.5 - acc / 100, train_acc=acc + 1, val_loss=1.4 - acc / 100, val_acc=acc,
        n_train=1024, n_val=256, total_params=900, lr=0.01, forward_passes=2, non_finite=False,
        rolled_back=False, train_time_s=0.01, val_time_s=0.01, counterfactual_time_s=0.0, samples_per_s=1e5,
        wall_time_s=0.02,
    )


class _Writer:
    def __init__(self, writer: LogWriter, run_id: str):
        self.writer, self.run_id, self.state = writer, run_id, initial_state()

    def __call__(self, command: cmd.Command, env: int | None = None, episode: int | None = None) -> None:
        events = decide(command, self.state)
        if events:
            for record in self.writer.append_batch(self.run_id, env, episode, events):
                self.state = evolve(self.state, record)


def write_run(path: Path, run: int, *, n_envs: int, episodes: int, epochs: int, rng: random.Random) -> int:
    """One run's log; returns its record count."""
    with LogWriter.create(path, fsync="never") as writer:
        write = _Writer(writer, f"bench-{run}")
        write(cmd.StartRun(run=header(run, n_envs)))
        for episode in range(episodes):
            for env in range(n_envs):
                write(cmd.StartEpisode(env=env, episode_seed=rng.getrandbits(32), host_seed=0, host_params=320,
                                       slots_enabled=tuple(SLOTS), max_epochs=epochs), env, episode)
            for epoch in range(1, epochs + 1):
                for env in range(n_envs):
                    _step(write, rng, env, episode, epoch, epochs)
        write(cmd.FinishRun(status="completed", final={"val_acc": 80.0}))
        return writer.next_seq


def _step(write: _Writer, rng: random.Random, env: int, episode: int, epoch: int, epochs: int) -> None:
    state = write.state.envs[env]
    acc = min(99.0, 30 + 2 * epoch + rng.gauss(0, 1))
    measurements = []
    for slot in state.slots:
        if slot.stage in (Stage.TRAINING, Stage.BLENDING, Stage.PROBATIONARY):
            kind = "shadow" if slot.stage == Stage.TRAINING else "ablation"
            cf = cmd.CounterfactualSample(kind=kind, alpha=1.0 if kind == "shadow" else 0.0, real_acc=acc,
                                          ablated_acc=acc + rng.uniform(-3, 3) if kind == "shadow" else
                                          acc - rng.uniform(-1, 4), real_loss=0.5, ablated_loss=0.6, n=256)
            measurements.append(cmd.SlotMeasurement(slot=slot.slot_id, seed_id=slot.seed.seed_id,
                                                    grad_ratio=rng.uniform(0, 1), isolation_leaks=0, finite=True,
                                                    counterfactual=cf))
    write(cmd.RecordEpoch(env=env, epoch=epoch, metrics=_metrics(epoch, acc), measurements=tuple(measurements)),
          env, episode)
    if epoch > 1:
        components = {"contribution": rng.uniform(-1, 1), "rent": -0.01, "terminal": 0.0}
        write(cmd.RecordReward(env=env, reward=ev.RewardComputed(
            epoch=epoch, decision_epoch=epoch - 1, mode="simplified", components=components,
            total_raw=sum(components.values()), governor=False, terminated=epoch == epochs, truncated=False,
            score_before=acc - 1, score_after=acc, potential_before=0.0, potential_after=0.0,
            seed_params_total=600, host_params=320, seeds=())), env, episode)
    if epoch == epochs:
        write(cmd.FinishEpisode(env=env), env, episode)
        return
    commands = []
    for slot in write.state.envs[env].slots:
        if slot.stage == Stage.DORMANT and rng.random() < 0.3:
            commands.append(ev.PolicyCommand(op="germinate", slot=slot.slot_id, blueprint=rng.choice(list(BLUEPRINTS)),
                                             reason="plateau_germinate"))
        elif slot.stage == Stage.PROBATIONARY and rng.random() < 0.5:
            commands.append(ev.PolicyCommand(op="fossilize", slot=slot.slot_id, reason="g5_ready"))
        elif slot.stage in (Stage.TRAINING, Stage.BLENDING) and rng.random() < 0.05:
            commands.append(ev.PolicyCommand(op="cull", slot=slot.slot_id, reason="blending_harm"))
    write(cmd.RecordDecision(env=env, decision=ev.PolicyDecided(
        epoch=epoch, policy="heuristic", policy_id="bench", commands=tuple(commands), action={}, action_index={},
        legal={}, rationale="bench")), env, episode)
    for c in commands:
        if c.op == "germinate":
            params = BLUEPRINTS[c.blueprint](SLOTS[c.slot])
            write(cmd.Germinate(env=env, slot=c.slot, blueprint=c.blueprint, decision_epoch=epoch,
                                probe=cmd.ProbeReport(shape_ok=True, finite=True, identity=True, param_count=params)),
                  env, episode)
        elif c.op == "fossilize":
            write(cmd.Fossilize(env=env, slot=c.slot, decision_epoch=epoch), env, episode)
        else:
            write(cmd.Cull(env=env, slot=c.slot, reason=c.reason, initiator="policy", decision_epoch=epoch),
                  env, episode)
    write(cmd.Tick(env=env, epoch=epoch), env, episode)


def write_logs(directory: Path, target_records: int, *, n_envs: int = 4, episodes: int = 5, epochs: int = 25,
               seed: int = 0) -> list[Path]:
    """Runs until the records reach `target_records`; one log per run directory."""
    rng, total, paths = random.Random(seed), 0, []
    run = 0
    while total < target_records:
        run_dir = directory / f"run-{run:03d}"
        run_dir.mkdir(parents=True)
        total += write_run(run_dir / "events.elog", run, n_envs=n_envs, episodes=episodes, epochs=epochs, rng=rng)
        paths.append(run_dir / "events.elog")
        run += 1
    return paths
