"""The one scan of a log (events spec §5.3) that readers and the writer share.

Frames are read in chunks, so memory stays bounded by the larger of a chunk and one frame. Records
are released a batch at a time: nothing after the last `batch_end` is ever yielded.
"""

import os
import re
import sys
import zlib
from collections.abc import Iterator
from itertools import chain
from pathlib import Path

import msgspec

from esper.events.catalogue import RunStarted
from esper.events.codec import decode_envelope, decode_record
from esper.events.envelope import RawRecord, Record
from esper.events.log_errors import LogCorruptError, LogError
from esper.events.log_files import writer_active
from esper.events.log_format import CHUNK, FRAME_HEAD, FRAME_HEAD_SIZE, HEADER_SIZE, MAX_PAYLOAD, check_header


class LogSummary(msgspec.Struct, frozen=True, kw_only=True):
    """What a scan found. `records`/`last_seq`/`end_offset` describe the readable part (complete
    batches only); `torn_*` are set only when `tail == "torn"`."""

    path: str
    records: int
    last_seq: int | None
    run_id: str | None
    tail: str  # clean | torn | live
    end_offset: int
    torn_offset: int | None = None
    torn_bytes: int | None = None


class RecordStream:
    """Iterate once for the records from `start_seq` on; `summary` is set when the iteration ends.

    Records before `start_seq` have only their envelope decoded. With `payloads=False` every record
    is yielded as a `RawRecord`. `probe=False` skips the live-writer check (the writer itself scans
    while holding the lock).
    """

    def __init__(self, path: Path, start_seq: int = 0, *, payloads: bool = True, probe: bool = True):
        self.path, self.start_seq, self.payloads, self.probe = Path(path), start_seq, payloads, probe
        self.summary: LogSummary | None = None

    def __iter__(self) -> Iterator[Record | RawRecord]:
        # Whole batches pass through one generator step each, not every record.
        return chain.from_iterable(self.batches())

    def batches(self) -> Iterator[list[Record | RawRecord]]:
        """The same records as iterating, one complete batch (from `start_seq` on) per list."""
        # Probed before and after: a writer that starts or stops during the scan can leave a
        # half-written frame that must read as "live", not "torn".
        live = self.probe and writer_active(self.path)
        try:
            f = open(self.path, "rb")
        except OSError as exc:
            raise LogError(f"cannot open log {self.path}: {exc.strerror}") from None
        with f:
            # Never past this size: a live writer's later frames cannot masquerade as data after damage.
            size = os.fstat(f.fileno()).st_size
            check_header(self.path, f.read(HEADER_SIZE))
            yield from self._frames(f, size)
        if live or (self.probe and writer_active(self.path)):
            self.summary = msgspec.structs.replace(self.summary, tail="live", torn_offset=None, torn_bytes=None)

    def _frames(self, f, size: int) -> Iterator[list[Record | RawRecord]]:
        start_seq = self.start_seq
        decode_from = start_seq if self.payloads else sys.maxsize
        head, crc32, decode_head = FRAME_HEAD.unpack_from, zlib.crc32, decode_envelope
        decode = msgspec.msgpack.Decoder(Record).decode  # codec.decode_record only for the failures
        head_size, max_payload = FRAME_HEAD_SIZE, MAX_PAYLOAD
        buf, base, pos = b"", HEADER_SIZE, 0  # buf[0] lies at file offset `base`
        read_to = HEADER_SIZE  # the file offset `f` has read up to
        expected, run_id, batch = 0, None, []
        cut, cut_seq = HEADER_SIZE, None  # end of the last complete batch, and its last seq
        suspect = None
        need = head_size  # bytes the next step needs from `pos` on
        while suspect is None:
            if pos + need > len(buf):
                rest, buf = buf[pos:], b""  # let the old chunk go before reading the next
                more = f.read(min(max(CHUNK, need - len(rest)), size - read_to))
                read_to += len(more)
                buf, base, pos = rest + more if rest else more, base + pos, 0
                if len(buf) < need:
                    suspect = base if buf else None
                    break
            # Every frame that lies whole in the buffer, without going back to the refill test.
            n, need = len(buf), head_size
            while pos + head_size <= n:
                length, crc = head(buf, pos)
                body = pos + head_size
                end = body + length
                if not 0 < length <= max_payload:
                    suspect = base + pos
                    break
                if end > n:
                    need = head_size + length
                    break
                payload = buf[body:end]
                if crc32(payload) != crc:
                    suspect = base + pos
                    break
                try:
                    record = decode(payload) if expected >= decode_from else decode_head(payload)
                except (msgspec.MsgspecError, UnicodeDecodeError) as exc:  # bad UTF-8 in a string is the latter
                    raise self._undecodable(payload, base + pos, expected, exc) from None
                if record.seq != expected or record.run_id != run_id:
                    run_id = self._first_run_id(record, base + pos, expected, run_id)
                expected += 1
                pos = end
                if expected > start_seq:
                    batch.append(record)
                if record.batch_end:
                    cut, cut_seq = base + pos, record.seq
                    if batch:
                        yield batch
                        batch = []
        if suspect is not None:
            found = find_valid_frame(f.fileno(), suspect + 1, size, _last(expected))
            if found is not None:
                raise LogCorruptError(self.path, suspect, found, _last(expected))
        torn = cut < size
        self.summary = LogSummary(
            path=str(self.path),
            records=0 if cut_seq is None else cut_seq + 1,
            last_seq=cut_seq,
            run_id=None if cut_seq is None else run_id,
            tail="torn" if torn else "clean",
            end_offset=cut,
            torn_offset=cut if torn else None,
            torn_bytes=size - cut if torn else None,
        )

    def _first_run_id(self, record: Record | RawRecord, offset: int, expected: int, run_id: str | None) -> str:
        """Off the fast path: accept record 0 (and learn the run id) or raise for a broken rule."""
        problem = None
        if record.seq != expected:
            problem = f"seq {record.seq} where {expected} was expected"
        elif expected != 0:
            problem = f"run_id {record.run_id!r} differs from the log's {run_id!r}"
        elif isinstance(record, Record) and type(record.event) is not RunStarted:
            problem = f"the first record is {type(record.event).__name__}, not RunStarted"
        if problem:
            raise LogCorruptError(self.path, offset, None, _last(expected), problem)
        return record.run_id

    def _undecodable(self, payload: bytes, offset: int, expected: int, exc: Exception) -> LogCorruptError:
        """An unknown event type raises `UnknownEventType`; any other decoding failure is corruption."""
        try:
            decode_record(payload, offset)
        except msgspec.MsgspecError:
            pass
        problem = f"checksummed frame does not decode ({exc})"
        return LogCorruptError(self.path, offset, None, _last(expected), problem)


