"""`esper run` as an application service: validate everything up front, then drive one engine.

The run directory (runtime §6.1) holds `config.toml`, `events.elog` and `checkpoints/`. A resumed
run is a fork (events §7) into a sibling directory; the interrupted one is never modified.
"""

import contextlib
import os
import signal
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import attrs
import torch

from esper.compute.blueprints import catalogue
from esper.compute import distributed
from esper.compute.checkpoints import prune, read_checkpoint, write_checkpoint
from esper.compute.engine import Engine
from esper.compute.errors import PeerLost, SetupError
from esper.compute.governor import Governor
from esper.compute.precision import check_precision
from esper.compute.run_header import run_started
from esper.compute.settings import SLOT_IDS
from esper.compute.simulated import SimulatedBackend
from esper.compute.streams import episode_seed
from esper.compute.torch_backend import TorchBackend
from esper.events import catalogue as ev
from esper.events.log import prefix_sha256
from esper.events.log_reader import LogReader
from esper.events.log_writer import LogWriter
from esper.lifecycle import commands as cmd
from esper.lifecycle.decide import state_digest
from esper.lifecycle.projections import SeedView
from esper.policy.baselines import NonePolicy, RandomPolicy
from esper.policy.features import ObservationContract
from esper.policy.heuristic import HeuristicPolicy
from esper.policy.ppo_policy import PPOPolicy
from esper.policy.rewards import make_reward_function
from esper.policy.run_config import (
    ConfigError,
    RunConfig,
    config_hash,
    dump_toml,
    merge,
    read_file,
    structure,
    unstructure,
)
from esper.compute.hosts import TRANSFORMER_PRESETS
from esper.tasks import TaskData, get_task, load_task

LOG_NAME = "events.elog"
CONFIG_NAME = "config.toml"
CHECKPOINT_FORMAT = 1


class RunError(Exception):
    """A user error found before or while starting a run: one line, exit code 2."""


@attrs.frozen
class RunOutcome:
    run_dir: Path
    status: str
    epochs: int
    final: dict[str, float | None]
    seeds: tuple[SeedView, ...]


# -- validation -------------------------------------------------------------------------------


def policy_blueprints(config: RunConfig, topology: str) -> tuple[str, ...]:
    known = [bp.name for bp in catalogue(topology)]
    chosen = config.run.blueprints or tuple(n for n in known if n != "noop")
    for name in chosen:
        if name not in known:
            raise RunError(f"unknown blueprint '{name}' for topology {topology} "
                           f"(choose from {', '.join(n for n in known if n != 'noop')})")
    return tuple(chosen)


def check_slots(config: RunConfig) -> None:
    valid = ("early", "mid", "late")
    for slot in config.run.slots:
        if slot not in valid:
            raise RunError(f"unknown slot '{slot}' (choose from {', '.join(valid)})")
    if not config.run.slots:
        raise RunError("no slot enabled (pass --slots with some of early, mid, late)")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RunError(f"device '{name}' requested but CUDA is not available (use --device cpu)")
        return torch.device(name)
    if name != "cpu":
        raise RunError(f"unknown device '{name}' (choose from auto, cpu, cuda, cuda:N)")
    return torch.device("cpu")


def run_contract(config: RunConfig, topology: str) -> ObservationContract:
    """The observation contract a `ppo:` policy must match: enabled slots in host order, the
    run's blueprint list and the configured blend kinds."""
    slots = tuple(s for s in SLOT_IDS if s in config.run.slots)
    return ObservationContract.of(slots, policy_blueprints(config, topology), config.ppo.blend_kinds)


def make_controller(config: RunConfig, env: int = 0) -> Any:
    spec = config.run.policy
    if spec == "none":
        return NonePolicy()
    if spec == "random":
        return RandomPolicy(config.run.seed, env)
    if spec == "heuristic":
        return HeuristicPolicy(config.heuristic)
    if spec.startswith("ppo:") and spec[4:]:
        topology = get_task(config.run.task).topology
        return load_policy(Path(spec[4:]), run_contract(config, topology), greedy=config.run.greedy)
    raise RunError(f"unknown policy '{spec}' (choose from none, random, heuristic, ppo:CHECKPOINT)")


