"""Everything that can go wrong with a log file, each a one-line message naming the file."""

from pathlib import Path

from esper.events.codec import UnknownEventType

__all__ = [
    "LogError",
    "LogHeaderError",
    "LogCorruptError",
    "LogLockedError",
    "LogExistsError",
    "LogFsyncError",
    "UnknownEventType",
]


class LogError(Exception):
    """A log this version cannot read, write or find."""


class LogHeaderError(LogError):
    """The first 16 bytes are not an esper log header this version understands."""

    def __init__(self, path: Path, problem: str):
        self.path = path
        super().__init__(f"{path} is not a readable esper log: {problem}")


class LogCorruptError(LogError):
    """Damage with valid data after it, or a checksummed frame that breaks the log's rules: never
    skipped and never cut away silently."""

    def __init__(
        self,
        path: Path,
        offset: int,
        next_valid_offset: int | None,
        last_good_seq: int | None,
        problem: str = "damaged frame",
    ):
        self.path, self.offset = path, offset
        self.next_valid_offset, self.last_good_seq = next_valid_offset, last_good_seq
        after = "" if next_valid_offset is None else f", next valid frame at offset {next_valid_offset}"
        good = "none" if last_good_seq is None else last_good_seq
        super().__init__(f"{path} is corrupt at offset {offset}: {problem} (last good seq {good}{after})")


class LogLockedError(LogError):
    """Another process holds the log's writer lock."""

    def __init__(self, path: Path, lock_path: Path, pid: int | None):
        self.path, self.lock_path, self.pid = path, lock_path, pid
        holder = "an unknown pid" if pid is None else f"pid {pid}"
        super().__init__(f"{path} is being written by another process ({lock_path} is held by {holder})")


class LogExistsError(LogError):
    """`create` refuses to write over a file that is already there."""

    def __init__(self, path: Path):
        self.path = path
        super().__init__(f"{path} already exists; a log is never overwritten")


class LogFsyncError(LogError):
    """A write or fsync failed. The kernel may have dropped the dirty pages, so retrying could report
    success for lost data: the writer refuses everything afterwards."""

    def __init__(self, path: Path, operation: str, cause: OSError | None = None):
        self.path, self.operation, self.cause = path, operation, cause
        if cause is None:
            message = f"the writer of {path} stopped after a failed {operation}; nothing more can be appended"
        else:
            message = f"{operation} of {path} failed ({cause.strerror or cause}); the writer has stopped"
        super().__init__(message)
