"""What `esper run` prints: one progress line per epoch on stderr, a seeds table at the end."""

import click

from esper.events.catalogue import EpochCompleted
from esper.events.enums import Stage
from esper.lifecycle.projections import SeedView

_SHORT = {Stage.GERMINATED: "G", Stage.TRAINING: "T", Stage.BLENDING: "B", Stage.PROBATIONARY: "P",
          Stage.FOSSILIZED: "F"}


class EpochPrinter:
    def __init__(self) -> None:
        self.best: float | None = None

    def __call__(self, engine, metrics: EpochCompleted) -> None:
        self.best = metrics.val_acc if self.best is None else max(self.best, metrics.val_acc)
        env = engine.state.envs[0]
        live = " ".join(f"{s.slot_id}:{_SHORT[s.stage]}" for s in env.slots if s.stage in _SHORT) or "-"
        click.echo(
            f"epoch {metrics.epoch:>3}/{env.max_epochs}  loss {metrics.train_loss:.4f}  "
            f"val {metrics.val_acc:6.2f}  best {self.best:6.2f}  params {metrics.total_params}  seeds {live}",
            err=True,
        )


def seeds_table(seeds: tuple[SeedView, ...], epoch: int) -> str:
    """Every seed of the run; `epoch` is the last one trained, the end of a living seed's span."""
    header = f"{'seed':<10} {'slot':<6} {'blueprint':<11} {'stage':<13} {'epochs':>6} {'contribution':>12}"
    rows = [header, "-" * len(header)]
    for s in seeds:
        epochs = (epoch if s.ended_epoch is None else s.ended_epoch) - s.germinated_epoch
        contribution = "-" if s.last_contribution is None else f"{s.last_contribution:+.2f}"
        rows.append(f"{s.seed_id:<10} {s.slot:<6} {s.blueprint:<11} {s.stage.name:<13} {epochs:>6} {contribution:>12}")
    if not seeds:
        rows.append("(no seeds were germinated)")
    return "\n".join(rows)
