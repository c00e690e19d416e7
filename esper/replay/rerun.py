"""`esper replay --rerun` (events §7, §10): run the recorded configuration again and compare.

The run is re-executed from `RunStarted`'s config and seed in a temporary run directory (or
`out`), for as many epochs as the log records, and ended with the recorded status. The two payload
streams are then compared record by record, volatile fields excluded, through the last recorded
record. Versions and platform are compared apart: a difference is a warning, since determinism
is promised only for the same esper, torch and python on CPU with the same thread count.
"""

import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import attrs
import msgspec

from esper import __version__
from esper.events import catalogue as ev
from esper.replay.compare import Divergence, first_divergence
from esper.replay.timetravel import Loaded, load


class RerunRefused(ValueError):
    """The log cannot be rerun as asked (a user error, exit code 2)."""


@attrs.frozen
class RerunReport:
    compared: int  # recorded records compared
    new_records: int
    divergence: Divergence | None
    warnings: tuple[str, ...]
    run_dir: Path | None  # the rerun's directory when kept (--out)

    @property
    def ok(self) -> bool:
        return self.divergence is None

    def describe(self) -> str:
        if self.divergence is None:
            return f"identical: {self.compared} records reproduced (volatile fields excluded)"
        return self.divergence.describe()

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "compared": self.compared, "new_records": self.new_records,
                "divergence": None if self.divergence is None else self.divergence.to_json(),
                "warnings": list(self.warnings), "run_dir": None if self.run_dir is None else str(self.run_dir)}


def environment_warnings(start: ev.RunStarted) -> list[str]:
    """Where this process differs from the recorded one in what determinism depends on."""
    import torch

    here = {"esper_version": __version__, "torch_version": str(torch.__version__),
            "python_version": platform.python_version(), "msgspec_version": msgspec.__version__,
            "platform": f"{sys.platform}-{platform.machine()}"}
    warnings = [f"{key} differs: recorded {getattr(start, key)!r}, here {value!r}"
                for key, value in here.items() if getattr(start, key) != value]
    if start.device != "cpu":
        warnings.append(f"the run used device {start.device!r}: equality is promised on CPU only")
    return warnings


def rerun(path: str | Path, out: Path | None = None, force: bool = False) -> RerunReport:
    loaded = load(path)
    start = _check_rerunnable(loaded, force)
    warnings = environment_warnings(start)
    if loaded.summary.tail == "torn":
        warnings.append(f"the log has a torn tail at offset {loaded.summary.torn_offset}: compared through seq "
                        f"{loaded.summary.last_seq}")
    temporary = None
    if out is None:
        temporary = Path(tempfile.mkdtemp(prefix="esper-rerun-"))
        run_dir = temporary / "rerun"
    else:
        run_dir = out
    try:
        execute_again(loaded, start, run_dir)
        new = load(run_dir).records
        divergence = first_divergence(loaded.records, new)
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
    return RerunReport(compared=len(loaded.records) if divergence is None else divergence.seq,
                       new_records=len(new), divergence=divergence, warnings=tuple(warnings),
                       run_dir=None if out is None else run_dir)


def _check_rerunnable(loaded: Loaded, force: bool) -> ev.RunStarted:
    start = loaded.run_started
    if start is None:
        raise RerunRefused(f"{loaded.path} holds no complete RunStarted batch to rerun")
    if start.forked_from is not None:
        raise RerunRefused(f"{loaded.path} is a fork of run {start.forked_from.run_id} at seq "
                           f"{start.forked_from.seq}; its prefix comes from the parent (rerun the parent, or fork it "
                           "again with esper fork)")
    if not start.deterministic and not force:
        raise RerunRefused("the run was recorded without deterministic algorithms, so a rerun need not match "
                           "(pass --force to compare anyway)")
    return start


def execute_again(loaded: Loaded, start: ev.RunStarted, run_dir: Path) -> None:
    """Run the recorded configuration for the recorded epochs and end it with the recorded status
    (an unterminated log's rerun ends `interrupted`, past the last compared record)."""
    from esper.policy.run_config import ConfigError, structure
    from esper.policy.runner import Run, RunError, load_data
    from esper.tasks.errors import DataError

    try:
        config = structure(start.config)
        data = load_data(config)
    except (ConfigError, RunError, DataError) as exc:
        raise RerunRefused(f"the recorded configuration cannot be run here: {exc}") from None
    if run_dir.exists() and any(run_dir.iterdir()):
        raise RerunRefused(f"'{run_dir}' already exists and is not empty (choose another --out)")
    run_dir.mkdir(parents=True, exist_ok=True)
    finished = next((r.event for r in reversed(loaded.records) if isinstance(r.event, ev.RunFinished)), None)
    epochs = max((r.event.epoch for r in loaded.records if isinstance(r.event, ev.EpochCompleted)), default=0)
    run = Run(config, run_dir, data)
    drive(run, 1, epochs, finished.status if finished else "interrupted")


def drive(run: Any, first: int, last: int, status: str) -> None:
    """Step the run's env 0 through epochs first..last, then write RunFinished with `status` (or
    `failed`, with the error, when a step raises as the recorded run may have)."""
    from esper.compute.checkpoints import prune

    error: Exception | None = None
    try:
        if first == 1 and 0 not in run.engine.state.envs:
            run.start()
        for epoch in range(first, last + 1):
            finished = run.engine.step(0, epoch)
            if run.config.run.checkpoint_every:
                prune(run.run_dir, run.config.run.keep_checkpoints)
            if finished:
                break
    except Exception as exc:  # the governor, say: recorded as RunFinished(failed), as `esper run` does
        error, status = exc, "failed"
    try:
        run.finish(status, error)
    finally:
        run.writer.close()