def load_policy(path: Path, contract: ObservationContract, greedy: bool) -> PPOPolicy:
    """A trained policy for this run's contract; a missing, unreadable or mismatching file is a user error."""
    if not path.is_file():
        raise RunError(f"policy checkpoint not found: '{path}' (train one with esper train-policy)")
    try:
        return PPOPolicy.load(path, contract, greedy=greedy)
    except ValueError as error:
        raise RunError(f"{path}: {error}") from None
    except Exception as error:  # torch's unpickler: a file that is not a checkpoint at all
        raise RunError(f"'{path}' is not a policy checkpoint ({type(error).__name__})") from None


def check_simulated(config: RunConfig) -> None:
    """Options with no meaning for the simulated backend are config errors (runtime §5.4)."""
    if config.train.amp != "off":
        raise ConfigError(f"train.amp = '{config.train.amp}' has no meaning for the simulated backend (use --amp off)")
    if config.train.compile:
        raise ConfigError("train.compile has no meaning for the simulated backend (set train.compile=false)")
    if config.run.device.startswith("cuda"):
        raise ConfigError(f"device '{config.run.device}' has no meaning for the simulated backend "
                          "(use --device cpu or auto)")
    if config.run.device not in ("auto", "cpu"):
        resolve_device(config.run.device)  # the usual one-line error for an unknown name
    if config.run.data:
        raise ConfigError("the simulated backend reads no data (omit --data)")


def simulated_data(spec: Any, context: int | None) -> TaskData:
    """The task without its data: the simulated backend needs only the spec and the host shapes."""
    from esper.compute.hosts import CNN_PRESETS
    from esper.tasks import Split

    if spec.topology == "transformer":
        empty = Split(torch.zeros((0,), dtype=torch.uint8))
    else:
        p = CNN_PRESETS[spec.host_preset]
        empty = Split(torch.zeros((0, p.in_channels, p.image_size, p.image_size)), torch.zeros((0,), dtype=torch.int64))
    return TaskData(spec, empty, empty, empty, data_digest=None, context=context)


def load_data(config: RunConfig, check_policy: bool = True) -> TaskData:
    """Fail before the first epoch: every name, the device and the data are checked here, before a
    run directory exists (runtime §8, rule 1)."""
    check_slots(config)
    simulated = config.run.backend == "simulated"
    if simulated:
        check_simulated(config)
    else:
        try:
            check_precision(config.train.amp, resolve_device(config.run.device))
        except SetupError as error:
            raise ConfigError(str(error)) from None
    spec = get_task(config.run.task)
    if check_policy:
        make_controller(config)
    preset = config.task.host or spec.host_preset
    presets = TRANSFORMER_PRESETS if spec.topology == "transformer" else {spec.host_preset: None}
    if preset not in presets:
        raise RunError(f"unknown host preset '{preset}' for task {spec.name} (choose from {', '.join(presets)})")
    context = TRANSFORMER_PRESETS[preset].block_size if spec.topology == "transformer" else None
    if simulated:
        policy_blueprints(config, spec.topology)
        return simulated_data(attrs.evolve(spec, host_preset=preset), context)
    data = load_task(config.run.task, config.run.data or None, context)
    policy_blueprints(config, spec.topology)
    return attrs.evolve(data, spec=attrs.evolve(spec, host_preset=preset))


# -- the run directory ----------------------------------------------------------------------


def create_run_dir(out: Path, name: str | None, config: RunConfig) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    if name:
        path = out / name
        if path.exists() and any(path.iterdir()):
            raise RunError(f"run directory '{path}' already exists and is not empty (choose another --name)")
        path.mkdir(exist_ok=True)
        return path
    kind = config.run.policy.split(":")[0]
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    base = f"{config.run.task}-{kind}-{stamp}-s{config.run.seed}"
    for k in range(1, 10_000):
        path = out / (base if k == 1 else f"{base}-{k}")
        try:
            path.mkdir()  # atomic: the first free name wins
            return path
        except FileExistsError:
            continue
    raise RunError(f"no free run directory name under '{out}'")


