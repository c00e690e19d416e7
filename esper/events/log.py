"""The log file of events (events spec §5): its public names, plus the two whole-file operations,
JSON lines export and the operator's repair."""

import hashlib
import os
import sys
from pathlib import Path

from esper.events.codec import record_to_json
from esper.events.log_errors import (
    LogCorruptError,
    LogError,
    LogExistsError,
    LogFsyncError,
    LogHeaderError,
    LogLockedError,
    UnknownEventType,
)
from esper.events.log_files import acquire_writer_lock, fsync_dir, fsync_file, release_writer_lock, save_aside
from esper.events.log_format import FRAME_HEAD, FRAME_HEAD_SIZE, HEADER_SIZE, LOG_NAME, check_header, resolve
from esper.events.log_reader import LogReader
from esper.events.log_scan import LogSummary, RecordStream
from esper.events.log_writer import FSYNC_POLICIES, LogWriter

__all__ = [
    "FSYNC_POLICIES",
    "LOG_NAME",
    "LogCorruptError",
    "LogError",
    "LogExistsError",
    "LogFsyncError",
    "LogHeaderError",
    "LogLockedError",
    "LogReader",
    "LogSummary",
    "LogWriter",
    "RecordStream",
    "UnknownEventType",
    "export_jsonl",
    "repair",
    "prefix_sha256",
    "resolve",
]


def export_jsonl(log_path: str | Path, out_path: str | Path) -> LogSummary:
    """One JSON line per record in seq order, through the last complete batch. The file appears
    only when the export succeeded, so a failed export never looks like a short log."""
    out_path = Path(out_path)
    stream = LogReader(log_path).records()
    partial = out_path.with_name(out_path.name + ".partial")
    try:
        with open(partial, "wb") as out:
            for record in stream:
                out.write(record_to_json(record))
                out.write(b"\n")
        os.replace(partial, out_path)
    finally:
        partial.unlink(missing_ok=True)
    summary = stream.summary
    through = "no records" if summary.last_seq is None else f"through seq {summary.last_seq}"
    if summary.tail == "torn":
        print(
            f"esper: warning: {log_path} has a torn tail at offset {summary.torn_offset} "
            f"({summary.torn_bytes} bytes); exported {through}",
            file=sys.stderr,
        )
    elif summary.tail == "live":
        print(f"esper: warning: {log_path} is being written; exported {through}", file=sys.stderr)
    return summary


def repair(log_path: str | Path, truncate_at: int) -> Path | None:
    """Cut the log at `truncate_at`, first saving the bytes from there in `<log>.removed-<offset>`.
    Returns that copy, or None when there was nothing after the offset."""
    path = Path(log_path)
    if not path.is_file():
        raise LogError(f"cannot open log {path}: no such file")
    lock_fd = acquire_writer_lock(path)
    try:
        with open(path, "rb") as f:
            check_header(path, f.read(HEADER_SIZE))
        size = path.stat().st_size
        if not HEADER_SIZE <= truncate_at <= size:
            raise LogError(f"offset {truncate_at} is outside {path}'s frames ({HEADER_SIZE}..{size})")
        if truncate_at == size:
            return None
        aside = save_aside(path, "removed", truncate_at)
        fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, truncate_at)
            fsync_file(fd, path)
        finally:
            os.close(fd)
        fsync_dir(path)
        return aside
    finally:
        release_writer_lock(lock_fd)


def prefix_sha256(log_path: str | Path, through_seq: int) -> str:
    """sha256 of the log's bytes from the header through the frame of record `through_seq`: a fork
    names its parent's prefix this way (events §7)."""
    digest = hashlib.sha256()
    with open(resolve(log_path), "rb") as f:
        digest.update(f.read(HEADER_SIZE))
        for _ in range(through_seq + 1):
            head = f.read(FRAME_HEAD_SIZE)
            if len(head) < FRAME_HEAD_SIZE:
                raise LogError(f"'{log_path}' ends before record {through_seq}")
            length, _ = FRAME_HEAD.unpack(head)
            digest.update(head)
            digest.update(f.read(length))
    return digest.hexdigest()
