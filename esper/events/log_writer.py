"""The single writer of a log (events spec §5.2): batches, group commit, fatal fsync failures."""

import os
import sys
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

import msgspec

from esper.events.catalogue import Event, RunStarted
from esper.events.envelope import SCHEMA_VERSION, Record
from esper.events.log_errors import LogError, LogExistsError, LogFsyncError
from esper.events.log_files import (
    acquire_writer_lock,
    fsync_dir,
    fsync_file,
    release_writer_lock,
    save_aside,
    write_all,
)
from esper.events.log_format import CHUNK, FRAME_HEAD, MAX_PAYLOAD, header_bytes
from esper.events.log_scan import LogSummary, RecordStream

FSYNC_POLICIES = ("always", "epoch", "never")


class LogWriter:
    """Build with `create` or `open_append`; use as a context manager or call `close`."""

    def __init__(self, path: Path, fd: int, lock_fd: int, fsync_policy: str, next_seq: int, run_id: str | None):
        self.path, self.fsync_policy = path, fsync_policy
        self._fd, self._lock_fd = fd, lock_fd
        self._run_id = run_id
        self._next_seq = next_seq
        self._buf = bytearray()
        self._written_seq = next_seq - 1 if next_seq else None  # the last seq handed to the OS
        self._committed_seq = self._written_seq
        self._failed: str | None = None  # the operation that failed; the writer is dead after it
        self._closed = False
        self._encode = msgspec.msgpack.Encoder().encode

    @classmethod
    def create(cls, path: str | Path, fsync: str = "epoch") -> "LogWriter":
        """A new log holding only the header. Refuses an existing file."""
        path = Path(path)
        _check_policy(fsync)
        lock_fd = acquire_writer_lock(path)
        try:
            fd = _create_file(path, durable=fsync != "never")
        except BaseException:
            release_writer_lock(lock_fd)
            raise
        return cls(path, fd, lock_fd, fsync, 0, None)

    @classmethod
    def open_append(cls, path: str | Path, fsync: str = "epoch") -> "LogWriter":
        """Reopen after the shared scan; a torn tail is cut back to the last complete batch and
        saved aside as `<log>.torn-<offset>`. Damage anywhere else raises and changes nothing."""
        path = Path(path)
        _check_policy(fsync)
        if not path.is_file():
            raise LogError(f"cannot open log {path}: no such file")
        lock_fd = acquire_writer_lock(path)
        try:
            stream = RecordStream(path, payloads=False, probe=False)
            for _ in stream:
                pass
            summary = stream.summary
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            try:
                if summary.tail == "torn":
                    _cut_torn_tail(path, fd, summary)
                elif fsync != "never":
                    fsync_file(fd, path)  # the previous writer may have left pages unsynced
            except BaseException:
                os.close(fd)
                raise
        except BaseException:
            release_writer_lock(lock_fd)
            raise
        next_seq = 0 if summary.last_seq is None else summary.last_seq + 1
        return cls(path, fd, lock_fd, fsync, next_seq, summary.run_id)

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def last_committed_seq(self) -> int | None:
        """The last seq the policy has made durable: fsynced under always/epoch, written under never."""
        return self._committed_seq

    def append_batch(
        self, run_id: str, env: int | None, episode: int | None, events: Sequence[Event]
    ) -> list[Record]:
        """Stamp and buffer one command's events as a unit; under `always` they are on disk on return."""
        self._check_usable()
        if not events:
            return []
        seq = self._next_seq
        if seq == 0 and type(events[0]) is not RunStarted:
            raise ValueError(f"the first record of a log must be RunStarted, not {type(events[0]).__name__}")
        if self._run_id is not None and run_id != self._run_id:
            raise ValueError(f"run_id {run_id!r} differs from the log's {self._run_id!r}")
        ts = time.time_ns() // 1000
        last = seq + len(events) - 1
        buf, encode, head, crc32 = self._buf, self._encode, FRAME_HEAD.pack, zlib.crc32
        start = len(buf)
        records = []
        try:
            for event in events:
                record = Record(
                    seq=seq, run_id=run_id, env=env, episode=episode, ts=ts,
                    schema=SCHEMA_VERSION, batch_end=seq == last, event=event,
                )
                payload = encode(record)
                if len(payload) > MAX_PAYLOAD:
                    raise ValueError(f"record {seq} encodes to {len(payload)} bytes (at most {MAX_PAYLOAD})")
                buf += head(len(payload), crc32(payload))
                buf += payload
                records.append(record)
                seq += 1
        except BaseException:
            del buf[start:]  # a batch enters the buffer whole or not at all
            raise
        self._next_seq = seq
        self._run_id = run_id
        if self.fsync_policy == "always":
            self._flush(durable=True)
        elif len(buf) > CHUNK:
            self._flush(durable=False)
        return records

    def commit(self) -> None:
        """The durable point: the engine calls it after each step's last batch."""
        self._check_usable()
        if self.fsync_policy == "epoch" and self._committed_seq != self._next_seq - 1:
            self._flush(durable=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._failed is None:
                self._flush(durable=self.fsync_policy != "never")
        finally:
            os.close(self._fd)
            release_writer_lock(self._lock_fd)

    def __enter__(self) -> "LogWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise LogFsyncError(self.path, self._failed)
        if self._closed:
            raise LogError(f"the writer of {self.path} is closed")

    def _flush(self, durable: bool) -> None:
        try:
            if self._buf:
                # Until the buffer is known to be in the file, the writer counts as failed: an
                # exception part-way (KeyboardInterrupt from a second SIGINT) leaves an unknown part
                # written, and writing the buffer again would repeat frames mid-file.
                self._failed = "interrupted write"
                try:
                    write_all(self._fd, self._buf)
                except OSError as exc:
                    raise LogFsyncError(self.path, "write", exc) from exc
                self._buf.clear()
                self._written_seq = self._next_seq - 1
                self._failed = None
            if durable:
                fsync_file(self._fd, self.path)
        except LogFsyncError as exc:
            self._failed = exc.operation
            raise
        if durable or self.fsync_policy == "never":
            self._committed_seq = self._written_seq


def _check_policy(policy: str) -> None:
    if policy not in FSYNC_POLICIES:
        raise ValueError(f"fsync policy {policy!r} is not one of {', '.join(FSYNC_POLICIES)}")


def _create_file(path: Path, durable: bool) -> int:
    """The header is written under a temporary name and linked into place, so a crash never leaves
    a log too short to open; link, unlike rename, refuses to replace an existing file."""
    staging = path.with_name(path.name + ".creating")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    try:
        try:
            write_all(fd, header_bytes())
            if durable:
                fsync_file(fd, path)
            os.link(staging, path)
        finally:
            staging.unlink(missing_ok=True)
        if durable:
            fsync_dir(path)
    except FileExistsError:
        os.close(fd)
        raise LogExistsError(path) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _cut_torn_tail(path: Path, fd: int, summary: LogSummary) -> None:
    aside = save_aside(path, "torn", summary.torn_offset)
    os.ftruncate(fd, summary.torn_offset)
    fsync_file(fd, path)
    fsync_dir(path)
    print(
        f"esper: warning: {path} had a torn tail at offset {summary.torn_offset}: {summary.torn_bytes} bytes "
        f"cut and saved to {aside}; continuing at seq {0 if summary.last_seq is None else summary.last_seq + 1}",
        file=sys.stderr,
    )