def write_config(run_dir: Path, config: RunConfig) -> None:
    """`config.toml`, whole or not at all: resume reads it when the log holds no complete batch."""
    path = run_dir / CONFIG_NAME
    staging = run_dir / (CONFIG_NAME + ".tmp")
    with open(staging, "w") as f:
        f.write(dump_toml(unstructure(config)))
        f.flush()
        os.fsync(f.fileno())
    os.rename(staging, path)
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- running ----------------------------------------------------------------------------------


class Interrupt:
    """The first SIGINT/SIGTERM lets the epoch finish; a second one stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "Interrupt":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def configure_torch(config: RunConfig, device: torch.device) -> int:
    threads = config.run.threads or max(1, os.cpu_count() or 1)
    torch.set_num_threads(threads)
    if config.run.deterministic and device.type == "cuda":
        # cuBLAS is deterministic only with a fixed workspace, chosen before its first use; without
        # it deterministic mode refuses every matrix multiply on CUDA.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(config.run.deterministic)
    torch.manual_seed(config.run.seed)  # a guard: every real draw comes from a named stream
    return threads


class Run:
    """One `esper run`: its config, data, backend, controller, engine and log writer."""

    def __init__(self, config: RunConfig, run_dir: Path, data: TaskData,
                 on_epoch: Callable[[Engine, ev.EpochCompleted], None] | None = None):
        self.config, self.run_dir, self.data = config, run_dir, data
        simulated = config.run.backend == "simulated"
        self.device = torch.device("cpu") if simulated else resolve_device(config.run.device)
        self.threads = configure_torch(config, self.device)
        spec = data.spec
        self.blueprints = policy_blueprints(config, spec.topology)
        if simulated:
            self.backend = SimulatedBackend(spec, config.simulated, config.train, config.lifecycle, config.run.slots,
                                            data.context)
        elif config.run.backend == "ddp":
            self.backend = distributed.start(data, config.train, config.lifecycle, config.run.slots, self.device,
                                             config.dist)
            self.device = self.backend.device  # cuda:LOCAL_RANK on CUDA
        else:
            self.backend = TorchBackend(data, config.train, config.lifecycle, config.run.slots, self.device)
        self.first_epoch = 1
        self.started = time.perf_counter()
        if isinstance(self.backend, distributed.Follower):
            self.writer = self.engine = None  # rank 0 alone writes the log and runs the engine (runtime §5.3)
            return
        # config.toml before the log: a run killed at any moment after this leaves a resumable directory.
        write_config(run_dir, config)
        self.writer = LogWriter.create(run_dir / LOG_NAME, fsync=config.run.fsync)
        self.engine = Engine(
            writer=self.writer, run_id=run_dir.name, backend=self.backend, controller=make_controller(config),
            reward=make_reward_function(config.reward, config.ppo.gamma),
            governor=Governor(config.governor, spec.l_rand), blueprints=self.blueprints, l_rand=spec.l_rand,
            snapshot_every=config.governor.snapshot_every,
            counterfactual_all_off=config.train.counterfactual_all_off,
            checkpoint=self._checkpoint if config.run.checkpoint_every else None, on_epoch=on_epoch,
        )

    def header(self, forked_from: ev.ForkOrigin | None = None) -> ev.RunStarted:
        spec = self.data.spec
        host = self.backend.build(episode_seed(self.config.run.seed, 0, 0), self.config.run.epochs)
        return run_started(
            config=unstructure(self.config), config_hash=config_hash(self.config), seed=self.config.run.seed,
            device=str(self.device), deterministic=self.config.run.deterministic, threads=self.threads,
            task=spec.name, topology=spec.topology, host=host, enabled=self.config.run.slots,
            score_kind=spec.score_kind, data_digest=self.data.data_digest, forked_from=forked_from,
            world_size=getattr(self.backend, "world_size", 1),
        )

    def start(self) -> None:
        self.engine.start_run(self.header(), self.config.run.seed)
        host_params, _ = self.backend.param_counts()
        self.engine.start_episode(0, self.backend.episode_seed, self.config.run.epochs, self.config.run.slots,
                                  host_params)
        self.engine.writer.commit()

    def _checkpoint(self, engine: Engine, epoch: int) -> None:
        if epoch % self.config.run.checkpoint_every:
            return
        covers = self.writer.next_seq - 1
        env_state = engine.state.envs[0]
        state = {
            "format": CHECKPOINT_FORMAT, "epoch": epoch, "covers_seq": covers,
            "digest": state_digest(env_state), "backend": self.backend.state_dict(),
            "governor": engine.governor.state_dict(), "controller": engine.controller.state_dict(),
            "snapshot": engine.snapshot,
        }
        path, sha, size = write_checkpoint(self.run_dir, epoch, state)
        engine.execute(cmd.RecordCheckpoint(path=path, sha256=sha, size=size, covers_seq=covers, kind="full"))

    def train(self, interrupt: Interrupt) -> str:
        for epoch in range(self.first_epoch, self.config.run.epochs + 1):
            finished = self.engine.step(0, epoch)
            if self.config.run.checkpoint_every:
                prune(self.run_dir, self.config.run.keep_checkpoints)
            if finished:
                return "completed"
            if interrupt.requested:
                return "interrupted"
        return "completed"

    def finish(self, status: str, error: BaseException | None = None) -> dict[str, float | None]:
        final: dict[str, float | None] = {}
        env_state = self.engine.state.envs.get(0)
        if env_state is not None:
            final = {"val_acc": env_state.last_val_acc, "val_loss": env_state.last_val_loss,
                     "best_val_acc": env_state.best_val_acc}
        if status == "completed":
            test = self.backend.test()
            final.update(test_acc=test.score, test_loss=test.loss)
        self.engine.execute(cmd.FinishRun(
            status=status, final=final, error_type=type(error).__name__ if error else None,
            error_message=str(error) if error else None, wall_time_s=time.perf_counter() - self.started,
        ))
        self.writer.close()
        return final

    def outcome(self, status: str, final: dict[str, float | None]) -> RunOutcome:
        env_state = self.engine.state.envs.get(0)
        return RunOutcome(run_dir=self.run_dir, status=status, epochs=env_state.epoch if env_state else 0,
                          final=final, seeds=self.engine.projector.snapshot().seeds)


def execute(run: Run, resume: bool = False) -> RunOutcome:
    """Train to the end (or an interrupt); a failure still writes RunFinished(failed) when it can."""
    if run.engine is None:  # a follower rank: rank 0 decides when the run ends
        with Interrupt():
            run.backend.follow()
        return RunOutcome(run_dir=run.run_dir, status="followed", epochs=0, final={}, seeds=())
    leader = isinstance(run.backend, distributed.Leader)
    try:
        outcome = _execute(run, resume)
    except BaseException:
        if leader:
            # Release the other ranks; if they are gone, what stopped this one is the error to report.
            with contextlib.suppress(PeerLost):
                run.backend.close()
        raise
    if leader:
        run.backend.close()
    return outcome


def _execute(run: Run, resume: bool) -> RunOutcome:
    # Closing the writer is a no-op after finish; else it releases the lock of a writer that failed.
    status = drive(run, resume, run.writer.close)
    return run.outcome(status, run.finish(status))


def drive(job: Any, resume: bool, close: Callable[[], None]) -> str:
    """Start `job` (a run or a training) unless resumed and train it to the end or an interrupt;
    the status it ended with. A failure still writes RunFinished(failed) when it can, then re-raises."""
    try:
        with Interrupt() as interrupt:
            if not resume:
                job.start()
            return job.train(interrupt)
    except BaseException as error:
        status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
        try:
            job.finish(status, None if status == "interrupted" else error)
        except Exception:
            pass  # the log stays valid up to its last commit; the original error is what matters
        finally:
            try:
                close()
            except Exception:
                pass
        raise


# -- resume -----------------------------------------------------------------------------------


def resume(parent: Path, out: Path | None, overrides: dict[str, Any],
           on_epoch: Callable[[Engine, ev.EpochCompleted], None] | None = None, data: TaskData | None = None) -> Run:
    """A fork at the newest usable checkpoint into `<parent>.r<k>` (runtime §6.4).

    `overrides` is a config layer (sections of keys, as `--config`, the flags and `--set` give;
    `data`, when given, was loaded for the configuration they resolve to):
    only `run.device` may differ from the recorded configuration, and `run.epochs` may grow. A
    larger `run.epochs` extends the episode the checkpoint left running (EpisodeExtended, before its
    next epoch); with no usable checkpoint the run starts again with the new length."""
    records, config = resumed_run_config(parent, overrides)
    cut, checkpoint = _usable_checkpoint(parent, records)
    run_dir = sibling_dir(parent, out)
    run = Run(config, run_dir, data or load_data(config), on_epoch)
    origin = fork_origin(parent, records, cut)
    engine = run.engine
    engine.start_run(run.header(origin), config.run.seed)
    if checkpoint is None:  # nothing usable: start again from the beginning, same config
        host_params, _ = run.backend.param_counts()
        engine.start_episode(0, run.backend.episode_seed, config.run.epochs, config.run.slots, host_params)
        run.writer.commit()
        return run
    _copy_prefix(run, records[1:cut + 1])
    try:
        run.backend.load_state_dict(checkpoint["backend"])
        engine.governor.load_state_dict(checkpoint["governor"])
        engine.controller.load_state_dict(checkpoint["controller"])
        engine.snapshot = checkpoint["snapshot"]
        run.first_epoch = checkpoint["epoch"] + 1
    except Exception as error:  # shapes, groups, names or keys the configuration does not have
        failure = checkpoint_mismatch(parent / records[cut].event.path, error)
        try:
            run.finish("failed", failure)
        finally:
            run.writer.close()
            if isinstance(run.backend, distributed.Leader):
                run.backend.close()  # the other ranks wait for the epoch that will not come
        raise failure from None
    env = engine.state.envs.get(0)
    if env is not None and env.status == "running" and config.run.epochs > env.max_epochs:
        extend_episode(run, config.run.epochs)  # a larger --epochs: before the next epoch
    run.writer.commit()
    return run


def checkpoint_mismatch(path: Path, error: Exception) -> RunError:
    problem = " ".join(str(error).split())[:300] or type(error).__name__
    return RunError(f"checkpoint '{path}' does not match the run's configuration: {problem} (it was not written "
                    "by this run)")


def resumed_run_config(parent: Path, overrides: dict[str, Any]) -> tuple[list, RunConfig]:
    """The parent's records, and the configuration a resume of it runs with."""
    records, recorded = read_parent(parent, "run")
    return records, resumed_config(recorded, overrides, extend=("run.epochs", "--epochs"))