def _last(expected: int) -> int | None:
    """The last good seq, when `expected` is the next one."""
    return expected - 1 if expected else None


# A frame head holds a length of 1 B..16 MiB (so its top byte is 0, or 1 with the rest 0), and its
# payload, a msgpack map, starts with a map marker. Letting the regex engine find these few
# positions keeps the search over a megabyte of zeroed or random tail in the milliseconds.
_CANDIDATE = re.compile(
    rb"(?=(?:[^\x00]..\x00|.[^\x00].\x00|..[^\x00]\x00|\x00\x00\x00\x01)....[\x80-\x8f\xde\xdf])", re.DOTALL
)


def find_valid_frame(fd: int, start: int, size: int, after_seq: int | None) -> int | None:
    """The first offset at or after `start` holding a frame with a matching CRC, a decodable envelope
    and a seq above `after_seq`; None if there is none."""
    head, crc32 = FRAME_HEAD.unpack_from, zlib.crc32
    window_at = start
    while window_at < size:
        # Windows overlap by one frame head, so every position is seen with its head in one piece.
        window = os.pread(fd, min(CHUNK + FRAME_HEAD_SIZE, size - window_at), window_at)
        for match in _CANDIDATE.finditer(window):
            p = match.start()
            if p >= CHUNK:
                break
            length, crc = head(window, p)
            at = window_at + p
            if at + FRAME_HEAD_SIZE + length > size:
                continue
            body_at = p + FRAME_HEAD_SIZE
            payload = (
                window[body_at : body_at + length]
                if body_at + length <= len(window)
                else os.pread(fd, length, at + FRAME_HEAD_SIZE)
            )
            if crc32(payload) != crc:
                continue
            try:
                seq = decode_envelope(payload).seq
            except msgspec.MsgspecError:
                continue
            if after_seq is None or seq > after_seq:
                return at
        window_at += CHUNK
    return None
