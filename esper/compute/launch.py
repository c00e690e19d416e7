"""`esper run --nproc N` (runtime §5.3) and `esper train-policy --nproc N` (policy §7.4): torchrun's
launcher starts N local processes of the same command.

Interruption (runtime §6.5). torch's agent starts every worker in a session of its own, so a
terminal's Ctrl-C reaches the launcher alone, and the launcher passes it on. Left to torch, its
agent forwards the first SIGINT/SIGTERM to the workers and SIGKILLs any still running after
`shutdown_timeout` (30 s by default): an epoch longer than that would never be committed, and the
run would end without `RunFinished`. So on Linux the launcher takes SIGINT and SIGTERM itself
(torch's agent keeps SIGHUP and SIGQUIT). The first is passed on to every worker, and the launcher
waits, without a deadline, until they have wound down: rank 0 finishes the epoch, commits it,
writes `RunFinished(interrupted)` and releases the others; the launcher exits with rank 0's code,
130. A second one kills every worker at once and the launcher exits 130: the log stays valid to its
last commit (runtime §6.2) and reads as unterminated. (A second SIGINT to the workers themselves
would not stop them at once: a rank inside a collective runs no Python until its peers join it,
and a rank that stops mid-pass leaves the others failing on a lost peer.)
"""

import logging
import os
import signal
import sys
import threading
import time
import uuid
from contextlib import nullcontext
from types import FrameType

# Signals torch's agent keeps: a hang-up or a quit still stops the workers its way.
AGENT_SIGNALS = "SIGHUP,SIGQUIT"
INTERRUPTS = (signal.SIGINT, signal.SIGTERM)
EXIT_INTERRUPTED = 130
POLL_S = 0.05


def launch(nproc: int, args: list[str], command: str = "run") -> int:
    """Run `python -m esper COMMAND ARGS` on `nproc` local processes; returns rank 0's exit code (130
    after a first SIGINT/SIGTERM; 3 when a signal from elsewhere ended rank 0: the run failed because
    a peer did), or 130 when a second signal killed the workers or one came while none ran."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    winding = WindDown() if WindDown.supported() else None
    extra = {"signals_to_handle": AGENT_SIGNALS} if winding else {}
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, **extra)
    # The workers print their own one-line errors; the agent's report of them, or of its signals,
    # would repeat it. Its loggers each carry a level of their own, so the parent's is not enough.
    quiet = Quiet("torch.distributed.elastic")
    try:
        with quiet, winding or nullcontext():
            elastic_launch(config, sys.executable)("-m", "esper", command, *args)
    except ChildFailedError as error:
        failure = error.failures.get(0)
        if winding is not None and winding.signals and (winding.killed or failure is None or failure.exitcode <= 0):
            # Interrupted, and rank 0 did not end on its own: killed by the second signal, or by
            # the first while it started, before it could take the signal as an interrupt.
            return EXIT_INTERRUPTED
        if failure is None or failure.exitcode <= 0:
            failure = error.get_first_failure()[1]
        return failure.exitcode if failure.exitcode > 0 else 3
    except (SignalException, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return 0


class WindDown:
    """The launcher's SIGINT/SIGTERM handler while its workers run (see the module's docstring)."""

    def __init__(self) -> None:
        self.signals = 0
        self.killed = False
        self._previous: dict[int, object] = {}

    @staticmethod
    def supported() -> bool:
        # The workers are found as this process's children in /proc; elsewhere (or off the main
        # thread, where no handler can be set) torch's agent handles the signals its own way.
        return (sys.platform.startswith("linux") and os.path.isdir(f"/proc/{os.getpid()}")
                and threading.current_thread() is threading.main_thread())

    def __enter__(self) -> "WindDown":
        for sig in INTERRUPTS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signals += 1
        workers = children()
        if not workers:  # none started yet, or all gone: nothing to wind down, the launcher stops
            raise KeyboardInterrupt
        if self.signals == 1:
            send(workers, signum)
            # Wait here, so torch's agent looks again only once every worker has ended: it then
            # sees rank 0's exit code and has nothing left to kill. A second signal interrupts the
            # wait (this handler runs again), then the wait goes on.
            while any(running(pid) for pid in workers):
                time.sleep(POLL_S)
        else:
            self.killed = True
            send(workers, signal.SIGKILL, group=True)


def children() -> list[int]:
    """This process's children that have not exited: torch's agent starts nothing else."""
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit() and running(int(entry))]


def running(pid: int) -> bool:
    """Whether `pid` is a child of this process that has not exited. An exited one stays a zombie
    until torch's agent reaps it, which only it may do: it reads the exit code then."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    state, ppid = stat[stat.rindex(b")") + 2:].split()[:2]  # after "pid (comm) "
    return int(ppid) == os.getpid() and state != b"Z"


def send(pids: list[int], sig: int, group: bool = False) -> None:
    for pid in pids:
        try:
            if group and os.getpgid(pid) == pid:  # torch starts each worker as a session leader
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            pass


class Quiet:
    """Silence a logger and every logger below it, then restore their levels."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._levels: dict[logging.Logger, int] = {}

    def __enter__(self) -> "Quiet":
        names = [self.prefix] + [n for n in logging.root.manager.loggerDict if n.startswith(self.prefix + ".")]
        for name in names:
            logger = logging.getLogger(name)
            self._levels[logger] = logger.level
            logger.setLevel(logging.CRITICAL)
        return self

    def __exit__(self, *exc: object) -> None:
        for logger, level in self._levels.items():
            logger.setLevel(level)

