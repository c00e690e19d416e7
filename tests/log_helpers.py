"""Shared by the log tests: write logs from batches of example events, and find their frames."""

import struct
import zlib
from pathlib import Path

import msgspec

from esper.events import catalogue as c
from esper.events.codec import encode_record
from esper.events.envelope import SCHEMA_VERSION
from esper.events.log import LogWriter
from esper.events.log_format import FRAME_HEAD, HEADER_SIZE
from event_factory import RUN_ID, all_examples, example

ENV_EVENTS = [e for e in all_examples() if not isinstance(e, c.RunStarted)]


def write_log(path: Path, batches: list[list], fsync: str = "never") -> list:
    """RunStarted alone, then `batches`; returns the records as the writer stamped them."""
    with LogWriter.create(path, fsync=fsync) as writer:
        records = writer.append_batch(RUN_ID, None, None, [example(c.RunStarted)])
        for batch in batches:
            records += writer.append_batch(RUN_ID, 0, 0, batch)
            writer.commit()
    return records


def frames(data: bytes) -> list[tuple[int, int]]:
    """(offset, end) of every whole frame after the header."""
    out, pos = [], HEADER_SIZE
    while pos + FRAME_HEAD.size <= len(data):
        length, _ = FRAME_HEAD.unpack_from(data, pos)
        end = pos + FRAME_HEAD.size + length
        if end > len(data):
            break
        out.append((pos, end))
        pos = end
    return out


def batch_ends(data: bytes, records: list) -> list[int]:
    """The file offset after each batch, in order."""
    return [end for (_, end), r in zip(frames(data), records) if r.batch_end]


def frame(payload: bytes) -> bytes:
    return struct.pack("<II", len(payload), zlib.crc32(payload)) + payload


def future_event_frame(seq: int) -> bytes:
    """A well-formed frame whose payload has a tag this esper does not know."""
    envelope = {
        "seq": seq, "run_id": RUN_ID, "env": 0, "episode": 0, "ts": 1, "schema": SCHEMA_VERSION + 1, "batch_end": True,
        "event": {"type": "FutureEvent", "epoch": 1},
    }
    return frame(msgspec.msgpack.encode(envelope))


def encoded(records) -> list[bytes]:
    """Records compared as bytes: NaN payloads never equal themselves."""
    return [encode_record(r) for r in records]
