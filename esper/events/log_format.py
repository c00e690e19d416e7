"""The byte layout of a log file (events spec §5.1): a 16-byte header, then checksummed frames."""

import struct
import zlib
from pathlib import Path

from esper.events.envelope import LOG_FORMAT
from esper.events.log_errors import LogHeaderError

MAGIC = b"\x89ESPLOG\n"
CHECKSUM_CRC32 = 1
HEADER = struct.Struct("<8sHHI")
HEADER_SIZE = HEADER.size
FRAME_HEAD = struct.Struct("<II")  # payload length, CRC-32 of the payload
FRAME_HEAD_SIZE = FRAME_HEAD.size
MAX_PAYLOAD = 16 * 1024 * 1024
# Writers flush a buffer past this size early; readers read in chunks of it.
CHUNK = 1024 * 1024
LOG_NAME = "events.elog"


def header_bytes() -> bytes:
    body = MAGIC + struct.pack("<HH", LOG_FORMAT, CHECKSUM_CRC32)
    return body + struct.pack("<I", zlib.crc32(body))


def check_header(path: Path, data: bytes) -> None:
    if len(data) < HEADER_SIZE:
        raise LogHeaderError(path, f"{len(data)} bytes is shorter than the {HEADER_SIZE}-byte header")
    magic, version, checksum, crc = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise LogHeaderError(path, "bad magic bytes")
    if crc != zlib.crc32(data[:12]):
        raise LogHeaderError(path, "header checksum mismatch")
    if version != LOG_FORMAT:
        raise LogHeaderError(path, f"format version {version} (this esper reads {LOG_FORMAT}; upgrade esper)")
    if checksum != CHECKSUM_CRC32:
        raise LogHeaderError(path, f"checksum algorithm {checksum} is not supported (only 1, CRC-32)")


def resolve(path: str | Path) -> Path:
    """A run directory stands for the log inside it."""
    path = Path(path)
    return path / LOG_NAME if path.is_dir() else path
