"""The comparison table of policy §9, computed from run logs alone.

`esper evaluate` prints it for the runs it just made and `esper report` renders it again over the
same directories; both call `compare` on what `run_metrics` folds from each log, so they agree.
Statistics describe the completed runs of each contender; failed and interrupted runs are counted,
never averaged, since their scores stop early. Wall time is measured from RunStarted to RunFinished
by the records' timestamps, so it leaves out process start-up and data loading.
"""

from pathlib import Path
from typing import Any, Iterable, Sequence

import attrs

from esper.replay.runlog import RunLog, collect
from esper.replay.stats import mean_interval
from esper.replay.timetravel import load

BASELINE = "none"


@attrs.frozen
class Metric:
    key: str
    label: str
    digits: int


METRICS = (
    Metric("final_test", "final test score", 2),
    Metric("best_val", "best val score", 2),
    Metric("added_params", "parameters added", 0),
    Metric("added_pct", "parameters added (% of host)", 2),
    Metric("germinated", "seeds germinated", 2),
    Metric("fossilized", "seeds fossilized", 2),
    Metric("culled", "seeds culled", 2),
    Metric("rollbacks", "governor rollbacks", 2),
    Metric("wall_time_s", "wall time (s)", 1),
    Metric("forward_passes", "forward passes (validation, counterfactuals included)", 0),
)


@attrs.frozen
class Estimate:
    """A mean with its 95 % t-interval half-width (None for a single value)."""

    mean: float
    half: float | None
    n: int

    @property
    def low(self) -> float | None:
        return None if self.half is None else self.mean - self.half

    @property
    def high(self) -> float | None:
        return None if self.half is None else self.mean + self.half

    def to_json(self) -> dict[str, Any]:
        return {"mean": self.mean, "half_width": self.half, "low": self.low, "high": self.high, "n": self.n}


def estimate(values: Sequence[float]) -> Estimate | None:
    if not values:
        return None
    mean, half = mean_interval(values)
    return Estimate(mean, half, len(values))


@attrs.frozen
class Paired:
    """Final test score minus the baseline's on the same seed."""

    difference: Estimate
    wins: int
    losses: int
    ties: int

    @property
    def verdict(self) -> str:
        if self.difference.half is None:
            return "too few seeds"
        if self.difference.low > 0:
            return "better"
        if self.difference.high < 0:
            return "worse"
        return "no difference shown"


@attrs.frozen
class Contender:
    policy: str
    runs: int
    completed: int
    metrics: dict[str, Estimate | None]
    paired: Paired | None  # None for the baseline itself, or when no seed pairs with it


@attrs.frozen
class Comparison:
    contenders: tuple[Contender, ...]
    runs: tuple[dict[str, Any], ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "contenders": [{
                "policy": c.policy, "runs": c.runs, "completed": c.completed,
                "metrics": {m.key: _json(c.metrics[m.key]) for m in METRICS},
                "paired_vs_none": None if c.paired is None else {
                    "final_test_difference": c.paired.difference.to_json(), "wins": c.paired.wins,
                    "losses": c.paired.losses, "ties": c.paired.ties, "verdict": c.paired.verdict},
            } for c in self.contenders],
            "runs": list(self.runs),
        }


def _json(value: Estimate | None) -> dict[str, Any] | None:
    return None if value is None else value.to_json()


def run_metrics(run: RunLog) -> dict[str, Any]:
    """The numbers a comparison reads from one run."""
    final = run.finished.final if run.finished else {}
    keys = run.keys
    host = run.episodes[keys[0]].host_params if keys else None
    points = run.epochs.get(keys[-1], []) if keys else []
    total = points[-1].total_params if points else None
    vals = [p.val_acc for k in keys for p in run.epochs.get(k, []) if p.val_acc is not None]
    outcomes = [s["outcome"] for s in run.seeds]
    added = None if total is None or host is None else total - host
    return {
        "run_id": run.header["run_id"], "policy": run.header["policy"], "seed": run.header["seed"],
        "status": run.header["status"], "epochs": run.header["epochs"], "path": run.header["path"],
        "started_at": run.start.started_at if run.start else "",
        "final_test": final.get("test_acc"), "final_val": final.get("val_acc", vals[-1] if vals else None),
        "best_val": max(vals) if vals else None, "host_params": host, "added_params": added,
        "added_pct": 100.0 * added / host if added is not None and host else None,
        "germinated": len(outcomes), "fossilized": outcomes.count("fossilized"), "culled": outcomes.count("culled"),
        "rollbacks": len(run.rollbacks), "wall_time_s": _wall_time(run),
        "forward_passes": sum(p.forward_passes for k in keys for p in run.epochs.get(k, [])),
    }


def _wall_time(run: RunLog) -> float | None:
    """RunStarted to RunFinished by the records' timestamps (microseconds): every log has them,
    whatever its writer put in RunFinished.wall_time_s."""
    records = run.loaded.records
    if run.finished is None or not records:
        return None
    return (records[-1].ts - records[0].ts) / 1e6


def compare(runs: Sequence[dict[str, Any]]) -> Comparison:
    """Contenders in the order their first run started, so a recomputation lists them as run."""
    ordered = sorted(runs, key=lambda m: (m["started_at"], m["run_id"]))
    groups: dict[str, list[dict[str, Any]]] = {}
    for m in ordered:
        groups.setdefault(str(m["policy"]), []).append(m)
    baseline: dict[int, float] = {}
    for m in groups.get(BASELINE, []):
        if m["status"] == "completed" and m["final_test"] is not None:
            baseline.setdefault(m["seed"], m["final_test"])  # a repeated seed pairs with its first run
    contenders = []
    for policy, members in groups.items():
        done = [m for m in members if m["status"] == "completed"]
        metrics = {x.key: estimate([m[x.key] for m in done if m[x.key] is not None]) for x in METRICS}
        diffs = [m["final_test"] - baseline[m["seed"]] for m in done
                 if m["final_test"] is not None and m["seed"] in baseline]
        paired = None
        if policy != BASELINE and diffs:
            paired = Paired(estimate(diffs), sum(d > 0 for d in diffs), sum(d < 0 for d in diffs),
                            sum(d == 0 for d in diffs))
        contenders.append(Contender(policy, len(members), len(done), metrics, paired))
    return Comparison(tuple(contenders), tuple(ordered))


def from_logs(paths: Iterable[str | Path]) -> Comparison:
    """Raises the log errors of the first unreadable log."""
    return compare([run_metrics(collect(load(path))) for path in paths])