def extend_episode(run: Run, max_epochs: int) -> None:
    """Lengthen env 0's running episode: the log records the new length first, then the backend's
    lr schedule stretches to it (the caller resets the controller with it, or has)."""
    run.engine.execute(cmd.ExtendEpisode(env=0, max_epochs=max_epochs), env=0)
    run.backend.extend(max_epochs)


def read_parent(parent: Path, what: str) -> tuple[list, RunConfig]:
    """The records of the log being resumed and the configuration it recorded: RunStarted's, or
    config.toml's when the log holds no complete batch (the run then starts again)."""
    log = parent / LOG_NAME
    if not log.is_file():
        raise RunError(f"'{parent}' holds no run log to resume (no {LOG_NAME}: the {what} never started; "
                       "start it again)")
    records = list(LogReader(log).records())
    if records and not isinstance(records[0].event, ev.RunStarted):
        raise RunError(f"'{parent}' holds no readable run log to resume")
    return records, structure(records[0].event.config) if records else recorded_config(parent)


def fork_origin(parent: Path, records: list, cut: int) -> ev.ForkOrigin:
    """Where a resumed log comes from; with no complete batch nothing is copied: seq -1, and the
    prefix is the header alone."""
    seq = cut if records else -1
    return ev.ForkOrigin(run_id=records[0].run_id if records else parent.name, seq=seq,
                         prefix_sha256=prefix_sha256(parent / LOG_NAME, seq))


