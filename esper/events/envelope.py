"""The envelope every stored event travels in (events spec §4.2)."""

from typing import ClassVar

import msgspec

from esper.events.catalogue import AnyEvent

# Bump on any new field or type; `esper schemas --check` refuses a changed schema body without it.
# 2: EpisodeExtended. A reader of version 1 stops at it as an unknown type (events §5.4).
SCHEMA_VERSION = 2
LOG_FORMAT = 1


class Record(msgspec.Struct, frozen=True, kw_only=True):
    VOLATILE: ClassVar[frozenset[str]] = frozenset({"run_id", "ts"})
    seq: int
    run_id: str
    env: int | None
    episode: int | None
    ts: int
    schema: int
    batch_end: bool
    event: AnyEvent


class RawRecord(msgspec.Struct, frozen=True, kw_only=True):
    """The envelope with its payload still undecoded: reads the header of an unknown event type."""

    seq: int
    run_id: str
    env: int | None
    episode: int | None
    ts: int
    schema: int
    batch_end: bool
    event: msgspec.Raw
