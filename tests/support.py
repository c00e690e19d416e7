"""Shared test scaffolding: a run header and an in-memory ledger driving the real decider."""

from typing import Any

import attrs

from esper.events import catalogue as ev
from esper.events.envelope import SCHEMA_VERSION, Record
from esper.lifecycle import decide, evolve, initial_state
from esper.lifecycle import commands as cmd

SLOTS = ("early", "mid", "late")
WIDTHS = {"early": 4, "mid": 8, "late": 16}
CATALOGUE = (
    ev.CatalogueEntry(name="noop", identity_at_birth=True, params={s: 0 for s in SLOTS}),
    ev.CatalogueEntry(name="conv_light", identity_at_birth=True,
                      params={s: 9 * c * c + 3 * c for s, c in WIDTHS.items()}),
    ev.CatalogueEntry(name="norm", identity_at_birth=True, params={s: 2 * c + 1 for s, c in WIDTHS.items()}),
)


def run_started(lifecycle: dict[str, Any] | None = None, n_envs: int = 1) -> ev.RunStarted:
    return ev.RunStarted(
        config={"lifecycle": lifecycle or {}}, seed=0, esper_version="0", torch_version=None,
        python_version="3.11", msgspec_version="0", platform="test", device="cpu", deterministic=True,
        num_threads=1, task="synthetic", topology="cnn",
        host=ev.HostInfo(preset="synthetic", param_count=320, input_shape=(1, 8, 8), classes=4),
        slots=tuple(ev.SlotInfo(slot_id=s, channels=c, feature_shape=(c, 2, 2), enabled=True)
                    for s, c in WIDTHS.items()),
        catalogue=CATALOGUE, n_envs=n_envs, world_size=1, score_kind="accuracy", config_hash="0",
        data_digest=None, log_format=1, started_at="", hostname="", pid=0,
    )


def probe(blueprint: str = "conv_light", slot: str = "mid", **changes: Any) -> cmd.ProbeReport:
    entry = next(e for e in CATALOGUE if e.name == blueprint)
    report = dict(shape_ok=True, finite=True, identity=True, param_count=entry.params.get(slot, 0))
    report.update(changes)
    return cmd.ProbeReport(**report)


def epoch_metrics(epoch: int, val_acc: float = 50.0, val_loss: float = 1.0) -> ev.EpochCompleted:
    return ev.EpochCompleted(
        epoch=epoch, train_loss=val_loss, train_acc=val_acc, val_loss=val_loss, val_acc=val_acc, n_train=10,
        n_val=10, total_params=100, lr=0.01, forward_passes=1, non_finite=False, rolled_back=False,
        train_time_s=0.0, val_time_s=0.0, counterfactual_time_s=0.0, samples_per_s=0.0, wall_time_s=0.0,
    )


@attrs.define
class Ledger:
    """The engine's step in memory: decide, stamp, append, fold."""

    state: Any = attrs.Factory(initial_state)
    records: list[Record] = attrs.Factory(list)

    def execute(self, command: cmd.Command) -> list[Record]:
        events = decide(command, self.state)
        env = getattr(command, "env", None)
        if isinstance(command, (cmd.StartRun, cmd.RecordCheckpoint, cmd.RecordPolicyUpdate, cmd.FinishRun)):
            env = None
        if isinstance(command, cmd.StartEpisode):
            current = self.state.envs.get(env)
            episode = 0 if current is None else current.episode + 1
        else:
            episode = None if env is None else self.state.envs[env].episode
        stamped = []
        for i, event in enumerate(events):
            record = Record(seq=len(self.records), run_id="test", env=env, episode=episode, ts=0,
                            schema=SCHEMA_VERSION, batch_end=i == len(events) - 1, event=event)
            self.records.append(record)
            self.state = evolve(self.state, record)
            stamped.append(record)
        return stamped
