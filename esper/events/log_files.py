"""The files around a log: its `.lock` sidecar, directory fsyncs and the copies of cut bytes."""

import fcntl
import os
from pathlib import Path

from esper.events.log_errors import LogFsyncError, LogLockedError


def lock_path(log: Path) -> Path:
    return log.with_name(log.name + ".lock")


def acquire_writer_lock(log: Path) -> int:
    """Take the exclusive lock or fail at once; the pid in the sidecar is only for the error message."""
    lock = lock_path(log)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _read_pid(fd)
        os.close(fd)
        raise LogLockedError(log, lock, pid) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def release_writer_lock(fd: int) -> None:
    # The sidecar stays: deleting it would let a process that opened the old inode lock a file
    # nobody else can see.
    os.close(fd)


def writer_active(log: Path) -> bool:
    """A shared-lock probe that never creates the sidecar (readers do not modify anything)."""
    try:
        fd = os.open(lock_path(log), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None


def write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    finally:
        view.release()


def fsync_file(fd: int, path: Path) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        raise LogFsyncError(path, "fsync", exc) from exc


def fsync_dir(path: Path) -> None:
    """Makes a file's creation, rename or truncation durable, not just its contents."""
    directory = path.parent
    fd = os.open(directory, os.O_RDONLY)
    try:
        fsync_file(fd, directory)
    finally:
        os.close(fd)


def save_aside(log: Path, kind: str, start: int) -> Path:
    """Copy the log's bytes from `start` to its end into `<log>.<kind>-<start>` and fsync the copy.
    An earlier copy with that name is kept: a name suffix is added instead."""
    base = f"{log}.{kind}-{start}"
    dest, n = Path(base), 0
    while True:
        try:
            out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            n += 1
            dest = Path(f"{base}.{n}")
    try:
        with open(log, "rb") as src:
            src.seek(start)
            while chunk := src.read(1024 * 1024):
                write_all(out, chunk)
        fsync_file(out, dest)
    finally:
        os.close(out)
    fsync_dir(dest)
    return dest
