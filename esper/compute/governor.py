"""The governor (runtime §4): catches NaN losses, lobotomy and divergence from the epoch's losses.

Pure bookkeeping over numbers; the engine turns a panic into a `RollBack` command and asks the
backend to restore its snapshot.
"""

import math
import statistics

import attrs

from esper.compute.settings import GovernorSettings


@attrs.frozen
class Panic:
    reason: str  # nan_loss | lobotomy | divergence
    loss: float
    threshold: float | None
    consecutive: int
    history_mean: float | None
    history_std: float | None


@attrs.define
class Governor:
    settings: GovernorSettings
    l_rand: float
    history: list[float] = attrs.Factory(list)
    consecutive: int = 0
    rollbacks: int = 0

    def check(self, train_loss: float, val_loss: float, non_finite: bool) -> Panic | None:
        """Judge one epoch; a healthy loss joins the history, an anomalous one never does."""
        if not self.settings.enabled:
            return None
        mean, std = self._moments()
        if non_finite or not (math.isfinite(train_loss) and math.isfinite(val_loss)):
            return Panic("nan_loss", val_loss if not math.isfinite(val_loss) else train_loss, None, 1, mean, std)
        s, enough = self.settings, len(self.history) >= self.settings.min_history
        band = s.lobotomy_band * self.l_rand
        if enough and mean < s.lobotomy_mean_ratio * self.l_rand and abs(val_loss - self.l_rand) < band:
            return Panic("lobotomy", val_loss, band, 1, mean, std)
        threshold = max(s.absolute, mean + s.sigma_k * std, s.mean_multiple * mean) if enough else None
        if threshold is not None and val_loss > threshold:
            self.consecutive += 1
            if self.consecutive >= s.consecutive:
                return Panic("divergence", val_loss, threshold, self.consecutive, mean, std)
            return None
        self.consecutive = 0
        self.history = (self.history + [val_loss])[-s.window:]
        return None

    def rolled_back(self) -> None:
        """The panic counter resets; the history is kept."""
        self.rollbacks += 1
        self.consecutive = 0

    @property
    def exhausted(self) -> bool:
        return self.rollbacks > self.settings.max_rollbacks

    def _moments(self) -> tuple[float | None, float | None]:
        if not self.history:
            return None, None
        return statistics.fmean(self.history), statistics.pstdev(self.history)

    def state_dict(self) -> dict:
        return {"history": list(self.history), "consecutive": self.consecutive, "rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict) -> None:
        self.history, self.consecutive, self.rollbacks = list(state["history"]), state["consecutive"], state["rollbacks"]