def recorded_config(parent: Path) -> RunConfig:
    path = parent / CONFIG_NAME
    if not path.is_file():
        raise RunError(f"'{parent}' holds no recorded run to resume: its log has no complete batch and there is "
                       f"no {CONFIG_NAME} (start the run again)")
    return structure(read_file(path))


def resumed_config(recorded: RunConfig, overrides: dict[str, Any],
                   extend: tuple[str, str] | None = None) -> RunConfig:
    """Only `run.device` and the `extend` key (extend only: `run.epochs` for a run, `ppo.rounds`
    for a training) may change on resume; any other key that differs from the recorded
    configuration is an error naming it (no option is ignored)."""
    key_extended, flag = extend or (None, None)
    allowed = f"only {flag} and --device may change" if flag else "only --device may change"
    config = structure(merge(unstructure(recorded), overrides))
    before, after = _dotted(unstructure(recorded)), _dotted(unstructure(config))
    for key, value in after.items():
        if value == before.get(key) or key == "run.device":
            continue
        if key == key_extended and value > before[key]:
            continue
        if key == key_extended:
            raise RunError(f"{flag} {value} would shorten the run ({key} = {before[key]} recorded); resume can "
                           "only extend it")
        raise RunError(f"config key '{key}' differs from the run being resumed ({before.get(key)!r} recorded, "
                       f"{value!r} given; {allowed})")
    return config


