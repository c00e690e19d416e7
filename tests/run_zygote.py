"""A fork server for the kill harness (tests/test_kill_run.py).

Starting `python -m esper` costs ~5 s (torch, then torch._dynamo on the first
`use_deterministic_algorithms`) against ~1 s for a whole `synthetic` run, so twenty kill rounds
would spend most of their time importing. This process imports everything once and forks one child
per request; the child runs exactly what `python -m esper` runs, `esper.cli.main.main()` with the
request's argv, in a process of its own that the test kills with a real SIGKILL.

Protocol, one JSON object per line on stdin:
    {"argv": [...], "stdout": PATH, "stderr": PATH, "ack": PATH, "pause": null | [KIND, N, FRACTION]}
answered on stdout by `started PID`, and by `exited PID CODE` (CODE = -SIGNAL when killed) once the
child has ended; several children may run at once. A child stays a zombie, so its pid cannot be
reused, until the line `reap PID`: a late SIGKILL from the test can never reach another process.

`ack`: the child appends `commit SEQ` each time the log writer's `commit` (or `close`) returns,
i.e. each time a prefix of the log has been acknowledged as durable.
`pause`: the child stops at a chosen moment, appends `paused KIND` and sleeps until it is killed:
  - ["log-write", N, F]: in the N-th write to events.elog, after a fraction F of its bytes (a torn
    frame, mid-batch);
  - ["log-fsync", N, _]: just before the N-th fsync of events.elog (written, not yet durable);
  - ["ckpt-write", N, F]: in the N-th checkpoint file write, after a fraction F of its bytes;
  - ["ckpt-rename", N, F]: at the N-th rename of a `.step-*.tmp` directory, before it (F < 0.5)
    or after it (F >= 0.5).
"""

import faulthandler
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

TESTS = Path(__file__).parent
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS)]))


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def _is_log(fd: int) -> bool:
    # The writer's fd was opened on `events.elog.creating`, linked into place and unlinked, so the
    # kernel names it `.../events.elog.creating (deleted)`.
    return os.path.basename(_fd_path(fd)).startswith("events.elog") and ".lock" not in _fd_path(fd)


