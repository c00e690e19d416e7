"""Encoding and decoding of records and payloads, msgpack for the log and JSON for export."""

import hashlib
import re
from typing import Any

import msgspec

from esper.events.catalogue import AnyEvent, Event
from esper.events.envelope import RawRecord, Record


class UnknownEventType(Exception):
    """A record whose payload tag this version of esper does not know."""

    def __init__(self, seq: int, offset: int | None, type_: str, record_schema: int, supported: int):
        self.seq, self.offset, self.type, self.record_schema = seq, offset, type_, record_schema
        from esper import __version__

        where = f"seq {seq}" + (f" (offset {offset})" if offset is not None else "")
        shown = re.sub(r"[\x00-\x1f\x7f\x85\u2028\u2029]", lambda m: ascii(m.group())[1:-1], type_)  # one line
        super().__init__(
            f"event type {shown} at {where} is not known to esper {__version__} "
            f"(log schema {record_schema}, supported <= {supported}); upgrade esper"
        )


_encoder = msgspec.msgpack.Encoder()
_sorted_encoder = msgspec.msgpack.Encoder(order="sorted")
_record_decoder = msgspec.msgpack.Decoder(Record)
_raw_decoder = msgspec.msgpack.Decoder(RawRecord)
_tag_decoder = msgspec.msgpack.Decoder(dict[str, Any])
_json_encoder = msgspec.json.Encoder()
_json_record_decoder = msgspec.json.Decoder(Record)
_event_decoder = msgspec.msgpack.Decoder(AnyEvent)


def encode_record(record: Record) -> bytes:
    return _encoder.encode(record)


def decode_record(data: bytes | memoryview, offset: int | None = None) -> Record:
    """Decode one record; an unknown payload tag becomes `UnknownEventType`, anything else malformed
    stays a `msgspec.DecodeError`/`ValidationError` for the caller to classify."""
    try:
        return _record_decoder.decode(data)
    except UnicodeDecodeError as exc:  # msgspec lets invalid UTF-8 in a string through as this
        raise msgspec.DecodeError(f"invalid UTF-8 in a string: {exc}") from None
    except msgspec.ValidationError:
        from esper.events.envelope import SCHEMA_VERSION
        from esper.events.catalogue import EVENT_TYPES

        try:
            raw = _raw_decoder.decode(data)
            tag = _tag_decoder.decode(raw.event).get("type")
        except UnicodeDecodeError as exc:  # in the payload, where the typed decode did not look
            raise msgspec.DecodeError(f"invalid UTF-8 in a string: {exc}") from None
        known = {cls.__struct_config__.tag for cls in EVENT_TYPES}
        if isinstance(tag, str) and tag not in known:
            raise UnknownEventType(raw.seq, offset, tag, raw.schema, SCHEMA_VERSION) from None
        raise


def decode_envelope(data: bytes | memoryview) -> RawRecord:
    try:
        return _raw_decoder.decode(data)
    except UnicodeDecodeError as exc:
        raise msgspec.DecodeError(f"invalid UTF-8 in a string: {exc}") from None


def encode_event(event: Event) -> bytes:
    return _encoder.encode(event)


def decode_event(data: bytes) -> Event:
    return _event_decoder.decode(data)


def record_to_json(record: Record) -> bytes:
    """JSON has no NaN or infinity: msgspec writes non-finite floats as null (documented loss)."""
    return _json_encoder.encode(record)


def record_from_json(line: bytes | str) -> Record:
    return _json_record_decoder.decode(line)


def canonical_bytes(value: Any) -> bytes:
    """Msgpack with sorted keys: the same value always gives the same bytes."""
    return _sorted_encoder.encode(value)


def digest(value: Any) -> str:
    return hashlib.sha256(canonical_bytes(value)).hexdigest()


def stable_payload(record: Record) -> bytes:
    """What determinism compares: the envelope minus `ts`/`run_id`, the payload minus its volatile
    fields, as msgpack bytes (so floats must match bit for bit)."""
    event = record.event
    payload = {
        f: getattr(event, f) for f in event.__struct_fields__ if f not in type(event).VOLATILE
    }
    payload["type"] = event.__struct_config__.tag
    return canonical_bytes(
        (record.seq, record.env, record.episode, record.batch_end, payload)
    )
