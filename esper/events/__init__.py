"""The contracts: enums, event types, the envelope, the codec and the log file. No torch here."""

from esper.events.catalogue import *  # noqa: F401,F403
from esper.events.catalogue import EVENT_TYPES, RUN_SCOPED, AnyEvent, Event
from esper.events.codec import UnknownEventType, decode_record, encode_record
from esper.events.enums import Gate, Stage
from esper.events.envelope import LOG_FORMAT, SCHEMA_VERSION, RawRecord, Record