def _instrument(ack_path: str, pause: list | None) -> None:
    from esper.events.log_writer import LogWriter

    ack = os.open(ack_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def note(line: str) -> None:
        os.write(ack, f"{line}\n".encode())

    commit, close = LogWriter.commit, LogWriter.close

    def acked_commit(self) -> None:
        commit(self)
        if self.last_committed_seq is not None:
            note(f"commit {self.last_committed_seq}")

    def acked_close(self) -> None:
        failed = self._failed is not None
        close(self)
        if not failed and self.last_committed_seq is not None:
            note(f"commit {self.last_committed_seq}")

    LogWriter.commit, LogWriter.close = acked_commit, acked_close
    if pause is None:
        return
    kind, target, fraction = pause
    counts = {"n": 0}

    def stop() -> None:
        note(f"paused {kind}")
        while True:
            time.sleep(60)

    def hit() -> bool:
        counts["n"] += 1
        return counts["n"] == target

    real_write, real_fsync, real_rename = os.write, os.fsync, os.rename

    def write(fd, data):
        path = _fd_path(fd)
        wanted = (kind == "log-write" and _is_log(fd)) or \
                 (kind == "ckpt-write" and ".tmp/" in path and "/checkpoints/.step-" in path)
        if wanted and len(data) > 1 and hit():
            part = max(1, min(len(data) - 1, int(len(data) * fraction)))
            real_write(fd, bytes(data[:part]))
            stop()
        return real_write(fd, data)

    def fsync(fd):
        if kind == "log-fsync" and _is_log(fd) and hit():
            stop()
        return real_fsync(fd)

    def rename(src, dst, *args, **kwargs):
        if kind == "ckpt-rename" and str(src).endswith(".tmp") and "/checkpoints/.step-" in str(src) and hit():
            if fraction >= 0.5:
                real_rename(src, dst, *args, **kwargs)
            stop()
        return real_rename(src, dst, *args, **kwargs)

    os.write, os.fsync, os.rename = write, fsync, rename


def _child(request: dict) -> None:
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    os.dup2(err, 2)
    # SIGUSR1 prints every thread's stack to stderr: how a test shows where a child hangs.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    code = 70
    try:
        _instrument(request["ack"], request.get("pause"))
        sys.argv = ["esper", *request["argv"]]
        from esper.cli.main import main

        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve() -> None:
    import torch  # noqa: F401

    import esper.cli.main  # noqa: F401
    import esper.cli.run_cmd  # noqa: F401  (the runner, backends and tasks)
    import torch._dynamo  # noqa: F401  (imported by torch.use_deterministic_algorithms on first use)

    print("ready", flush=True)
    running: set[int] = set()  # started, exit not yet reported
    unreaped: set[int] = set()  # started, not yet reaped
    pending = b""
    stdin = sys.stdin.buffer.raw
    while True:
        # One thread only (a thread caught holding a lock at fork time would hang the child), so
        # children's exits are polled between reads of the requests.
        for pid in sorted(running):
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            if info is not None:
                code = -info.si_status if info.si_code in (os.CLD_KILLED, os.CLD_DUMPED) else info.si_status
                print(f"exited {pid} {code}", flush=True)
                running.discard(pid)
        if not select.select([stdin], [], [], 0.002)[0]:
            continue
        chunk = os.read(stdin.fileno(), 65536)
        if not chunk:  # the test process is gone: so are the children it left (a paused one sleeps forever)
            for pid in sorted(unreaped):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            return
        pending += chunk
        while b"\n" in pending:
            line, _, pending = pending.partition(b"\n")
            if line.startswith(b"reap "):
                os.waitpid(int(line.split()[1]), 0)
                unreaped.discard(int(line.split()[1]))
                continue
            request = json.loads(line)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(request)
            running.add(pid)
            unreaped.add(pid)
            print(f"started {pid}", flush=True)


class Zygote:
    """The client, in the test process. Every wait is bounded."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__))], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=ENV, cwd=TESTS.parent)
        self._buffer = b""
        self.children: set[int] = set()  # started and not yet reaped: their pids cannot be reused
        self.exits: dict[int, int] = {}
        self.last: int | None = None
        assert self._line(120) == "ready"

    def _line(self, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], max(left, 0))[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError("the fork server died")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def _next(self, timeout: float) -> str | None:
        """The next line that is not an exit report (those are filed in `exits`)."""
        deadline = time.monotonic() + timeout
        while True:
            line = self._line(max(0.0, deadline - time.monotonic()))
            if line is None or not line.startswith("exited "):
                return line
            _, pid, code = line.split()
            self.exits[int(pid)] = int(code)

    def start(self, argv: list[str], files: Path, pause: list | None = None) -> int:
        """Fork a child running `esper ARGV`; its stdout, stderr and acks go to FILES.out/.err/.ack."""
        request = {"argv": argv, "stdout": str(files.with_suffix(".out")), "stderr": str(files.with_suffix(".err")),
                   "ack": str(files.with_suffix(".ack")), "pause": pause}
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        started = self._next(30)
        assert started and started.startswith("started "), started
        pid = int(started.split()[1])
        self.children.add(pid)
        self.last = pid
        return pid

    def ended(self, timeout: float, pid: int | None = None) -> int | None:
        """The exit code of child PID (default: the last started; -9 when killed) once it has ended,
        or None if it is still running after `timeout` seconds."""
        pid = self.last if pid is None else pid
        deadline = time.monotonic() + timeout
        while pid not in self.exits:
            line = self._line(max(0.0, deadline - time.monotonic()))
            if line is None:
                return None
            assert line.startswith("exited "), line
            _, done, code = line.split()
            self.exits[int(done)] = int(code)
        return self.exits[pid]

    def wait_paused(self, files: Path, timeout: float = 60, pid: int | None = None) -> None:
        """Until the child says it has paused; fails if it ends first."""
        ack = files.with_suffix(".ack")
        deadline = time.monotonic() + timeout
        while "paused" not in (ack.read_text() if ack.exists() else ""):
            assert time.monotonic() < deadline, "the child never reached its pause"
            code = self.ended(0.002, pid)
            assert code is None, f"the child ended ({code}) before reaching its pause"

    def reap(self, pid: int | None = None) -> None:
        pid = self.last if pid is None else pid
        self.proc.stdin.write(f"reap {pid}\n".encode())
        self.proc.stdin.flush()
        self.children.discard(pid)
        self.exits.pop(pid, None)

    def run(self, argv: list[str], files: Path, timeout: float = 120) -> tuple[int, str, str]:
        pid = self.start(argv, files)
        code = self.ended(timeout, pid)
        assert code is not None, f"{argv} did not finish within {timeout} s"
        self.reap(pid)
        return code, files.with_suffix(".out").read_text(), files.with_suffix(".err").read_text()

    def close(self) -> None:
        """Ends any child left running (a failed test, or one paused for good), then the server."""
        for pid in sorted(self.children):
            os.kill(pid, signal.SIGKILL)  # not yet reaped: still our child's pid, never another process
            self.ended(30, pid)
            self.reap(pid)
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


if __name__ == "__main__":
    serve()