def _dotted(data: dict[str, Any]) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, values in data.items() for key, value in values.items()}


def _usable_checkpoint(parent: Path, records: list) -> tuple[int, dict | None]:
    """The newest checkpoint in the complete prefix whose digest matches the folded log."""
    from esper.lifecycle.fold import fold

    for record in reversed(records):
        event = record.event
        if not isinstance(event, ev.CheckpointWritten):
            continue
        path = parent / event.path
        if not path.exists():
            continue
        try:
            state = read_checkpoint(path)
        except Exception:
            continue
        folded = fold(r for r in records if r.seq <= event.covers_seq).state
        env_state = folded.envs.get(0)
        if state.get("format") == CHECKPOINT_FORMAT and env_state is not None and \
                state_digest(env_state) == state["digest"]:
            return record.seq, state
    return 0, None


def sibling_dir(parent: Path, out: Path | None) -> Path:
    base = out if out is not None else parent.parent
    base.mkdir(parents=True, exist_ok=True)
    for k in range(1, 10_000):
        path = base / f"{parent.name}.r{k}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RunError(f"no free directory name for resuming '{parent}'")


def _copy_prefix(run: Run, records: list) -> None:
    """Re-append the parent's records (same batches, new run id) and fold them into the engine."""
    batch: list = []
    for record in records:
        batch.append(record)
        if record.batch_end:
            before = run.engine.state
            stamped = run.writer.append_batch(run.engine.run_id, batch[0].env, batch[0].episode,
                                              [r.event for r in batch])
            for new in stamped:
                run.engine.absorb(new, before)
            batch = []
    if 0 in run.engine.state.envs:
        run.engine.controller.reset(0, run.engine.state.envs[0].episode, run.config.run.epochs)


__all__ = ["ConfigError", "Run", "RunError", "RunOutcome", "create_run_dir", "execute", "extend_episode", "load_data",
           "resume", "resumed_run_config"]
