"""Payload-stream comparison (events §10), shared by `replay --rerun` and `fork`.

Two records are the same when their stable payloads are: seq, env, episode, batch_end and the
payload minus its volatile fields, as msgpack bytes, so floats match bit for bit. A divergence
names the first differing field path, both values, both records and the three records before it.
"""

import math
from typing import Any, Sequence

import attrs
import msgspec

from esper.events import catalogue as ev
from esper.events.codec import decode_record, encode_record, stable_payload
from esper.events.envelope import Record

# Compared apart: a rerun warns when these differ, since determinism is promised only within them.
VERSION_FIELDS = frozenset({"esper_version", "torch_version", "python_version", "msgspec_version"})


def as_stored(record: Record) -> Record:
    """A freshly stamped record as a reader would give it back (ints in float fields become floats)."""
    return decode_record(encode_record(record))


def stable_dict(record: Record | None, ignore: frozenset[str] = frozenset()) -> dict[str, Any] | None:
    """The compared part of a record as plain data."""
    if record is None:
        return None
    event = record.event
    payload = {f: getattr(event, f) for f in event.__struct_fields__
               if f not in type(event).VOLATILE and f not in ignore}
    return {"seq": record.seq, "env": record.env, "episode": record.episode, "batch_end": record.batch_end,
            "type": event.__struct_config__.tag, "event": msgspec.to_builtins(payload)}


def same(recorded: Record, new: Record) -> bool:
    if isinstance(recorded.event, ev.RunStarted):
        return first_path(stable_dict(recorded, VERSION_FIELDS), stable_dict(new, VERSION_FIELDS)) is None
    return stable_payload(recorded) == stable_payload(new)


def first_path(a: Any, b: Any, path: str = "") -> str | None:
    """The first path at which two plain values differ (NaN equals NaN); None if they are equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if key not in a or key not in b:
                return f"{path}.{key}" if path else str(key)
            found = first_path(a[key], b[key], f"{path}.{key}" if path else str(key))
            if found is not None:
                return found
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b)):
            found = first_path(x, y, f"{path}[{i}]")
            if found is not None:
                return found
        return None if len(a) == len(b) else f"{path}[{min(len(a), len(b))}]"
    if isinstance(a, float) and isinstance(b, float):
        if (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b)):
            return None
        return path or "."
    if type(a) is not type(b) or a != b:
        return path or "."
    return None


def value_at(data: Any, path: str) -> Any:
    """The value at a path `first_path` returned (None where it is missing)."""
    if data is None:
        return None
    node = data
    for part in path.replace("[", ".[").split("."):
        if not part:
            continue
        try:
            node = node[int(part[1:-1])] if part.startswith("[") else node[part]
        except (KeyError, IndexError, TypeError, ValueError):
            return None
    return node


@attrs.frozen
class Divergence:
    seq: int
    type: str
    path: str
    recorded_value: Any
    new_value: Any
    recorded: dict[str, Any] | None
    new: dict[str, Any] | None
    preceding: tuple[dict[str, Any], ...]

    def describe(self) -> str:
        new_type = self.new["type"] if self.new else "nothing"
        lines = [
            f"divergence at seq {self.seq} ({self.type}; new {new_type}): {self.path}: "
            f"recorded {self.recorded_value!r}, new {self.new_value!r}",
            f"  recorded: {_line(self.recorded)}",
            f"  new:      {_line(self.new)}",
        ]
        if self.preceding:
            lines.append("  preceded by:")
            lines += [f"    {_line(p)}" for p in self.preceding]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "type": self.type, "path": self.path, "recorded_value": self.recorded_value,
                "new_value": self.new_value, "recorded": self.recorded, "new": self.new,
                "preceding": list(self.preceding)}


def _line(data: dict[str, Any] | None) -> str:
    if data is None:
        return "(no record)"
    return msgspec.json.encode(data).decode()


def divergence(recorded: Sequence[Record], index: int, new: Record | None) -> Divergence:
    """Describe how `new` differs from `recorded[index]`."""
    old = recorded[index]
    ignore = VERSION_FIELDS if isinstance(old.event, ev.RunStarted) else frozenset()
    a, b = stable_dict(old, ignore), stable_dict(new, ignore)
    path = first_path(a, b) if b is not None else "."
    path = path or "."
    return Divergence(
        seq=old.seq, type=a["type"], path=path, recorded_value=value_at(a, path),
        new_value=value_at(b, path), recorded=a, new=b,
        preceding=tuple(stable_dict(r) for r in recorded[max(0, index - 3):index]),
    )


def first_divergence(recorded: Sequence[Record], new: Sequence[Record]) -> Divergence | None:
    """Compare record by record through the last recorded one; extra new records are not compared."""
    for i, old in enumerate(recorded):
        other = new[i] if i < len(new) else None
        if other is None or not same(old, other):
            return divergence(recorded, i, other)
    return None
