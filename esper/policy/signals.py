"""The signal tracker (policy §4.1), shared by the heuristic and PPO's features.

It is recomputed from the episode's history on every call instead of being updated in place:
an observation then fully determines it, so nothing needs checkpointing and a resumed run sees
exactly what an uninterrupted one saw. The cost is O(E) per decision, which is nothing.
"""

import math
from collections.abc import Sequence

import attrs

from esper.compute.observation import EpochSignals

WINDOW = 10  # length of the score and loss windows
STABLE_EPOCHS = 3  # consecutive stable epochs that set the latch
STABLE_MAX_IMPROVEMENT = 0.03  # relative loss drop below which an epoch counts as stable
STABLE_MAX_GROWTH = 1.5  # a loss above this multiple of the previous one is not stable


@attrs.frozen
class Signals:
    epoch: int  # t: epochs seen (0 before any)
    score: float | None  # A_t
    loss: float | None  # L_t
    score_delta: float  # A_t - A_{t-1}; 0 at t = 1
    loss_delta: float  # L_{t-1} - L_t; 0 at t = 1
    plateau: int  # consecutive epochs with score_delta < plateau_threshold
    stable_count: int  # consecutive stable epochs (only meaningful before the latch is set)
    latch_epoch: int | None  # the epoch the stabilisation latch was set; None while unset
    best_score: float | None
    scores: tuple[float, ...]  # the last WINDOW scores, oldest first
    losses: tuple[float, ...]  # the last WINDOW losses, oldest first

    @property
    def latched(self) -> bool:
        return self.latch_epoch is not None


def _stable(previous: float, current: float) -> bool:
    # A non-finite or non-positive previous loss gives no meaningful relative change: unstable.
    if not (math.isfinite(previous) and math.isfinite(current)) or previous <= 0:
        return False
    return (previous - current) / previous < STABLE_MAX_IMPROVEMENT and current < STABLE_MAX_GROWTH * previous


def track(history: Sequence[EpochSignals], plateau_threshold: float = 0.5) -> Signals:
    """Signals after epochs 1..len(history) of the episode (validation loss and score)."""
    plateau = stable = 0
    latch: int | None = None
    best: float | None = None
    score_delta = loss_delta = 0.0
    for t, now in enumerate(history, start=1):
        if t == 1:
            score_delta = loss_delta = 0.0
        else:
            before = history[t - 2]
            score_delta = now.val_acc - before.val_acc
            loss_delta = before.val_loss - now.val_loss
            if latch is None:
                stable = stable + 1 if _stable(before.val_loss, now.val_loss) else 0
                if stable >= STABLE_EPOCHS:
                    latch = t
        plateau = plateau + 1 if score_delta < plateau_threshold else 0
        best = now.val_acc if best is None or now.val_acc > best else best
    last = history[-1] if history else None
    return Signals(
        epoch=len(history),
        score=last.val_acc if last else None,
        loss=last.val_loss if last else None,
        score_delta=score_delta,
        loss_delta=loss_delta,
        plateau=plateau,
        stable_count=stable,
        latch_epoch=latch,
        best_score=best,
        scores=tuple(h.val_acc for h in history[-WINDOW:]),
        losses=tuple(h.val_loss for h in history[-WINDOW:]),
    )
