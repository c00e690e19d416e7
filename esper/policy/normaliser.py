"""Running statistics for observations (policy §5.3) and rewards (§5.5 step 1).

Both are Welford accumulators (count, mean, M2) in float64, merged a batch at a time with the
parallel formula of Chan et al., so a merge of many batches equals the statistics of their union
(up to rounding). Observation statistics are frozen during a round: `normalise` reads the current
statistics and never changes them; the trainer calls `merge` with the round's raw vectors after the
update. State dicts hold tensors and primitives only (weights-only loading).
"""

from collections.abc import Sequence

import torch

EPS = 1e-8


class Welford:
    """count/mean/M2 over vectors of a fixed shape; population variance M2/count."""

    def __init__(self, shape: tuple[int, ...] = ()):
        self.shape = tuple(shape)
        self.count = 0
        self.mean = torch.zeros(self.shape, dtype=torch.float64)
        self.m2 = torch.zeros(self.shape, dtype=torch.float64)

    @property
    def var(self) -> torch.Tensor:
        """σ²; 1 before any data (initial μ = 0, σ² = 1)."""
        if self.count == 0:
            return torch.ones(self.shape, dtype=torch.float64)
        return self.m2 / self.count

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()

    def merge(self, batch) -> None:
        """Merge a batch of samples, shape (n, *shape)."""
        x = torch.as_tensor(batch, dtype=torch.float64).reshape(-1, *self.shape)
        n = x.shape[0]
        if n == 0:
            return
        if not torch.isfinite(x).all():
            raise ValueError("non-finite values cannot enter running statistics")
        batch_mean = x.mean(dim=0)
        batch_m2 = ((x - batch_mean) ** 2).sum(dim=0)
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + batch_m2 + delta ** 2 * (self.count * n / total)
        self.count = total

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean.clone(), "m2": self.m2.clone()}

    def load_state_dict(self, state: dict) -> None:
        mean = torch.as_tensor(state["mean"], dtype=torch.float64)
        if tuple(mean.shape) != self.shape:
            raise ValueError(f"running statistics of shape {tuple(mean.shape)} do not fit shape {self.shape}")
        self.count = int(state["count"])
        self.mean = mean.clone()
        self.m2 = torch.as_tensor(state["m2"], dtype=torch.float64).clone()


class RunningNormaliser:
    """x̂ = clip((x − μ)/sqrt(σ² + 1e-8), −clip, clip) on N columns; R columns pass through."""

    def __init__(self, raw_columns: Sequence[bool], clip: float = 10.0):
        self.raw = torch.tensor([bool(r) for r in raw_columns], dtype=torch.bool)
        self.clip = float(clip)
        self.stats = Welford((len(self.raw),))

    @property
    def dim(self) -> int:
        return len(self.raw)

    @property
    def count(self) -> int:
        return self.stats.count

    def normalise(self, x) -> torch.Tensor:
        """Any leading shape, last axis = D; returns float32 (the policy runs in fp32)."""
        x = torch.as_tensor(x, dtype=torch.float64)
        if x.shape[-1] != self.dim:
            raise ValueError(f"observation has {x.shape[-1]} features, the normaliser {self.dim}")
        scaled = ((x - self.stats.mean) / torch.sqrt(self.stats.var + EPS)).clamp(-self.clip, self.clip)
        return torch.where(self.raw, x, scaled).to(torch.float32)

    def merge(self, batch) -> None:
        self.stats.merge(batch)

    def state_dict(self) -> dict:
        return {**self.stats.state_dict(), "raw": self.raw.clone(), "clip": self.clip}

    def load_state_dict(self, state: dict) -> None:
        raw = torch.as_tensor(state["raw"], dtype=torch.bool)
        if not torch.equal(raw, self.raw):
            raise ValueError("normaliser column layout differs (raw/normalised columns do not match)")
        self.clip = float(state["clip"])
        self.stats.load_state_dict(state)


class RewardScaler:
    """r̃ = clip(r/max(σ, 1e-8), −clip, clip) with σ the running std of raw rewards (no centring)."""

    def __init__(self, clip: float = 10.0):
        self.clip = float(clip)
        self.stats = Welford(())

    @property
    def std(self) -> float:
        return float(self.stats.std)

    def merge(self, rewards) -> None:
        self.stats.merge(rewards)

    def scale(self, rewards) -> torch.Tensor:
        r = torch.as_tensor(rewards, dtype=torch.float64)
        return (r / max(self.std, EPS)).clamp(-self.clip, self.clip)

    def state_dict(self) -> dict:
        return {**self.stats.state_dict(), "clip": self.clip}

    def load_state_dict(self, state: dict) -> None:
        self.clip = float(state["clip"])
        self.stats.load_state_dict(state)
